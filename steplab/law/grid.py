"""Sweep grids: a grid (TOML, JSON or dict) -> every run's resolved config, id and cost (``steplab law sweep``
runs them: ``steplab.law.sweep``).

A grid is a TOML file (or the same dict in Python)::

    sizes  = ["step1-nano", {d_model = 64, n_layer = 2, n_head = 2}]  # presets or model shapes
    tokens = [1e6, 2e6, 4e6]              # training-token budgets D
    lr     = ["steplaw"]                  # numbers, "steplaw" or "steplaw*0.5" (Step Law per (N, D))
    batch_tokens = ["steplaw"]            # tokens per optimizer step: numbers or "steplaw[*x]"
    seeds  = [0]
    warmup_fraction = 0.05                # warmup steps = this fraction of each run's steps (wsd: of the smallest budget's)
    warmup_tokens = 1e5                   # optional, instead: the same warm-up, in tokens, for every run
    rule_tokens = 2e6                     # optional: evaluate the "steplaw" lr/batch rules at this D for every
                                          # run (a D-agnostic recipe; wsd: default the largest budget)
    eval_tokens = 131072                  # validation tokens per run (the same windows for every run)
    [hparams]                             # optional: Step Law coefficients for "steplaw" (default: published),
    lr_coef_N = 0.0                       # e.g. refitted ones from `steplab law fit --json` of an lr x batch sweep
    [fixed]                               # overrides for every run, nested like a train config
    data  = {seq_len = 256}
    train = {dtype = "bf16"}              # a fixed train.batch_size is the micro-batch (grad_accum reaches the batch)

Every point of ``sizes x tokens x lr x batch_tokens x seeds`` becomes one run of ``steplab.train.trainer.train``.
Run ids are made from the grid point alone (size label, D, lr, batch, seed and a hash of the resolved
config and of the dataset), so the same grid always maps to the same directories
(``steplab.law.sweep`` lays them out).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steplab.errors import ConfigError

GRID_KEYS = {"sizes", "tokens", "lr", "batch_tokens", "seeds", "fixed", "warmup_fraction", "eval_tokens",
             "ckpt_every_fraction", "hparams", "name", "mode", "decay_fraction", "rule_tokens", "warmup_tokens"}
MODES = ("wsd", "independent")
# A WSD branch decays over this fraction of its own steps (Hägele et al. 2024 find ~20% matches cosine).
DECAY_FRACTION = 0.2

@dataclass
class SweepRun:
    run_id: str
    size: str
    config: dict[str, Any]      # the full resolved RunConfig as a nested dict
    point: dict[str, Any]       # grid-point descriptors that go into the table (size, rules, target D)
    cost: float                 # model FLOPs of the run, for the progress bar and scheduling
    parent: str | None = None   # wsd: the stable-phase run this branch starts from
    branch_step: int = 0        # wsd: the parent's step (checkpoint) the branch starts at
    stable: bool = False        # wsd: a stable-phase run (no decay): trained for its branches, not a table row


def load_grid(grid: str | os.PathLike | dict) -> dict[str, Any]:
    """A grid dict from a TOML/JSON file or a dict; unknown keys are an error (a typo would change nothing)."""
    if isinstance(grid, dict):
        spec = copy.deepcopy(grid)
    else:
        path = Path(grid)
        if not path.is_file():
            raise ConfigError(f"sweep grid {path} does not exist; write a TOML file with sizes, tokens, lr, batch_tokens")
        try:
            spec = tomllib.loads(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse sweep grid {path}: {e}") from None
    if isinstance(spec.get("grid"), dict):  # also accept everything under a [grid] table
        spec = {**spec.pop("grid"), **spec}
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ConfigError(f"sweep grid: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(GRID_KEYS))}")
    for key in ("sizes", "tokens"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise ConfigError(f"sweep grid: '{key}' must be a non-empty list")
    for key, default in (("lr", ["steplaw"]), ("batch_tokens", ["steplaw"]), ("seeds", [0])):
        value = spec.get(key, default)
        spec[key] = value if isinstance(value, list) else [value]
        if not spec[key]:
            raise ConfigError(f"sweep grid: '{key}' must not be empty")
    spec.setdefault("fixed", {})
    spec.setdefault("warmup_fraction", 0.05)
    spec.setdefault("eval_tokens", 131072)
    spec.setdefault("ckpt_every_fraction", 0.25)
    # wsd (the default for a D grid): per size, one warm-up + stable run and a decay branch per budget
    spec.setdefault("mode", "wsd" if len(spec["tokens"]) > 1 else "independent")
    if spec["mode"] not in MODES:
        raise ConfigError(f"sweep grid: mode = {spec['mode']!r} is not one of {', '.join(MODES)}")
    spec.setdefault("decay_fraction", DECAY_FRACTION)
    rt = spec.get("rule_tokens")
    if rt is not None and not (isinstance(rt, (int, float)) and not isinstance(rt, bool) and math.isfinite(rt) and rt > 0):
        raise ConfigError(f"sweep grid: rule_tokens = {rt!r} must be a positive number of tokens")
    wt = spec.get("warmup_tokens")
    if wt is not None and not (isinstance(wt, (int, float)) and not isinstance(wt, bool) and math.isfinite(wt) and wt > 0):
        raise ConfigError(f"sweep grid: warmup_tokens = {wt!r} must be a positive number of tokens")
    f = spec["decay_fraction"]
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1):
        raise ConfigError(f"sweep grid: decay_fraction = {f!r} must be in (0, 1]")
    spec["hparams"] = dict(spec.get("hparams") or {})
    hparam_coefs(spec)  # validates
    return spec


def hparam_coefs(spec: dict):
    """The Step Law coefficients "steplaw" means in this grid: published, with any given in [hparams] replaced."""
    from steplab.law.hparams import PUBLISHED, HparamCoefs

    given = spec.get("hparams") or {}
    known = set(vars(PUBLISHED))
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"sweep grid: unknown [hparams] key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    for k, v in given.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise ConfigError(f"sweep grid: [hparams] {k} = {v!r} must be a finite number")
    return HparamCoefs(**{**vars(PUBLISHED), **{k: float(v) for k, v in given.items()}})


_RULE = re.compile(r"^\s*(?:steplaw\s*(?:\*\s*([0-9.eE+-]+))?|([0-9.eE+-]+)\s*\*\s*steplaw)\s*$")


def _rule_factor(value: Any, what: str) -> float | None:
    """``"steplaw"`` -> 1.0, ``"steplaw*0.5"``/``"0.5*steplaw"`` -> 0.5; a number -> None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"sweep grid: {what} = {value!r} must be positive")
        return None
    m = _RULE.match(str(value))
    if not m:
        raise ConfigError(f"sweep grid: {what} = {value!r}; give a number, 'steplaw' or 'steplaw*FACTOR'")
    factor = float(m.group(1) or m.group(2) or 1.0)
    if not factor > 0:
        raise ConfigError(f"sweep grid: {what} = {value!r}: the factor must be positive")
    return factor


