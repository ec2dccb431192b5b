"""Compare RL runs (algorithms x seeds) at equal sampled tokens: a Markdown table and a curve plot of held-out
pass@1 vs sampled tokens; optionally a test-time-scaling plot of several `steplab eval --samples` results.

    python bench/rl_compare.py --runs /tmp/i16/ppo_s0 /tmp/i16/grpo_s0 ... --png /tmp/i16/compare.png \
        [--tts /tmp/i16/base_cd3/tts_countdown3.json /tmp/i16/ppo_s0/tts_countdown3.json --tts-png tts.png]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from steplab.train.metrics import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--png")
    p.add_argument("--tts", nargs="*", default=[])
    p.add_argument("--tts-png")
    a = p.parse_args()
    by_algo = defaultdict(list)
    print("| run | algo | seed | steps | sampled tokens | held-out pass@1 start -> end | pass@k start -> end | train reward last 5 "
          "| format viol. end | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in map(Path, a.runs):
        cfg = json.loads((run / "rl.json").read_text())
        rec = read_jsonl(run / "metrics.jsonl")
        ev = [r for r in rec if "eval_pass1" in r]
        tr = [r for r in rec if "reward" in r]
        last5 = sum(r["reward"] for r in tr[-5:]) / max(1, len(tr[-5:]))
        by_algo[cfg["algo"]].append((run.name, ev))
        k = f"eval_pass{cfg['eval_samples']}"  # pass@k over the eval's k samples (older runs lack it)
        passk = f"{ev[0][k]:.3f} -> {ev[-1][k]:.3f} (k={cfg['eval_samples']})" if k in ev[0] else "-"
        print(f"| {run.name} | {cfg['algo']} | {cfg['seed']} | {tr[-1]['step'] if tr else 0} | {rec[-1]['sampled_tokens']:,} | "
              f"{ev[0]['eval_pass1']:.3f} -> {ev[-1]['eval_pass1']:.3f} | {passk} | {last5:.3f} | {ev[-1]['eval_format_violation']:.3f} | "
              f"{tr[-1]['seconds'] if tr else 0:.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if a.png and a.runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (algo, runs) in enumerate(sorted(by_algo.items())):
            for j, (name, ev) in enumerate(runs):
                x = [r["sampled_tokens"] for r in ev]
                ax.plot(x, [r["eval_pass1"] for r in ev], "o-", color=f"C{i}", ms=3, label=algo if j == 0 else None, alpha=0.8)
                k = next((key for key in ev[0] if key.startswith("eval_pass") and key != "eval_pass1"), None)
                if k:  # pass@k on the same axis, dashed: what RL does to diversity
                    ax.plot(x, [r.get(k, float("nan")) for r in ev], "s--", color=f"C{i}", ms=3, alpha=0.6,
                            label=f"{algo} {k[5:].replace('pass', 'pass@')}" if j == 0 else None)
        ax.set_xlabel("sampled response tokens")
        ax.set_ylabel("held-out pass@1 (solid), pass@k (dashed)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
    if a.tts and a.tts_png:
        from steplab.eval.tts import plot_scaling

        results = [json.loads(Path(t).read_text()) for t in a.tts]
        for res in results:
            t = res["table"]
            row = lambda m: " ".join(f"{k}:{v:.3f}" for k, v in t[m].items()) if m in t else "-"
            print(f"{res['label']}: pass {row('pass')} | maj {row('maj')} | verifier {row('verifier')} | oracle {row('oracle')}")
        plot_scaling(results, a.tts_png)


if __name__ == "__main__":
    main()
