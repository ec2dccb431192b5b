"""Kill a training run with SIGKILL at 5 random steps, resume it, and check the loss sequence is bit-identical.

    python bench/kill_resume.py [--runs 5] [--steps 60] [--seed 0]

Uses the embedded stdlib corpus (no ../shared needed). Each trial: start `steplab train`, wait until the
metrics log reaches a random step, SIGKILL the process (possibly mid-checkpoint), then `--resume` until done.
A second kill can land in the resumed process too (``--kills 2``).
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steplab.data.prepare import prepare_data
from steplab.train.metrics import read_jsonl


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kills", type=int, default=1, help="kills per trial")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    data = work / "data"
    prepare_data("stdlib", data, vocab_size=1024, max_bytes=1_000_000, progress=False)
    overrides = [f"data.path={data}", "data.seq_len=128", "model.d_model=128", "model.n_layer=4", "model.n_head=4",
                 "train.batch_size=8", f"train.max_steps={args.steps}", "train.ckpt_every=5", "train.eval_every=20",
                 "train.eval_batches=2", "train.warmup_steps=5"]
    cmd = [sys.executable, "-m", "steplab", "train", "--quiet", *[f"--set={o}" for o in overrides]]
    t0 = time.time()
    subprocess.run(cmd + ["--out", str(work / "reference")], check=True, capture_output=True)
    reference = losses(work / "reference")
    print(f"reference: {len(reference)} steps, final loss {reference[-1]:.6f} ({time.time() - t0:.1f} s)")
    print(f"{'trial':>5} {'killed at step':>15} {'resumes':>8} {'final loss':>12} {'identical':>10}")
    ok = 0
    for trial in range(args.runs):
        run = work / f"trial{trial}"
        kill_steps = sorted(rng.sample(range(2, args.steps - 1), args.kills))
        at = []
        for k in kill_steps:
            resume = ["--resume"] if (run / "config.json").exists() else []
            proc = subprocess.Popen(cmd + ["--out", str(run), *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and len(losses(run)) < k:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            at.append(len(losses(run)))
        subprocess.run(cmd + ["--out", str(run), "--resume"], check=True, capture_output=True)
        got = losses(run)
        same = got == reference
        ok += same
        print(f"{trial:>5} {','.join(map(str, at)):>15} {len(at):>8} {got[-1]:>12.6f} {str(same):>10}")
    print(f"{ok}/{args.runs} killed-and-resumed runs reproduce the uninterrupted loss sequence exactly (work dir {work})")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
