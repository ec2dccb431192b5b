"""Metrics: a JSONL log that survives resume, optional TensorBoard, the loss-curve plot, and peak FLOP/s for MFU."""
from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from steplab.utils import atomic_write


class MetricsLog:
    """Append-only JSONL, one record per line. On resume from step s, records past s are dropped first, so
    the log of an interrupted-and-resumed run reads exactly like that of an uninterrupted one."""

    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in read_jsonl(self.path) if line.get("step", 0) <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                print("tensorboard is not installed; metrics go to JSONL only (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is untrustworthy
    return records


def plot_loss_curve(records: list[dict[str, Any]], out: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# Dense bf16 peak of common accelerators (FLOP/s), for MFU on GPU; CPUs are measured instead.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


@lru_cache(maxsize=None)
def peak_flops(device_type: str, dtype: str) -> float:
    """Peak matmul FLOP/s: a table for known GPUs, otherwise measured with a 2048^3 matmul on this machine."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype == "bf16" else value / 2
    return measure_matmul_flops(device_type, torch.bfloat16 if dtype == "bf16" else torch.float32)


def measure_matmul_flops(device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    # its own generator: this runs after a resume restored the run's RNG, which must not move (exact resume)
    gen = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up (thread pool, AMX tiles, cuBLAS handles)
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
