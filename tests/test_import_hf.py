"""`steplab import hf` of a checkpoint created by transformers itself (not a steplab export)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from steplab.data.prepare import load_prepared
from steplab.errors import CheckpointError
from steplab.export.hf import import_hf
from steplab.train.checkpoint import load_run

transformers = pytest.importorskip("transformers")


def _llama_dir(tiny_data, tmp_path, **extra):
    tok, _, _, _ = load_prepared(tiny_data)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=50000.0, **extra)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "llama"
    model.save_pretrained(out)
    for f in (tiny_data / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return model, tok, out


def test_transformers_made_llama_imports_with_identical_logits(tiny_data, tmp_path):
    hf, tok, hf_dir = _llama_dir(tiny_data, tmp_path)
    assert "rope_parameters" in json.loads((hf_dir / "config.json").read_text())  # transformers >= 5 layout
    import_hf(hf_dir, tmp_path / "run")
    cfg, ours, _, _ = load_run(tmp_path / "run")
    assert cfg.model.rope_base == 50000.0  # read from rope_parameters, not defaulted to 10000
    ids = torch.tensor([[tok.bos_id] + tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_unsupported_rope_scaling_is_refused_in_one_line(tiny_data, tmp_path):
    # linear/dynamic/yarn/llama3 import (tests/test_rope.py); a type steplab cannot reproduce is refused
    _, _, hf_dir = _llama_dir(tiny_data, tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "factor": 2.0, "rope_theta": 50000.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        import_hf(hf_dir, tmp_path / "run")
    assert "\n" not in str(e.value) and "longrope" in str(e.value) and not (tmp_path / "run").exists()
