"""Building blocks shared by Step-1 (dense) and Step-2 (MoE): RMSNorm, RoPE, attention, SwiGLU, KV cache.

Conventions follow Llama exactly (rotate-half RoPE, RMSNorm with weight, no biases) so our weights load
into Hugging Face's LlamaForCausalLM with identical logits; the only difference is that we keep q/k/v and
gate/up as single fused matrices because one big matmul is faster than three small ones, and the
state-dict adapter splits them on export.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from steplab.config import ModelConfig
from steplab.data.chat import IGNORE_INDEX  # a target that is not trained (prompts, markers, padding)




def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX.

    A batch with no target at all (an SFT micro-batch holding only prompts) would average over nothing, 0/0 =
    NaN (nanochat #590); it contributes a zero loss with zero gradient instead.
    """
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE_INDEX)
    return torch.where(flat.ne(IGNORE_INDEX).any(), loss, torch.zeros_like(loss))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Llama, then return in the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Per-layer key/value buffers with one row ("slot") per sequence, each at its own length.

    Rows are independent, which is what continuous batching needs: a sequence can join a free slot and
    decode beside others that are further along. ``lengths[slot]`` counts the positions already filled.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, n_slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.max_len = max_len

    def reset(self, slots: torch.Tensor | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0


# Under bf16 autocast on CPU, attention with head_dim up to this runs in fp32: torch's CPU flash-attention kernel is
# 1.1-2.7x faster in fp32 than in bf16 at head dims 12-48 (forward + backward; docs/performance.md), even at 64 and
# slower at step1-mini's 4 x 8 heads x 512 x 64 (0.85x); whole steps: bench/tiny_step.py. fp32 is also the more
# exact of the two. SDPA is on CPU autocast's bf16 list, so autocast must be switched off around it, not just fed
# fp32 inputs. 0 turns this off (every attention then follows autocast, as before 2026-11-30).
FP32_ATTENTION_MAX_HEAD_DIM = 48


def upcast_attention(q: torch.Tensor) -> bool:
    """True where attention should leave CPU bf16 autocast for fp32 (see ``FP32_ATTENTION_MAX_HEAD_DIM``)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
            and q.shape[-1] <= FP32_ATTENTION_MAX_HEAD_DIM)


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention (n_kv_head == n_head is plain MHA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, slots=None, positions=None, segments=None):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        upcast = cache is None and upcast_attention(q)  # training/eval under CPU autocast at small head dims: fp32
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # rotate in the matmul dtype (bf16 under autocast): half the bytes
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
                y = self._sdpa(q, k, v, mask=None) if segments is None else self._sdpa_segments(q, k, v, segments)
            y = y.to(torch.bfloat16) if upcast else y
        else:
            # Write this step's keys/values at each row's own positions, then attend over the filled prefix.
            rows = slots[:, None]
            cache.k[layer][rows, :, positions] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[layer][rows, :, positions] = v.transpose(1, 2).to(cache.v.dtype)
            S = int(positions.max()) + 1
            keys, values = cache.k[layer][slots, :, :S].to(q.dtype), cache.v[layer][slots, :, :S].to(q.dtype)
            mask = torch.arange(S, device=x.device)[None, None, :] <= positions[:, :, None]  # (B, T, S)
            y = self._sdpa(q, keys, values, mask=mask[:, None])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _sdpa_segments(self, q, k, v, segments):
        """Document masking in packed rows: causal attention inside each [start, end) segment of each row, one
        SDPA call per document, so memory stays linear in length (no T x T mask) and cross-document blocks
        are never computed."""
        rows = [torch.cat([self._sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], mask=None)
                           for s, e in row], dim=2) for b, row in enumerate(segments)]
        return torch.cat(rows, dim=0)

    def _sdpa(self, q, k, v, mask):
        if self.n_kv_head != self.n_head:
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matrix ``w13``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.d_ff, dim=-1)
        return self.w2(F.silu(gate) * up)


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer: q and o are d x d, k and v d x (n_kv_head * head_dim) each (GQA counted
    as it is; 4 d^2, Step Law's count, when n_kv_head == n_head)."""
    d, hd = cfg.d_model, cfg.head_dim
    return 2 * d * (cfg.n_head * hd) + 2 * d * (cfg.n_kv_head * hd)
