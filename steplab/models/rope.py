"""Rotary position embeddings and their context-extension scalings.

One function, ``inv_freq``, turns the config's ``model.rope`` block into per-pair rotation frequencies
and an attention factor; ``rope_tables`` turns those into the cos/sin tables the attention multiplies
with (rotate-half layout, the frequencies repeated twice). Each scaling matches the formula of the paper
and, number for number, Hugging Face's ``ROPE_INIT_FUNCTIONS`` (tests/test_rope.py checks them against
transformers), so an exported model gives the same logits under ``LlamaForCausalLM``.

Scalings (s = ``factor``, L = ``original_max_seq_len``, the context the model was trained at):

- ``linear``  position interpolation (Chen et al. 2023): every frequency / s, i.e. positions squeezed s-fold.
- ``dynamic`` dynamic NTK (bloc97, /r/LocalLLaMA 2023): for a sequence of length n > L the base becomes
  base * (s n / L - (s - 1)) ^ (d / (d - 2)); at n <= L nothing changes. The tables depend on the current
  length, so they are recomputed per forward (as transformers does).
- ``yarn``    YaRN (Peng et al., ICLR 2024): "NTK-by-parts" - dimensions that rotate more than beta_fast
  times over L keep their frequency (extrapolate), those rotating fewer than beta_slow times are divided
  by s (interpolate), a linear ramp in between; plus an attention temperature: cos and sin are multiplied
  by 0.1 ln s + 1, so q.k (the logits) grows by its square, as in the paper's sqrt(1/t) = 0.1 ln s + 1.
- ``llama3``  Llama-3.1: wavelengths longer than L / low_freq_factor are divided by s, shorter than
  L / high_freq_factor are kept, smoothly interpolated between.
"""
from __future__ import annotations

import math

import torch

SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature multiplier on cos/sin: 0.1 ln s + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_ramp(head_dim: int, base: float, rope) -> tuple[int, int]:
    """YaRN's ramp (low, high) in frequency-pair indices: pairs up to ``low`` rotate at least ``beta_fast`` times
    over the original length and keep their frequency, pairs from ``high`` on rotate at most ``beta_slow`` times
    and are divided by s, the ones between are blended linearly (transformers' ``find_correction_range``)."""
    def dim_at(rotations: float) -> float:  # the pair index completing ``rotations`` turns over L positions
        return head_dim * math.log(rope.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(math.floor(dim_at(rope.beta_fast)), 0), min(math.ceil(dim_at(rope.beta_slow)), head_dim - 1)


def describe_yarn(head_dim: int, base: float, rope) -> str:
    """One line saying which frequency pairs YaRN keeps, blends and interpolates (printed by `steplab extend`)."""
    low, high = yarn_ramp(head_dim, base, rope)
    pairs = head_dim // 2
    keep = 1 - ((torch.arange(pairs, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    kept, interpolated = int((keep == 1).sum()), int((keep == 0).sum())
    line = (f"YaRN ramp (beta_fast {rope.beta_fast:g}, beta_slow {rope.beta_slow:g}) over {pairs} frequency pairs: "
            f"{kept} kept, {pairs - kept - interpolated} blended, {interpolated} interpolated 1/{rope.factor:g}")
    if kept <= 1:
        line += (f"; the fastest pair rotates only {rope.original_max_seq_len / (2 * math.pi):.1f} times over "
                 f"{rope.original_max_seq_len} tokens, so beta_fast={rope.beta_fast:g} (tuned for Llama's 4k context) keeps almost "
                 "nothing: a lower --beta-fast (e.g. 2) keeps the fine position resolution of short-context models")
    return line


def inv_freq(head_dim: int, base: float, rope=None, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """(frequencies of shape (head_dim/2,), attention factor) for a ``RopeConfig`` (None: plain RoPE).

    ``seq_len`` matters only for ``dynamic``: the length of the sequence being processed.
    """
    kind = "none" if rope is None else rope.scaling
    dims = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    if kind == "dynamic":
        n = max(seq_len or 0, rope.original_max_seq_len)
        base = base * ((rope.factor * n / rope.original_max_seq_len) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    freq = 1.0 / (base ** dims)
    if kind in ("none", "dynamic"):
        return freq, 1.0
    s, L = rope.factor, rope.original_max_seq_len
    if kind == "linear":
        return freq / s, 1.0
    if kind == "yarn":
        low, high = yarn_ramp(head_dim, base, rope)
        if low == high:
            high += 0.001  # a one-point ramp would divide by zero
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequency, kept), 0: interpolate (divided by s)
        freq = (freq / s) * (1 - keep) + freq * keep
        return freq, rope.attention_factor or yarn_attention_factor(s)
    if kind == "llama3":
        wavelen = 2 * math.pi / freq
        low_wavelen, high_wavelen = L / rope.low_freq_factor, L / rope.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, freq / s, freq)
        smooth = (L / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unknown RoPE scaling {kind!r}; known: {', '.join(SCALINGS)}")


def rope_tables(head_dim: int, max_len: int, base: float, rope=None, seq_len: int | None = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim), the frequencies repeated twice (the rotate-half layout)."""
    freq, attention = inv_freq(head_dim, base, rope, seq_len=seq_len, device=device)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention, angles.sin() * attention


def is_dynamic(rope) -> bool:
    return rope is not None and rope.scaling == "dynamic"


# ---- Hugging Face config keys ------------------------------------------------------------------------------

def hf_rope_fields(cfg) -> dict:
    """``config.json`` fields for ``ModelConfig`` ``cfg``: transformers >= 5 reads ``rope_parameters`` (and
    still accepts ``rope_scaling``, which it prefers when both are present); transformers 4.x and vLLM read
    ``rope_scaling`` + ``rope_theta``. We write all three, with the same content."""
    r = cfg.rope
    params: dict = {"rope_type": "default" if r.scaling == "none" else r.scaling, "rope_theta": cfg.rope_base}
    max_pos = cfg.max_seq_len
    if r.scaling == "linear":
        params["factor"] = r.factor
    elif r.scaling == "dynamic":
        # transformers scales relative to max_position_embeddings, so that must be the original length.
        params["factor"] = r.factor
        max_pos = r.original_max_seq_len
    elif r.scaling == "yarn":
        params.update(factor=r.factor, original_max_position_embeddings=r.original_max_seq_len, beta_fast=r.beta_fast,
                      beta_slow=r.beta_slow, attention_factor=r.attention_factor or yarn_attention_factor(r.factor))
    elif r.scaling == "llama3":
        params.update(factor=r.factor, original_max_position_embeddings=r.original_max_seq_len,
                      low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    out = {"rope_theta": cfg.rope_base, "rope_parameters": params, "max_position_embeddings": max_pos}
    out["rope_scaling"] = dict(params) if r.scaling != "none" else None
    return out


def rope_from_hf(hf: dict, where: str) -> tuple[dict, int, float]:
    """(``model.rope`` dict, our max_seq_len, rope base) from a Hugging Face config dict; ValueError with a
    message naming ``where`` when the scaling is one steplab cannot reproduce."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    # transformers >= 5 keeps rope_theta inside rope_parameters and may write a top-level null
    base = float(params.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta") or 10000.0)
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if kind == "default":
        return {}, max_pos, base
    names = {"linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}
    if kind not in names:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; steplab reproduces default, linear, dynamic, yarn and llama3")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim") or params.get("truncate") is False):
        raise ValueError(f"{where}: YaRN with mscale/mscale_all_dim/truncate=false (DeepSeek style) is not supported")
    factor = float(params.get("factor") or 0)
    if factor < 1:
        raise ValueError(f"{where}: rope factor {params.get('factor')!r} must be >= 1")
    rope = {"scaling": names[kind], "factor": factor}
    if kind == "dynamic":
        rope["original_max_seq_len"] = max_pos
        max_pos = int(round(max_pos * factor))
    elif kind == "linear":
        rope["original_max_seq_len"] = int(hf.get("original_max_position_embeddings") or round(max_pos / factor))
    else:
        rope["original_max_seq_len"] = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos)
    if kind == "yarn":
        rope.update(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1))
        if params.get("attention_factor") is not None:
            rope["attention_factor"] = float(params["attention_factor"])
    if kind == "llama3":
        rope.update(low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]))
    return rope, max_pos, base