def _size_layer(size: Any) -> tuple[str, dict[str, Any], str | None]:
    """(label, model overrides, preset) of one ``sizes`` entry."""
    if isinstance(size, str):
        return size, {}, size
    if not isinstance(size, dict):
        raise ConfigError(f"sweep grid: size {size!r} must be a preset name or a table of model settings")
    size = dict(size)
    preset = size.pop("preset", None)
    name = size.pop("name", None)
    if name is None:
        short = {"d_model": "d", "n_layer": "l", "n_head": "h", "n_kv_head": "kv", "d_ff": "f"}
        name = (preset + "-" if preset else "") + "".join(f"{short[k]}{v}" for k, v in size.items() if k in short)
        name = name or "default"
    return str(name), size, preset


def _short(x: float) -> str:
    """Compact, filename-safe number: 2000000 -> 2M, 80000 -> 80k, 4096 -> 4.096k, 0.003 -> 3e-3."""
    if x >= 1e3:
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if x >= scale:
                return f"{x / scale:.4g}{unit}"
    if x >= 1:
        return f"{x:.4g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def _data_fingerprint(data_path: str | None) -> tuple[dict[str, Any], str]:
    """meta.json of the prepared dataset (vocab, token counts) and a short hash of it."""
    if not data_path:
        return {}, "nodata"
    meta_file = Path(data_path) / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"sweep: {data_path} is not a prepared dataset (no meta.json); run `steplab data prepare`")
    meta = json.loads(meta_file.read_text())
    keep = {k: meta.get(k) for k in ("source", "max_bytes", "seed", "val_fraction", "vocab_size")}
    keep["train_tokens"], keep["val_tokens"] = meta["train"]["tokens"], meta["val"]["tokens"]
    return meta, hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:6]


