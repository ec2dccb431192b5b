"""``steplab law sweep``: a grid of small training runs, run in a local process pool, resumable, -> a runs table.

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
config and of the dataset), so the same grid always maps to the same directories:

    OUT/runs/<run id>/   a complete run directory (config, metrics, checkpoints, summary.json)
    OUT/runs.csv         one row per finished run (``load_table(..., adapter="runs")`` reads it)
    OUT/runs.jsonl       the same rows as JSON lines
    OUT/sweep.json       the grid and every run's resolved config

Resuming is the default: a run with ``summary.json`` is finished and skipped; a run directory without one
(a crash, a kill, Ctrl-C) is continued from its latest checkpoint with ``resume=True``; a run that failed
with a training error (divergence) leaves ``failed.json`` and is not retried unless ``retry_failed``.
The tables are rewritten atomically after every finished run, so they are complete at any moment; they hold
this grid's runs only (run directories of an earlier grid in the same OUT stay on disk, out of the table).
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steplab.errors import ConfigError, StepLabError
from steplab.law.cores import auto_threads, auto_workers, usable_cores  # noqa: F401 (part of this API)
from steplab.utils import atomic_write_json, atomic_write_text

GRID_KEYS = {"sizes", "tokens", "lr", "batch_tokens", "seeds", "fixed", "warmup_fraction", "eval_tokens",
             "ckpt_every_fraction", "hparams", "name", "mode", "decay_fraction", "rule_tokens", "warmup_tokens"}
MODES = ("wsd", "independent")
# A WSD branch decays over this fraction of its own steps (Hägele et al. 2024 find ~20% matches cosine).
DECAY_FRACTION = 0.2
# Columns first in the runs table, in this order; any other summary key follows alphabetically.
TABLE_COLUMNS = ["run", "size", "N", "N_active", "D", "C", "loss", "val_loss", "val_bpb", "train_loss_smoothed",
                 "train_loss_final", "lr", "lr_rule", "batch_tokens", "batch_rule", "batch_sequences", "seq_len",
                 "steps", "seed", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "n_experts", "top_k",
                 "params_total", "C_6ND", "C_model", "tokens_target", "train_seconds", "tok_per_s", "dataset"]


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


@dataclass
class SweepResult:
    table: Path
    finished: list[str] = field(default_factory=list)   # ran to completion in this call
    skipped: list[str] = field(default_factory=list)    # already finished before this call
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error


# ------------------------------------------------------------------------------------------- grids

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


# --------------------------------------------------------------------------------------- running

def _train_one(cfg_dict: dict, run_dir: str, threads: int) -> dict:
    """Worker: train (or resume) one run. Training errors come back as data, so one diverged run does
    not stop the sweep; anything else (a bug, out of memory) propagates."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from steplab.config import RunConfig
    from steplab.train.trainer import train

    cfg = RunConfig.from_dict(cfg_dict)
    resume = Path(run_dir).exists()
    try:
        return {"ok": True, "summary": train(cfg, run_dir, resume=resume, progress=False), "resumed": resume}
    except StepLabError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "resumed": resume}


def _priority(runs: list[SweepRun]) -> dict[str, float]:
    """Longest-first key: a run's FLOPs plus its longest chain of dependants (a stable run's largest branch),
    so the critical path starts first and the last runs to finish are short ones."""
    longest_child: dict[str, float] = {}
    for r in runs:
        if r.parent:
            longest_child[r.parent] = max(longest_child.get(r.parent, 0.0), r.cost)
    return {r.run_id: r.cost + longest_child.get(r.run_id, 0.0) for r in runs}


