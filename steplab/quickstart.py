"""``steplab quickstart``: predict before you train, end to end on a fresh machine with no data of its own.

1. data: the running Python's standard library sources -> byte-level BPE tokenizer -> token shards;
2. sweep: a small grid of model sizes x token budgets, lr and batch from Step Law's form (``HPARAMS``)
   (``steplab.law.sweep``, resumable);
3. fit: L(N, D) = E + A/N^alpha + B/D^beta to the sweep's final validation losses (``fit_parametric``);
4. plan: the compute-optimal model for about 4x the compute of the largest sweep run (``steplab.law.plan``);
5. train it, then compare the measured validation loss with the prediction; samples; ``report.md``.

Output directory::

    data/        the prepared corpus          sweep/   runs/, runs.csv, runs.jsonl (the sweep)
    run/         the planned run (config, summary.json, metrics.jsonl, checkpoints, loss.png, report.md)
    plan.toml    its train config             report.md, report.html, *.png   predicted vs measured
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from steplab.data.prepare import META, prepare_data
from steplab.errors import ConfigError, FitError

MIN_CORPUS_BYTES = 400_000  # enough text for the 1024-token BPE at tiny budgets
# ~5.6 MB of the standard library: ~2.0M train tokens. The sweep's budgets run up to the unique tokens (TOKENS), so
# the planned run, which the data limits to one pass (D = the unique tokens), sits at the largest swept D and
# extrapolates in N alone. With the whole library (4.3M tokens) and budgets up to 2M, the plan extrapolated 2x in
# D as well and missed by +7.5% / +8.4% (seeds 0, two runs; docs/LOG.md): the law fitted up to 2M tokens
# under-estimates how much the loss still falls by 4M.
# 20% of the modules (by hash) are validation: 102-114 of them (seeds 0-2). At 5% (18-22 modules) the split's
# idiosyncrasies moved single runs by up to 3.5% against 340 unseen modules (one size preferred half the lr
# there, the other way round on the 340) and the three seeds' planned runs measured 2.68 / 3.20 / 3.55 for one
# recipe. The corpus grows to keep the train side at ~5.4 MB (1.9-2.1M tokens); EVAL_TOKENS are spread over
# the whole split (steplab.data.loader.iter_eval_batches).
VAL_FRACTION = 0.2
CORPUS_BYTES = 6_750_000
CORPUS_TOKENS = 2_100_000  # about what CORPUS_BYTES gives; a --budget below 1 uses this many x budget of them
# 1024, not 4096: at these sizes a 4096-token vocabulary puts most parameters and compute in the embedding and
# lm_head (d_model 64: 524k embedding vs 106k non-embedding parameters); the loss then hardly depended on N
# (a 2-layer d_model 96 model lost to d_model 64 at 800k tokens) and the fit had no N term to find. At 1024
# the loss falls with N at every budget, and training runs about 2x faster.
VOCAB_SIZE = 1024
SEQ_LEN = 256
# The sweep: one family of shapes (2 layers, 2 heads, the width varies), 4 sizes over 6.7x in N, 3 token
# budgets. Mixing depths misleads at this scale: a 3-layer model sat 5% above the 2-layer one next to it.
# Budgets start at 0.5M: below that runs are still in their first fast drop (250k -> 500k -> 1M gave a
# steeper first step), and a law fitted through it put E at 2.53 and predicted the planned run 6.6% high.
FAMILY = {"n_layer": 2, "n_head": 2}
# 5 widths over 16x in N (13,824 to 221,184): a sweep that spans 6.7x cannot separate alpha from E (alpha
# 1.56, 95% CI [0.16, 2.57] on the earlier 4-size sweep). d_model 24 is the smallest width with an even head
# dim whose N still follows the family (d_ff 64).
SIZES = [{"d_model": d, **FAMILY} for d in (24, 32, 48, 64, 96)]  # N = 13,824 / 32,768 / 55,296 / 106,496 / 221,184
# Token budgets as fractions of the unique train tokens (~0.5M, 1M, 2.0M at the default corpus), as WSD branches:
# one stable run per size (docs/scaling_laws.md). The lr and batch rules are evaluated at the largest budget for
# every branch (a branch continues its size's stable phase), so the table describes one D-agnostic recipe,
# the planned run's: bench/wsd_branches.py measures what that recipe gives vs per-budget lr and batch.
TOKENS = [0.25, 0.5, 1.0]
# lr and batch: Step Law's form, lr = c N^a D^b and batch = 0.58 D^0.571 (published). Its published lr
# (1.79 N^-0.713 D^0.307, fitted on 2e8-1e9 parameters) is 3-10x too large at these sizes, and above the best
# lr lies a cliff where runs stall near loss 4.2. So the lr uses our own coefficients with Step Law's D exponent,
# measured under this recipe (WSD branches, one warm-up, the largest budget's lr for every branch) by
# bench/quickstart_lr.py: best lr on 230k tokens of stdlib modules no run trains on, data split seed 7, sizes
# 13.8k-426k (never the planned run's 885k): 6.3e-3 / 2.4e-3 / 1.6e-3 at N = 13.8k / 221k / 426k (55k and
# 106k: flat to the grid's edge). The previous rule, 3.4e-3 (N/1.06e5)^-0.163 (D/5e5)^0.307 from cosine-era
# grids at 0.5-1M tokens, gave the 221k size 2x and the 885k planned run 3.7x their best lr: they lost 2.8% and
# 4.5% of loss (seed 1, held-out modules), so the law promised the planned run gains its recipe did not deliver.
LR_RULE = (2.9e-3, 1.06e5, -0.385, 2.07e6, 0.307)  # lr0, N0, a, D0, b: lr = lr0 (N/N0)^a (D/D0)^b
LR_RULE_TEXT = "lr 2.9e-3 (N/1.06e5)^-0.385 (D/2.07e6)^0.307"
HPARAMS = {"lr_intercept": math.log(LR_RULE[0]) - LR_RULE[2] * math.log(LR_RULE[1]) - LR_RULE[4] * math.log(LR_RULE[3]),
           "lr_coef_N": LR_RULE[2], "lr_coef_D": LR_RULE[4]}
WARMUP_FRACTION = 0.05  # of the largest budget's steps, for every run (sweep_grid)
BIG_FACTOR = 4.0  # the planned run's compute, in units of the largest sweep run's
# The planned run's D: the compute-optimal D of the fit when it fits in the corpus (one pass) and the fit
# pins it down (95% interval within a factor of 2); otherwise the D the data allows (steplab.law.data_limits).
D_OPT_MAX_RATIO = 2.0
EVAL_TOKENS = 131_072
SAMPLE_PROMPTS = ["def ", "import os\n", "class "]
# The downstream suite (steplab.eval, issue 14) over the sweep and the planned run: below this budget the models
# are too small for any task to leave chance, and scoring 13 runs would take longer than training them.
SUITE_MIN_BUDGET = 0.25


def moe_sizes(sizes: list[dict] = SIZES) -> list[dict]:
    """Dense sizes as Step-2 MoE: 8 routed experts (top-2) + 1 shared, d_expert ~ d_ff / 3 (a multiple of 8,
    which ``_grouped_mm`` needs in bf16), so N_active is within ~6% of the dense size's N."""
    from steplab.config import ModelConfig
    from steplab.law.plan import MOE_LAYOUT

    out = []
    for size in sizes:
        d_ff = ModelConfig(d_model=size["d_model"], n_head=size["n_head"]).d_ff
        out.append({**size, "moe": {**MOE_LAYOUT, "d_expert": max(8, round(d_ff / 24) * 8)}})
    return out


