"""RoPE scalings: frequencies equal transformers' own, the model's logits equal LlamaForCausalLM's at 4x the
original length for every scaling, the config block validates and survives export -> import, and the
document mask keeps packed documents independent."""
from __future__ import annotations

import math

import pytest
import torch

from steplab.config import ModelConfig, RopeConfig, RunConfig
from steplab.errors import ConfigError
from steplab.models.dense import Step1
from steplab.models.rope import hf_rope_fields, inv_freq, rope_from_hf, yarn_attention_factor

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ORIGINAL = 32
SCALINGS = {
    "linear": RopeConfig(scaling="linear", factor=4.0),
    "dynamic": RopeConfig(scaling="dynamic", factor=4.0),
    "yarn": RopeConfig(scaling="yarn", factor=4.0),
    "yarn8": RopeConfig(scaling="yarn", factor=8.0, beta_fast=16.0, beta_slow=2.0),
    "llama3": RopeConfig(scaling="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0),
}


def model_config(rope: RopeConfig, **kw) -> ModelConfig:
    rope = RopeConfig(**{**rope.__dict__, "original_max_seq_len": ORIGINAL})
    return ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=4 * ORIGINAL,
                       rope_base=500.0, rope=rope, **kw)


def hf_config(cfg: ModelConfig):
    from steplab.export.hf import llama_config_dict

    d = llama_config_dict(cfg)
    d.pop("architectures")
    d.pop("model_type")
    return transformers.LlamaConfig(**d)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_frequencies_match_transformers(name):
    cfg = model_config(SCALINGS[name])
    hf = hf_config(cfg)
    kind = hf.rope_parameters["rope_type"]
    n = 4 * ORIGINAL
    theirs, their_attn = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=n) if kind == "dynamic" else ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours, our_attn = inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope, seq_len=n)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert our_attn == pytest.approx(their_attn)
    assert not torch.allclose(ours, inv_freq(cfg.head_dim, cfg.rope_base)[0])  # the scaling really changed something


def test_yarn_ramp_keeps_high_frequencies_and_interpolates_low_ones():
    cfg = model_config(RopeConfig(scaling="yarn", factor=4.0))
    plain, _ = inv_freq(cfg.head_dim, cfg.rope_base)
    ours, attn = inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope)
    assert ours[0] == plain[0]  # rotates far more than beta_fast times over 32 positions: extrapolated
    assert ours[-1] == pytest.approx(plain[-1] / 4)  # rotates less than beta_slow times: interpolated
    ratio = plain / ours
    assert ((ratio >= 1 - 1e-6) & (ratio <= 4 + 1e-6)).all() and (ratio[1:] >= ratio[:-1] - 1e-6).all()
    assert attn == pytest.approx(0.1 * math.log(4) + 1)


def test_yarn_ramp_bounds_follow_beta_and_the_original_length():
    from steplab.models.rope import describe_yarn, yarn_ramp

    # Llama-2 (head_dim 128, base 1e4, 4k): the paper's beta 32/1 keep pairs 0-20 and interpolate 46 on.
    llama = RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=4096)
    assert yarn_ramp(128, 1e4, llama) == (20, 46)
    assert "21 kept, 25 blended, 18 interpolated" in describe_yarn(128, 1e4, llama)
    # At 128 tokens no pair turns 32 times, so 32/1 keeps only pair 0 and the line says so; beta_fast 2 keeps 0-4.
    short = RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=128)
    assert yarn_ramp(32, 1e4, short) == (0, 6) and "--beta-fast" in describe_yarn(32, 1e4, short)
    lower = RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=128, beta_fast=2.0)
    assert yarn_ramp(32, 1e4, lower) == (4, 6) and "5 kept, 1 blended, 10 interpolated" in describe_yarn(32, 1e4, lower)
    freq, _ = inv_freq(32, 1e4, lower)
    plain, _ = inv_freq(32, 1e4)
    assert torch.equal(freq[:5], plain[:5]) and torch.allclose(freq[6:], plain[6:] / 4)


@pytest.mark.parametrize("name", ["none"] + list(SCALINGS))
def test_logits_match_llama_at_4x_the_original_length(name):
    from steplab.export.hf import to_hf_state_dict

    torch.manual_seed(0)
    cfg = model_config(SCALINGS.get(name, RopeConfig()))
    ours = Step1(cfg).eval()
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * ORIGINAL))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert a.abs().max() > 0.05  # a real signal, not two zero tensors
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(SCALINGS))
def test_hf_keys_round_trip_to_the_same_rope_block(name):
    cfg = model_config(SCALINGS[name])
    fields = hf_rope_fields(cfg)
    assert fields["rope_scaling"] == fields["rope_parameters"] and fields["rope_theta"] == cfg.rope_base
    rope, max_len, base = rope_from_hf(fields, "config.json")
    assert (max_len, base) == (cfg.max_seq_len, cfg.rope_base)
    back = RopeConfig(**rope)
    if cfg.rope.scaling == "yarn":
        assert back.attention_factor == pytest.approx(yarn_attention_factor(cfg.rope.factor))
        back.attention_factor = 0.0
    assert back == cfg.rope


def test_hf_import_refuses_scalings_it_cannot_reproduce():
    with pytest.raises(ValueError, match="longrope.*not supported"):
        rope_from_hf({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "x/config.json")
    with pytest.raises(ValueError, match="mscale"):
        rope_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0}}, "x")
    assert rope_from_hf({"rope_theta": 5e5, "max_position_embeddings": 64}, "x") == ({}, 64, 5e5)


@pytest.mark.parametrize("bad, match", [
    (dict(scaling="cubic"), "model.rope.scaling"),
    (dict(scaling="yarn", factor=0.5), "factor"),
    (dict(scaling="yarn", factor=4.0, original_max_seq_len=999), "original_max_seq_len"),
    (dict(scaling="yarn", factor=4.0, beta_fast=1.0, beta_slow=2.0), "beta_fast > beta_slow"),
    (dict(scaling="llama3", factor=4.0, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
])
def test_rope_block_is_validated(bad, match):
    cfg = RunConfig.from_dict({"model": {"max_seq_len": 128, "rope": bad}, "data": {"seq_len": 128}})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_rope_block_defaults_and_saved_config_round_trip():
    cfg = RunConfig.from_dict({"model": {"max_seq_len": 512, "rope": {"scaling": "yarn", "factor": 4.0}}})
    assert cfg.model.rope.original_max_seq_len == 512  # unset: the model's own length
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.model.rope == cfg.model.rope and again.validate() is again


def test_document_mask_makes_packed_documents_independent():
    torch.manual_seed(0)
    cfg = model_config(RopeConfig(), doc_mask_token=1)
    model = Step1(cfg).eval()
    a = [1] + torch.randint(3, 300, (20,)).tolist()
    b = [1] + torch.randint(3, 300, (30,)).tolist()
    with torch.no_grad():
        packed = model(torch.tensor([a + b]))
        alone = model(torch.tensor([b]))
        unmasked = Step1(model_config(RopeConfig())).eval()
        unmasked.load_state_dict(model.state_dict())
        leaky = unmasked(torch.tensor([a + b]))
    # RoPE is relative, so document b alone (positions 0..) and packed after a (positions 21..) agree.
    assert (packed[0, len(a):] - alone[0]).abs().max() < 1e-4
    assert (leaky[0, len(a):] - alone[0]).abs().max() > 1e-2
