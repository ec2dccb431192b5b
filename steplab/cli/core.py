"""Core verbs: quickstart, data prepare, tokenizer train, train, sample (eval: cli/evaluate.py)."""
from __future__ import annotations

import argparse
import json
import time

# Inference dtype of sample/chat/serve (weights and KV cache). auto = bf16 where the device multiplies bf16 natively
# (train/precision.py), by measurement: on an AMX-BF16 CPU KV-cached decoding of step1-mini ran 1.09x (batch 1) and
# 1.50x (batch 8) the fp32 speed (bench/decode_dtype.py, docs/benchmarks.md "issue 10"), while an AVX2-only CPU
# emulates bf16 matmuls ~70x slower than fp32. Pass --dtype fp32 for bit-exact comparisons (the KV cache equals
# recomputation exactly only in fp32).
DTYPES = ("auto", "bf16", "fp32")
DEFAULT_DTYPE = "auto"


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="weights and KV cache dtype for inference (default auto: bf16 where the device has native bf16 "
                        "matmuls, else fp32; see docs/serving.md)")


def inference_dtype(name: str, device) -> str:
    """``--dtype`` resolved for ``device``: auto -> bf16 | fp32 (``steplab.train.precision.native_bf16``)."""
    if name != "auto":
        return name
    import torch

    from steplab.train.precision import native_bf16
    return "bf16" if native_bf16(torch.device(device).type) else "fp32"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: corpus -> tokenizer -> shards -> train -> eval -> samples")
    p.add_argument("--out", help="output directory (default: runs/quickstart, or runs/quickstart-moe with --moe)")
    p.add_argument("--budget", type=float, default=1.0, help="scale the training work (1.0: the full quickstart; docs/benchmarks.md has its wall time)")
    p.add_argument("--moe", action="store_true",
                   help="sweep, fit (in active N) and train Step-2 MoE models instead of dense ones")
    p.add_argument("--source", default="stdlib", help="corpus (default: the Python standard library sources)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, every sweep run and the planned run")
    p.add_argument("--workers", type=int, help="sweep processes (default: one per usable core)")
    p.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_verb", metavar="<data-verb>")
    data.required = True
    p = data.add_parser("prepare", help="source -> tokenizer + train/val token shards")
    _source_args(p)
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--tokenizer", help="use this trained tokenizer directory instead of training one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing prepared dataset in --out")
    from steplab.cli.audio import add_prepare_args
    add_prepare_args(p)  # --speech-tokenizer: ASR + TTS token data from speech
    p.set_defaults(func=cmd_data_prepare)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_verb", metavar="<tokenizer-verb>")
    tok.required = True
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer (--audio: the speech tokenizer)")
    _source_args(p)
    p.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    from steplab.cli.audio import add_tokenizer_args
    add_tokenizer_args(p)
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--preset", help="e.g. step1-nano, step1-mini, step1-mini-8k")
    p.add_argument("--config", help="TOML or JSON config file")
    p.add_argument("--data", help="prepared dataset directory (sets data.path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set train.lr=1e-3")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the saved one (recorded in metrics and report)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: data parallel or FSDP2 sharding (default fsdp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix each step (for checking the KV cache)")
    p.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    p.add_argument("--out", help="video runs: write the clip here (.gif; .mp4 needs imageio-ffmpeg); -n > 1 numbers the files")
    p.add_argument("--steps", type=int, default=30, help="video: Euler steps of the flow sampler")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="video: classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=1.0, help="video: time shift of the sampler's timesteps")
    add_dtype_arg(p)
    p.set_defaults(func=cmd_sample)


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="stdlib | DIR | FILE.txt | FILE.jsonl | FILE.parquet | hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column / HF column with the text")
    p.add_argument("--max-bytes", type=float, help="stop reading after about this many bytes")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--skip-bad", action="store_true", help="skip binary or non-UTF-8 files with a warning instead of failing")


def cmd_quickstart(args) -> int:
    from steplab.quickstart import quickstart

    quickstart(out=args.out, budget=args.budget, source=args.source, device=args.device, resume=args.resume,
               moe=args.moe, seed=args.seed, workers=args.workers)
    return 0


