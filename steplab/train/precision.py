"""Which compute dtype a run trains in: ``train.dtype`` = bf16 | fp32 | auto.

bf16 autocast pays only where the hardware multiplies bf16 natively. On a CPU with AMX or AVX512-BF16 bf16 matmuls
outrun fp32, but on an AVX2-only CPU (many laptops; AMD EPYC before Zen 4) torch emulates them: on a 2-core AVX2
EPYC (2026-12-02, ``bench/dtype_step.py``) a 1024^2 bf16 matmul ran at 0.8 GFLOP/s against 53 GFLOP/s in fp32,
and the quickstart's trainer steps were 3.9x (33k) to 10.1x (0.9M) slower under bf16 autocast than in fp32.
``auto`` therefore picks bf16 on a CUDA device that supports it and on a CPU with native bf16, fp32 elsewhere.

As with ``train.compile``, the resolved value is written into the run's config.json, and a resumed run keeps the
choice it started with (the same run must train the same bits, even when resumed on another machine).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def cpu_bf16_features() -> dict[str, bool]:
    """The CPU's native bf16 matmul paths, from torch's own probes (absent in an older torch: False)."""
    return {name: bool(getattr(torch.cpu, f"_is_{probe}_supported", lambda: False)())
            for name, probe in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16"))}


def native_bf16(device_type: str) -> bool:
    """True where bf16 matmuls run natively on ``device_type`` (cuda / cpu)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return any(cpu_bf16_features().values())
    return False


def resolve_dtype(choice: str, device_type: str, saved_config: Path | None = None) -> tuple[str, str]:
    """(bf16 | fp32, why) for ``train.dtype``; ``saved_config``: the config.json of the run being resumed."""
    if choice != "auto":
        return choice, f"train.dtype={choice}"
    if saved_config is not None and saved_config.is_file():
        saved = json.loads(saved_config.read_text()).get("train", {}).get("dtype")
        if saved in ("bf16", "fp32"):
            return saved, f"auto: as this run chose when it started (train.dtype={saved})"
    if native_bf16(device_type):
        return "bf16", f"auto: this {device_type} multiplies bf16 natively"
    return "fp32", f"auto: this {device_type} has no native bf16 matmul (bf16 would be emulated, several times slower)"
