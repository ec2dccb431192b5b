"""Masked vs unmasked SFT at equal steps, several seeds (issue 15): assistant-token validation loss and held-out
task accuracy side by side.

    python bench/sft_mask_ablation.py --base runs/base --out /tmp/abl --steps 100 --seeds 0 1 2 \
        --set train.batch_size=8 --set data.seq_len=192 --set train.lr=2e-3

Each run is ``steplab sft`` (the one trainer) from the same base on the builtin chat set; the seed sets the data
order. Finished runs are kept (``row.json`` in each run): seeds can run as separate processes on one ``--out``
and a last invocation with every seed prints the table. The validation loss is the assistant-token loss on the tasks' held-out conversations for both arms (the
unmasked arm trains on prompts too, but is scored on the same targets).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=100, help="held-out items per task")
    p.add_argument("--task", action="append", help="default: add2 spelling letter_count recall identity")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    tasks = args.task or ["add2", "spelling", "letter_count", "recall", "identity"]

    import torch

    from steplab.eval.runner import EngineLM
    from steplab.eval.task_eval import run_task
    from steplab.tasks import get_task
    from steplab.train.sft import sft_config
    from steplab.train.trainer import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = []
    for seed in args.seeds:
        for mask in (True, False):
            run = out / f"{'masked' if mask else 'unmasked'}_s{seed}"
            overrides = args.set + [f"train.max_steps={args.steps}", f"train.seed={seed}", f"train.threads={args.threads}",
                                    f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}"]
            if (run / "row.json").is_file():  # finished earlier (several invocations may share --out)
                results.append(json.loads((run / "row.json").read_text()))
                continue
            t0 = time.time()
            summary = (json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else
                       train(sft_config(args.base, "builtin", overrides, mask=mask), run, progress=False))
            row = {"seed": seed, "mask": mask, "val_loss": summary["val_loss"], "train_s": round(time.time() - t0)}
            with EngineLM.from_run(run, device="cpu", dtype="fp32") as lm:
                for name in tasks:
                    r = run_task(lm, get_task(name), args.n)
                    row[name] = r.accuracy
                    row[name + "_format"] = r.format_rate
            (run / "row.json").write_text(json.dumps(row))
            results.append(row)
            print(json.dumps(row), flush=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    print("| arm | assistant-token val loss (mean ± sd) | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for mask in (True, False):
        rows = [r for r in results if r["mask"] == mask]
        losses = [r["val_loss"] for r in rows]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        cells = []
        for name in tasks:
            accs = [r[name] for r in rows]
            cells.append(f"{statistics.mean(accs):.1%} ({', '.join(f'{a:.0%}' for a in accs)})")
        print(f"| {'masked' if mask else 'unmasked'} | {statistics.mean(losses):.4f} ± {sd:.4f} "
              f"({', '.join(f'{v:.4f}' for v in losses)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
