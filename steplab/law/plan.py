"""``steplab law plan``: from a loss law to a ready training run.

Given one of compute C, parameters N or tokens D, ``plan`` returns
1. the compute-optimal N and D: the (N, D) on C = 6ND that minimises the fitted L(N, D) = E + A/N^alpha +
   B/D^beta (Hoffmann eq. 4, closed form: N_opt = G (C/6)^a, a = beta/(alpha+beta)); given N alone, the
   C whose optimal N it is (and likewise for D); given two of C, N, D, the third follows and nothing is
   optimised;
2. the predicted loss, with a 95% bootstrap interval when the law comes from a fit with bootstrap draws;
3. Step Law's peak lr and batch size (``steplab.law.hparams.suggest``);
4. a model shape (d_model, n_layer, n_head, d_ff) whose N, counted by ``steplab.models.count_params``, is
   within about 1% of the target, and a train config (steps = D / batch tokens) that ``steplab train
   --config FILE`` accepts.

The law defaults to Epoch AI's refit of Chinchilla (Besiroglu et al. 2024); its losses are on Chinchilla's
MassiveText scale, so for your own data fit your own sweep (``fit=``, or ``--from TABLE`` on the CLI).

MoE (``moe=True``): N is the *active* non-embedding count, since compute is 6 N_active D. The shape is a
Step-2 layout (8 routed experts, top-2, 1 shared expert) sized so that N_active hits the target; its total N
is about 2.3x larger. The loss is the law fitted on MoE runs (``law fit`` fits a runs table of MoE runs in
active N), or else the dense law at N = N_active (an MoE usually does at least as well as the dense model of
its active size). A law fitted on MoE runs plans MoE runs only. The learning rate uses Step Law with the TOTAL N:
on Step Law's released MoE runs the grid-best learning rates follow the law with total N (cell RMS 0.2-0.3
in log lr) far better than with active N (off by 2.7-3.4x); see docs/scaling_laws.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steplab.errors import ConfigError, FitError
from steplab.law.fit import ParametricFit
from steplab.law.hparams import HparamCoefs, suggest
from steplab.utils import atomic_write_text

# Epoch AI's refit of Chinchilla approach 3 (Besiroglu et al. 2024, arXiv 2404.10102).
EPOCH = {"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.348, "beta": 0.366}
EPOCH_SOURCE = "Epoch AI's refit of Chinchilla (E=1.817, A=482, B=2085, alpha=0.348, beta=0.366), published coefficients"
# the step2-* presets' layout and router (sigmoid scores; bias rate 1e-2: at 1e-3 the router collapsed
# within ~10 steps at our learning rates, docs/LOG.md)
MOE_LAYOUT = {"n_experts": 8, "top_k": 2, "n_shared": 1, "score": "sigmoid", "bias_update_rate": 1e-2}


def coefficients_fit(E: float, A: float, B: float, alpha: float, beta: float) -> ParametricFit:
    """A ParametricFit from bare coefficients (no bootstrap draws, so no intervals)."""
    values = {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta}
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise FitError(f"loss law: {name} = {v!r} must be a positive finite number")
    nan = float("nan")
    return ParametricFit(E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta), n=0,
                         objective=nan, rmse_log=nan, max_rel_err=nan, starts=0, starts_at_best=0)


def as_fit(fit: Any = None) -> tuple[ParametricFit, str]:
    """(law, description) from a ParametricFit, a dict with E, A, B, alpha, beta (e.g. ``law fit --json``
    output), a 5-sequence in that order, or None (Epoch's published coefficients)."""
    if fit is None:
        return coefficients_fit(**EPOCH), EPOCH_SOURCE
    if isinstance(fit, ParametricFit):
        boot = "" if fit.boot is None else f", {len(fit.boot)} bootstrap draws"
        return fit, f"fitted law (E={fit.E:.4g}, A={fit.A:.4g}, B={fit.B:.4g}, alpha={fit.alpha:.4g}, beta={fit.beta:.4g}; {fit.n} runs{boot})"
    if isinstance(fit, dict):
        missing = [k for k in EPOCH if k not in fit]
        if missing:
            raise FitError(f"loss law: coefficients {', '.join(missing)} missing; give E, A, B, alpha, beta")
        law = coefficients_fit(*(fit[k] for k in EPOCH))
        return law, f"given coefficients (E={law.E:.4g}, A={law.A:.4g}, B={law.B:.4g}, alpha={law.alpha:.4g}, beta={law.beta:.4g})"
    if isinstance(fit, (list, tuple)) and len(fit) == 5:
        return as_fit(dict(zip(EPOCH, fit)))
    raise FitError(f"loss law: expected a ParametricFit, a dict of E, A, B, alpha, beta, or None; got {type(fit).__name__}")


def optimal_allocation(law: ParametricFit, compute: float | None = None, params: float | None = None,
                       tokens: float | None = None) -> tuple[float, float, float, str]:
    """(C, N, D, how) on C = 6ND. One of C, N, D: the compute-optimal point; two: the third follows."""
    given = {k: v for k, v in (("compute", compute), ("params", params), ("tokens", tokens)) if v is not None}
    for k, v in given.items():
        if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"plan: {k} = {v!r} must be a positive finite number")
    if not given:
        raise ConfigError("plan: give one of compute (--compute C), params (--params N) or tokens (--tokens D)")
    if len(given) == 3:
        raise ConfigError("plan: give at most two of compute, params and tokens (C = 6ND fixes the third)")
    if len(given) == 2:
        C, N, D = compute, params, tokens
        if C is None:
            C = 6.0 * N * D
        elif N is None:
            N = C / (6.0 * D)
        else:
            D = C / (6.0 * N)
        return float(C), float(N), float(D), "given " + " and ".join(given) + " (nothing optimised)"
    s = law.alpha + law.beta
    a = law.beta / s  # N_opt = G (C/6)^a
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / s)
    if compute is not None:
        C = float(compute)
    elif params is not None:
        C = 6.0 * (params / G) ** (1 / a)
    else:
        C = 6.0 * (tokens * G) ** (1 / (1 - a))
    N = G * (C / 6.0) ** a
    D = C / (6.0 * N)
    if params is not None:
        N = float(params)  # exact, not the round trip through C
    if tokens is not None:
        D = float(tokens)
    how = {"compute": "compute-optimal for the given C", "params": "the compute for which the given N is optimal",
           "tokens": "the compute for which the given D is optimal"}[next(iter(given))]
    return float(C), float(N), float(D), how


