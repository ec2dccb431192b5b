"""Fixed-shape decode step for the serving engine (issue 13): one token for every KV-cache slot at once.

The engine's eager decode runs ``model(ids, cache=..., slots=...)`` over the running sequences only, so its
shapes change whenever a sequence joins or leaves and every step pays the model's Python and dispatch overhead
(for a 0.9M-parameter model that overhead, not arithmetic, is most of a step). :class:`FixedDecoder` instead
runs one step over **all** ``max_batch`` slots with shapes that never change: inactive rows compute garbage
that nobody reads and write nothing, so the step can be traced once and compiled (``torch.compile``), which
fuses the norms, RoPE, the cache writes and the small elementwise ops and removes the per-op dispatch.

Modes (``Engine(decode=...)``, ``steplab serve --decode``):

- ``eager``: the model's own forward over the running rows (the default; what ``steplab sample`` computes);
- ``static``: this module's fixed-shape step, not compiled (a check of the step itself, and the fallback);
- ``compiled``: the same step under ``torch.compile``, one graph per length bucket, all compiled by
  :meth:`FixedDecoder.warm_up` before the engine serves, so no request waits for a compile.

Cache writes are in place (an index_put into the preallocated ``KVCache``; a copy of the cache per layer made an
earlier attempt slower than eager). Attention reads a prefix of the cache whose length is the smallest bucket
(a power of two from ``DecodeConfig.min_bucket``, capped at the context) holding every active row's position,
with a per-row length mask, so a short conversation does not attend over the whole context.

:func:`prefill_together` is the prefill side of the same modes: waiting prompts in one padded forward.

Only the dense Step-1 family with static RoPE runs here (``unsupported_reason`` says why not otherwise); MoE,
vision and dynamic-NTK models keep the eager path.
"""
from __future__ import annotations

import itertools
import logging
import time
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steplab.models.common import KVCache, apply_rope

log = logging.getLogger(__name__)

MODES = ("eager", "static", "compiled")
_DECODERS = itertools.count()  # names each compiled decoder's own copy of _forward