def expand_grid(grid: str | os.PathLike | dict, data_path: str | None = None) -> list[SweepRun]:
    """Every run of the grid with its resolved config, in grid order; validates all of them first."""
    from steplab.config import RunConfig, _deep_update, _preset_dict
    from steplab.law.hparams import suggest
    from steplab.models import count_params, flops_per_token

    spec = load_grid(grid)
    meta, data_hash = _data_fingerprint(data_path)
    coefs = hparam_coefs(spec)
    vocab = int(meta.get("vocab_size") or 4096)
    val_tokens = meta.get("val", {}).get("tokens")
    runs: list[SweepRun] = []
    seen: dict[str, int] = {}
    for size in spec["sizes"]:
        label, model_layer, preset = _size_layer(size)
        base = _preset_dict(preset) if preset else {}
        base = _deep_update(base, spec["fixed"])
        base = _deep_update(base, {"model": model_layer})
        if data_path:
            base = _deep_update(base, {"data": {"path": str(data_path)}})
        probe = RunConfig.from_dict(base)
        N = count_params(probe.model)["N"]  # total N for MoE: Step Law's lr follows total N (docs/scaling_laws.md)
        seq_len = probe.data.seq_len
        for D in spec["tokens"]:
            if not (isinstance(D, (int, float)) and not isinstance(D, bool) and D >= seq_len):
                raise ConfigError(f"sweep grid: token budget {D!r} must be a number of at least one sequence ({seq_len})")
        budgets = sorted(float(D) for D in spec["tokens"]) if spec["mode"] == "wsd" else [float(D) for D in spec["tokens"]]
        # wsd: the branches of one size share the stable phase, so its lr and batch: the rule's at the largest
        # budget (that branch is then exactly an independent WSD run of the recipe at its D)
        for D in ([budgets[-1]] if spec["mode"] == "wsd" else budgets):
            law = suggest(N, float(spec.get("rule_tokens") or D), seq_len, coefs)
            for lr_v in spec["lr"]:
                lr_f = _rule_factor(lr_v, "lr")
                lr = law["lr"] * lr_f if lr_f else float(lr_v)
                for bt_v in spec["batch_tokens"]:
                    bt_f = _rule_factor(bt_v, "batch_tokens")
                    target_bt = law["batch_tokens"] * bt_f if bt_f else float(bt_v)
                    for seed in spec["seeds"]:
                        args = (spec, base, label, N, lr, lr_v, lr_f, target_bt, bt_v, bt_f, int(seed), seq_len, vocab,
                                val_tokens, data_hash, flops_per_token)
                        if spec["mode"] == "wsd":
                            runs += _wsd_runs(budgets, *args)
                        else:
                            runs.append(_make_run(D, *args))
    for r in runs:
        if r.run_id in seen:
            raise ConfigError(f"sweep grid: two grid points resolve to the same run ({r.run_id}); remove the duplicate")
        seen[r.run_id] = 1
    return runs


def _batch(spec, target_bt, seq_len) -> tuple[int, int, int]:
    """(micro-batch sequences, grad_accum, tokens per step) for a target batch in tokens."""
    micro = int(spec["fixed"].get("train", {}).get("batch_size", 0)) or None
    seqs = max(1, round(target_bt / seq_len))
    if micro and seqs > micro:  # a fixed micro-batch: reach the batch by gradient accumulation
        accum = max(1, round(seqs / micro))
        batch_size = micro
    else:
        accum, batch_size = 1, seqs
    return batch_size, accum, batch_size * accum * seq_len


def _wsd_runs(budgets, spec, base, label, N, lr, lr_v, lr_f, target_bt, bt_v, bt_f, seed, *rest) -> list[SweepRun]:
    """One stable-phase run (warm-up, then constant lr, to the last branch point) and one decay branch per
    budget: branch k starts from the stable run's checkpoint at (1 - decay_fraction) of its own steps, with
    that run's optimizer state and data position, and decays linearly to min_lr over the rest. Its final
    validation loss is the (N, D_k) point; it is a run of its own (directory, summary, resume)."""
    seq_len = rest[0]
    _, _, batch_tokens = _batch(spec, target_bt, seq_len)
    steps = [max(2, round(D / batch_tokens)) for D in budgets]
    f = float(spec["decay_fraction"])
    starts = [max(1, int(n * (1 - f))) for n in steps]
    fixed_train = spec["fixed"].get("train", {})
    warmup = int(fixed_train.get("warmup_steps", _warmup(spec, batch_tokens, steps[0])))
    if warmup >= starts[0]:
        raise ConfigError(f"sweep grid: the smallest budget's branch point (step {starts[0]}) is not after the warm-up "
                          f"({warmup} steps); raise the smallest token budget or lower warmup_fraction")
    stable = _make_run(starts[-1] * batch_tokens, spec, base, label, N, lr, lr_v, lr_f, target_bt, bt_v, bt_f, seed, *rest,
                       train_extra={"schedule": "constant", "warmup_steps": warmup, "keep_last": 1,
                                    "ckpt_at": ",".join(str(s) for s in sorted(set(starts)))},
                       tag="stable")
    stable.stable = True
    out = [stable]
    for D, n, s in zip(budgets, steps, starts):
        decay = (n - s) / n
        while int(n * (1 - decay)) < s:  # lr_at's decay start must be the branch point exactly
            decay = math.nextafter(decay, 0.0)
        r = _make_run(D, spec, base, label, N, lr, lr_v, lr_f, target_bt, bt_v, bt_f, seed, *rest,
                      train_extra={"schedule": "wsd", "decay_fraction": decay, "warmup_steps": warmup,
                                   "init_state": True, "max_steps": n}, tag="wsd")
        r.parent, r.branch_step = stable.run_id, s
        r.cost = r.cost * (n - s) / n  # FLOPs of its own steps; the stable run paid for the rest
        r.point.update({"mode": "wsd", "parent": stable.run_id, "branch_step": s})
        out.append(r)
    return out


