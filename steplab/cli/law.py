"""`steplab law ...` verbs: argument parsing and printing only; the work is in steplab.law.

Each verb is a pair: ``_add_<verb>(law_sub)`` declares its parser and ``cmd_<verb>(args) -> int`` runs it.
To add a verb, write the pair and append the adder to ``VERBS``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings


def register(sub: argparse._SubParsersAction) -> None:
    law = sub.add_parser("law", help="scaling-law lab: hparams, fit, report, plan, sweep (predict before you train)")
    law_sub = law.add_subparsers(dest="law_verb", metavar="<law-verb>")
    law_sub.required = True
    for add in VERBS:
        add(law_sub)


def add_table_args(p: argparse.ArgumentParser) -> None:
    """How to read a runs table: shared by every verb that takes one."""
    p.add_argument("--adapter", default="auto",
                   choices=["auto", "runs", "epoch", "steplaw", "gadre", "misfitting", "open_athena"],
                   help="table format (default: detected from the columns)")
    p.add_argument("--map", action="extend", nargs="+", default=[], metavar="KEY=COLUMN",
                   help="take a canonical column from a source column, e.g. --map N=params loss=val_loss")
    p.add_argument("--where", action="extend", nargs="+", default=[], metavar="COLUMN=VALUE",
                   help="keep only matching rows, e.g. --where dataset=rpj")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop runs with NaN, infinite or non-positive values (with a warning) instead of failing")


def load_from_args(args, path: str):
    from steplab.law.tables import load_table, parse_pairs

    return load_table(path, adapter=args.adapter, columns=parse_pairs(args.map, "--map"),
                      where=parse_pairs(args.where, "--where"))


def _jsonable(obj):
    """NaN (no bootstrap, no interval) becomes null: json.dumps would write invalid JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _print_json(obj) -> None:
    print(json.dumps(_jsonable(obj), indent=2))


def _print_warnings(result) -> None:
    results = result if isinstance(result, list) else [result]
    for w in dict.fromkeys(w for r in results for w in r.warnings):
        print(f"warning: {w}", file=sys.stderr)


def _fit(args, table):
    """Run the fit with Python's own warning printing off: the result carries the warnings and we print them
    once, as one line each."""
    from steplab.law.fit import FitWarning, fit_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        return fit_table(table, args.kind, holdout=args.holdout, n_bootstrap=args.bootstrap, seed=args.seed,
                         drop_invalid=args.drop_invalid, form=args.form)


# --------------------------------------------------------------------------------------- hparams

def _add_hparams(law_sub) -> None:
    p = law_sub.add_parser("hparams", help="Step Law optimal peak learning rate and batch size for N, D")
    p.add_argument("--N", type=float, required=True, help="non-embedding parameters (MoE: see docs/scaling_laws.md)")
    p.add_argument("--D", type=float, required=True, help="training tokens")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the batch in sequences")
    p.add_argument("--from", dest="from_table", metavar="TABLE",
                   help="refit the coefficients from this lr x batch sweep instead of the published ones")
    add_table_args(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for --from (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help='print {"lr", "batch_tokens", "batch_sequences", ...}')
    p.set_defaults(func=cmd_hparams)


def cmd_hparams(args) -> int:
    from steplab.law.hparams import PUBLISHED, fit_hparam_laws, suggest

    coefs, source = PUBLISHED, "published coefficients (Li et al. 2025, ~3,700 runs)"
    if args.from_table:
        from steplab.law.fit import FitWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FitWarning)
            fit = fit_hparam_laws(load_from_args(args, args.from_table), seq_len=args.seq_len,
                                  n_bootstrap=args.bootstrap, seed=args.seed)
        _print_warnings(fit)
        coefs, source = fit.coefs, f"refitted from {args.from_table} ({fit.n_selected} runs kept)"
    s = suggest(args.N, args.D, args.seq_len, coefs)
    if args.json:
        _print_json({**s, "N": args.N, "D": args.D, "seq_len": args.seq_len, "coefficients": vars(coefs),
                     "source": source})
        return 0
    print(f"Step Law, {source}:")
    print(f"  lr = {math.exp(coefs.lr_intercept):.4g} * N^{coefs.lr_coef_N:.4f} * D^{coefs.lr_coef_D:.4f}, "
          f"batch_tokens = {math.exp(coefs.bs_intercept):.4g} * D^{coefs.bs_coef_D:.4f}")
    print(f"  N = {args.N:.4g}, D = {args.D:.4g}")
    print(f"  peak lr        {s['lr']:.4g}")
    print(f"  batch          {s['batch_tokens']:,.0f} tokens = {s['batch_sequences']} sequences of {args.seq_len}")
    return 0


