"""``steplab law sweep``: a grid of small training runs, run in a local process pool, resumable, -> a runs table.

The grid (sizes x token budgets x lr x batch x seeds, WSD branches) and each run's resolved config and id come
from ``steplab.law.grid``. Run ids are made from the grid point alone, so the same grid always maps to the same
directories:

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
import csv
import io
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steplab.errors import ConfigError, StepLabError
from steplab.law.cores import auto_threads, auto_workers, usable_cores  # noqa: F401 (part of this API)
from steplab.law.grid import SweepRun, _data_fingerprint, branch_init, expand_grid, load_grid
from steplab.utils import atomic_write_json, atomic_write_text

# Columns first in the runs table, in this order; any other summary key follows alphabetically.
TABLE_COLUMNS = ["run", "size", "N", "N_active", "D", "C", "loss", "val_loss", "val_bpb", "train_loss_smoothed",
                 "train_loss_final", "lr", "lr_rule", "batch_tokens", "batch_rule", "batch_sequences", "seq_len",
                 "steps", "seed", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "n_experts", "top_k",
                 "params_total", "C_6ND", "C_model", "tokens_target", "train_seconds", "tok_per_s", "dataset"]


@dataclass
class SweepResult:
    table: Path
    finished: list[str] = field(default_factory=list)   # ran to completion in this call
    skipped: list[str] = field(default_factory=list)    # already finished before this call
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error


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
