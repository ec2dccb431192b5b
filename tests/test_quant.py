"""Weight-only int8/int4 (infer/quant.py): number formats, kernels vs the dequantized reference, run round trips."""
from __future__ import annotations

import json

import pytest
import torch

from steplab.config import ModelConfig, MoEConfig
from steplab.errors import ConfigError
from steplab.infer.quant import (QuantConfig, QuantWeight, apply_quantized, dequantize_tensor, quantize_state,
                                 quantize_tensor)
from steplab.models import build_model


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_dequantized_error_is_within_half_a_step(scheme, group):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    t = quantize_tensor(w, QuantConfig(scheme, group or 32))
    err = (dequantize_tensor(t) - w).abs()
    if scheme == "int8":
        assert t["q"].dtype == torch.int8 and t["q"].shape == w.shape
        assert (err <= t["scale"][:, None] / 2 + 1e-6).all()
    else:
        assert t["q"].dtype == torch.uint8 and t["q"].shape == (48, 128)  # two nibbles a byte
        step = t["scale"].float().repeat_interleave(group, dim=1)
        assert (err <= step * 0.51 + 1e-3).all()  # half a step, plus fp16 rounding of zero/scale
    assert err.max() > 0  # it really is quantized


@pytest.mark.parametrize("scheme,out", [("int8", 40), ("int4", 64), ("int4", 40)])  # 40: int4 not packable (N % 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_dequantized_matmul(scheme, out, dtype):
    torch.manual_seed(1)
    w, x = torch.randn(out, 128), torch.randn(2, 3, 128)
    t = quantize_tensor(w, QuantConfig(scheme, 32))
    qw = QuantWeight(t)
    assert qw.packed == (scheme == "int4" and out % 16 == 0)
    ref = x @ dequantize_tensor(t).T
    y = qw.matmul(x.to(dtype))
    assert y.shape == (2, 3, out) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_int4_group_must_divide_the_input_size():
    with pytest.raises(ConfigError, match=r"tensor w13\.weight: input size 96 is not a multiple of the int4 group 64; choose --group 32"):
        quantize_tensor(torch.randn(8, 96), QuantConfig("int4", 64), "w13.weight")
    with pytest.raises(ConfigError, match="--scheme"):
        QuantConfig("int3").validate()


def _models():
    dense = ModelConfig(vocab_size=320, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)
    moe = ModelConfig(vocab_size=320, d_model=64, n_layer=2, n_head=4, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, top_k=2, n_shared=1, d_expert=32, first_dense=1))
    tied = ModelConfig(vocab_size=320, d_model=64, n_layer=1, n_head=4, max_seq_len=64, tie_embeddings=True)
    return {"dense": dense, "moe": moe, "tied": tied}


@pytest.mark.parametrize("kind", ["dense", "moe", "tied"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_equals_model_with_dequantized_weights(kind, scheme):
    """Embedding, every linear and the MoE experts are quantized; the forward equals fp32 on dequantized weights."""
    torch.manual_seed(2)
    cfg = _models()[kind]
    model = build_model(cfg).eval()
    if kind == "moe":
        for layer in model.layers:  # a trained-looking router bias (balancing) must survive quantization
            if hasattr(layer.ffn, "expert_bias"):
                layer.ffn.expert_bias.copy_(torch.randn(4) * 0.1)
    state = quantize_state(model, QuantConfig(scheme, 32))
    assert "tok_emb.weight.q" in state and "tok_emb.weight" not in state
    assert ("lm_head.weight.q" in state) == (kind != "tied")
    if kind == "moe":
        assert state["layers.1.ffn.w13.weight.q"].shape[:2] == (4, 64)  # (E, d_out, d_in / (2 if int4))
        assert "layers.1.ffn.router.weight" in state  # kept in fp32
    # reference: the fp32 model with each quantized weight replaced by its dequantized value
    ref = build_model(cfg).eval()
    deq = {}
    for name, p in model.state_dict().items():
        key = "tok_emb.weight" if (kind == "tied" and name == "lm_head.weight") else name
        if f"{key}.q" in state:
            w = dequantize_tensor({k: state[f"{key}.{k}"] for k in ("q", "scale", "zero") if f"{key}.{k}" in state})
            deq[name] = w.transpose(1, 2) if w.dim() == 3 else w
        else:
            deq[name] = p
    ref.load_state_dict(deq)
    q = apply_quantized(build_model(cfg), state).eval()
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        a, b, full = q(idx), ref(idx), model(idx)
    assert torch.allclose(a, b, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(a, full, atol=1e-5)  # quantization changed something


def test_quantize_cli_writes_a_run_that_eval_and_sample_load(tiny_data, tmp_path, capsys):
    from steplab.cli import main
    from steplab.train.checkpoint import load_run
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    assert main(["train", "--preset", "step1-nano", "--quiet", "--out", str(run),
                 *sum((["--set", s] for s in tiny_overrides(tiny_data, steps=4)), [])]) == 0
    for scheme, ratio in (("int8", 0.30), ("int4", 0.17)):
        out = tmp_path / scheme
        assert main(["quantize", str(run), "--scheme", scheme, "--out", str(out)]) == 0
        assert json.loads((out / "quant.json").read_text())["scheme"] == scheme
        fp32 = next((run / "checkpoints").iterdir()) / "model.safetensors"
        q = next((out / "checkpoints").iterdir()) / "model.safetensors"
        assert q.stat().st_size <= ratio * fp32.stat().st_size + 4096  # + the safetensors header
        _, model, tok, _ = load_run(out)
        assert isinstance(model.tok_emb, torch.nn.Module) and type(model.tok_emb).__name__ == "QuantEmbedding"
        capsys.readouterr()
        assert main(["sample", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)[0]["tokens"]) == 5
        assert main(["eval", str(out), "--batches", "2"]) == 0
        assert json.loads(capsys.readouterr().out)["val_loss"] < 7.0
    assert main(["quantize", str(run), "--scheme", "int8", "--out", str(tmp_path / "int8")]) == 2  # refuses to overwrite
    assert main(["quantize", str(tmp_path / "int8"), "--scheme", "int4", "--out", str(tmp_path / "x")]) == 2  # already quantized