# ------------------------------------------------------------------------------------------- fit

def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="runs table: CSV/JSONL (ours or a public suite), or a Gadre model-JSON directory")
    add_table_args(p)
    p.add_argument("--kind", default="auto", choices=["auto", "chinchilla", "isoflop", "hparams"],
                   help="chinchilla: L = E + A/N^a + B/D^b; isoflop: approaches 1 and 2; hparams: Step Law "
                        "lr/batch laws (default: hparams for an lr x batch sweep, else chinchilla)")
    p.add_argument("--form", default="chinchilla", choices=["chinchilla", "farseer", "kaplan"],
                   help="loss law: chinchilla E + A/N^a + B/D^b (default), farseer E(N) + B(N) D^-beta(N) "
                        "(StepFun's Farseer, 9 parameters) or kaplan ((Nc/N)^(aN/aD) + Dc/D)^aD (Kaplan et al. "
                        "2020, 4 parameters); docs/scaling_laws.md compares them")
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="fit without the K largest-compute runs and report predicted vs measured loss for them")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)


def _add_fit(law_sub) -> None:
    p = law_sub.add_parser("fit", help="fit a runs table: Chinchilla form, IsoFLOP, or Step Law hparams")
    _fit_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable results (each value with a _ci pair)")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots of the fit into DIR")
    p.set_defaults(func=cmd_fit)


def cmd_fit(args) -> int:
    from steplab.law.report import plots_for, summary_lines

    table = load_from_args(args, args.table)
    result = _fit(args, table)
    _print_warnings(result)
    if args.json:
        if isinstance(result, list):
            _print_json({"kind": "isoflop", **{f"approach{r.approach}": r.to_dict() for r in result}})
        else:
            _print_json(result.to_dict())
    else:
        print(f"{table.describe()}")
        for note in (result[0] if isinstance(result, list) else result).notes:
            print(f"  note: {note}")
        print("\n".join(summary_lines(result)))
    if args.plots:
        for path in plots_for(table, result, args.plots):
            print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------- report

