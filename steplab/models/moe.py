"""Step-2: the Mixture-of-Experts decoder. Reads top to bottom: routing -> grouped experts -> MoE layer -> model -> accounting.

Step-2 is Step-1 (``models/dense.py``) with the SwiGLU FFN of some layers replaced by a Mixture of Experts:
the first ``moe.first_dense`` layers stay dense, then every ``moe.every``-th layer is MoE (layer i is MoE when
``i >= first_dense and (i - first_dense) % every == 0``). Attention, norms, embedding, lm_head and their
parameter names are Step-1's, so checkpoints, the KV cache and sampling work unchanged.

Routing maths, for one token x (d_model) in an MoE layer with E routed experts, top-k and n_shared shared:

    logits  = W_r x                                 (E,)   router in fp32, even under bf16 autocast
    s       = softmax(logits) | sigmoid(logits)     (E,)   "scores"   (moe.score)
    S       = top-k of (s + b)        [sigmoid]            selection uses the balancing bias b ...
              top-k of (logits + b)   [softmax]            (= top-k of log s + b: see below)
    g_i     = s_i / sum_{j in S} s_j,  i in S              ... the gates do not (DeepSeek-V3); k=1: g = s_i
    y       = sum_{i in S} g_i * FFN_i(x)  +  FFN_shared(x)

For sigmoid scores the bias is added to the scores exactly as in DeepSeek-V3. For softmax scores it is added
to the logits (log-scores): softmax scores sum to 1, and once one expert's score nears 1 all others sit near
0 together, so a fixed bias step in score units flips whole groups of tokens at once and the load jitters
around balance (on the skewed-router task of tests/test_moe.py: max/mean load 1.5-1.8 after 600 steps with
the bias on scores, 1.05-1.1 with it on logits).

Every FFN is a SwiGLU, down(silu(gate(x)) * up(x)); a routed expert has hidden size ``d_expert`` and the
``n_shared`` shared experts are fused into one SwiGLU of hidden ``n_shared * d_expert`` (the same function).

Balancing, aux-loss-free (DeepSeek-V3): each layer counts the tokens each expert received over an optimizer
step's forward passes (``load``); after the step ``b += rate * sign(mean(load) - load)``, centred so that
sum(b) stays 0 (torchtitan's choice; a common shift never changes a top-k). Under-loaded experts become
easier to select, over-loaded ones harder, without a gradient that fights the language-modelling loss. ``b``
is a persistent buffer: it is in every checkpoint, so a resumed run routes exactly as an uninterrupted one.
Two optional companions are added to the training loss: the sequence-level balance loss
``aux_loss_coef * sum_i f_i P_i`` (f_i = E/(kT) x tokens of the sequence routed to i, P_i = mean over the
sequence of s_i / sum_j s_j; 1.0 when perfectly balanced) and the router z-loss
``z_loss_coef * mean(logsumexp(logits)^2)`` (ST-MoE), which keeps router logits small.

Dispatch is dropless (every token reaches all of its k experts, no capacity factor): the T*k (token, expert)
assignments are sorted by expert and the token rows gathered into one buffer in that order, so each expert's
tokens are a contiguous slice (padded to a few repeating sizes, see ``row_bucket``); two grouped matmuls
(``torch._grouped_mm``, one GEMM per slice inside one op) run all experts; the gated rows are summed back into
their tokens with ``index_add``. Where this build has no working ``_grouped_mm`` for the device/dtype, a loop
of matmuls over the same contiguous slices is used.
Measured alternatives and timings are in docs/moe.md.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from steplab.config import ModelConfig
from steplab.errors import ConfigError
from steplab.models.common import SwiGLU, attention_params
from steplab.models.dense import Step1


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    m = cfg.moe
    return m.n_experts > 0 and i >= m.first_dense and (i - m.first_dense) % m.every == 0


def d_expert(cfg: ModelConfig) -> int:
    return cfg.moe.d_expert or cfg.d_ff


def check_moe_config(cfg: ModelConfig) -> None:
    m = cfg.moe
    if m.n_experts <= 0:
        raise ConfigError("Step2 needs model.moe.n_experts > 0; n_experts=0 is the dense Step-1 model")
    if not 1 <= m.top_k <= m.n_experts:
        raise ConfigError(f"model.moe.top_k={m.top_k} must be between 1 and n_experts={m.n_experts}")
    if m.score not in ("softmax", "sigmoid"):
        raise ConfigError(f"model.moe.score={m.score!r} is not one of softmax, sigmoid")
    if m.every < 1 or m.first_dense < 0 or m.n_shared < 0 or m.d_expert < 0:
        raise ConfigError("model.moe.every must be >= 1 and first_dense, n_shared, d_expert >= 0")
    if not any(is_moe_layer(cfg, i) for i in range(cfg.n_layer)):
        raise ConfigError(f"model.moe.first_dense={m.first_dense} leaves no MoE layer in {cfg.n_layer} layers; "
                          f"lower it, or set model.moe.n_experts=0 for a dense model")


# ---- grouped matmul ---------------------------------------------------------------------------------------

def row_bucket(n_rows: int, n_experts: int) -> int:
    """Expert slices are padded to a multiple of this many rows: ~1/8 of the mean slice, a power of 2 in [16, 128].

    On CPU, oneDNN builds (JIT-compiles) a GEMM kernel for every new matrix shape and caches it by shape. Exact
    slice sizes change every step, so each expert GEMM paid that again (1-2.5 ms each; a step2-nano step took
    up to 1.6x a step1-nano step instead of ~1.1x). Rounding makes the shapes repeat, for at most 1/8 (on average 1/16) extra rows.
    """
    mean = max(n_rows / n_experts, 1.0)
    return int(min(128, max(16, 2 ** round(math.log2(max(mean / 8, 1.0))))))


@torch.compiler.disable  # a one-off probe with a backward inside: never traced by torch.compile
@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Does ``torch._grouped_mm`` run forward and backward here? (CPU: yes in torch >= 2.9, fp32 and bf16.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:  # the first caller may be an eval or generation under no_grad/inference_mode: the probe needs grad
        with torch.inference_mode(False), torch.enable_grad():
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    x = torch.randn(5, 16, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 16, 32, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([2, 2, 5], device=device_type, dtype=torch.int32)  # includes an empty group
    y = torch._grouped_mm(x, w, offs=offs)
    y.backward(torch.ones_like(y))
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    return bool(torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-slice e of ``x`` (``counts[e]`` rows, in expert order) times ``w[e]``: (M, d_in) x (E, d_in, d_out) -> (M, d_out)."""
    # _grouped_mm wants row strides of a multiple of 16 bytes (e.g. d_expert a multiple of 8 in bf16)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    if aligned and grouped_mm_works(x.device.type, x.dtype):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    # Fallback: one matmul per expert over its contiguous slice (no masking, no per-token loop).
    return torch.cat([xs @ w[e] for e, xs in enumerate(x.split(counts.tolist()))])


