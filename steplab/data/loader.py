"""Batches of (input, target) token windows for training and evaluation.

The token stream is cut into non-overlapping windows: window ``i`` holds tokens
``[i*seq_len, i*seq_len + seq_len + 1)`` (one extra token, so targets are the inputs
shifted by one). Training visits windows in a fresh random order each epoch, given
by ``default_rng([seed, epoch]).permutation(n_windows)``. The whole loader state is
then two integers (epoch, position in that order): a checkpoint restores exactly the
batches an uninterrupted run would have seen, with no RNG state to pickle.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from steplab.data.shards import ShardSet
from steplab.errors import DataError


def count_windows(shards: ShardSet, seq_len: int) -> int:
    """Number of full ``seq_len + 1`` windows; DataError if not even one fits."""
    if seq_len <= 0:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    n = (len(shards) - 1) // seq_len if len(shards) > 0 else 0
    if n < 1:
        raise DataError(f"{shards.path} has {len(shards)} tokens but one window needs seq_len + 1 = {seq_len + 1}; "
                        "use a smaller seq_len or prepare more data (larger --max-bytes or another --source)")
    return n


def _to_device(rows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows.astype(np.int64))
    x, y = t[:, :-1], t[:, 1:]
    if torch.device(device).type == "cuda":
        # Pinned memory lets the copy overlap with compute.
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


class TokenLoader:
    """Endless shuffled training batches with an exact, two-integer resume state."""

    def __init__(self, shards: ShardSet, seq_len: int, batch_size: int, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.shards = shards
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.n_windows = count_windows(shards, seq_len)
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next window to serve
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each a LongTensor of shape (batch_size, seq_len)."""
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for b in range(self.batch_size):
            if self.position >= self.n_windows:  # epoch used up: the batch continues in the next one
                self.epoch += 1
                self.position = 0
            window = int(self._order()[self.position])
            self.position += 1
            rows[b] = self.shards.get(window * self.seq_len, self.seq_len + 1)
        return _to_device(rows, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints, JSON-friendly. seq_len/n_windows/seed are stored to catch a changed setup."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "n_windows", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state[key]} but this loader has "
                                f"{key}={getattr(self, key)}; resume with the same data and settings, or start fresh")
        position = int(state["position"])
        if not 0 <= position <= self.n_windows:
            raise DataError(f"loader state position {position} is outside 0..{self.n_windows}; the checkpoint "
                            "does not match this dataset, start fresh")
        self.epoch = int(state["epoch"])
        self.position = position


def skip_positions(rows: int, seq_len: int, span: int, rng: np.random.Generator) -> torch.Tensor:
    """PoSE position ids (Zhu et al., ICLR 2024, "Positional Skip-wise Training"): each row of ``seq_len`` tokens
    is cut at a random point into two chunks and the second chunk's positions jump ahead by a random skip, so the
    row's positions span up to ``span``. Relative distances up to ``span`` then occur in training without rows
    of that length: a model extended at 4x sees the query-to-start distances of 8x. (rows, seq_len) int64."""
    if span <= seq_len:
        raise DataError(f"a PoSE span of {span} must exceed the row length {seq_len}")
    cut = rng.integers(1, seq_len, size=rows)  # the second chunk starts here (both chunks non-empty)
    skip = rng.integers(0, span - seq_len + 1, size=rows)
    pos = np.arange(seq_len)[None, :] + np.where(np.arange(seq_len)[None, :] >= cut[:, None], skip[:, None], 0)
    return torch.from_numpy(pos.astype(np.int64))


def iter_eval_batches(shards: ShardSet, seq_len: int, batch_size: int, max_batches: int | None = None,
                      device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out windows, ``batch_size`` at a time, the same on every call.

    All windows 0, 1, 2, ... in order when they fit in ``max_batches``; otherwise ``max_batches`` full batches of
    windows spread evenly over the whole split, so a capped evaluation still sees every part of it (the first
    windows alone are the first few documents: one quickstart split of 22 modules put one size's loss 3.5% off
    its value on 340 modules; docs/LOG.md 2026-12-01). The last batch may be smaller than ``batch_size``: weight
    losses by ``y.numel()`` when averaging.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n = count_windows(shards, seq_len)
    if max_batches is not None and max_batches * batch_size < n:
        picked = (np.arange(max_batches * batch_size) * n) // (max_batches * batch_size)  # increasing, distinct
        for b in range(max_batches):
            starts = picked[b * batch_size:(b + 1) * batch_size] * seq_len
            yield _to_device(np.stack([shards.get(int(s), seq_len + 1).astype(np.int64) for s in starts]), device)
        return
    for b in range(-(-n // batch_size)):
        first = b * batch_size
        count = min(batch_size, n - first)
        # Consecutive windows share their edge token, so one contiguous read serves the batch.
        flat = shards.get(first * seq_len, count * seq_len + 1).astype(np.int64)
        rows = np.stack([flat[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)])
        yield _to_device(rows, device)