def _add_report(law_sub) -> None:
    p = law_sub.add_parser("report", help="fit a runs table and write plots + a Markdown/HTML report")
    _fit_args(p)
    p.add_argument("--out", default="out/law_report", help="output directory (default out/law_report)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from steplab.law.report import fit_report

    table = load_from_args(args, args.table)
    result = _fit(args, table)
    _print_warnings(result)
    md, page = fit_report(table, result, args.out)
    print(f"wrote {md}\nwrote {page}")
    return 0


# ------------------------------------------------------------------------------------------ plan

def _add_plan(law_sub) -> None:
    p = law_sub.add_parser("plan", help="compute-optimal N and D, predicted loss, Step Law lr/batch and a train config")
    what = p.add_argument_group("what to plan (one of them, or two to fix the third by C = 6ND)")
    what.add_argument("--compute", type=float, metavar="C", help="training FLOPs (6 N D; N active for MoE)")
    what.add_argument("--params", type=float, metavar="N", help="non-embedding parameters (active for MoE)")
    what.add_argument("--tokens", type=float, metavar="D", help="training tokens")
    p.add_argument("--from", dest="from_table", metavar="TABLE",
                   help="fit the loss law to this runs table first (or read E, A, B, alpha, beta from a "
                        "`law fit --json` file); default: Epoch's published Chinchilla refit")
    add_table_args(p)
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples for --from (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length of the planned run (default 2048)")
    p.add_argument("--moe", action="store_true",
                   help="plan a Step-2 MoE (8 experts, top-2, 1 shared): N is active; lr from total N")
    p.add_argument("--data", help="prepared dataset to put in the config (data.path); or pass it to `train --data`. "
                                  "With --compute its train tokens are the unique tokens the plan must respect")
    p.add_argument("--unique-tokens", type=float, metavar="U",
                   help="unique tokens available (default: the --data set's train tokens): with --compute the plan "
                        "stays within them or repeats epochs (Muennighoff et al. 2023) and says which")
    p.add_argument("--data-mode", choices=["auto", "repeat", "one-epoch"], default="auto",
                   help="when D_opt exceeds the unique tokens: repeat epochs (data-constrained law), one epoch "
                        "(D = U, larger N), or auto (repeat up to 4 epochs, else one epoch)")
    p.add_argument("--out", metavar="CONFIG", help="write the train config here (.toml, else JSON)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (config included)")
    p.set_defaults(func=cmd_plan)


def _law_from(args):
    """The loss law for --from: a `law fit --json` file's coefficients, or a fit of a runs table."""
    from pathlib import Path

    path = Path(args.from_table)
    if path.suffix == ".json" and path.is_file():
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and all(k in obj for k in ("E", "A", "B", "alpha", "beta")):
            return {k: obj[k] for k in ("E", "A", "B", "alpha", "beta")}
    from steplab.law.fit import FitWarning, fit_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        fit = fit_table(load_from_args(args, args.from_table), "chinchilla", n_bootstrap=args.bootstrap,
                        seed=args.seed, drop_invalid=args.drop_invalid)
    _print_warnings(fit)
    return fit


def cmd_plan(args) -> int:
    from steplab.law.plan import plan, write_config

    law = _law_from(args) if args.from_table else None
    unique = args.unique_tokens
    if unique is None and args.data and args.compute is not None and args.params is None and args.tokens is None:
        from pathlib import Path

        meta = Path(args.data) / "meta.json"
        if meta.is_file():
            unique = float(json.loads(meta.read_text())["train"]["tokens"])
    p = plan(args.compute, args.params, args.tokens, fit=law, seq_len=args.seq_len, moe=args.moe, data_path=args.data,
             unique_tokens=unique, data_mode=args.data_mode)
    if args.out:
        write_config(p, args.out)
    if args.json:
        _print_json({**p.to_dict(), "config_file": args.out})
        return 0
    print("\n".join(p.lines()))
    if args.out:
        data = "" if args.data else " --data DATA_DIR"
        print(f"wrote {args.out}\n  steplab train --config {args.out}{data} --out runs/NAME")
    return 0


# ----------------------------------------------------------------------------------------- sweep

def _add_sweep(law_sub) -> None:
    p = law_sub.add_parser("sweep", help="run a grid of training runs (sizes x tokens x lr x batch), resumable")
    p.add_argument("--grid", required=True, help="grid TOML (see docs/scaling_laws.md)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="sweep directory: runs/, runs.csv, runs.jsonl, sweep.json")
    p.add_argument("--workers", type=int, help="parallel training processes (default: one per usable core, "
                                               "from the CPU affinity; 0: in this process)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers, fewer when busy)")
    p.add_argument("--retry-failed", action="store_true", help="re-run runs that failed (diverged) before")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local process pool (default) or Ray tasks (pip install ray; shared storage for --out)")
    p.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a local one)")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray: GPUs each run asks for")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from pathlib import Path

    from steplab.law.grid import expand_grid
    from steplab.law.sweep import run_state, run_sweep

    if args.dry_run:
        runs = expand_grid(args.grid, args.data)
        for r in runs:
            state = run_state(Path(args.out) / "runs" / r.run_id)
            t = r.config["train"]
            role = " (stable phase)" if r.stable else f" (branch of step {r.branch_step})" if r.parent else ""
            print(f"{state:<9} {r.run_id}  steps {t['max_steps']}, batch {t['batch_size'] * t['grad_accum']}, "
                  f"lr {t['lr']:.3g}, {r.cost:.3g} FLOPs{role}")
        print(f"{len(runs)} runs, {sum(r.cost for r in runs):.3g} FLOPs in all")
        return 0
    res = run_sweep(args.grid, args.out, data_path=args.data, workers=args.workers, threads=args.threads,
                    progress=not args.quiet, retry_failed=args.retry_failed, return_result=True,
                    launcher=args.launcher, ray_address=args.ray_address, gpus_per_run=args.gpus_per_run)
    print(f"{len(res.finished)} run(s) trained, {len(res.skipped)} already finished, {len(res.failed)} failed")
    print(f"wrote {res.table}\n  next: steplab law fit {res.table}   or   steplab law plan --compute C --from {res.table}")
    return 1 if res.failed and not (res.finished or res.skipped) else 0


VERBS = [_add_hparams, _add_fit, _add_report, _add_plan, _add_sweep]
