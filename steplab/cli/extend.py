"""`steplab extend RUN --factor 4 --method yarn --steps N --out runs/long`, and the long-context options of
`steplab eval` (``--task passkey --lengths ... --depths ...``, perplexity by position bucket)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extend", help="extend a run's context: scaled RoPE + continued training on long documents")
    p.add_argument("run", help="the trained run to extend")
    p.add_argument("--factor", type=float, required=True, help="context growth s over the trained length")
    p.add_argument("--method", required=True, choices=["yarn", "pi", "ntk", "llama3"],
                   help="yarn | pi (linear position interpolation) | ntk (dynamic NTK) | llama3")
    p.add_argument("--steps", type=int, required=True, help="continued-training steps")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--seq-len", type=int, help="training length (default: factor x the trained length)")
    p.add_argument("--data", help="prepared dataset to draw long documents from (default: the run's own)")
    p.add_argument("--min-doc-tokens", type=int, help="only documents at least this long (default: half the training length)")
    p.add_argument("--passkey-fraction", type=float, default=0.0, help="share of rows that are passkey documents (default 0)")
    p.add_argument("--passkey-min-length", type=int, default=0, help="pack passkey rows with documents of mixed "
                   "lengths from this many tokens up to the row (e.g. the trained length; default 0: one document per row)")
    p.add_argument("--max-tokens", type=float, help="cap on the long dataset's training tokens")
    p.add_argument("--lr", type=float, help="override the derived peak learning rate")
    p.add_argument("--batch-size", type=int, help="override the derived rows per step")
    p.add_argument("--beta-fast", type=float, help="yarn: pairs rotating at least this often over the trained length keep "
                   "their frequency (default 32, the paper's value for Llama's 4k context; ~2 suits contexts of a few hundred)")
    p.add_argument("--beta-slow", type=float, help="yarn: pairs rotating at most this often are interpolated (default 1)")
    p.add_argument("--pose", action="store_true", help="PoSE: rows shorter than the new context (--seq-len) get position "
                   "ids that skip ahead to span all of it, so training sees its longest distances (Zhu et al., ICLR 2024)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the derived config, e.g. "
                   "--set train.ckpt_every=25")
    p.add_argument("--memory", default="4,8,16", help="measure peak training memory at these multiples of the trained "
                   "length ('' to skip)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted extension in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extend)


def cmd_extend(args) -> int:
    from steplab.config import RunConfig
    from steplab.law.hparams import step_law_batch_tokens, step_law_lr
    from steplab.models import count_params
    from steplab.train.extend import build_long_dataset, extension_plan, measure_peak_memory
    from steplab.train.trainer import train

    base = RunConfig.from_dict(json.loads((Path(args.run) / "config.json").read_text())) if (Path(args.run) / "config.json").is_file() else None
    out = Path(args.out)
    data = out.parent / f"{out.name}.data"
    seq_len = args.seq_len or (int(round(base.model.max_seq_len * args.factor)) if base else 0)
    if not (args.resume and data.is_dir()) and base is not None:
        meta = build_long_dataset(args.data or base.data.path, data, seq_len, passkey_fraction=args.passkey_fraction,
                                  min_doc_tokens=args.min_doc_tokens if args.min_doc_tokens is not None else seq_len // 2,
                                  max_tokens=int(args.max_tokens) if args.max_tokens else None,
                                  passkey_min_length=args.passkey_min_length)
        print(f"long data: {meta['corpus_rows']:,} corpus rows of {seq_len} tokens from {meta['long_documents']:,} documents "
              f"+ {meta['passkey_rows']:,} passkey rows -> {data}")
    plan = extension_plan(args.run, factor=args.factor, method=args.method, steps=args.steps, data_path=str(data),
                          seq_len=seq_len, lr=args.lr, batch_size=args.batch_size, beta_fast=args.beta_fast,
                          beta_slow=args.beta_slow, pose=args.pose)
    cfg = plan.cfg
    if args.set:
        from steplab.config import _deep_update, parse_overrides

        cfg = RunConfig.from_dict(_deep_update(cfg.to_dict(), parse_overrides(args.set))).validate()
        plan.reasoning.append(f"overrides: {' '.join(args.set)}")
    cfg.model.vocab_size = base.model.vocab_size
    N, D = count_params(cfg.model)["N"], base.train.max_steps * base.tokens_per_step + args.steps * cfg.tokens_per_step
    for line in plan.reasoning:
        print(f"  {line}")
    print(f"  for reference, Step Law at N={N:,}, D={D:,}: lr {step_law_lr(N, D):.3g}, batch {step_law_batch_tokens(D):,.0f} "
          "tokens (fitted on models of 60M+ parameters; the base run's own choices are the better guide this small)")
    multiples = [float(m) for m in args.memory.split(",") if m.strip()]
    if multiples:
        L = cfg.model.rope.original_max_seq_len
        lengths = [int(L * m) for m in multiples]
        causal, packed = measure_peak_memory(cfg.model, lengths), measure_peak_memory(cfg.model, lengths, docs=4)
        print("  peak memory of one training step (batch 1; causal | 4 packed documents with the document mask):")
        for m, length in zip(multiples, lengths):
            print(f"    {m:g}x = {length:>6} tokens: {causal[length]['bytes'] / 2**20:8.1f} MiB | "
                  f"{packed[length]['bytes'] / 2**20:8.1f} MiB ({causal[length]['where']})")
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"val loss {summary['val_loss']:.4f} at {seq_len} tokens, {summary['tok_per_s']:,.0f} tok/s -> {out}")
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Long-context options for `steplab eval` (added beside whatever --task the eval verb has)."""
    if "--task" not in p._option_string_actions:
        p.add_argument("--task", action="append", default=[], help="passkey (long-context retrieval)")
    p.add_argument("--lengths", default="", help="passkey/perplexity lengths in tokens, e.g. 128,256,512 (default: 1x,2x,4x the context)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths in 0..1")
    p.add_argument("--keys", type=int, default=20, help="passkey examples per (length, depth) cell")
    p.add_argument("--report", help="directory for passkey.png and longctx.json (default: RUN/eval)")