# ------------------------------------------------------------------------------------------- shapes

def _ff_granularity(d: int) -> int:
    """Round d_ff (d_expert) to 8 for tiny models, up to 64 for d_model >= 1024 (GEMM-friendly)."""
    return int(min(64, max(8, 2 ** math.floor(math.log2(max(d, 16) / 16)))))


def _head_dim(d: int) -> int | None:
    """A head dim in 32..128 (multiple of 16) dividing d_model: 128 for wide models, else nearest 64 (32 for
    d_model under 128, so tiny models still get several heads)."""
    want = 128 if d >= 2048 else 64 if d >= 128 else 32
    fits = [hd for hd in range(32, 129, 16) if d % hd == 0]
    return min(fits, key=lambda hd: (abs(math.log(hd / want)), -hd)) if fits else None


def find_shape(target: float, *, moe: bool = False, seq_len: int = 2048, aspect: tuple[float, float] = (32, 128),
               max_layers: int = 160, n_layer: int | None = None, n_head: int | None = None) -> dict[str, Any]:
    """Model settings whose N (dense) or N_active (MoE) is closest to ``target``, among d_model in steps
    of 16 up to 256, 32 up to 1024 and 128 above, n_layer with d_model/n_layer in ``aspect``, head dim 32-128,
    and d_ff (d_expert for MoE) within 2x-4.3x of d_model (the SwiGLU default is 8/3; d_model 32 rounds it up
    to 4x) rounded to a multiple of 8-64.

    Among shapes within ~1% of the target, the score prefers an aspect ratio near 64 and d_ff near the
    default. ``n_layer`` / ``n_head`` fix the depth / head count (a family of shapes that varies width only,
    as a sweep may use; then the aspect-ratio limits do not apply). Returns {"model": {...}, "N": ...,
    "N_active": ..., "rel_err": ...}."""
    from steplab.config import ModelConfig
    from steplab.models import count_params

    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"plan: target N = {target!r} must be positive")
    best = None
    d_values = list(range(32, 256, 16)) + list(range(256, 1025, 32)) + list(range(1152, 16385, 128))
    for d in d_values:
        if n_head is not None:
            hd = d // n_head if d % n_head == 0 and (d // n_head) % 2 == 0 else None
        else:
            hd = _head_dim(d)
        if hd is None:
            continue
        lo, hi = max(1, math.ceil(d / aspect[1])), min(max_layers, math.floor(d / aspect[0]))
        if n_layer is not None:
            lo = hi = n_layer
        attn = 4 * d * d
        gran = _ff_granularity(d)
        for L in range(lo, hi + 1):
            per_layer = target / L
            if moe:
                k = MOE_LAYOUT["top_k"] + MOE_LAYOUT["n_shared"]
                ideal = (per_layer - attn - d * MOE_LAYOUT["n_experts"]) / (3 * d * k)
                default = 8 * d / 9  # d_ff / 3, the step2-* presets' choice
            else:
                ideal = (per_layer - attn) / (3 * d)
                default = 8 * d / 3
            if not 0.75 * default <= ideal <= 1.6 * default:  # d_ff within 2x-4.3x of d_model
                continue
            ff = max(gran, int(round(ideal / gran)) * gran)
            model = {"d_model": d, "n_layer": L, "n_head": d // hd, "n_kv_head": d // hd, "max_seq_len": seq_len}
            if moe:
                model["d_ff"] = 3 * ff  # the dense layers' size, if moe.first_dense/every leave any
                model["moe"] = {**MOE_LAYOUT, "d_expert": ff}
            else:
                model["d_ff"] = ff
            counts = count_params(_model_config(ModelConfig, model))
            n = counts["N_active"]
            score = (20 * abs(math.log(n / target)) + (0 if n_layer else abs(math.log(d / L / 64)))
                     + 2 * abs(math.log(ff / default)))
            if best is None or score < best[0]:
                best = (score, model, counts)
    if best is None:
        fixed = f", n_layer {n_layer}" if n_layer else f", d_model/n_layer {aspect[0]:g}-{aspect[1]:g}"
        raise ConfigError(f"plan: no model shape reaches N = {target:.3g} (d_model 32-16384{fixed}, d_ff 2x-4.3x "
                          "d_model); is the target sensible?")
    _, model, counts = best
    n = counts["N_active"]
    return {"model": model, "N": counts["N"], "N_active": n, "rel_err": n / target - 1}


def _model_config(cls, model: dict):
    m = dict(model)
    moe = m.pop("moe", None)
    cfg = cls(**m)
    if moe:
        for k, v in moe.items():
            setattr(cfg.moe, k, v)
    return cfg


# --------------------------------------------------------------------------------------------- plan

@dataclass
class Plan:
    given: str                     # how C, N, D were obtained
    compute: float                 # C = 6 N D (N active for MoE)
    N: float                       # target non-embedding params (active for MoE)
    D: float                       # target tokens
    loss: float                    # predicted at (N, D)
    loss_ci: tuple[float, float] | None
    law: str                       # where the loss law came from
    a: float                       # N_opt ~ C^a under this law
    lr: float
    batch_tokens: float            # Step Law's batch (before rounding to sequences)
    lr_N: float                    # the N the lr law was evaluated at (total N for MoE)
    moe: bool
    seq_len: int
    model: dict[str, Any]          # the shape found
    N_model: int                   # its N (total for MoE)
    N_active_model: int
    config: dict[str, Any]         # a complete nested train config
    steps: int
    D_config: float
    loss_config: float
    loss_config_ci: tuple[float, float] | None
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] | None = None  # with unique_tokens: which data plan (fits / one-epoch / repeat) and why

    @property
    def batch_sequences(self) -> int:
        t = self.config["train"]
        return t["batch_size"] * t["grad_accum"]

    def to_dict(self) -> dict[str, Any]:
        return {"given": self.given, "compute": self.compute, "N": self.N, "D": self.D, "tokens_per_param": self.D / self.N,
                "loss": self.loss, "loss_ci": list(self.loss_ci) if self.loss_ci else None, "law": self.law,
                "a": self.a, "lr": self.lr, "lr_N": self.lr_N, "batch_tokens": self.batch_tokens,
                "batch_sequences": self.batch_sequences, "seq_len": self.seq_len, "moe": self.moe,
                "model": self.model, "N_model": self.N_model, "N_active_model": self.N_active_model,
                "N_rel_err": self.N_active_model / self.N - 1, "steps": self.steps, "D_config": self.D_config,
                "C_config": 6.0 * self.N_active_model * self.D_config, "loss_config": self.loss_config,
                "loss_config_ci": list(self.loss_config_ci) if self.loss_config_ci else None,
                "config": self.config, "notes": self.notes, "data": self.data}

    def lines(self) -> list[str]:
        m, t = self.model, self.config["train"]
        nname = "N_active" if self.moe else "N"
        ci = (f"  95% CI [{self.loss_ci[0]:.4f}, {self.loss_ci[1]:.4f}]" if self.loss_ci
              else "  (no interval: the law has no bootstrap draws; fit a sweep with --from TABLE)")
        out = [f"law: {self.law}",
               f"C = {self.compute:.4g} FLOPs (6 {nname} D), {self.given}",
               f"  {nname} = {self.N:.4g} non-embedding parameters, D = {self.D:.4g} tokens "
               f"({self.D / self.N:.1f} tokens per parameter; N_opt ~ C^{self.a:.3f})",
               f"  predicted loss {self.loss:.4f}{ci}",
               f"Step Law: peak lr {self.lr:.4g} (at N = {self.lr_N:.4g}{' TOTAL' if self.moe else ''}), "
               f"batch {self.batch_tokens:,.0f} tokens -> {self.batch_sequences} x {self.seq_len}",
               f"model: d_model {m['d_model']}, {m['n_layer']} layers, {m['n_head']} heads of {m['d_model'] // m['n_head']}, "
               + (f"{m['moe']['n_experts']} experts (top-{m['moe']['top_k']}, {m['moe']['n_shared']} shared) of "
                  f"d_expert {m['moe']['d_expert']}" if self.moe else f"d_ff {m['d_ff']}"),
               f"  N = {self.N_model:,}" + (f" total, N_active = {self.N_active_model:,}" if self.moe else "")
               + f" ({self.N_active_model / self.N - 1:+.2%} vs target {nname})",
               f"train: {self.steps:,} steps x {self.batch_sequences * self.seq_len:,} tokens = D {self.D_config:.4g} "
               f"({self.D_config / self.D - 1:+.2%}), batch {t['batch_size']} x grad_accum {t['grad_accum']}, "
               f"warmup {t['warmup_steps']}, {t.get('schedule', 'cosine')} to {t.get('min_lr_ratio', 0.1):g} x lr",
               f"  predicted loss of this config {self.loss_config:.4f}"
               + (f"  95% CI [{self.loss_config_ci[0]:.4f}, {self.loss_config_ci[1]:.4f}]" if self.loss_config_ci else "")]
        out += [f"note: {n}" for n in self.notes]
        return out