def cmd_data_prepare(args) -> int:
    if args.speech_tokenizer:
        from steplab.cli.audio import cmd_prepare_speech
        return cmd_prepare_speech(args)
    from steplab.data.prepare import prepare_data

    meta = prepare_data(args.source, args.out, vocab_size=args.vocab_size, val_fraction=args.val_fraction, field=args.field,
                        max_bytes=int(args.max_bytes) if args.max_bytes else None, tokenizer_dir=args.tokenizer,
                        seed=args.seed, skip_bad=args.skip_bad, force=args.force)
    for split in ("train", "val"):
        s = meta[split]
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    print(f"wrote {args.out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    if args.audio:
        from steplab.cli.audio import cmd_tokenizer_train_audio
        return cmd_tokenizer_train_audio(args)
    from steplab.data.sources import iter_documents
    from steplab.data.tokenizer import train_tokenizer

    docs = iter_documents(args.source, field=args.field, max_bytes=int(args.max_bytes) if args.max_bytes else None, skip_bad=args.skip_bad)
    tok = train_tokenizer(docs, args.vocab_size, progress=True)
    tok.save(args.out)
    print(f"trained a byte-level BPE tokenizer with {tok.vocab_size:,} tokens; wrote {args.out}")
    return 0


def cmd_train(args) -> int:
    from steplab.config import resolve
    from steplab.train.trainer import train

    overrides = list(args.set) + ([f"data.path={args.data}"] if args.data else []) + ([f"train.parallel={args.parallel}"] if args.parallel else [])
    if args.resume and not args.preset and not args.config:
        from pathlib import Path

        saved = Path(args.out) / "config.json"
        if saved.is_file():
            args.config = str(saved)
    cfg = resolve(args.preset, args.config, overrides)
    t0 = time.time()
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet, allow_config_change=args.allow_config_change)
    others = "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("val_") and k not in ("val_loss", "val_bpb"))
    bpb = f", bits/byte {summary['val_bpb']:.4f}" if "val_bpb" in summary else ""  # text; other families: their own val_*
    print(f"val loss {summary['val_loss']:.4f}{bpb}{others}, "
          f"{summary['tok_per_s']:,.0f} tok/s, MFU {summary['mfu']:.1%}, wall {time.time() - t0:.1f} s -> {args.out}")
    return 0


def cmd_sample(args) -> int:
    from steplab.infer.video import is_video_run

    if args.out or is_video_run(args.run):
        return cmd_sample_video(args)
    from steplab.infer.prompts import torch_dtype
    from steplab.infer.sampling import SamplingParams, generate
    from steplab.train.checkpoint import load_run
    from steplab.train.trainer import resolve_device

    device = resolve_device("auto")
    cfg, model, tokenizer, _ = load_run(args.run, device=device)
    model = model.to(torch_dtype(inference_dtype(args.dtype, device)))
    prompt = [tokenizer.bos_id] + tokenizer.encode(args.prompt)  # plain text: marker strings stay text
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    outs = generate(model, [prompt] * args.num_samples, params, stop_ids={tokenizer.eos_id}, use_cache=not args.no_cache)
    if args.json:
        print(json.dumps([{"prompt_tokens": prompt, "tokens": o, "text": tokenizer.decode(o, skip_special=True)} for o in outs]))
        return 0
    for i, o in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(o, skip_special=True))
    return 0


def cmd_sample_video(args) -> int:
    """Text to video with a video-dit run: one clip per sample, written atomically."""
    from pathlib import Path

    from steplab.errors import ConfigError
    from steplab.infer.video import check_out_path, load_video_run, write_clip

    if not args.out:
        raise ConfigError(f"{args.run} is a video run: pass --out clip.gif (or .mp4)")
    check_out_path(args.out)
    if args.steps < 1 or args.num_samples < 1:
        raise ConfigError("--steps and -n must be at least 1")
    _, model = load_video_run(args.run)
    if not hasattr(model, "sample"):
        raise ConfigError(f"{args.run} is a video VAE run; sample from a video-dit run (trained on its latents)")
    out = Path(args.out)
    clips = model.sample([args.prompt] * args.num_samples, steps=args.steps, cfg_scale=args.cfg_scale,
                         shift=args.shift, seed=args.seed)
    for i, clip in enumerate(clips):
        path = out if args.num_samples == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        print(write_clip(clip, path))
    return 0