def wants_passkey(args) -> bool:
    task = getattr(args, "task", None)
    return "passkey" in (task if isinstance(task, list) else [task])


def cmd_eval_passkey(args) -> int:
    from steplab.data.prepare import load_prepared
    from steplab.errors import ConfigError
    from steplab.eval.longctx import passkey_grid, perplexity_by_position, plot_heatmap
    from steplab.train.checkpoint import load_run
    from steplab.train.trainer import resolve_device
    from steplab.utils import atomic_write_json

    device = resolve_device("auto")
    cfg, model, tokenizer, step = load_run(args.run, device=device, checkpoint=args.checkpoint)
    try:
        L = cfg.model.max_seq_len
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()] or [L // 4, L // 2, L, 2 * L]
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths/--depths expect comma-separated numbers, got {args.lengths!r} / {args.depths!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths) or any(n <= 0 for n in lengths):
        raise ConfigError("--depths must be in 0..1 and --lengths positive")
    grid = passkey_grid(cfg.model, model, tokenizer, lengths, depths, n=args.keys, device=device)
    _, _, val, _ = load_prepared(args.data or cfg.data.path)
    ppl = {}
    for length in lengths:
        try:
            ppl[length] = perplexity_by_position(cfg.model, model, val, tokenizer.bos_id, length, device=device)
        except ValueError as e:
            print(f"perplexity at {length}: skipped ({e})")
    report = Path(args.report or Path(args.run) / "eval")
    png = plot_heatmap(grid, report / "passkey.png", title=f"{Path(args.run).name} step {step}: passkey exact match")
    atomic_write_json(report / "longctx.json", {"run": str(args.run), "step": step, "passkey": grid, "perplexity": ppl})
    print(f"passkey exact match ({args.keys} held-out keys per cell, chance {grid['chance']:.0e}):")
    print("  depth  " + "".join(f"{L:>8}" for L in lengths))
    for d in depths:
        print(f"  {d:5.2f}  " + "".join(f"{grid['accuracy'][L][d]:8.0%}" for L in lengths))
    print("  mean   " + "".join(f"{grid['mean'][L]:8.0%}" for L in lengths))
    for length, r in ppl.items():
        buckets = ", ".join(f"{k}: {v:.2f}" for k, v in r["buckets"].items())
        print(f"perplexity at {length} ({r['documents']} held-out documents): {r['ppl']:.3f}; by position: {buckets}")
    print(f"wrote {png} and {report / 'longctx.json'}")
    return 0
