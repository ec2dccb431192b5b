"""Data kind "speech-masked": prepared speech token shards whose loss skips the audio of ASR documents.

The shards are those of ``steplab data prepare --speech-tokenizer`` (``data/speech_lm.py``), read exactly as data
kind "tokens" reads them (same windows, same order, same resume state). Only the targets change: inside an ASR
document (``<|bos|> <|audio|> ... <|/audio|> text <|eos|>``) the audio tokens and ``<|/audio|>`` become
``IGNORE_INDEX``, so the loss there is the transcript's alone; TTS documents keep every target, so the model still
learns to speak. The idea: 9 of 10 ASR documents in the ``--augment 8`` recipe are perturbed audio the model must
predict token by token. Measured (docs/benchmarks.md, issue 20 session 8), it hurts: dev ASR 96.3% against 99.7%
unmasked; predicting that audio is most of what the ASR path learns from. An ablation, not the recipe.

    steplab train --preset step1-nano --data DIR --set data.kind=speech-masked ...

The held-out loss is unmasked (the whole documents), comparable with a "tokens" run on the same data.
"""
from __future__ import annotations

import numpy as np
import torch

from steplab.data.chat import IGNORE_INDEX


def asr_audio_positions(rows: np.ndarray, bos: int, open_id: int, close_id: int) -> np.ndarray:
    """Boolean mask over ``rows`` (B, T): True at the audio tokens and the closing ``<|/audio|>`` of every ASR
    document (an ``<|audio|>`` right after ``<|bos|>``). Rows start at document boundaries (documents are packed
    whole into windows); a span still open at the row's end is masked to the end."""
    out = np.zeros(rows.shape, dtype=bool)
    for b, row in enumerate(rows):
        opens = np.flatnonzero((row[1:] == open_id) & (row[:-1] == bos)) + 1
        closes = np.flatnonzero(row == close_id)
        for s in opens:
            after = closes[closes > s]
            out[b, s + 1:(after[0] + 1 if len(after) else len(row))] = True
    return out


class SpeechMaskedData:
    """TrainData: data kind "tokens" over the same shards, with ASR documents' audio targets ignored."""

    def __init__(self, tokens, bos: int, open_id: int, close_id: int) -> None:
        self.tokens, self.ids = tokens, (bos, open_id, close_id)
        self.tokens_per_batch, self.vocab_size = tokens.tokens_per_batch, tokens.vocab_size
        self.tokenizer_dir, self.special_tokens = tokens.tokenizer_dir, tokens.special_tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tokens.next_batch()
        rows = torch.cat([x[:, :1], y], dim=1).cpu().numpy()
        skip = torch.from_numpy(asr_audio_positions(rows, *self.ids)[:, 1:]).to(y.device)
        return x, y.masked_fill(skip, IGNORE_INDEX)

    def state_dict(self) -> dict:
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tokens.load_state_dict(state)

    def eval_batches(self):
        return self.tokens.eval_batches()

    def evaluate(self, model: torch.nn.Module, device: str, dtype: str) -> dict[str, float]:
        return self.tokens.evaluate(model, device=device, dtype=dtype)


def build_speech_masked(cfg) -> SpeechMaskedData:
    from steplab.data.speech_lm import SpeechVocab
    from steplab.train.data import TokenData

    tokens = TokenData(cfg)
    vocab = SpeechVocab.load(tokens.tokenizer_dir)
    return SpeechMaskedData(tokens, vocab.text.bos_id, vocab.open_id, vocab.close_id)
