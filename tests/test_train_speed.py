"""Issue 13's faster training paths: fp32 attention under CPU bf16 autocast, and the train.compile=auto and
train.dtype=auto choices."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import steplab.models.common as common
from conftest import tiny_overrides
from steplab.config import ModelConfig, RunConfig, check_ranges, resolve
from steplab.errors import ConfigError
from steplab.models.common import Attention, apply_rope
from steplab.models.rope import rope_tables
from steplab.train.compile import COMPILE_MIN_STEPS, c_compiler, resolve_compile
from steplab.train.precision import native_bf16, resolve_dtype
from steplab.train.trainer import train


def attention_in_fp32(attn: Attention, x, cos, sin):
    """Reference: the projections under bf16 autocast, rope + causal attention in plain fp32 SDPA."""
    B, T, _ = x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = attn.wqkv(x)
    hd, h = attn.head_dim, attn.n_head
    q, k, v = (t.float().view(B, T, h, hd).transpose(1, 2) for t in qkv.split(h * hd, dim=-1))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def run(attn, x, cos, sin, fn):
    """Output and the gradients of (x, wqkv, wo) of sum(output * probe)."""
    x = x.detach().clone().requires_grad_()
    attn.zero_grad()
    y = fn(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.float(), x.grad, attn.wqkv.weight.grad, attn.wo.weight.grad]


def test_fp32_attention_under_autocast_matches_fp32_sdpa_forward_and_gradients(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, max_seq_len=48)  # head dim 16, as the quickstart's 33k
    attn = Attention(cfg)
    cos, sin = rope_tables(cfg.head_dim, 48, cfg.rope_base)
    x = torch.randn(3, 48, 32)
    ref = run(attn, x, cos, sin, lambda x: attention_in_fp32(attn, x, cos, sin))

    def ours(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attn(x, cos, sin)

    new = run(attn, x, cos, sin, ours)
    for a, b in zip(new, ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    monkeypatch.setattr(common, "FP32_ATTENTION_MAX_HEAD_DIM", 0)  # the old path: attention in bf16 (can fail)
    old = run(attn, x, cos, sin, ours)
    assert max((a - b).abs().max().item() for a, b in zip(old, ref)) > 1e-3


def test_fp32_attention_is_not_used_outside_autocast_or_above_the_head_dim_limit():
    q = torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16)
    assert not common.upcast_attention(q)  # no autocast: the dtype the caller chose
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.upcast_attention(q)
        assert not common.upcast_attention(torch.zeros(1, 2, 4, common.FP32_ATTENTION_MAX_HEAD_DIM + 2, dtype=torch.bfloat16))


def test_compile_auto_decides_by_run_length_and_a_resume_keeps_the_choice(tmp_path):
    def cfg(steps, compile_="auto", **model):
        return RunConfig.from_dict({"model": {"d_model": 32, "n_layer": 2, "n_head": 2, **model},
                                    "train": {"max_steps": steps, "compile": compile_}})

    assert resolve_compile(cfg(COMPILE_MIN_STEPS - 1), "cpu")[0] is False
    assert resolve_compile(cfg(COMPILE_MIN_STEPS), "cpu")[0] is (c_compiler() is not None)
    assert resolve_compile(cfg(10, "true"), "cpu")[0] is True
    assert resolve_compile(cfg(10 * COMPILE_MIN_STEPS, "false"), "cpu")[0] is False
    assert resolve_compile(cfg(10 * COMPILE_MIN_STEPS, moe={"n_experts": 4}), "cpu")[0] is False  # not measured: eager
    assert resolve_compile(cfg(10 * COMPILE_MIN_STEPS, doc_mask_token=1), "cpu")[0] is False  # a graph per batch
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"train": {"compile": True}}))  # an old config.json: compile was a bool
    assert resolve_compile(cfg(3), "cpu", saved) == (True, "auto: as this run chose when it started (train.compile=true)")
    assert RunConfig.from_dict({"train": {"compile": False}}).train.compile == "false"
    with pytest.raises(ConfigError, match="train.compile='maybe' is not one of auto, true, false"):
        check_ranges(RunConfig.from_dict({"train": {"compile": "maybe"}}))


def test_compile_choice_is_printed_and_recorded_in_config_and_summary(tiny_data, tmp_path, capsys):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=2, **{"train.ckpt_every": 2}))
    assert cfg.train.compile == "auto"
    summary = train(cfg, tmp_path / "run", progress=True)
    assert f"torch.compile off (auto: 2 steps < {COMPILE_MIN_STEPS}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["compile"] == "false"
    assert summary["compiled"] is False
    # resuming with the default (auto) again is not a config change
    train(resolve(overrides=tiny_overrides(tiny_data, steps=2, **{"train.ckpt_every": 2})), tmp_path / "run", resume=True, progress=False)


def test_dtype_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, tmp_path):
    for amx, avx512_bf16, want in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert native_bf16("cpu") is (want == "bf16")
        dtype, why = resolve_dtype("auto", "cpu")
        assert dtype == want and why.startswith("auto: this cpu")
    assert resolve_dtype("bf16", "cpu") == ("bf16", "train.dtype=bf16")  # an explicit choice is kept (still emulated)
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"train": {"dtype": "bf16"}}))  # a run started on an AMX machine resumes in bf16 here
    assert resolve_dtype("auto", "cpu", saved) == ("bf16", "auto: as this run chose when it started (train.dtype=bf16)")
    assert resolve_dtype("auto", "mps")[0] == "fp32"
    with pytest.raises(ConfigError, match="train.dtype='fp16' is not one of auto, bf16, fp32"):
        check_ranges(RunConfig.from_dict({"train": {"dtype": "fp16"}}))


def test_dtype_choice_is_printed_and_recorded_and_a_resume_keeps_it(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=2, **{"train.ckpt_every": 2}))
    assert cfg.train.dtype == "auto"
    train(cfg, tmp_path / "run", progress=True)
    assert "fp32 (auto: this cpu has no native bf16 matmul" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == "fp32"
    # the same run resumed on a machine with native bf16 keeps fp32: the same run trains the same bits
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    summary = train(resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.ckpt_every": 2})), tmp_path / "run",
                    resume=True, progress=True, allow_config_change=True)
    assert "fp32 (auto: as this run chose when it started (train.dtype=fp32))" in capsys.readouterr().out
    assert summary["steps"] == 4 and summary["dtype"] == "fp32"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == "fp32"