def branch_init(out: Path, r: SweepRun) -> str:
    """The checkpoint a wsd branch starts from (its parent's, at the branch step)."""
    return str(out / "runs" / r.parent / "checkpoints" / f"step_{r.branch_step:08d}")


def _warmup(spec: dict, batch_tokens: int, steps: int) -> int:
    """Warm-up steps: ``warmup_tokens`` when the grid sets it (one warm-up for every run, whatever its budget),
    else ``warmup_fraction`` of ``steps``."""
    if spec.get("warmup_tokens"):
        return max(1, round(float(spec["warmup_tokens"]) / batch_tokens))
    return max(1, round(spec["warmup_fraction"] * steps))


def _make_run(D, spec, base, label, N, lr, lr_v, lr_f, target_bt, bt_v, bt_f, seed, seq_len, vocab, val_tokens,
              data_hash, flops_per_token, train_extra: dict | None = None, tag: str = "") -> SweepRun:
    from steplab.config import RunConfig, _deep_update

    fixed_train = spec["fixed"].get("train", {})
    batch_size, accum, batch_tokens = _batch(spec, target_bt, seq_len)
    steps = max(1, round(D / batch_tokens))
    train = {"lr": lr, "batch_size": batch_size, "grad_accum": accum, "max_steps": steps, "seed": seed}
    train.update(train_extra or {})
    steps = train["max_steps"]
    if "warmup_steps" not in fixed_train and "warmup_steps" not in train:
        train["warmup_steps"] = _warmup(spec, batch_tokens, steps)
    if "eval_every" not in fixed_train:
        train["eval_every"] = steps  # one evaluation, at the end: that is the loss the table needs
    if "eval_batches" not in fixed_train:
        eval_tokens = spec["eval_tokens"] if val_tokens is None else min(spec["eval_tokens"], val_tokens)
        train["eval_batches"] = max(1, math.ceil(eval_tokens / (batch_size * seq_len)))
    if "ckpt_every" not in fixed_train:
        train["ckpt_every"] = max(1, math.ceil(spec["ckpt_every_fraction"] * steps))
    if "keep_last" not in fixed_train and "keep_last" not in train:
        train["keep_last"] = 1
    if "log_every" not in fixed_train:
        train["log_every"] = max(1, steps // 200)
    raw = _deep_update(base, {"train": train})
    cfg = RunConfig.from_dict(raw).validate()
    d = cfg.to_dict()
    hashed = copy.deepcopy(d)
    hashed["data"].pop("path", None)  # the dataset enters through its fingerprint, not its location
    hashed["train"].pop("init_from", None)  # a branch's parent checkpoint is set at run time (under the sweep's out)
    digest = hashlib.sha256((json.dumps(hashed, sort_keys=True) + data_hash).encode()).hexdigest()[:6]
    D = steps * batch_tokens if tag == "stable" else D
    run_id = (f"{label}-{tag + '-' if tag else ''}D{_short(D)}-lr{_short(lr)}-b{_short(batch_tokens)}"
              + (f"-s{seed}" if seed else "") + f"-{digest}")
    run_id = re.sub(r"[^A-Za-z0-9_.+-]", "_", run_id)
    m = cfg.model
    model_for_flops = copy.deepcopy(m)
    model_for_flops.vocab_size = m.vocab_size or vocab
    cost = flops_per_token(model_for_flops, seq_len)["model"] * steps * batch_tokens
    point = {"size": label, "tokens_target": D, "lr_rule": _rule_text(lr_v, lr_f), "batch_rule": _rule_text(bt_v, bt_f),
             "seed": seed, "d_model": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_kv_head": m.n_kv_head,
             "d_ff": m.d_ff, "n_experts": m.moe.n_experts, "top_k": m.moe.top_k if m.moe.n_experts else 0,
             "mode": spec["mode"]}
    return SweepRun(run_id, label, d, point, cost)


def _rule_text(value, factor) -> str:
    return "fixed" if factor is None else ("steplaw" if factor == 1 else f"steplaw*{factor:g}")
