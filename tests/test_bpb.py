"""Bits per byte counts the bytes each token stands for, also for tokens that hold part of a character."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from steplab.data.prepare import load_prepared, prepare_data
from steplab.eval.evaluate import evaluate, token_byte_lengths

TEXTS = [
    "Crème brûlée, déjà vu, façade, naïve coöperation; Ærøskøbing og Ålesund. " * 3,
    "東京都の天気は晴れです。我们今天学习机器学习。한국어 문장도 있습니다. " * 3,
    "Grüße aus Köln: Straße, Übermaß, Ölförderung. Español: niño, año, corazón. " * 3,
    "数学：∑ x² ≤ ∞, λ → μ; emoji 🙂🚀 and ‘quotes’ “double” — dashes… " * 3,
]


def test_token_bytes_match_the_utf8_bytes_of_non_ascii_validation_text(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):  # enough documents that hashing puts several in val
        (src / f"doc{i:02d}.txt").write_text(f"{i}: " + TEXTS[i % 4] + TEXTS[(i + 1) % 4], encoding="utf-8")
    meta = prepare_data(str(src), tmp_path / "data", vocab_size=300, progress=False)
    tok, _, val, _ = load_prepared(tmp_path / "data")
    ids = np.asarray(val.tokens, dtype=np.int64)
    special = set(tok.special_ids.values())
    plain = [int(i) for i in ids if int(i) not in special]
    exact = len(tok.decode(plain).encode("utf-8"))
    assert exact == meta["val"]["bytes"] > 1000
    lengths = token_byte_lengths(tok)
    assert int(lengths[torch.as_tensor(plain)].sum()) == exact
    assert all(int(lengths[i]) == 0 for i in special)
    # ... and evaluate() divides by exactly that count: bits per byte = (nats summed over non-special targets) / ln 2 / bytes
    x = torch.as_tensor(ids[:-1]).view(1, -1)
    y = torch.as_tensor(ids[1:]).view(1, -1)

    class Uniform(torch.nn.Module):  # every token equally likely: loss ln V per token
        def forward(self, idx):
            return torch.zeros(*idx.shape, tok.vocab_size)

    out = evaluate(Uniform(), [(x, y)], lengths)
    counted = sum(1 for i in ids[1:] if int(i) not in special)
    want_bytes = int(lengths[y.view(-1)].sum())
    assert out["val_bpb"] == pytest.approx(counted * np.log(tok.vocab_size) / np.log(2) / want_bytes, rel=1e-6)