class GroupedLinear(nn.Module):
    """E bias-free linear maps, weight (E, d_in, d_out): the layout ``_grouped_mm`` takes without a transpose."""

    def __init__(self, n: int, d_in: int, d_out: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d_in, d_out) * std)  # Step2.reset_parameters re-initialises

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x, self.weight.to(x.dtype), counts)


def sort_by_expert(expert_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, k) expert choices -> (order, token_of, counts).

    ``order`` sorts the T*k flattened assignments by expert (stable: token order within an expert),
    ``token_of[j]`` is the token of the j-th sorted assignment, ``counts[e]`` how many went to expert e.
    """
    flat = expert_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    return order, order // expert_idx.shape[1], torch.bincount(flat, minlength=n_experts)


# ---- the MoE layer ----------------------------------------------------------------------------------------

class MoE(nn.Module):
    """Router + E routed SwiGLU experts (grouped) + optional shared SwiGLU; drop-in for ``Block.ffn``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d, de = cfg.moe, cfg.d_model, d_expert(cfg)
        self.n_experts, self.top_k, self.d_expert, self.score = m.n_experts, m.top_k, de, m.score
        self.bias_update_rate, self.aux_loss_coef, self.z_loss_coef = m.bias_update_rate, m.aux_loss_coef, m.z_loss_coef
        self.router = nn.Linear(d, m.n_experts, bias=False)
        self.w13 = GroupedLinear(m.n_experts, d, 2 * de)  # gate and up, fused as in SwiGLU
        self.w2 = GroupedLinear(m.n_experts, de, d)
        self.shared = SwiGLU(d, m.n_shared * de) if m.n_shared else None
        self.register_buffer("expert_bias", torch.zeros(m.n_experts))  # persistent: checkpoints carry it
        self.register_buffer("load", torch.zeros(m.n_experts, dtype=torch.long), persistent=False)  # this step
        self.aux_loss: torch.Tensor | None = None  # set by a training forward when a coefficient is > 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) -> expert_idx (T, k), gates (T, k) fp32, scores (T, E) fp32, logits (T, E) fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        biased = (logits if self.score == "softmax" else scores) + self.expert_bias.float()
        expert_idx = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices
        gates = scores.gather(-1, expert_idx)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return expert_idx, gates, scores, logits

    def experts(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropless grouped dispatch: (y, counts) with y[t] = sum_i gates[t, i] * expert_{idx[t, i]}(x[t])."""
        order, token_of, counts = sort_by_expert(expert_idx, self.n_experts)
        # Each expert's slice is rounded up to a multiple of `bucket` rows (see row_bucket): sorted assignment j
        # goes to row dest[j] of the buffer. Padding rows read token 0 and get gate 0, so they add exactly 0 to
        # the output and receive exactly 0 gradient.
        bucket = row_bucket(order.numel(), self.n_experts)
        rows = (counts + bucket - 1) // bucket * bucket
        expert_sorted = expert_idx.reshape(-1)[order]
        dest = (rows.cumsum(0) - rows)[expert_sorted] + torch.arange(order.numel(), device=x.device) \
            - (counts.cumsum(0) - counts)[expert_sorted]
        n_rows = int(rows.sum())
        src = torch.zeros(n_rows, dtype=torch.long, device=x.device).index_copy_(0, dest, token_of)
        gate_rows = gates.new_zeros(n_rows).index_copy(0, dest, gates.reshape(-1)[order])
        xs = x.index_select(0, src)  # (n_rows, d): each expert's tokens are one contiguous slice
        gate, up = self.w13(xs, rows).chunk(2, dim=-1)
        ys = self.w2(F.silu(gate) * up, rows) * gate_rows[:, None].to(x.dtype)
        return torch.zeros_like(x, dtype=ys.dtype).index_add_(0, src, ys), counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        expert_idx, gates, scores, logits = self.route(flat)
        if torch.is_autocast_enabled(x.device.type):  # _grouped_mm is not on autocast's list: cast by hand
            flat = flat.to(torch.get_autocast_dtype(x.device.type))
        y, counts = self.experts(flat, expert_idx, gates)
        if self.shared is not None:
            y = y + self.shared(flat)
        self.aux_loss = None
        if self.training:
            self.load += counts.detach()
            self.aux_loss = self.auxiliary_losses(expert_idx.view(B, T, -1), scores.view(B, T, -1), logits)
        return y.view(B, T, d)

    def auxiliary_losses(self, expert_idx, scores, logits) -> torch.Tensor | None:
        """Weighted sequence-level balance loss + router z-loss, or None when both coefficients are 0."""
        loss = None
        if self.aux_loss_coef > 0:
            B, T, E = scores.shape
            picked = torch.zeros(B, E, device=scores.device).scatter_add_(
                1, expert_idx.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores.device))
            f = picked * E / (self.top_k * T)  # (B, E), 1 everywhere when balanced
            P = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
            loss = self.aux_loss_coef * (f * P).sum(-1).mean()
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
            loss = z if loss is None else loss + z
        return loss

    @torch.no_grad()
    def update_bias(self) -> dict[str, float]:
        """After an optimizer step: move the bias toward balance, report the step's load, reset the counts.

        Under data parallelism the trainer sums ``load`` over ranks first (train/distributed.py), so every
        rank moves its bias identically."""
        load = self.load.float()
        if load.sum() == 0:  # no training forward since the last update
            return {}
        mean = load.mean()
        if self.bias_update_rate > 0:
            delta = self.bias_update_rate * torch.sign(mean - load)
            self.expert_bias += delta - delta.mean()
        p = load / load.sum()
        entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(self.n_experts) if self.n_experts > 1 else p.new_tensor(1.0)
        self.load.zero_()
        return {"load_max_mean": (load.max() / mean).item(), "entropy": entropy.item(),
                "bias_norm": self.expert_bias.float().norm().item()}


# ---- the model --------------------------------------------------------------------------------------------

class Step2(Step1):
    """Step-1 with MoE FFNs in the layers ``is_moe_layer`` picks; same constructor, forward and names."""

    def __init__(self, cfg: ModelConfig):
        check_moe_config(cfg)
        super().__init__(cfg)  # the dense skeleton: embedding, blocks, norm, lm_head
        for i, layer in enumerate(self.layers):
            if is_moe_layer(cfg, i):
                layer.ffn = MoE(cfg)
        self.reset_parameters()  # Step-1's rule: N(0, 0.02), w2 (expert down-projections too) / sqrt(2 L)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.ffn) for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None, *,
                cache=None, slots=None) -> torch.Tensor:
        """Logits, or with ``targets`` the mean cross-entropy (+ the weighted router losses when training)."""
        out = super().forward(idx, targets, positions, cache=cache, slots=slots)
        if targets is not None and self.training:
            for _, moe in self.moe_layers():
                if moe.aux_loss is not None:
                    out = out + moe.aux_loss
        return out

    def after_optimizer_step(self) -> dict[str, float]:
        """Aux-loss-free bias update in every MoE layer; returns ``moe{layer}_{load_max_mean,entropy,bias_norm}``."""
        stats = {}
        for i, moe in self.moe_layers():
            stats.update({f"moe{i}_{k}": v for k, v in moe.update_bias().items()})
        return stats

    def step_stats(self) -> list[torch.Tensor]:
        """Each MoE layer's tokens per expert over this step's micro-batches: summed over data-parallel ranks
        (train/distributed.py) before ``after_optimizer_step`` moves the balancing biases."""
        return [moe.load for _, moe in self.moe_layers()]

    def discard_step_stats(self) -> None:
        """Forget the token counts of a step that was skipped (e.g. NaN loss) instead of stepped."""
        for _, moe in self.moe_layers():
            moe.load.zero_()


# ---- accounting -------------------------------------------------------------------------------------------

def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N (all non-embedding weights), N_active (what one token uses), embedding, total.

    Dense layers count as in Step-1: attention 2 d^2 + 2 d (n_kv_head * head_dim), FFN 3 d d_ff. An MoE layer
    has E routed + n_shared shared SwiGLU experts of hidden d_expert (3 d d_expert each) and a router
    (d E); a token uses top_k + n_shared experts and the whole router, so
    N_active = attention + (top_k + n_shared) 3 d d_expert + d E. The balancing bias is a buffer, not counted.
    """
    m, d, de = cfg.moe, cfg.d_model, d_expert(cfg)
    attn = attention_params(cfg)
    N = N_active = 0
    for i in range(cfg.n_layer):
        if is_moe_layer(cfg, i):
            N += attn + (m.n_experts + m.n_shared) * 3 * d * de + d * m.n_experts
            N_active += attn + (m.top_k + m.n_shared) * 3 * d * de + d * m.n_experts
        else:
            N += attn + 3 * d * cfg.d_ff
            N_active += attn + 3 * d * cfg.d_ff
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    norms = (2 * cfg.n_layer + 1) * d
    return {"N": N, "N_active": N_active, "embedding": embedding, "total": N + embedding + norms}
