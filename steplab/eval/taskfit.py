"""Task-level prediction: how each downstream score grows with compute over a sweep, extrapolated to a run.

For every task of the suite the sweep's accuracies are fitted as a function of training compute C
(``summary.json``'s ``C_6ND``) with a logistic curve that starts at the chance level:

    acc(C) = chance + (1 - chance) * sigmoid(a + b * log10 C)

(two parameters; the form of the "emergence" fits in the capability-prediction literature). A task is only
fitted when at least one sweep run lies above chance (its 95% interval's lower end above chance); below that
the scores are noise around chance and the report says "too close to chance to fit" instead of a number.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from steplab.utils import atomic_write_json, atomic_write_text


def _curve(logc, a, b, chance):
    return chance + (1 - chance) / (1 + np.exp(-(a + b * logc)))


def fit_task(compute: list[float], acc: list[float], chance: float, above: list[bool]) -> dict:
    """Fit one task's accuracies vs compute; {"a", "b"} or {"reason"} when there is nothing to fit."""
    from scipy.optimize import curve_fit

    if len(compute) < 3:
        return {"reason": f"only {len(compute)} runs (need >= 3)"}
    if not any(above):
        return {"reason": "too close to chance to fit (no sweep run is above chance at 95%)"}
    x = np.log10(np.asarray(compute, dtype=float))
    y = np.clip(np.asarray(acc, dtype=float), chance + 1e-4, 1 - 1e-4)
    # start: a straight line through the logits of the points
    z = np.log((y - chance) / (1 - y))
    b0, a0 = np.polyfit(x, z, 1)
    try:
        (a, b), _ = curve_fit(lambda xx, a, b: _curve(xx, a, b, chance), x, y, p0=(a0, b0), maxfev=20000)
    except RuntimeError as e:
        return {"reason": f"fit did not converge ({e})"}
    resid = y - _curve(x, a, b, chance)
    return {"a": float(a), "b": float(b), "rmse": float(np.sqrt(np.mean(resid ** 2)))}


def predict(fit: dict, compute: float, chance: float) -> float | None:
    if "a" not in fit:
        return None
    return float(_curve(math.log10(compute), fit["a"], fit["b"], chance))


def sweep_points(run_dirs: list[Path], suite: str = "small") -> list[dict]:
    """(run, C, per-task result) for every run that has a saved suite result."""
    from steplab.eval.suite import load_suite

    points = []
    for d in run_dirs:
        res, summary = load_suite(d, suite), Path(d) / "summary.json"
        if res is None or not summary.is_file():
            continue
        s = json.loads(summary.read_text())
        points.append({"run": str(d), "C": float(s["C_6ND"]), "N": s.get("N"), "D": s.get("D"),
                       "results": {r["task"]: r for r in res["results"]}})
    return points


def fit_sweep(points: list[dict], target_C: float | None = None) -> dict:
    """Per task: the fit over the sweep and, with ``target_C``, the predicted accuracy there."""
    tasks = sorted({t for p in points for t in p["results"]})
    out = {}
    for t in tasks:
        pts = [p for p in points if t in p["results"]]
        chance = pts[0]["results"][t]["chance"]
        fit = fit_task([p["C"] for p in pts], [p["results"][t]["accuracy"] for p in pts], chance,
                       [p["results"][t]["above_chance"] for p in pts])
        entry = {"chance": chance, "fit": fit, "runs": len(pts),
                 "first_above_chance_C": min((p["C"] for p in pts if p["results"][t]["above_chance"]), default=None)}
        if target_C is not None:
            entry["target_C"] = target_C
            entry["predicted"] = predict(fit, target_C, chance)
        out[t] = entry
    return out