def run_sweep(grid: str | os.PathLike | dict, out_dir: str | os.PathLike, *, data_path: str | os.PathLike,
              workers: int | None = None, threads: int | None = None, progress: bool = True, retry_failed: bool = False,
              return_result: bool = False, launcher: str = "local", ray_address: str | None = None,
              gpus_per_run: float = 0.0, on_result=None):
    """Run every grid point not yet finished; return the path of ``runs.csv`` (or a SweepResult).

    ``workers`` processes (spawn) train in parallel (default ``auto_workers``: one per usable core), each with
    ``threads`` torch threads (default ``auto_threads``: the cores divided by ``workers``, fewer when other
    processes keep cores busy). Runs start longest-first (critical path first); a wsd branch starts as soon
    as its stable run has finished, so no worker idles while a run could start. ``workers=0`` trains in this
    process (debugging, tests). ``launcher="ray"`` hands the runs to Ray (``steplab.law.ray_launcher``;
    ``ray_address`` of an existing cluster, ``gpus_per_run``) with the same worker function, resume rules and
    tables (stable runs first, then their branches). ``on_result(rows)`` is called with the finished table rows
    after each new run (the quickstart prints its running fit there).
    """
    if launcher not in ("local", "ray"):
        raise ConfigError(f"sweep: launcher {launcher!r} is not one of local, ray")
    from tqdm.auto import tqdm

    out = Path(out_dir)
    data_path = str(data_path)
    runs = expand_grid(grid, data_path)
    spec = load_grid(grid)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    for r in runs:
        if r.parent:
            r.config["train"]["init_from"] = branch_init(out, r)
    meta, _ = _data_fingerprint(data_path)
    dataset = f"{meta.get('source', '?')}:{Path(data_path).name}"
    cost = {"flops": sum(r.cost for r in runs), "flops_if_independent": _independent_cost(runs)}
    atomic_write_json(out / "sweep.json", {"mode": spec["mode"], "grid": spec, "data_path": data_path, "dataset": dataset,
                                           "cost": cost, "runs": {r.run_id: {"point": r.point, "config": r.config,
                                                                             "parent": r.parent, "stable": r.stable}
                                                                  for r in runs}})

    result = SweepResult(out / "runs.csv")
    rows: dict[str, dict] = {}
    done: set[str] = set()
    pending: list[SweepRun] = []
    for r in runs:
        run_dir = out / "runs" / r.run_id
        summary = run_dir / "summary.json"
        if summary.is_file():
            done.add(r.run_id)
            if not r.stable:
                rows[r.run_id] = _row(r, json.loads(summary.read_text()), dataset)
            result.skipped.append(r.run_id)
        elif (run_dir / "failed.json").is_file() and not retry_failed:
            result.failed[r.run_id] = json.loads((run_dir / "failed.json").read_text()).get("error", "failed")
        else:
            (run_dir / "failed.json").unlink(missing_ok=True)
            pending.append(r)
    _write_tables(out, runs, rows)
    if workers is None:
        workers = auto_workers(len(pending))
    threads = threads or auto_threads(workers)

    # One worker: small runs first, so results arrive early; several: longest first (less idle at the end).
    prio = _priority(runs)
    pending.sort(key=lambda r: prio[r.run_id], reverse=workers > 1)
    bar = tqdm(total=sum(r.cost for r in pending), unit="FLOP", unit_scale=True, disable=not progress or not pending,
               dynamic_ncols=True, desc=f"sweep {len(rows)}/{sum(not r.stable for r in runs)} runs")
    if progress:
        tqdm.write(f"sweep ({spec['mode']}): {len(runs)} runs, {len(done)} finished already, {len(pending)} to train "
                   f"({workers or 'in-process'} worker(s) x {threads} thread(s) on {usable_cores()} usable core(s)) -> {out}")

    def record(r: SweepRun, res: dict) -> None:
        run_dir = out / "runs" / r.run_id
        if res["ok"]:
            done.add(r.run_id)
            if not r.stable:
                rows[r.run_id] = _row(r, res["summary"], dataset)
                _write_tables(out, runs, rows)
            result.finished.append(r.run_id)
            s = res["summary"]
            msg = (f"  {r.run_id}: val loss {s['val_loss']:.4f}, {s['train_seconds']:.0f} s"
                   + (" (stable phase)" if r.stable else "") + (" (resumed)" if res.get("resumed") else ""))
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "failed.json", {"error": res["error"]})
            result.failed[r.run_id] = res["error"]
            msg = f"  {r.run_id}: FAILED ({res['error']})"
        bar.update(r.cost)
        bar.set_description(f"sweep {len(rows)}/{sum(not r.stable for r in runs)} runs")
        if progress:
            tqdm.write(msg)
        if on_result is not None and res["ok"] and not r.stable:
            on_result([rows[x.run_id] for x in runs if x.run_id in rows])

    def ready() -> list[SweepRun]:
        """Pending runs whose parent is done; runs whose parent failed fail with it."""
        out_, keep = [], []
        for r in pending:
            if r.parent and r.parent in result.failed:
                record(r, {"ok": False, "error": f"its stable-phase run {r.parent} failed"})
            elif r.parent is None or r.parent in done:
                out_.append(r)
            else:
                keep.append(r)
        pending[:] = keep
        return out_

    try:
        if launcher == "ray":
            from steplab.law.ray_launcher import run_with_ray

            while pending:  # waves: stable runs (and independent runs), then the branches
                wave = ready()
                if not wave:
                    break
                run_with_ray([(r, r.config, str(out / "runs" / r.run_id)) for r in wave], _train_one, record,
                             threads=threads, gpus_per_run=gpus_per_run, address=ray_address)
        elif workers <= 0:
            while pending:
                wave = ready()
                if not wave:
                    break
                for r in wave:
                    record(r, _train_one(r.config, str(out / "runs" / r.run_id), threads))
        elif pending:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=ctx) as pool:
                queue: list[SweepRun] = []
                futures: dict[cf.Future, SweepRun] = {}
                try:
                    while pending or queue or futures:
                        queue += ready()
                        queue.sort(key=lambda r: prio[r.run_id], reverse=workers > 1)
                        while queue and len(futures) < workers:  # never a free core while a run can start
                            r = queue.pop(0)
                            futures[pool.submit(_train_one, r.config, str(out / "runs" / r.run_id), threads)] = r
                        if not futures:
                            break
                        finished, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                        for fut in finished:
                            record(futures.pop(fut), fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    if result.failed and progress:
        tqdm.write(f"sweep: {len(result.failed)} run(s) failed; their directories hold failed.json "
                   "(pass retry_failed / --retry-failed to try again)")
    return result if return_result else result.table


def _independent_cost(runs: list[SweepRun]) -> float:
    """FLOPs the same table would cost as independent runs (a branch trained from scratch to its D)."""
    total = 0.0
    for r in runs:
        if r.stable:
            continue
        steps = r.config["train"]["max_steps"]
        total += r.cost * steps / (steps - r.branch_step) if r.parent else r.cost
    return total


# Measured on each (re)start, so a run resumed at its end would change them; they stay in summary.json.
VOLATILE = ("peak_flops", "mfu")


def _row(r: SweepRun, s: dict, dataset: str) -> dict:
    row = {**r.point, **{k: v for k, v in s.items() if k not in VOLATILE}}
    row["run"] = r.run_id
    row["C"] = s["C_6ND"]
    row["loss"] = s["val_loss"]
    row["dataset"] = dataset
    return row


def _write_tables(out: Path, runs: list[SweepRun], rows: dict[str, dict]) -> None:
    """runs.csv + runs.jsonl: this grid's finished runs, in grid order. Runs of an earlier, different grid in
    the same directory stay on disk but leave the table (a fit should see one design)."""
    ordered = [rows[r.run_id] for r in runs if r.run_id in rows]
    keys = [c for c in TABLE_COLUMNS if any(c in row for row in ordered)]
    keys += sorted({k for row in ordered for k in row} - set(keys))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in ordered:
        writer.writerow({k: _cell(row.get(k)) for k in keys})
    atomic_write_text(out / "runs.jsonl", "".join(json.dumps(row) + "\n" for row in ordered))
    atomic_write_text(out / "runs.csv", buf.getvalue())


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return "" if v is None else v


def run_state(run_dir: str | os.PathLike) -> str:
    """finished (summary.json), failed (failed.json), partial (to resume) or new."""
    d = Path(run_dir)
    return ("finished" if (d / "summary.json").is_file() else "failed" if (d / "failed.json").is_file()
            else "partial" if d.exists() else "new")
