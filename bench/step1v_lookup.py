"""Step-1V: how fast the decoder learns its image lookups, per question type (the issue-19 ablations).

    python bench/step1v_lookup.py shape,colour,position --steps 1000 [--lr 5e-4] [--batch 32] \
        [--set model.vision.image_place=end --set model.vision.slot_loss=1.0]

Trains step1v-nano (with the given overrides) from scratch, one thread, on a mixture of the named example kinds
(``kind:weight`` weighs one), and every ``--every`` steps prints the teacher-forced exact match per type on
held-out scenes (= greedy decoding's exact match, models/vision.py). Linear warmup over 50 steps, then a
constant lr: it measures *when* a lookup is learned, not a final accuracy (``steplab train`` does that).
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kinds", help="comma-separated example kinds, e.g. shape,colour:3,position,caption,digits")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--held-out", type=int, default=384)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from steplab.config import resolve
    from steplab.data import images as I
    from steplab.data.tokenizer import Tokenizer
    from steplab.models.vision import Step1V
    from steplab.train.optim import build_optimizer

    I.MIXTURES["bench"] = tuple((k.split(":")[0], float(k.split(":")[1]) if ":" in k else 1.0) for k in args.kinds.split(","))
    tok = Tokenizer.load(I.build_tokenizer())
    cfg = resolve("step1v-nano", overrides=args.set)
    cfg.model.vocab_size = tok.vocab_size
    v, seq = cfg.model.vision, cfg.data.seq_len
    print(f"vision: image_place={v.image_place} slot_loss={v.slot_loss}; lr {args.lr}, batch {args.batch}", flush=True)
    torch.manual_seed(0)
    model = Step1V(cfg.model)
    opt = build_optimizer(model, cfg.train, "cpu")
    held = I.held_out_samples(args.held_out, "bench")

    def evaluate() -> dict[str, float]:
        model.eval()
        hits: dict[str, list[bool]] = {}
        with torch.no_grad():
            for i in range(0, len(held), 64):
                rows = held[i:i + 64]
                idx, tg, im, _ = I.collate(tok, rows, v.n_tokens, seq, v.image_place)
                ok = ((model(idx, None, im).argmax(-1) == tg) | (tg == -100)).all(1)
                for s, o in zip(rows, ok.tolist()):
                    hits.setdefault(s.qtype, []).append(o)
        model.train()
        return {k: round(sum(h) / len(h), 3) for k, h in sorted(hits.items())}

    t0, pos = time.time(), 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50) * g.get("lr_mult", 1.0)
        rows = [I.sample(random.Random(f"0/{pos + i}"), "bench", "train") for i in range(args.batch)]
        pos += args.batch
        idx, tg, im, st = I.collate(tok, rows, v.n_tokens, seq, v.image_place)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, tg, im, st)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            print(step + 1, f"loss {loss.item():.3f}", evaluate(), f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
