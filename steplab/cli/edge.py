"""Edge verbs: `steplab quantize RUN --scheme int8|int4 --out Q` and `steplab export gguf RUN OUT.gguf --type ...`."""
from __future__ import annotations

import argparse


def _export_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `export` verb's <format> subparsers (created by cli/interop.py, or here when it is absent)."""
    if "export" not in sub.choices:
        export = sub.add_parser("export", help="export a run to another format").add_subparsers(dest="export_verb", metavar="<format>")
        export.required = True
        return export
    return next(a for a in sub.choices["export"]._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="int8/int4 weight-only copy of a run (CPU decoding; sample/eval/serve load it)")
    p.add_argument("run")
    p.add_argument("--scheme", required=True, choices=["int8", "int4"])
    p.add_argument("--group", type=int, default=32, choices=[32, 64, 128], help="int4: weights per scale/zero (default 32)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)

    p = _export_subparsers(sub).add_parser("gguf", help="GGUF file for llama.cpp tooling (llama architecture, tokenizer embedded)")
    p.add_argument("run")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"], help="weight type (default f16)")
    p.add_argument("--checkpoint", help="a specific checkpoint directory (default: the latest)")
    p.add_argument("--verify", type=int, default=0, metavar="BATCHES",
                   help="read the file back, run our forward on BATCHES validation batches, compare perplexity")
    p.set_defaults(func=cmd_export_gguf)


def cmd_quantize(args) -> int:
    from steplab.infer.quant import QuantConfig, quantize_run

    info = quantize_run(args.run, args.out, QuantConfig(args.scheme, args.group), force=args.force)
    group = f", group {args.group}" if args.scheme == "int4" else ""
    print(f"wrote {args.out}: {args.scheme}{group}, {info['bytes'] / 1e6:.2f} MB = {info['ratio_vs_fp32']:.3f}x fp32; "
          f"`steplab sample/eval/serve {args.out}` load it")
    return 0


def cmd_export_gguf(args) -> int:
    from steplab.export.gguf import export_gguf, verify_gguf

    info = export_gguf(args.run, args.out, args.type, checkpoint=args.checkpoint)
    print(f"wrote {args.out}: {args.type}, {info['tensors']} tensors, {info['bytes'] / 1e6:.2f} MB")
    if args.verify:
        v = verify_gguf(args.run, args.out, batches=args.verify, checkpoint=args.checkpoint)
        print(f"verify: perplexity read back {v['ppl_file']:.4f} vs in-memory {args.type} {v['ppl_memory']:.4f} "
              f"({v['rel_diff']:+.5%}); fp32 {v['ppl_fp32']:.4f}")
    return 0
