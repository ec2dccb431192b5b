"""What the one trainer trains on: a ``TrainData`` per data kind, chosen by ``cfg.data.kind``.

The trainer knows nothing about tokens, images, speech or video. It asks the run's ``TrainData`` for global
batches (tuples of tensors, the batch on dim 0, so each data-parallel rank takes its rows), for its position in
the stream (saved in every checkpoint: exact resume), for held-out batches, and for what a batch counts as
tokens (tokens/s, D, MFU). Text's prepared token shards are the kind ``"tokens"``; the other families' kinds
are builders named in ``DATA_MODULES`` ("module:function"), imported only when a run asks for one (so text
runs never import Pillow or soundfile); :func:`register_data` adds a kind from outside the package.

Evaluation, in order of preference: the data's own ``evaluate(model, device, dtype)`` (text: loss and bits per
byte, which need the tokenizer's byte lengths), the model's ``eval_metrics(batches)``, else the mean of
``model(*batch)`` over ``eval_batches()`` as ``val_loss``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from steplab.config import RunConfig
from steplab.data.loader import TokenLoader, iter_eval_batches, skip_positions
from steplab.data.prepare import load_prepared
from steplab.errors import ConfigError
from steplab.eval.evaluate import autocast_context, evaluate, token_byte_lengths


class TrainData(Protocol):
    tokens_per_batch: int  # per global batch: what tokens/s and D count
    vocab_size: int  # 0 when the family has no token vocabulary
    tokenizer_dir: Path | None  # copied into the run directory as tokenizer/ (None: the family has none)

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def eval_batches(self) -> Iterable[tuple[torch.Tensor, ...]]: ...


# The other families' data kinds: kind -> "module:builder", imported only when a run asks for the kind (so text
# runs never import Pillow or soundfile), and never importing the trainer back.
DATA_MODULES: dict[str, str] = {"chat": "steplab.data.chat_data:build_chat_data", "vqa": "steplab.data.images:build_vqa_data",
                                "video-clips": "steplab.data.video:build_clip_data",
                                "video-latents": "steplab.data.video:build_latent_data",
                                "speech-masked": "steplab.data.speech_data:build_speech_masked"}

_BUILDERS: dict[str, Callable[[RunConfig], TrainData]] = {}


def register_data(kind: str, build: Callable[[RunConfig], TrainData]) -> None:
    _BUILDERS[kind] = build


def data_kinds() -> list[str]:
    return sorted(set(_BUILDERS) | set(DATA_MODULES))


def build_train_data(cfg: RunConfig) -> TrainData:
    kind = cfg.data.kind
    if kind not in _BUILDERS and kind in DATA_MODULES:
        module, _, builder = DATA_MODULES[kind].partition(":")
        register_data(kind, getattr(importlib.import_module(module), builder))
    if kind not in _BUILDERS:
        raise ConfigError(f"data.kind={kind!r} is not a known kind of training data; known: {', '.join(data_kinds())}")
    return _BUILDERS[kind](cfg)


def evaluate_run(data: TrainData, model: torch.nn.Module, device: str, dtype: str) -> dict[str, float]:
    """Held-out metrics for the run's summary and log (see the module docstring for who decides them)."""
    if hasattr(data, "evaluate"):
        return data.evaluate(model, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = (tuple(t.to(device) for t in batch) for batch in data.eval_batches())
            if hasattr(model, "eval_metrics"):
                return model.eval_metrics(batches)
            total, n = 0.0, 0
            with autocast_context(torch.device(device).type, dtype):
                for batch in batches:
                    total += float(model(*batch))
                    n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError(f"data.kind={type(data).__name__} gave no evaluation batches; the held-out split is empty")
    return {"val_loss": total / n}


class TokenData:
    """Text: a directory written by ``steplab data prepare`` (token shards + tokenizer), in seq_len windows."""

    def __init__(self, cfg: RunConfig) -> None:
        tc = cfg.train
        self.tokenizer, train_shards, self.val_shards, _ = load_prepared(cfg.data.path)
        self.tokenizer_dir = Path(cfg.data.path) / "tokenizer"
        self.vocab_size = self.tokenizer.vocab_size
        self.special_tokens = len(self.tokenizer.special_ids)
        self.seq_len, self.batch_size, self.eval_limit = cfg.data.seq_len, tc.batch_size, tc.eval_batches
        self.loader = TokenLoader(train_shards, cfg.data.seq_len, tc.batch_size, seed=tc.seed)
        self.tokens_per_batch = tc.batch_size * cfg.data.seq_len
        self._token_bytes = token_byte_lengths(self.tokenizer)
        self.pose_length = cfg.data.pose_length

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets), plus PoSE position ids when ``data.pose_length`` is set. The positions are drawn
        from the loader's state before the batch, so a resumed run draws the same ones."""
        if not self.pose_length:
            return self.loader.next_batch()
        # the last word keeps this stream apart from the loader's own default_rng([seed, epoch]) window order
        rng = np.random.default_rng([self.loader.seed, self.loader.epoch, self.loader.position, 0x905E])
        x, y = self.loader.next_batch()
        return x, y, skip_positions(x.shape[0], self.seq_len, self.pose_length, rng).to(x.device)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def eval_batches(self):
        return iter_eval_batches(self.val_shards, self.seq_len, self.batch_size, max_batches=self.eval_limit)

    def evaluate(self, model: torch.nn.Module, device: str, dtype: str) -> dict[str, float]:
        return evaluate(model, self.eval_batches(), self._token_bytes, device=device, dtype=dtype)


register_data("tokens", TokenData)