def prepare_corpus(source: str, data_dir: Path, budget: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    """The quickstart's data: ``CORPUS_BYTES`` x budget of ``source`` (at least ``MIN_CORPUS_BYTES``), its
    modules split train / validation by hash (``VAL_FRACTION``, ``seed``), a ``VOCAB_SIZE`` byte-level BPE."""
    return prepare_data(source, data_dir, vocab_size=VOCAB_SIZE, max_bytes=max(MIN_CORPUS_BYTES, int(CORPUS_BYTES * budget)),
                        val_fraction=VAL_FRACTION, progress=progress, seed=seed)


def sweep_grid(budget: float, device: str, moe: bool = False, seed: int = 0, mode: str = "wsd",
               unique_tokens: float | None = None) -> dict:
    """The sweep over ``TOKENS`` x the unique train tokens the run may use (default ``CORPUS_TOKENS`` x budget)."""
    unique = unique_tokens or CORPUS_TOKENS * budget
    tokens = [max(SEQ_LEN * 8, int(f * unique)) for f in TOKENS]
    return {
        "sizes": moe_sizes() if moe else SIZES,
        "tokens": tokens,
        "lr": ["steplaw"], "batch_tokens": ["steplaw"], "hparams": HPARAMS, "seeds": [seed], "mode": mode,
        "eval_tokens": max(16_384, int(EVAL_TOKENS * min(budget, 1.0))), "warmup_fraction": WARMUP_FRACTION,
        # one warm-up for every sweep run and the planned run (which plan_big_run builds from this grid): 5% of
        # the largest budget, the planned run's own 5% at one pass. With 5% of the smallest budget's steps (11)
        # the sweep's larger sizes warmed up 4x shorter than the planned run (46), which it beat the law by
        # +4.9% (seed 1); the same sweep with 46 steps: +2.6% (docs/benchmarks.md, issue 12 fourth session)
        "warmup_tokens": WARMUP_FRACTION * max(tokens),
        # min_lr_ratio 0: anneal to ~0, as Step Law's runs do (to 1e-5)
        "fixed": {"data": {"seq_len": SEQ_LEN}, "model": {"max_seq_len": SEQ_LEN},
                  "train": {"device": device, "min_lr_ratio": 0.0}},
    }


def quickstart(out: str | None = None, budget: float = 1.0, source: str = "stdlib", device: str = "auto",
               resume: bool = False, progress: bool = True, moe: bool = False, seed: int = 0,
               workers: int | None = None) -> dict:
    """The whole loop; ``moe=True`` sweeps, fits (in active N) and trains Step-2 MoE models instead.
    ``seed`` sets the data split, every sweep run and the planned run; ``workers`` the sweep's processes
    (default: one per usable core)."""
    import torch

    from steplab.config import RunConfig
    from steplab.law.fit import in_active_params
    from steplab.law.grid import expand_grid
    from steplab.law.report import quickstart_report
    from steplab.law.sweep import auto_threads, run_sweep
    from steplab.law.tables import load_table
    from steplab.train.trainer import resolve_device, train
    from steplab.utils import atomic_write_json

    t0 = time.time()
    load_start = _load()
    phases: dict[str, float] = {}
    out_dir = Path(out or ("runs/quickstart-moe" if moe else "runs/quickstart"))
    data_dir, run_dir, sweep_dir = out_dir / "data", out_dir / "run", out_dir / "sweep"
    kind = "a Step-2 MoE model (N = active parameters)" if moe else "a model"
    print(f"steplab quickstart -> {out_dir}  (budget {budget:g}, seed {seed}): predict the loss of {kind}, then train it")

    # 1. data
    t = time.time()
    if (data_dir / META).is_file():
        meta = json.loads((data_dir / META).read_text())
        if meta.get("seed", 0) != seed:
            raise ConfigError(f"quickstart: {data_dir} was prepared with seed {meta.get('seed', 0)}, not {seed}; "
                              "choose another --out or the same --seed")
        print(f"[1/5] data: reusing {data_dir}")
    else:
        print(f"[1/5] data: {source} corpus -> byte-level BPE ({VOCAB_SIZE} tokens) -> shards (split seed {seed})")
        # the corpus scales with the budget, and the sweep's budgets with the corpus
        meta = prepare_corpus(source, data_dir, budget, seed, progress)
    # the tokens this budget may use: all of them at --budget 1; at smaller budgets the tokenizer still needs
    # MIN_CORPUS_BYTES of text, but the sweep and the planned run keep to CORPUS_TOKENS x budget of it
    unique = float(min(meta["train"]["tokens"], max(CORPUS_TOKENS * budget, SEQ_LEN * 32)))
    print(f"      train {meta['train']['tokens']:,} tokens / val {meta['val']['tokens']:,} tokens "
          f"from {meta['train']['documents'] + meta['val']['documents']:,} documents")
    phases["data"] = time.time() - t

    # 2. sweep, with the running fit printed after each new point
    grid = sweep_grid(budget, device, moe, seed, unique_tokens=unique)
    runs = [r for r in expand_grid(grid, str(data_dir)) if not r.stable]
    Ns = sorted({_N(r) for r in runs})
    C_max = max(6 * _N(r) * r.config["train"]["max_steps"] * _tokens_per_step(r.config) for r in runs)
    target_C = BIG_FACTOR * C_max
    print(f"[2/5] sweep: {len(SIZES)} sizes x {len(grid['tokens'])} token budgets = {len(runs)} points as WSD branches "
          f"(N {Ns[0]:,}-{Ns[-1]:,}: {Ns[-1] / Ns[0]:.1f}x; D {min(grid['tokens']):,}-{max(grid['tokens']):,}), "
          f"{LR_RULE_TEXT}, Step Law batch, device {resolve_device(device)} -> {sweep_dir}")
    print(f"      planned run: C = {BIG_FACTOR:g} x {C_max:.3g} = {target_C:.3g} FLOPs within {unique:,.0f} unique tokens")
    t = time.time()
    with _quiet_numpy():
        run_sweep(grid, sweep_dir, data_path=str(data_dir), workers=workers, progress=progress,
                  on_result=lambda rows: _running_fit(rows, meta["vocab_size"], target_C, unique, moe))
    phases["sweep"] = time.time() - t
    table, _ = in_active_params(load_table(sweep_dir / "runs.csv", adapter="runs"))  # MoE: N is N_active

    # 3. fit. Bootstrap draws of a barely determined exponent (alpha up to ~40 at tiny budgets) overflow in
    # exp/power; those draws only widen the interval, so numpy's overflow warnings are silenced here.
    t = time.time()
    with _quiet_numpy():
        fit, why = fit_sweep(table, vocab=meta["vocab_size"])
        if fit is not None:
            est = fit.estimates()
            print(f"[3/5] fit: L = {fit.E:.3f} + {fit.A:.4g}/N^{fit.alpha:.3f} + {fit.B:.4g}/D^{fit.beta:.3f}  "
                  f"({fit.n} runs, RMSE {fit.rmse_log:.2%} in log loss; alpha 95% CI [{est['alpha'].ci[0]:.2f}, "
                  f"{est['alpha'].ci[1]:.2f}], beta [{est['beta'].ci[0]:.2f}, {est['beta'].ci[1]:.2f}])")
            for w in fit.warnings:
                print(f"      warning: {w}")
        else:
            print(f"[3/5] fit: not usable ({why}); planning the largest size's family at {BIG_FACTOR:g}x compute "
                  "within the data, with no prediction")
        phases["fit"] = time.time() - t

        # 4. plan + train
        t = time.time()
        big, predicted, ci, plan_note, choice = plan_big_run(fit, table, target_C, grid, data_dir, out_dir,
                                                             unique_tokens=unique, moe=moe)
        phases["plan"] = time.time() - t
        print(f"[4/5] plan: C = {target_C:.3g} FLOPs -> N = {big['N']:,}, D = {big['D']:,} "
              f"({big['D'] / big['N']:.1f} tokens/param, {big['D'] / unique:.0%} of the unique tokens), "
              f"lr {big['lr']:.3g}, batch {big['batch_tokens']:,} tokens"
              + (f"; predicted val loss {predicted:.4f}, 95% interval for one run [{ci[0]:.4f}, {ci[1]:.4f}] (the law's "
               f"mean: [{choice['law_ci'][0]:.4f}, {choice['law_ci'][1]:.4f}]; a run's scatter around it "
               f"{choice['run_sigma']:.2%})" if predicted is not None else ""))
        if plan_note:
            print(f"      why: {plan_note}")
        m = big["config"]["model"]
        ffn = (f"{m['moe']['n_experts']} experts of {m['moe']['d_expert']} (top-{m['moe']['top_k']}) + "
               f"{m['moe']['n_shared']} shared" if moe else f"d_ff {m['d_ff']}")
        print(f"      train: d_model {m['d_model']}, {m['n_layer']} layers, {ffn}, {big['config']['train']['max_steps']} "
              f"steps (WSD, the sweep's schedule), seed {seed}, device {resolve_device(device)} -> {run_dir}")

    cfg = RunConfig.from_dict(big["config"])
    cfg.train.eval_every = max(1, cfg.train.max_steps // 3)  # two points on the curve before the final eval
    torch.set_num_threads(auto_threads(1))  # every usable core, fewer when other processes keep cores busy
    t = time.time()
    summary = train(cfg, run_dir, resume=resume, progress=progress)
    phases["train"] = time.time() - t

    # 5. compare, report, samples
    t = time.time()
    measured = summary["val_loss"]
    err = None if predicted is None else predicted / measured - 1
    with _quiet_numpy():
        report = quickstart_report(out_dir, table, fit, why, summary, predicted, ci, plan_note, big, target_C)
    print("[5/5] samples (temperature 0.8, top-k 50):")
    print_samples(run_dir, resolve_device(device))
    phases["report"] = time.time() - t
    to_report = time.time() - t0
    if budget >= SUITE_MIN_BUDGET:
        t = time.time()
        _downstream(sweep_dir, run_dir, out_dir, report, resolve_device(device), progress, workers)
        phases["downstream"] = time.time() - t
    else:
        print(f"      downstream suite: skipped below --budget {SUITE_MIN_BUDGET:g} (run `steplab eval {sweep_dir} "
              f"--suite small --target {run_dir}`)")

    wall = time.time() - t0
    inside = predicted is not None and ci[0] <= measured <= ci[1]
    print("\n== result ==")
    if predicted is not None:
        print(f"predicted validation loss {predicted:.4f} (95% interval for one run [{ci[0]:.4f}, {ci[1]:.4f}], "
              f"{(ci[0] / predicted - 1):+.2%} / {(ci[1] / predicted - 1):+.2%}), measured {measured:.4f}: "
              f"error {err:+.2%} ({'inside' if inside else 'OUTSIDE'} the interval)")
    else:
        print(f"no prediction ({why}); measured {measured:.4f}")
    if moe:
        print(f"N_active = {summary['N_active']:,} non-embedding parameters (N_total {summary['N']:,}), "
              f"D = {summary['D']:,} tokens, C = 6 N_active D = {summary['C_6ND']:.3g} FLOPs")
    else:
        print(f"N = {summary['N']:,} non-embedding parameters, D = {summary['D']:,} tokens, C = 6ND = {summary['C_6ND']:.3g} FLOPs")
    print(f"validation loss {measured:.4f} nats/token, {summary['val_bpb']:.4f} bits per byte")
    print(f"throughput {summary['tok_per_s']:,.0f} tokens/s on {summary['threads']} thread(s), MFU {summary['mfu']:.1%}")
    print(f"wall time {wall:.1f} s, {to_report:.1f} s to the report (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
          + f"; load average {load_start} at the start)")
    print(f"run directory {run_dir}: " + ", ".join(sorted(p.name for p in run_dir.iterdir())))
    print(f"report {report}")
    result = {"predicted_loss": predicted, "predicted_ci": list(ci) if ci else None, "measured_loss": measured,
              "rel_err": err, "inside_interval": inside, "N": summary["N"], "N_active": summary["N_active"],
              "D": summary["D"], "C": summary["C_6ND"], "target_C": target_C, "unique_tokens": unique,
              "N_span": Ns[-1] / Ns[0], "sweep_N": Ns, "plan": choice, "seed": seed, "budget": budget,
              "wall_seconds": wall, "wall_to_report_seconds": to_report, "phase_seconds": phases,
              "load_average": {"start": load_start, "end": _load()}, "threads": summary["threads"],
              "law_ci": choice.get("law_ci"), "run_sigma": choice.get("run_sigma"),
              "interval_rel": None if ci is None else [ci[0] / predicted - 1, ci[1] / predicted - 1],
              "fit": None if fit is None else {k: fit.to_dict()[k] for k in ("E", "A", "B", "alpha", "beta",
                                                                            "alpha_ci", "beta_ci")}}
    atomic_write_json(out_dir / "prediction.json", result)
    print(f"prediction {out_dir / 'prediction.json'}")
    return {**summary, **result, "report": str(report)}


def _load() -> float | None:
    """The 1-minute load average (a wall time means little without it on a shared machine)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _tokens_per_step(config: dict) -> int:
    t = config["train"]
    return t["batch_size"] * t["grad_accum"] * config["data"]["seq_len"]


def _running_fit(rows: list[dict], vocab: int, target_C: float, unique: float, moe: bool) -> None:
    """After each sweep point: the fit so far (a quick one: 8 starts, 50 bootstrap draws) and its prediction for the
    planned run, so the prediction visibly tightens as the sweep goes."""
    from steplab.law.data_limits import data_plan
    from steplab.law.tables import RunsTable

    from tqdm.auto import tqdm

    cols = {k: np.array([float(r["N_active" if (moe and k == "N") else k]) for r in rows]) for k in ("N", "D", "loss")}
    if len(np.unique(cols["N"])) < 3 or len(np.unique(cols["D"])) < 3:
        tqdm.write(f"    fit: {len(rows)} points, waiting for 3 sizes x 3 budgets")
        return
    table = RunsTable({**cols, "C": 6 * cols["N"] * cols["D"]}, source="sweep so far")
    # 8 starts, not the final fit's 64: this runs in the main process while the workers train on every core, and
    # 64 starts took ~5 s per point on a quiet machine (16 s at load 5) for the same optimum on these tables
    fit, why = fit_sweep(table, vocab=vocab, n_bootstrap=50, n_starts=8)
    if fit is None:
        tqdm.write(f"    fit: {len(rows)} points, not yet usable ({why})")
        return
    p = data_plan(fit, target_C, unique, mode="one-epoch")
    lo, hi = fit.predict_run_interval(np.array([p.N]), np.array([p.D]))
    tqdm.write(f"    fit on {len(rows)} points: alpha {fit.alpha:.3f}, beta {fit.beta:.3f}, E {fit.E:.3f}; planned run "
               f"N {p.N:.3g}, D {p.D:.3g}: predicted {float(fit.predict(p.N, p.D)):.4f} [{lo[0]:.4f}, {hi[0]:.4f}]")


def _downstream(sweep_dir: Path, run_dir: Path, out_dir: Path, report, device: str, progress: bool,
                workers: int | None = None) -> None:
    """The downstream suite (steplab.eval, issue 14): scores of the sweep and the planned run, each task's
    prediction from the sweep next to the measurement, appended to the report. On CPU the runs are scored in
    parallel, one process per usable core (as the sweep trains them)."""
    from steplab.eval.taskfit import suite_over_sweep, sweep_law_runs
    from steplab.law.sweep import auto_workers
    from steplab.utils import atomic_write_text

    runs = sweep_law_runs(sweep_dir)
    workers = 1 if device != "cpu" else (workers or auto_workers(len(runs) + 1))
    print(f"      downstream suite: the sweep's runs (a fifth of the items) and the planned run (all), {workers} process(es)")
    with _quiet_numpy():
        md = suite_over_sweep(runs, run_dir, out_dir, device=device, progress=progress, workers=workers)
    print(md)
    report = Path(report)
    if report.suffix == ".md" and report.is_file():
        text = report.read_text()
        cut = text.find("\n## Downstream suite")
        atomic_write_text(report, (text if cut < 0 else text[:cut]).rstrip() + "\n\n" + md)


@contextlib.contextmanager
def _quiet_numpy():
    """numpy overflow/invalid-value warnings off (both the floating-point error state and RuntimeWarning)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _N(run) -> int:
    from steplab.config import RunConfig
    from steplab.models import count_params

    return count_params(RunConfig.from_dict(run.config).model)["N_active"]  # = N for dense


def fit_sweep(table, vocab: int, n_bootstrap: int = 300, seed: int = 0, n_starts: int = 64):
    """(fit, None) or (None, why). Runs that did not learn (loss near ln V) or diverged are left out first."""
    from steplab.law.fit import FitWarning, fit_parametric

    loss = table["loss"]
    stable = np.isfinite(loss) & (loss < 0.9 * math.log(vocab))
    if stable.sum() < 6:
        return None, f"only {int(stable.sum())} of {len(loss)} sweep runs learned anything (loss below 0.9 ln V)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)
            fit = fit_parametric(table["N"][stable], table["D"][stable], loss[stable], n_bootstrap=n_bootstrap, seed=seed,
                                 n_starts=n_starts)
    except FitError as e:
        return None, str(e)
    if not (0.02 < fit.alpha < 3 and 0.02 < fit.beta < 3):
        return None, f"the fit ran to an edge (alpha {fit.alpha:.3g}, beta {fit.beta:.3g}): the runs do not pin down the law"
    return fit, None


def plan_big_run(fit, table, target_C: float, grid: dict, data_dir: Path, out_dir: Path, unique_tokens: float,
                 moe: bool = False):
    """Plan the run at ``target_C`` within the data and resolve its config with the sweep's own recipe (lr and
    batch rules, warm-up tokens, WSD schedule, eval tokens), so the law's points and the planned run differ
    only in N and D. D is the fit's compute-optimal D when it fits in one pass over the unique tokens and the
    fit pins it down (95% bootstrap interval of D_opt within a factor of ``D_OPT_MAX_RATIO``); otherwise the
    D the data allows, and N = C / 6D. No hand-set cap: the note says which case and why."""
    from steplab.config import RunConfig
    from steplab.law.data_limits import d_opt_interval, data_plan
    from steplab.law.plan import plan, write_config
    from steplab.law.grid import DECAY_FRACTION, expand_grid, hparam_coefs
    from steplab.models import count_params

    kw = dict(seq_len=SEQ_LEN, hparams=hparam_coefs(grid), base=grid["fixed"], data_path=str(data_dir),
              warmup_fraction=grid["warmup_fraction"], moe=moe, **FAMILY)
    choice: dict = {"unique_tokens": unique_tokens}
    if fit is not None:
        dp = data_plan(fit, target_C, unique_tokens, mode="one-epoch")
        N, D, note = dp.N, dp.D, dp.why
        interval = d_opt_interval(fit, target_C)
        choice.update(kind=dp.kind, N_opt=dp.N_opt, D_opt=dp.D_opt, D_opt_ci=list(interval) if interval else None)
        if dp.kind == "fits" and (interval is None or interval[1] / interval[0] > D_OPT_MAX_RATIO):
            N, D = target_C / (6 * unique_tokens), unique_tokens
            shown = f"[{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "(no bootstrap)"
            note = (f"the fit cannot choose D: D_opt = {dp.D_opt:.3g} but its 95% bootstrap interval {shown} is wider "
                    f"than {D_OPT_MAX_RATIO:g}x; planned N at the D the data allows (one pass, {D:,.0f} tokens)")
            choice["kind"] = "d-undetermined"
        elif interval is not None:
            note += f" (D_opt 95% interval [{interval[0]:.3g}, {interval[1]:.3g}]"
            note += (f": wider than {D_OPT_MAX_RATIO:g}x, so the fit cannot choose D anyway)"
                     if interval[1] / interval[0] > D_OPT_MAX_RATIO else ")")
        p = plan(compute=target_C, params=N, fit=fit, **kw)  # plan.toml's header then quotes this sweep's law
    else:
        N, D = target_C / (6 * unique_tokens), unique_tokens
        note = "no usable fit: N = C / 6D at the D the data allows"
        choice["kind"] = "no-fit"
        p = plan(compute=target_C, params=N, **kw)
    choice.update(why=note, N_target=N, D_target=D)
    write_config(p, out_dir / "plan.toml")
    D_run = min(D, unique_tokens)
    one = {**grid, "sizes": [{k: v for k, v in p.model.items() if k != "max_seq_len"}], "tokens": [D_run],
           "mode": "independent"}
    one["fixed"] = {**grid["fixed"], "train": {**grid["fixed"]["train"], "schedule": "wsd",
                                               "decay_fraction": DECAY_FRACTION}}
    # warm-up: the grid's warmup_tokens, as every sweep run's (5% of the largest budget = 5% of the planned run's
    # own steps at one pass). Never the smallest budget's 5%: with that 4x shorter warm-up the 885k-parameter run
    # stalled near loss 5.5 for ~60 steps and ended 7% above the 221k sweep model (seed 0; docs/LOG.md)
    run = expand_grid(one, str(data_dir))[0]
    cfg = RunConfig.from_dict(run.config)
    N_cfg = count_params(cfg.model)["N_active"]  # = N for dense; the law's N for MoE
    D_cfg = cfg.train.max_steps * cfg.tokens_per_step
    predicted = ci = None
    if fit is not None:
        predicted = float(fit.predict(N_cfg, D_cfg))
        # the interval of ONE run (the planned run is one run): the law's bootstrap and a run's own scatter
        # around the law, as the sweep's runs show it (ParametricFit.predict_run_interval); the law's mean alone
        # (predict_interval) was +-3-4% wide and missed seed 1's run (+4.9%, outside)
        lo_, hi_ = fit.predict_run_interval(np.array([N_cfg]), np.array([D_cfg]))
        ci = (float(lo_[0]), float(hi_[0]))
        law_lo, law_hi = fit.predict_interval(np.array([N_cfg]), np.array([D_cfg]))
        choice["law_ci"] = [float(law_lo[0]), float(law_hi[0])]
        choice["run_sigma"] = fit.run_sigma()
    big = {"config": run.config, "N": N_cfg, "D": D_cfg, "lr": cfg.train.lr, "batch_tokens": cfg.tokens_per_step,
           "plan": p}
    return big, predicted, ci, note, choice


def print_samples(run_dir: Path, device: str) -> None:
    from steplab.infer.sampling import SamplingParams, generate
    from steplab.train.checkpoint import load_run

    _, model, tokenizer, _ = load_run(run_dir, device=device)
    params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50, seed=0)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in SAMPLE_PROMPTS]
    for prompt, completion in zip(SAMPLE_PROMPTS, generate(model, prompts, params, stop_ids={tokenizer.eos_id})):
        print("  ---")
        print("  " + (prompt + tokenizer.decode(completion, skip_special=True)).replace("\n", "\n  "))
