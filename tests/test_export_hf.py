"""Hugging Face export/import: transformers loads our directory with identical logits, generations and tokens."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from steplab.cli import main
from steplab.config import resolve
from steplab.infer.sampling import SamplingParams, generate
from steplab.train.checkpoint import load_run
from steplab.train.metrics import read_jsonl
from steplab.train.trainer import train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=6)), run, progress=False)
    return run


def test_export_loads_in_transformers_with_identical_logits_generation_and_tokens(trained_run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "hf", str(trained_run), str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    cfg, ours, tokenizer, _ = load_run(trained_run)
    text = "def add(a, b):\n    return a + b  # héllo ✓\n"
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    with torch.no_grad():
        diff = (ours(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    new = generate(ours, [ids], SamplingParams(max_new_tokens=20, temperature=0))[0]
    hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=len(new), do_sample=False, eos_token_id=None)
    assert hf_out[0, len(ids):].tolist() == new
    # generation stops at a document's end and at a chat turn's end
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        sorted([tokenizer.eos_id, tokenizer.special_ids["<|end|>"]])


def test_export_refuses_to_overwrite(trained_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="exists and is not empty"):
        from steplab.export.hf import export_hf
        export_hf(trained_run, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_import_then_continue_training(trained_run, tiny_data, tmp_path):
    hf_dir = tmp_path / "hf"
    main(["export", "hf", str(trained_run), str(hf_dir)])
    imported = tmp_path / "imported"
    assert main(["import", "hf", str(hf_dir), "--out", str(imported)]) == 0
    _, a, _, _ = load_run(trained_run)
    _, b, _, step = load_run(imported)
    assert step == 0 and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Continue training from the imported weights: the first loss is the trained model's, not a fresh init's.
    cont = resolve(overrides=tiny_overrides(tiny_data, steps=2) + [f"train.init_from={imported}"])
    train(cont, tmp_path / "cont", progress=False)
    fresh = resolve(overrides=tiny_overrides(tiny_data, steps=2))
    train(fresh, tmp_path / "fresh", progress=False)
    first = lambda run: read_jsonl(run / "metrics.jsonl")[0]["loss"]
    assert first(tmp_path / "cont") < first(tmp_path / "fresh") - 0.3


def test_moe_export_matches_glm4_moe_in_transformers(tiny_data, tmp_path):
    moe = {"model.moe.n_experts": 4, "model.moe.top_k": 2, "model.moe.n_shared": 1, "model.moe.d_expert": 32,
           "model.moe.score": "sigmoid", "model.moe.first_dense": 1, "model.n_layer": 3, "model.moe.bias_update_rate": 0.01}
    run = tmp_path / "moe"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=6, **moe)), run, progress=False)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm4_moe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _, ours, tokenizer, _ = load_run(run)
    assert any(m.expert_bias.abs().sum() > 0 for _, m in ours.moe_layers())  # balancing moved the biases
    ids = [tokenizer.bos_id] + tokenizer.encode("import sys\nprint(sys.argv)\n")
    with torch.no_grad():
        assert (ours(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item() < 1e-4
    new = generate(ours, [ids], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert hf.generate(torch.tensor([ids]), max_new_tokens=len(new), do_sample=False, eos_token_id=None)[0, len(ids):].tolist() == new


def test_moe_export_refuses_softmax_router(tiny_data, tmp_path):
    run = tmp_path / "moe"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=2, **{"model.moe.n_experts": 4, "model.moe.score": "softmax"})),
          run, progress=False)
    from steplab.errors import CheckpointError
    from steplab.export.hf import export_hf

    with pytest.raises(CheckpointError, match="model.moe.score=sigmoid"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
