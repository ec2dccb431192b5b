"""Step-1: the dense decoder. Reads top to bottom: config -> block -> model -> accounting
(FLOPs per token for every family: ``steplab.models.flops_per_token``).

Layout (identical to Llama): token embedding -> n_layer x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU -> residual] -> RMSNorm -> lm_head (optionally tied to the embedding).

Initialisation: every weight matrix and the embedding ~ N(0, init_std=0.02); the two projections that
write into the residual stream (attention ``wo`` and FFN ``w2``) are scaled by 1/sqrt(2 * n_layer), as in
GPT-2, so the residual stream's variance does not grow with depth; RMSNorm weights start at 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from steplab.config import ModelConfig
from steplab.models.common import Attention, KVCache, RMSNorm, SwiGLU, attention_params, masked_cross_entropy
from steplab.models.rope import is_dynamic, rope_tables


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, cache=None, layer=0, slots=None, positions=None, segments=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, slots, positions, segments)
        return x + self.ffn(self.ffn_norm(x))


class Step1(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = cfg.rope if cfg.rope.scaling != "none" else None
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, self.rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None, *,
                cache: KVCache | None = None, slots: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean cross-entropy over the non-ignored ``targets`` when given.

        With a ``cache``, row b of ``idx`` continues the sequence in cache slot ``slots[b]`` (default: row b)
        from position ``cache.lengths[slot]``; the cache lengths advance by T. ``embeds`` (B, T, d_model), when
        given, replaces the token embeddings: Step-1V (models/vision.py) puts image features at image places.
        ``positions`` (B, T), without a cache, gives each token its RoPE position instead of 0..T-1: PoSE training
        rows (``data.pose_length``) whose positions skip ahead to span a longer context.
        """
        B, T = idx.shape
        x = self.tok_emb(idx) if embeds is None else embeds
        segments = None
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            n = T if positions is None else int(positions.max()) + 1
            if n > self.cfg.max_seq_len:
                raise ValueError(f"position {n - 1} exceeds max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:n], self.rope_sin[:n]
            if is_dynamic(self.rope) and n > self.rope.original_max_seq_len:
                cos, sin = rope_tables(self.cfg.head_dim, n, self.cfg.rope_base, self.rope, seq_len=n, device=idx.device)
            if positions is not None:
                cos, sin = cos[positions][:, None], sin[positions][:, None]
            positions = None  # the layers use positions only to write a cache
            if self.cfg.doc_mask_token >= 0:
                segments = document_segments(idx, self.cfg.doc_mask_token)
        else:
            slots = torch.arange(B, device=idx.device) if slots is None else slots
            positions = cache.lengths[slots][:, None] + torch.arange(T, device=idx.device)  # (B, T)
            if int(positions.max()) >= min(cache.max_len, self.cfg.max_seq_len):
                raise ValueError(f"position {int(positions.max())} exceeds the cache/context length {min(cache.max_len, self.cfg.max_seq_len)}")
            cos, sin = self.rope_cos, self.rope_sin
            n = int(positions.max()) + 1
            if is_dynamic(self.rope) and n > self.rope.original_max_seq_len:  # frequencies follow the length so far
                cos, sin = rope_tables(self.cfg.head_dim, n, self.cfg.rope_base, self.rope, seq_len=n, device=idx.device)
            cos, sin = cos[positions][:, None], sin[positions][:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, slots, positions, segments)
        if cache is not None:
            cache.lengths[slots] += T
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return masked_cross_entropy(logits, targets)  # targets of IGNORE_INDEX (-100) are not trained

    # The trainer's interface (steplab.models.Trainable): a dense model keeps no per-step statistics.
    def step_stats(self) -> list[torch.Tensor]:
        return []

    def after_optimizer_step(self) -> dict[str, float]:
        return {}

    def discard_step_stats(self) -> None:
        pass


def document_segments(idx: torch.Tensor, start_token: int) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of the documents packed in it (a document starts at ``start_token``);
    None when no row holds more than one document, so attention keeps its plain causal path."""
    starts = (idx[:, 1:] == start_token).nonzero().tolist()  # (row, position - 1) of every inner document start
    if not starts:
        return None
    T = idx.shape[1]
    cuts: list[list[int]] = [[0] for _ in range(idx.shape[0])]
    for row, pos in starts:
        cuts[row].append(pos + 1)
    return [[(a, b) for a, b in zip(c, c[1:] + [T])] for c in cuts]


# ---- accounting -----------------------------------------------------------------------------------------

def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N (Step Law's non-embedding count), embedding parameters and the real total.

    Step Law writes N = n_layer * (4 d^2 + 3 d d_ff) for full multi-head attention. With grouped-query
    attention the k and v projections shrink to d * n_kv_head * head_dim each, and we count what is really
    there: attention = 2 d^2 + 2 d (n_kv_head * head_dim). This equals 4 d^2 when n_kv_head == n_head.
    RMSNorm weights (2 d per layer + d) are excluded from N, as Step Law does, but included in ``total``.
    """
    d = cfg.d_model
    N = cfg.n_layer * (attention_params(cfg) + 3 * d * cfg.d_ff)
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    norms = (2 * cfg.n_layer + 1) * d
    return {"N": N, "N_active": N, "embedding": embedding, "total": N + embedding + norms}
