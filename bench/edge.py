"""Edge footprint table: fp32, bf16, int8, int4 (and GGUF q8_0/q4_0 read back) of one run, in one command.

    python bench/edge.py RUN [--group 32] [--batches 4] [--prompt 128] [--decode 32] [--rounds 3] [--out /tmp/edge] [--llama-cpp]

Columns: file size (and x fp32), resident memory while decoding (a fresh subprocess per variant loads the model
and decodes; VmRSS read right after, and the same process's RSS before loading subtracted as "model RSS"),
batch-1 decode tokens/s (KV cache) and prompt-processing tokens/s, perplexity on the run's validation windows
(the same windows for every variant). Speeds are measured side by side in this process, the variants
interleaved round by round, medians reported, and given as a ratio to bf16.

Compute dtypes: fp32 weights and activations; bf16 weights and activations (no autocast); int8/int4 weights
with fp32 activations (the kernels widen weights inside the GEMM). GGUF rows: the file written by
`steplab export gguf`, read back with GGUFReader and dequantized into our fp32 forward; with ``--llama-cpp``
each file also runs in llama.cpp (llama-cpp-python): perplexity on the same windows and greedy tokens, next to
ours on the same file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from steplab.infer.quant import QuantConfig, quantize_run, release_freed_memory  # noqa: E402
from steplab.models.common import KVCache  # noqa: E402
from steplab.train.checkpoint import latest_checkpoint, load_run  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_variant(name: str, path: str):
    cfg, model, tok, _ = load_run(path)
    if name == "bf16":
        model = model.to(torch.bfloat16)
    return cfg, model, tok


def prompt_ids(cfg, n: int) -> torch.Tensor:
    from steplab.data.loader import iter_eval_batches
    from steplab.data.prepare import load_prepared

    _, _, val, _ = load_prepared(cfg.data.path)
    x, _ = next(iter_eval_batches(val, max(n, 8), 1, max_batches=1))
    return x[:, :n]


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) at batch 1, greedy, KV cache."""
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, prompt.shape[1] + n_new + 1, dtype=dtype)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    t1 = time.perf_counter()
    for _ in range(n_new):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
    t2 = time.perf_counter()
    return prompt.shape[1] / (t1 - t0), n_new / (t2 - t1)


def perplexity(model, cfg, batches: int) -> float:
    from steplab.data.loader import iter_eval_batches
    from steplab.data.prepare import load_prepared
    from steplab.eval.evaluate import evaluate, token_byte_lengths

    tok, _, val, _ = load_prepared(cfg.data.path)
    data = iter_eval_batches(val, cfg.data.seq_len, cfg.train.batch_size, max_batches=batches)
    # dtype="fp32": no autocast; a bf16 model computes in bf16 (its RMSNorms in fp32) because its weights are bf16
    return math.exp(evaluate(model, data, token_byte_lengths(tok), dtype="fp32")["val_loss"])


def rss_child(name: str, path: str, prompt: int, decode: int) -> None:
    """Subprocess body: RSS before loading, then after loading and decoding (printed as JSON)."""
    torch.set_num_threads(int(os.environ.get("EDGE_THREADS", "2")))
    base = rss_mb()
    cfg, model, _ = load_variant(name, path)
    release_freed_memory()  # every variant alike: the fp32 init / fp32 copy of bf16 is not counted
    decode_speed(model, prompt_ids(cfg, prompt), decode)
    print(json.dumps({"base": base, "rss": rss_mb()}))