@dataclass
class DecodeConfig:
    """How the engine decodes. ``compile_mode`` is torch.compile's mode, or ``frozen`` (freezing + max-autotune:
    weights become constants of the graph; bench/decode.py measured them: docs/benchmarks.md, issue 13 session 12);
    ``min_bucket`` the shortest attention length; ``buckets=False`` attends over the whole context at every step
    (one graph)."""

    mode: str = "eager"
    compile_mode: str = "frozen"
    min_bucket: int = 64
    buckets: bool = True

    def validate(self) -> "DecodeConfig":
        if self.mode not in MODES:
            raise ValueError(f"decode mode {self.mode!r} is not one of {', '.join(MODES)} (or 'auto' in steplab serve)")
        if self.min_bucket < 1:
            raise ValueError(f"min_bucket={self.min_bucket} must be at least 1")
        return self


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the fixed-shape step (None when it can)."""
    from steplab.models.dense import Step1
    from steplab.models.rope import is_dynamic

    if type(model) is not Step1:
        return f"{type(model).__name__} is not the dense Step-1 decoder (MoE, vision and other families decode eagerly)"
    if is_dynamic(model.rope):
        return "dynamic-NTK RoPE recomputes its tables with the length; it decodes eagerly"
    return None


def auto_mode(model: torch.nn.Module) -> str:
    """``steplab serve --decode auto``: compiled for a plain dense model (float weights), else eager."""
    from steplab.infer.quant import QuantLinear

    if unsupported_reason(model) is not None or any(isinstance(m, QuantLinear) for m in model.modules()):
        return "eager"
    return "compiled"


def bucket_sizes(max_len: int, min_bucket: int, buckets: bool = True) -> list[int]:
    """Attention lengths the step is built for: powers of two from ``min_bucket``, and ``max_len`` last."""
    if not buckets:
        return [max_len]
    out, n = [], min_bucket
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


class FixedDecoder:
    """One decode step over every slot of ``cache`` for ``model`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, cfg: DecodeConfig):
        cfg.validate()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"decode={cfg.mode!r} needs the fixed-shape step: {reason}; use decode='eager'")
        self.model, self.cache, self.cfg = model, cache, cfg
        self.n_slots, self.max_len = cache.k.shape[1], cache.max_len
        self.device = cache.k.device
        self.rows = torch.arange(self.n_slots, device=self.device)
        self.buckets = bucket_sizes(self.max_len, cfg.min_bucket, cfg.buckets)
        self.warm = cfg.mode != "compiled"
        self.explicit_attention = cfg.mode == "compiled"
        self._step = self._forward
        if cfg.mode == "compiled":
            import torch._dynamo as dynamo

            # Dynamo keeps its compiled graphs on the function's code object, shared by every decoder, and its guards
            # do not tell two same-shaped decoders apart: a frozen graph (weights as constants) of one model was
            # reused for another, and after Engine.load_weights for the new weights (wrong tokens). Each decoder
            # therefore traces its own copy of the code. One graph per bucket: the attention length is a Python
            # int, and past dynamo's default limit of 8 specialisations it would silently fall back to eager.
            forward = types.FunctionType(FixedDecoder._forward.__code__.replace(co_name=f"_forward_{next(_DECODERS)}"),
                                         FixedDecoder._forward.__globals__)
            self._forward = types.MethodType(forward, self)
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 8, 2 * len(self.buckets))
            if cfg.compile_mode == "frozen":  # weights folded in as constants, GEMMs autotuned (incl. inductor's
                # own C++ GEMM on prepacked weights): faster steps, slower compile, and new weights need a new
                # decoder (Engine.load_weights builds one)
                self._step = torch.compile(self._forward, dynamic=False, mode="max-autotune-no-cudagraphs")
            else:
                self._step = torch.compile(self._forward, dynamic=False, mode=cfg.compile_mode)

    def bucket(self, n: int) -> int:
        """The shortest bucket holding ``n`` positions."""
        for b in self.buckets:
            if b >= n:
                return b
        return self.buckets[-1]

    def warm_up(self, say=None) -> float:
        """Compile every bucket now (a step with no active row changes nothing); returns the seconds it took."""
        if self.warm:
            return 0.0
        import torch._inductor.config as inductor_config

        t = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inside inductor's autotuner
            rows = torch.zeros(3, self.n_slots, dtype=torch.long, device=self.device)  # no row active
            # freezing is read when the graph is compiled, i.e. here (only compiled decoders are not warm); 0 choices
            # displayed keeps max-autotune from writing its timing tables to stderr (pages of them at serve start-up)
            with inductor_config.patch(freezing=self.cfg.compile_mode == "frozen", autotune_num_choices_displayed=0,
                                       max_autotune_report_choices_stats=False):
                for S in self.buckets:
                    self._step(self.cache.k, self.cache.v, self.cache.lengths, rows, S)
        self.warm = True
        dt = time.perf_counter() - t
        msg = f"compiled the decode step for {len(self.buckets)} attention length(s) {self.buckets} in {dt:.1f} s"
        log.info(msg)
        if say is not None:
            say(msg)
        return dt

    def step(self, slots: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens[i]`` to the sequence in slot ``slots[i]`` at its next position; returns the logits
        (n_slots, V) and their argmax (n_slots,), row = slot. The cache lengths of ``slots`` advance by one, as
        ``model(..., cache=...)`` does."""
        lengths = self.cache.lengths.tolist()
        need = max(lengths[s] for s in slots) + 1
        if need > min(self.max_len, self.model.cfg.max_seq_len):
            raise ValueError(f"position {need - 1} exceeds the cache/context length {min(self.max_len, self.model.cfg.max_seq_len)}")
        ids, active = [0] * self.n_slots, [0] * self.n_slots
        for s, t in zip(slots, tokens):
            ids[s], active[s] = t, 1
        # inactive rows "write" at their own length (clamped): the write keeps the old value there (see _forward)
        pos = [min(n, self.max_len - 1) for n in lengths]
        rows = torch.tensor([ids, pos, active], device=self.device)  # one host-to-tensor copy per step, not three
        return self._step(self.cache.k, self.cache.v, self.cache.lengths, rows, self.bucket(need))

    def _forward(self, kc: torch.Tensor, vc: torch.Tensor, lengths: torch.Tensor, inputs: torch.Tensor,
                 S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's decode forward for one token per slot (the same ops as Step1.forward + Attention.forward with
        a cache, so greedy tokens match the eager path). ``inputs`` (3, n_slots): token ids, positions, 1 where the
        row is active; ``S`` is the attention length (a bucket)."""
        m, rows = self.model, self.rows
        ids, pos, active = inputs[0], inputs[1], inputs[2].bool()
        B = ids.shape[0]
        x = m.tok_emb(ids)[:, None]  # (B, 1, d)
        cos, sin = m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None]  # (B, 1, 1, hd)
        keep = active[:, None, None]  # (B, 1, 1): rows whose write is real
        mask = (torch.arange(S, device=ids.device)[None, :] <= pos[:, None])[:, None, None]  # (B, 1, 1, S)
        nkv = m.layers[0].attn.n_kv_head
        heads = torch.arange(nkv, device=ids.device)[None, :].expand(B, nkv)
        slot_rows, head_pos = rows[:, None].expand(B, nkv), pos[:, None].expand(B, nkv)
        for i, layer in enumerate(m.layers):
            a = layer.attn
            nh, nkv, hd = a.n_head, a.n_kv_head, a.head_dim
            q, k, v = a.wqkv(layer.attn_norm(x)).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
            k = k.view(B, 1, nkv, hd).transpose(1, 2)
            v = v.view(B, 1, nkv, hd).transpose(1, 2)
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            q, k = apply_rope(q, c, s), apply_rope(k, c, s)
            # The write indexes the whole cache tensor (layer, slot, head, position), not a per-layer view of it:
            # index_put_ on a graph input is then done in place by inductor, where a write through a view made it
            # copy every layer's cache twice per step. An inactive row writes back what its slot already holds at
            # that position, so a free slot or one still prefilling is never changed by someone else's step.
            at = (torch.full_like(heads, i), slot_rows, heads, head_pos)  # each (B, nkv)
            kc.index_put_(at, torch.where(keep, k[:, :, 0].to(kc.dtype), kc[at]))
            vc.index_put_(at, torch.where(keep, v[:, :, 0].to(vc.dtype), vc[at]))
            keys, values = kc[i, :, :, :S].to(q.dtype), vc[i, :, :, :S].to(q.dtype)
            if self.explicit_attention:  # compiled: inductor fuses these into its own kernels (~8% faster per step
                # than calling SDPA's CPU kernel from the graph); the query heads of one KV head form a group
                scores = q.view(B, nkv, nh // nkv, hd) @ keys.transpose(-1, -2) * hd ** -0.5  # (B, nkv, G, S)
                y = (torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values).view(B, nh, 1, hd)
            else:
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=nkv != nh)
            x = x + a.wo(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + layer.ffn(layer.ffn_norm(x))
        lengths.add_(inputs[2])  # in the graph: one dispatch fewer per step than an index_put outside it
        logits = m.lm_head(m.norm(x))[:, 0]
        return logits, logits.argmax(dim=-1)  # greedy rows need only this (fused here, one host transfer later)


def prefill_together(engine, budget: int) -> int:
    """Prefill the whole prompts at the head of ``engine``'s queue (two or more, within ``budget`` tokens
    padded) in one right-padded forward, each into its first slot; returns the padded tokens used. Only for the
    fixed-shape decode modes (the engine calls it, like scoring.score_step, before its one-request prefill):
    eight 16-token prompts were 10% of a batch-8 run of a 0.9M model when prefilled one by one,
    and the eager mode keeps its one-request prefill (bit-identical to an unbatched engine). The padding's
    keys and values lie past each row's length: masked, then overwritten by its decoding."""
    from steplab.infer.scoring import _padded, pads_safely

    group, width = [], 0
    for pre in engine._prefilling:
        req = pre.handle.request
        w = max(width, len(req.prompt))
        if (pre.pos or req.continuations or req.images is not None or req.prompt_logprobs is not None
                or w * (len(group) + 1) > budget or not pads_safely(engine, w)):
            break
        group.append(pre)
        width = w
    if len(group) < 2:
        return 0
    prompts = [pre.handle.request.prompt for pre in group]
    first = [pre.seqs[0].slot for pre in group]
    slots = torch.tensor(first, device=engine.device)
    logits = engine.model(_padded(prompts, engine.device), cache=engine.cache, slots=slots)
    engine.cache.lengths[slots] = torch.tensor([len(p) for p in prompts], device=engine.device)
    with engine._cond:  # one move, so stats() never sees the sequences in neither container
        for pre in group:
            engine._prefilling.remove(pre)
            engine._running.extend(pre.seqs)
            engine.prompt_tokens_total += len(pre.handle.request.prompt)
    for row, pre in enumerate(group):
        n = len(prompts[row])
        for seq in pre.seqs[1:]:  # n > 1: share the computed prompt
            engine._copy_slot(first[row], seq.slot, n)
        for seq in pre.seqs:
            engine._accept(seq, logits[row, n - 1])
    return width * len(group)