def plan(compute: float | None = None, params: float | None = None, tokens: float | None = None, *,
         fit: Any = None, seq_len: int = 2048, moe: bool = False, hparams: HparamCoefs | None = None,
         base: dict[str, Any] | None = None, data_path: str | None = None, max_micro_batch: int = 32,
         warmup_fraction: float = 0.05, level: float = 0.95, n_layer: int | None = None,
         n_head: int | None = None, unique_tokens: float | None = None, data_mode: str = "auto") -> Plan:
    """Plan a run from one (or two) of compute, params, tokens; see the module docstring.

    ``fit``: a ParametricFit (e.g. ``fit_parametric`` on your sweep), coefficients (dict/sequence of E, A, B,
    alpha, beta), or None for Epoch's published ones. ``hparams``: Step Law coefficients (default published).
    ``base``: a nested config dict the train config is built on (e.g. the sweep's fixed settings), so the
    planned run is trained the way the law's runs were. ``max_micro_batch``: sequences per forward pass;
    larger batches use gradient accumulation. ``n_layer``/``n_head``: keep the shape in a sweep's family
    (see ``find_shape``). ``unique_tokens``: the unique tokens the data has; a plan from ``compute`` then stays
    within them or repeats epochs under Muennighoff et al.'s law (``steplab.law.data_limits``, ``data_mode``
    auto | repeat | one-epoch) and says which it did and why.
    """
    from steplab.config import RunConfig, _deep_update

    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ConfigError(f"plan: seq_len = {seq_len!r} must be a positive integer")
    law, law_text = as_fit(fit)
    if law.N_is == "N_active" and not moe:
        raise ConfigError("plan: the law was fitted on MoE runs (in active N); plan an MoE with --moe, or fit "
                          "dense runs for a dense plan")
    C, N, D, how = optimal_allocation(law, compute, params, tokens)
    notes: list[str] = []
    seen = lambda d: d  # noqa: E731  the tokens the law sees (repeated epochs count for less)
    data = None
    if unique_tokens is not None:
        from steplab.law.data_limits import data_plan, effective_tokens

        if compute is None or params is not None or tokens is not None:
            raise ConfigError("plan: unique tokens shape a plan from compute alone (--compute C without --params/--tokens)")
        dp = data_plan(law, C, float(unique_tokens), data_mode)
        N, D = dp.N, dp.D
        how = {"fits": how, "one-epoch": "one epoch over the unique tokens at the given C",
               "repeat": f"{dp.epochs:.2f} epochs over the unique tokens at the given C"}[dp.kind]
        notes.append(f"data: {dp.why}")
        data = {"unique_tokens": float(unique_tokens), "kind": dp.kind, "epochs": dp.epochs, "D_effective": dp.D_effective,
                "N_opt_unconstrained": dp.N_opt, "D_opt_unconstrained": dp.D_opt, "why": dp.why}
        if dp.kind == "repeat":
            seen = lambda d: effective_tokens(d, float(unique_tokens))  # noqa: E731
    if fit is None:
        notes.append("the default law is fitted to Chinchilla's MassiveText runs: its loss values are for that data "
                     "and tokenizer; for yours, fit your own sweep (steplab law sweep, then --from runs.csv)")

    shape = find_shape(N, moe=moe, seq_len=seq_len, n_layer=n_layer, n_head=n_head)
    N_model, N_active_model = shape["N"], shape["N_active"]
    lr_N = N_model  # total N; equals N_active for dense
    hp = suggest(lr_N, D, seq_len, hparams)
    if moe:
        notes.append(f"MoE: N, C and the loss use ACTIVE parameters (C = 6 N_active D); the model has "
                     f"N_total = {N_model:,} and N_active = {N_active_model:,} non-embedding parameters")
        notes.append("MoE: the learning rate uses Step Law with TOTAL N: on Step Law's MoE runs total N predicts "
                     "the grid-best lr far better than active N (docs/scaling_laws.md); batch depends on D only")
        if law.N_is == "N_active":
            notes.append("MoE: the loss law was fitted on MoE runs, in active N")
        else:
            notes.append("MoE: the loss is the dense law at N = N_active (the law has no MoE runs); an MoE usually "
                         "does at least as well as a dense model of its active size")

    seqs = max(1, int(round(hp["batch_tokens"] / seq_len)))
    accum = max(1, math.ceil(seqs / max_micro_batch))
    micro = max(1, int(round(seqs / accum)))
    batch_tokens = micro * accum * seq_len
    steps = max(1, int(round(D / batch_tokens)))
    D_config = float(steps * batch_tokens)
    every = max(1, steps // 10)
    train = {"lr": hp["lr"], "batch_size": micro, "grad_accum": accum, "max_steps": steps,
             "warmup_steps": max(1, int(round(warmup_fraction * steps))), "eval_every": every, "ckpt_every": every}
    layer = {"model": shape["model"], "data": {"seq_len": seq_len}, "train": train}
    if data_path:
        layer["data"]["path"] = str(data_path)
    raw = _deep_update(base or {}, layer)
    cfg = RunConfig.from_dict(raw).validate()
    config = _prune(cfg.to_dict(), raw)

    pred = float(law.predict(N, seen(D)))
    pred_cfg = float(law.predict(N_active_model, seen(D_config)))
    ci = ci_cfg = None
    if law.boot is not None:
        lo, hi = law.predict_interval(np.array([N, N_active_model]), np.asarray(seen(np.array([D, D_config]))), level)
        ci, ci_cfg = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
    a = law.beta / (law.alpha + law.beta)
    return Plan(given=how, compute=C, N=N, D=D, loss=pred, loss_ci=ci, law=law_text, a=a, lr=hp["lr"],
                batch_tokens=hp["batch_tokens"], lr_N=float(lr_N), moe=moe, seq_len=seq_len, model=shape["model"],
                N_model=int(N_model), N_active_model=int(N_active_model), config=config, steps=steps,
                D_config=D_config, loss_config=pred_cfg, loss_config_ci=ci_cfg, notes=notes, data=data)


def _prune(full: dict, raw: dict) -> dict:
    """The resolved config restricted to the keys the plan (or ``base``) set: a short file, and defaults
    that may change later stay defaults. Keys under model.moe are kept whole."""
    out: dict = {}
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(full.get(key), dict) and key != "moe":
            out[key] = _prune(full[key], value)
        else:
            out[key] = full[key]
    return out


# ------------------------------------------------------------------------------------- config files

def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    """A nested dict of scalars as TOML (tables for sub-dicts), which ``resolve`` reads back."""
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        sub = to_toml(v, f"{prefix}.{k}" if prefix else k)
        out += ("\n" if out else "") + sub
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


def write_config(p: Plan, path: str | Path) -> Path:
    """Write the plan's train config as TOML (``.toml``) or JSON (anything else)."""
    path = Path(path)
    if path.suffix == ".toml":
        header = (f"# steplab law plan: {p.given}; C = {p.compute:.4g}, N = {p.N:.4g}, D = {p.D:.4g}\n"
                  f"# predicted loss {p.loss_config:.4f} ({p.law})\n"
                  f"# train with: steplab train --config {path.name} --data DATA_DIR --out runs/NAME\n\n")
        atomic_write_text(path, header + to_toml(p.config))
    else:
        atomic_write_text(path, json.dumps(p.config, indent=2) + "\n")
    return path
