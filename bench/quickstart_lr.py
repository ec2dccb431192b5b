"""The quickstart's lr rule, measured under the quickstart's own recipe (issue 12).

The quickstart evaluates its lr rule at the largest budget and trains every branch of a size with that one
peak lr (WSD: warm-up 5% of the largest budget, stable, decay 20% of each branch's tokens). This bench trains
sizes of the sweep's family at several multiples of the current rule's lr, as the same WSD branches, on a data
split of its own (``--seed``, default 7, which no quickstart default uses), and scores every run at the largest
budget twice: on the data split's own validation documents (what a quickstart sweep sees) and on a large
held-out set (the stdlib modules after the quickstart's corpus cap, ~240 files, which no run trains on), which is the
measurement the best lr is read from. Then: the best lr per size (vertex of a parabola in log lr through the
best point and its neighbours) and the least-squares power law lr = lr0 (N / 1.06e5)^a through those that lie
inside their grid.

    PYTHONPATH=. python bench/quickstart_lr.py --out /tmp/qs_lr --widths 24 48 96 --factors 0.33 0.55 1.0 1.6

Runs are cached under ``--out``; the table covers every run there (so calls with different widths or factors
add up; ``--widths`` with no value only prints the table).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from steplab import quickstart as qs
from steplab.data.loader import iter_eval_batches
from steplab.data.prepare import load_prepared, prepare_data
from steplab.data.sources import iter_documents
from steplab.eval.evaluate import evaluate, token_byte_lengths
from steplab.law.sweep import run_sweep
from steplab.train.checkpoint import load_run

HELDOUT_TOKENS = 230_400  # 100 batches of 9 x 256: ~35 of the held-out modules


def heldout_set(out: Path, tokenizer: Path, seed: int) -> Path:
    """The stdlib modules after the quickstart's corpus cap, tokenized with the run's tokenizer."""
    dest = out / "heldout"
    if (dest / "meta.json").is_file():
        return dest
    src = out / "heldout_src"
    src.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, doc in enumerate(iter_documents("stdlib")):
        total += len(doc.encode())
        if total > qs.CORPUS_BYTES:  # the document cut at the cap is partly in the corpus: past it only
            (src / f"doc{i:04d}.py").write_text(doc)
    prepare_data(str(src), dest, tokenizer_dir=str(tokenizer), val_fraction=0.9, seed=seed, progress=False)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7, help="data split and training seed (quickstart defaults use 0-2)")
    ap.add_argument("--widths", type=int, nargs="*", default=[24, 48, 96], help="d_model of the sizes (sweep family)")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.33, 0.55, 1.0, 1.6],
                    help="multiples of the quickstart's current lr rule")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    data = out / "data"
    meta = (json.loads((data / "meta.json").read_text()) if (data / "meta.json").is_file() else
            qs.prepare_corpus("stdlib", data, seed=args.seed))
    unique = float(min(meta["train"]["tokens"], qs.CORPUS_TOKENS))
    if args.widths:
        grid = qs.sweep_grid(1.0, "cpu", seed=args.seed, unique_tokens=unique)
        grid["sizes"] = [{"d_model": d, **qs.FAMILY} for d in args.widths]
        grid["lr"] = [f"steplaw*{f:g}" for f in args.factors]
        run_sweep(grid, out / "sweep", data_path=str(data), workers=args.workers, threads=args.threads)

    tok, _, held, _ = load_prepared(heldout_set(out, data / "tokenizer", args.seed))
    token_bytes = token_byte_lengths(tok)
    cache_path = out / "heldout_losses.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    runs = sorted(p.parent for p in (out / "sweep" / "runs").glob("*/summary.json"))
    D_max = max(json.loads((r / "summary.json").read_text())["D"] for r in runs)
    cells = defaultdict(dict)  # N -> {lr: (val loss, held-out loss)}, at D_max
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        if s["D"] != D_max:
            continue
        key = str(r.resolve())
        if key not in cache:
            _, model, _, _ = load_run(r)
            batches = iter_eval_batches(held, 256, 9, max_batches=HELDOUT_TOKENS // (9 * 256))
            cache[key] = evaluate(model, batches, token_bytes, device="cpu", dtype="bf16")["val_loss"]
            cache_path.write_text(json.dumps(cache, indent=1))
        cells[s["N"]][s["lr"]] = (s["val_loss"], cache[key])

    print(f"data seed {args.seed}, D = {D_max:,} (WSD branches, the quickstart's recipe); loss on the split's "
          f"{meta['val']['documents']} validation modules / on {HELDOUT_TOKENS:,} tokens of the held-out modules:")
    print("| N | lr: val / held-out loss | best lr (held-out) |")
    print("|---|---|---|")
    best = {}
    for N, cell in sorted(cells.items()):
        lrs = sorted(cell)
        held_best = vertex({lr: cell[lr][1] for lr in lrs})
        row = ", ".join(f"{lr:.3g}: {cell[lr][0]:.4f} / {cell[lr][1]:.4f}" for lr in lrs)
        print(f"| {N:,} | {row} | {held_best[0]:.3g}{held_best[1]} |")
        if not held_best[1]:  # a best at the grid's edge is a bound, not a measurement
            best[N] = held_best[0]
    Ns = np.array(sorted(best), float)
    if len(Ns) > 1:
        a, c = np.polyfit(np.log(Ns / 1.06e5), np.log([best[n] for n in sorted(best)]), 1)
        print(f"least squares through the best lrs inside their grids (N {', '.join(f'{n:,.0f}' for n in Ns)}): "
              f"lr = {math.exp(c):.3g} (N/1.06e5)^{a:.3f} at D = {D_max:,}")


def vertex(cell: dict[float, float]) -> tuple[float, str]:
    """The best lr: the vertex of a parabola in log lr through the best grid point and its two neighbours;
    the grid point itself, flagged, when it lies at the grid's edge."""
    lrs = sorted(cell)
    i = min(range(len(lrs)), key=lambda j: cell[lrs[j]])
    if i == 0 or i == len(lrs) - 1:
        return lrs[i], " (edge of the grid)"
    x = np.log(lrs[i - 1:i + 2])
    c2, c1, _ = np.polyfit(x, [cell[lr] for lr in lrs[i - 1:i + 2]], 2)
    return (float(np.exp(np.clip(-c1 / (2 * c2), x[0], x[2]))) if c2 > 0 else lrs[i]), ""


if __name__ == "__main__":
    main()