def plot_sweep(points: list[dict], fits: dict, path: str | Path, measured: dict | None = None) -> None:
    """One panel per task: sweep accuracies (with 95% intervals) vs compute, the fit, chance, the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(fits)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        pts = sorted((p for p in points if t in p["results"]), key=lambda p: p["C"])
        C = np.array([p["C"] for p in pts])
        acc = np.array([p["results"][t]["accuracy"] for p in pts])
        lo = np.maximum(0, acc - np.array([p["results"][t]["ci_low"] for p in pts]))
        hi = np.maximum(0, np.array([p["results"][t]["ci_high"] for p in pts]) - acc)
        ax.errorbar(C, acc, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label="sweep")
        f = fits[t]
        ax.axhline(f["chance"], color="gray", ls=":", label="chance")
        cmax = max([C.max()] + ([f["target_C"]] if f.get("target_C") else []))
        if "a" in f["fit"]:
            xs = np.logspace(np.log10(C.min()), np.log10(cmax), 100)
            ax.plot(xs, [predict(f["fit"], x, f["chance"]) for x in xs], "-", label="fit")
        if f.get("predicted") is not None:
            ax.plot([f["target_C"]], [f["predicted"]], "s", color="C2", label="predicted")
        if measured and t in measured:
            m = measured[t]
            ax.errorbar([f.get("target_C") or cmax], [m["accuracy"]], yerr=[[max(0, m["accuracy"] - m["ci_low"])], [max(0, m["ci_high"] - m["accuracy"])]],
                        fmt="*", ms=9, color="C3", capsize=2, label="measured")
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("training compute C = 6ND (FLOPs)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(fits: dict, measured: dict | None = None) -> str:
    lines = ["## Task-level prediction", "",
             "| task | chance | first C above chance | fit | predicted | measured |", "|---|---:|---:|---|---:|---:|"]
    for t, f in fits.items():
        fit = f["fit"]
        fit_s = f"a {fit['a']:.2f}, b {fit['b']:.2f}, rmse {fit['rmse']:.3f}" if "a" in fit else fit["reason"]
        first = f"{f['first_above_chance_C']:.2e}" if f["first_above_chance_C"] else "never"
        pred = f"{f['predicted']:.1%}" if f.get("predicted") is not None else "-"
        meas = ""
        if measured and t in measured:
            m = measured[t]
            meas = f"{m['accuracy']:.1%} ({m['ci_low']:.1%}-{m['ci_high']:.1%})"
        lines.append(f"| {t} | {f['chance']:.0%} | {first} | {fit_s} | {pred} | {meas} |")
    lines += ["", "Fit: acc = chance + (1 - chance) sigmoid(a + b log10 C) over the sweep's runs."]
    return "\n".join(lines) + "\n"


def save_prediction(out_dir: str | Path, points: list[dict], fits: dict, measured: dict | None = None) -> Path:
    out = Path(out_dir)
    atomic_write_json(out / "task_prediction.json", {"points": points, "fits": fits, "measured": measured})
    plot_sweep(points, fits, out / "task_prediction.png", measured)
    md = out / "task_prediction.md"
    atomic_write_text(md, report_markdown(fits, measured) + "\n![task-level prediction](task_prediction.png)\n")
    return md


def sweep_law_runs(sweep_dir: str | Path) -> list[Path]:
    """The finished runs of a sweep that are points of its law: a WSD sweep's stable parent runs (marked
    ``stable`` in sweep.json) are branch sources, not points, and are left out."""
    sweep_dir = Path(sweep_dir)
    meta = sweep_dir / "sweep.json"
    runs = json.loads(meta.read_text()).get("runs", {}) if meta.is_file() else {}
    return sorted(d for d in (sweep_dir / "runs").iterdir()
                  if (d / "summary.json").is_file() and not runs.get(d.name, {}).get("stable"))


def score_run(run_dir: str | Path, suite: str, scale: float, device: str = "cpu", dtype: str = "fp32", seed: int = 0,
              threads: int = 0) -> bool:
    """Score ``suite`` on one run and save it (``RUN/eval/suite_NAME.json``) unless a saved result already covers
    every task; True when it scored. A process-pool worker (``threads``: its torch threads, 0 = leave as is)."""
    from steplab.eval.runner import EngineLM
    from steplab.eval.suite import load_suite, run_suite, save_suite, suite_tasks

    if threads:
        import torch

        torch.set_num_threads(threads)
    old = load_suite(run_dir, suite)
    done = {r["task"] for r in old["results"]} | {s["task"] for s in old["skipped"]} if old else set()
    if old is not None and all(t in done for t, _ in suite_tasks(suite)):
        return False
    with EngineLM.from_run(run_dir, device=device, dtype=dtype) as lm:
        save_suite(run_dir, run_suite(lm, suite, scale=scale, seed=seed, previous=old))
    return True


def suite_over_sweep(sweep_runs: list[Path], target_run: Path | None, out_dir: str | Path, *, suite: str = "small",
                     sweep_scale: float = 0.2, device: str = "cpu", dtype: str = "fp32", seed: int = 0,
                     progress: bool = True, workers: int = 1) -> str:
    """Score the suite on every sweep run (``sweep_scale`` of the items: a quick look) and on the target run (all
    items), fit each task vs compute, predict the target, and return the Markdown (suite table + prediction).
    Saved results are reused (a grown suite scores only its new tasks), so a rerun does not score a run twice.
    ``workers`` > 1 scores that many runs at once in spawned processes of one torch thread each (the target run
    first: it is the longest), which on CPU beats one process with that many threads on these small models."""
    from steplab.eval.suite import load_suite, suite_markdown

    by_size = sorted(sweep_runs, key=lambda d: -json.loads((Path(d) / "summary.json").read_text()).get("N", 0))
    todo = ([(Path(target_run), 1.0)] if target_run else []) + [(Path(d), sweep_scale) for d in by_size]
    if workers <= 1 or len(todo) < 2:
        for d, scale in todo:
            if score_run(d, suite, scale, device, dtype, seed) and progress:
                print(f"      suite {suite}: scored {d.name}")
    else:
        import concurrent.futures as cf
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(score_run, d, suite, scale, device, dtype, seed, 1): d for d, scale in todo}
            for fut in cf.as_completed(futures):
                if fut.result() and progress:
                    print(f"      suite {suite}: scored {futures[fut].name}")
    points = sweep_points([Path(d) for d in sweep_runs], suite)
    target_C, measured, head = None, None, ""
    if target_run:
        target = load_suite(target_run, suite)
        target_C = json.loads((Path(target_run) / "summary.json").read_text())["C_6ND"]
        measured = {r["task"]: r for r in target["results"]}
        head = suite_markdown(target, f"Downstream suite ({suite}) of the planned run") + "\n"
    fits = fit_sweep(points, target_C)
    save_prediction(out_dir, points, fits, measured)
    return head + report_markdown(fits, measured) + "\n![task-level prediction](task_prediction.png)\n"
