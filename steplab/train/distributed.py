"""torchrun integration: process group, DDP or FSDP2 wrapping, and small collectives.

The same trainer runs single-process or under ``torchrun --nproc-per-node K -m steplab train ...``. Every rank
draws the same global batch from the loader (same seed, same position) and keeps its own slice of rows, so
the data order, the loader's resume state and the averaged gradient are those of the single-process run:
the loss curves agree to rounding (a test holds us to 1e-5 in fp32).

FSDP2 (``fully_shard``) wraps each transformer block and then the root, the usual recipe: parameters are
sharded between steps and gathered one block at a time. In bf16 a ``MixedPrecisionPolicy`` computes in
bf16 and reduces gradients in fp32, instead of autocast.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from steplab.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp
    device: str = "cpu"  # where collectives' tensors live (nccl needs CUDA tensors)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(parallel: str, device_type: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; a no-op in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if parallel in ("ddp", "fsdp"):
            print(f"note: train.parallel={parallel} in a single process; start with torchrun --nproc-per-node K to shard")
        return DistInfo()
    if parallel == "none":
        raise ConfigError(f"WORLD_SIZE={world} but train.parallel=none; use --parallel ddp or fsdp")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, "fsdp" if parallel == "auto" else parallel,
                    f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return info


def wrap_model(model: torch.nn.Module, info: DistInfo, dtype: str, device_type: str) -> torch.nn.Module:
    """The module to call for training steps (DDP wrapper, or the FSDP2-sharded model itself)."""
    if not info.enabled:
        return model
    if info.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: by default DDP copies rank 0's buffers to every rank at each forward, which
        # overwrote the per-step MoE expert counts accumulated over micro-batches (the summed loads then
        # counted rank 0 twice and dropped the others). Every buffer is identical on all ranks by construction
        # (RoPE tables; balancing biases moved from counts summed over ranks), so nothing needs broadcasting.
        return DistributedDataParallel(model, device_ids=[info.local_rank] if device_type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def uses_autocast(info: DistInfo, dtype: str) -> bool:
    """bf16 comes from autocast, except under FSDP2 where the mixed-precision policy does it."""
    return dtype == "bf16" and info.parallel != "fsdp"


def mean_across_ranks(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def sync_step_stats(model: torch.nn.Module, info: DistInfo) -> None:
    """Sum the model's per-step statistics (``Trainable.step_stats``, e.g. MoE tokens per expert) over ranks,
    so every rank takes the same decisions from them (the balancing-bias update)."""
    if info.enabled and hasattr(model, "step_stats"):
        for t in model.step_stats():
            dist.all_reduce(t)


def grad_sync(train_module: torch.nn.Module, last_micro_batch: bool):
    """DDP's ``no_sync()`` on every micro-batch but the last: gradients accumulate locally and are all-reduced
    once per optimizer step instead of once per micro-batch (same result, less communication)."""
    if not last_micro_batch and hasattr(train_module, "no_sync"):
        return train_module.no_sync()
    return contextlib.nullcontext()


def barrier(info: DistInfo | None) -> None:
    if info is not None and info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
