"""`steplab sft`: fine-tune a base run on conversations (loss on assistant tokens) through the one trainer."""
from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations: a chat model from a base run",
                       description="Conversations (OpenAI messages) from --data are rendered with the one chat "
                                   "template, packed into rows, and trained with loss on assistant tokens only.")
    p.add_argument("--from", dest="base", required=True, metavar="RUN", help="the base run to start from")
    p.add_argument("--data", default="builtin",
                   help="builtin (the chat tasks, no download) | FILE.jsonl | FILE.parquet | hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--out", required=True, help="run directory of the chat model")
    p.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    p.add_argument("--no-mask", action="store_true", help="train on every token, prompts included (the ablation)")
    p.add_argument("--mix", metavar="DATASET", help="a prepared pretraining dataset mixed into every batch")
    p.add_argument("--mix-fraction", type=float, default=0.25, help="share of each batch from --mix (default 0.25)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad data rows (counted) instead of stopping")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set train.lr=5e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sft)


def cmd_sft(args) -> int:
    from steplab.train.sft import sft_config
    from steplab.train.trainer import train

    overrides = list(args.set)
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.mix:
        overrides += [f"data.chat.mix_path={args.mix}", f"data.chat.mix_fraction={args.mix_fraction}"]
    if args.skip_bad:
        overrides.append("data.chat.skip_bad=true")
    cfg = sft_config(args.base, args.data, overrides, mask=not args.no_mask)
    t0 = time.time()
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"assistant-token val loss {summary['val_loss']:.4f}, {summary['tok_per_s']:,.0f} tok/s, "
          f"wall {time.time() - t0:.1f} s -> {args.out}")
    print(f"next: steplab eval {args.out} --task add2 --task spelling --task letter_count --task recall; "
          f"steplab chat {args.out}")
    return 0