def llama_cpp_check(run: str, path: Path, cfg, batches: int, prompt: torch.Tensor, decode: int, threads: int) -> dict:
    """The GGUF file in llama.cpp (llama-cpp-python) next to our forward on the same file's dequantized weights:
    perplexity on the same validation windows, and greedy tokens from the same prompt (matching prefix length).
    llama.cpp also quantizes activations (q8_0/q4_0 dot products take q8 activations), so small differences are
    expected; a layout or tokenizer error would show as a large one."""
    import llama_cpp
    import numpy as np

    from steplab.data.loader import iter_eval_batches
    from steplab.data.prepare import load_prepared
    from steplab.export.gguf import read_gguf, steplab_state
    from steplab.infer.sampling import SamplingParams, generate
    from steplab.models import build_model

    ours = build_model(cfg.model).eval()
    ours.load_state_dict(steplab_state(read_gguf(path)[0], cfg.model), strict=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.data.seq_len, logits_all=True, n_threads=threads,
                          verbose=False)
    _, _, val, _ = load_prepared(cfg.data.path)
    nll = {"llama.cpp": 0.0, "ours": 0.0}
    count = 0
    for x, y in iter_eval_batches(val, cfg.data.seq_len, cfg.train.batch_size, max_batches=batches):
        with torch.no_grad():
            logp_ours = torch.log_softmax(ours(x).float(), dim=-1)
        for row in range(x.shape[0]):
            llm.reset()
            llm.eval(x[row].tolist())
            logits = torch.from_numpy(np.asarray(llm.scores[: x.shape[1]], dtype=np.float32))
            logp = torch.log_softmax(logits, dim=-1)
            nll["llama.cpp"] -= logp.gather(1, y[row][:, None]).sum().item()
            nll["ours"] -= logp_ours[row].gather(1, y[row][:, None]).sum().item()
            count += y.shape[1]
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    ids = prompt[0].tolist()
    mine = generate(ours, [ids], SamplingParams(max_new_tokens=decode, temperature=0.0))[0]
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == decode:
            break
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    return {"ppl_llama_cpp": ppl["llama.cpp"], "ppl_ours": ppl["ours"], "greedy_same_prefix": same, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--group", type=int, default=32, help="int4 group size (32, 64 or 128)")
    ap.add_argument("--batches", type=int, default=4, help="validation batches for perplexity")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/edge", help="where the quantized runs and GGUF files are written")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true", help="also run each GGUF file (and an f16 one) in llama.cpp "
                    "(llama-cpp-python), each in a subprocess")
    ap.add_argument("--llama-child", nargs=1, metavar="GGUF", help=argparse.SUPPRESS)
    ap.add_argument("--rss-child", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(*args.rss_child, args.prompt, args.decode)
    if args.llama_child:
        cfg, _, _, _ = load_run(args.run)
        res = llama_cpp_check(args.run, Path(args.llama_child[0]), cfg, args.batches, prompt_ids(cfg, args.prompt),
                              args.decode, args.threads)
        return print(json.dumps(res))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_file = latest_checkpoint(args.run) / "model.safetensors"
    variants = {"fp32": args.run, "bf16": args.run}
    files = {"fp32": fp32_file.stat().st_size}
    cfg, model, _, _ = load_run(args.run)
    bf16_file = out / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
               if not (cfg.model.tie_embeddings and k == "lm_head.weight")}, str(bf16_file))
    files["bf16"] = bf16_file.stat().st_size
    for scheme, group in (("int8", 0), ("int4", args.group)):
        name = scheme if scheme == "int8" else f"int4-g{group}"
        info = quantize_run(args.run, out / name, QuantConfig(scheme, group or 32), force=True)
        variants[name], files[name] = str(out / name), info["bytes"]

    models = {name: load_variant(name, path)[1] for name, path in variants.items()}
    prompt = prompt_ids(cfg, args.prompt)
    speeds: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
    for n, m in models.items():  # warm-up (oneDNN builds kernels per shape on first use)
        decode_speed(m, prompt[:, :8], 2)
    for _ in range(args.rounds):
        for n, m in models.items():
            speeds[n].append(decode_speed(m, prompt, args.decode))
    ppl = {n: perplexity(m, cfg, args.batches) for n, m in models.items()}
    rss = {}
    for n, path in variants.items():
        res = subprocess.run([sys.executable, __file__, args.run, "--rss-child", n, path, "--prompt", str(args.prompt),
                              "--decode", str(args.decode)], capture_output=True, text=True,
                             env={**os.environ, "EDGE_THREADS": str(args.threads)})
        rss[n] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"base": math.nan, "rss": math.nan}

    gguf_rows = {}
    if not args.no_gguf:
        from steplab.export.gguf import export_gguf, verify_gguf

        for kind in ("f16", "q8_0", "q4_0") if args.llama_cpp else ("q8_0", "q4_0"):
            path = out / f"model-{kind}.gguf"
            size = export_gguf(args.run, path, kind)["bytes"]
            v = verify_gguf(args.run, path, batches=args.batches, ppl_fp32=ppl["fp32"])
            gguf_rows[f"gguf {kind}"] = (size, v)
            if args.llama_cpp:  # a subprocess: a llama.cpp build can die on this CPU (SIGILL, docs/benchmarks.md)
                res = subprocess.run([sys.executable, __file__, args.run, "--llama-child", str(path), "--batches",
                                      str(args.batches), "--prompt", str(args.prompt), "--decode", str(args.decode),
                                      "--threads", str(args.threads)], capture_output=True, text=True)
                v["llama_cpp"] = (json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else
                                  {"error": f"exit status {res.returncode}" + (f" (signal {-res.returncode})"
                                                                               if res.returncode < 0 else "")})

    bf16_dec = statistics.median(s[1] for s in speeds["bf16"])
    print(f"run {args.run}: {sum(p.numel() for p in model.state_dict().values()) / 1e6:.1f}M parameters, "
          f"{args.threads} threads, prompt {args.prompt}, decode {args.decode} tokens x {args.rounds} rounds, "
          f"perplexity on {args.batches} x {cfg.train.batch_size} x {cfg.data.seq_len} val tokens")
    print("| variant | file MB | x fp32 | RSS MB (model) | decode tok/s | x bf16 | prompt tok/s | perplexity | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in models:
        dec = statistics.median(s[1] for s in speeds[n])
        pre = statistics.median(s[0] for s in speeds[n])
        r = rss[n]
        print(f"| {n} | {files[n] / 1e6:.2f} | {files[n] / files['fp32']:.3f} | {r['rss']:.0f} ({r['rss'] - r['base']:.0f}) | "
              f"{dec:.1f} | {dec / bf16_dec:.2f} | {pre:.0f} | {ppl[n]:.4f} | {ppl[n] / ppl['fp32'] - 1:+.2%} |")
    for n, (size, v) in gguf_rows.items():
        print(f"| {n} (read back) | {size / 1e6:.2f} | {size / files['fp32']:.3f} | - | - | - | - | {v['ppl_file']:.4f} | "
              f"{v['ppl_file'] / ppl['fp32'] - 1:+.2%} (vs in-memory {v['rel_diff']:+.4%}) |")
    for n, (_, v) in gguf_rows.items():
        c = v.get("llama_cpp")
        if c and "error" in c:
            print(f"{n} in llama.cpp: failed, {c['error']}")
        elif c:
            print(f"{n} in llama.cpp: perplexity {c['ppl_llama_cpp']:.4f} vs ours on the same file {c['ppl_ours']:.4f} "
                  f"({c['ppl_llama_cpp'] / c['ppl_ours'] - 1:+.3%}); greedy tokens identical for the first "
                  f"{c['greedy_same_prefix']} of {c['decode']}")


if __name__ == "__main__":
    main()
