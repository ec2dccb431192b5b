"""What people look at after a fit: text summaries, PNG plots and a Markdown + HTML report.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so they work on
headless machines and inside other programs. Every file is written atomically.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steplab.law.fit import ParametricFit
from steplab.law.isoflop import IsoFLOPFit
from steplab.law.hparams import COEF_NAMES, PUBLISHED, HparamCoefs, HparamFit, select_near_best
from steplab.law.tables import RunsTable
from steplab.utils import atomic_write, atomic_write_text


# ----------------------------------------------------------------------------------------- text

def _ci(lo: float, hi: float, fmt: str) -> str:
    return "" if math.isnan(lo) else f"  95% CI [{lo:{fmt}}, {hi:{fmt}}]"


def _form_lines(result, lines: list[str], names: tuple[str, ...], extra: list[str] = ()) -> list[str]:
    """The Farseer / Kaplan summary: each parameter with its interval, fit quality, held-out runs."""
    q = result.to_dict()
    width = max(len(n) for n in names)
    for name in names:
        ci = q.get(f"{name}_ci")
        lines.append(f"  {name:<{width}} {q[name]:.4f}" + (_ci(*ci, ".4f") if ci else ""))
    lines += list(extra)
    lines.append(f"  fit quality: RMSE log-loss {result.rmse_log:.4f}, max |rel err| {result.max_rel_err:.2%}, "
                 f"{result.starts} starts")
    for h in result.holdout:
        lines.append(f"    holdout N={h['N']:.3g} D={h['D']:.3g}: measured {h['measured']:.4f}, predicted "
                     f"{h['predicted']:.4f} [{h['predicted_ci'][0]:.4f}, {h['predicted_ci'][1]:.4f}], "
                     f"error {h['rel_err']:+.2%}")
    return lines


def summary_lines(result) -> list[str]:
    """Human-readable lines for any fit result (what `steplab law fit` prints)."""
    if isinstance(result, list):
        return [line for r in result for line in summary_lines(r)]
    if isinstance(result, ParametricFit):
        est = result.estimates()
        q = result
        lines = [f"Chinchilla form L = E + A/N^alpha + B/D^beta ({q.n} runs)"]
        for name in ("E", "A", "B", "alpha", "beta"):
            e = est[name]
            fmt = ".4g" if name in ("A", "B") else ".4f"
            se = "" if math.isnan(e.se) else f"  se {e.se:{fmt}}"
            lines.append(f"  {name:<6} {e.value:{fmt}}{_ci(*e.ci, fmt)}{se}")
        a = est["a"]
        lines.append(f"  compute-optimal: N_opt ~ C^{a.value:.3f}{_ci(*a.ci, '.3f')}, D_opt ~ C^{1 - a.value:.3f}")
        lines.append(f"  fit quality: Huber objective {q.objective:.6g}, RMSE log-loss {q.rmse_log:.4f}, "
                     f"max |rel err| {q.max_rel_err:.2%}, {q.starts_at_best}/{q.starts} starts at the optimum")
        if q.holdout:
            lines.append("  holdout (largest compute, not used in the fit):")
            for h in q.holdout:
                lines.append(f"    N={h['N']:.3g} D={h['D']:.3g} C={h['C']:.3g}: measured {h['measured']:.4f}, "
                             f"predicted {h['predicted']:.4f} [{h['predicted_ci'][0]:.4f}, "
                             f"{h['predicted_ci'][1]:.4f}], error {h['rel_err']:+.2%}")
        return lines
    if getattr(result, "kind", None) == "farseer":
        lines = [f"Farseer form L = exp(a3 n^g3 + b3) + exp(a2 n^g2 + b2) d^-exp(a1 n^g1 + b1), n = N/{result.N0:.4g}, "
                 f"d = D/{result.D0:.4g} ({result.n} runs)"]
        Ns = np.geomspace(result.N0 / 4, result.N0 * 4, 3)
        extra = "  data exponent beta(N): " + ", ".join(f"{b:.3f} at N={n:.3g}" for n, b in zip(Ns, result.beta_of(Ns)))
        return _form_lines(result, lines, ("a1", "b1", "g1", "a2", "b2", "g2", "a3", "b3", "g3"), [extra])
    if getattr(result, "kind", None) == "kaplan":
        lines = [f"Kaplan form L = ((Nc/N)^(alpha_N/alpha_D) + Dc/D)^alpha_D ({result.n} runs)"]
        return _form_lines(result, lines, ("log_Nc", "log_Dc", "alpha_N", "alpha_D"))
    if isinstance(result, IsoFLOPFit):
        name = "envelope (min loss per budget)" if result.approach == 1 else "IsoFLOP parabolas"
        return [f"Approach {result.approach}, {name}: {len(result.points)} compute levels",
                f"  N_opt ~ C^{result.a.value:.3f}{_ci(*result.a.ci, '.3f')}",
                f"  D_opt ~ C^{result.b.value:.3f}{_ci(*result.b.ci, '.3f')}",
                f"  fit quality: RMSE of log N_opt about the power law {result.rmse_log_N:.3f}"]
    if isinstance(result, HparamFit):
        d = result.to_dict()
        lines = [f"Step Law fit: {result.n_selected} of {result.n_runs} runs within {result.tolerance:.2%} of "
                 f"their cell's best loss, {result.n_cells} (N, D) cells"]
        for name in COEF_NAMES:
            sd = d[f"{name}_sd"]
            lines.append(f"  {name:<13} {d[name]:+.4f}{_ci(*d[f'{name}_ci'], '+.4f')}"
                         + ("" if math.isnan(sd) else f"  sd {sd:.4f}"))
        c = result.coefs
        lines.append(f"  lr = {math.exp(c.lr_intercept):.4g} N^{c.lr_coef_N:.3f} D^{c.lr_coef_D:.3f};  "
                     f"batch_tokens = {math.exp(c.bs_intercept):.4g} D^{c.bs_coef_D:.3f}")
        p = PUBLISHED
        lines.append(f"  published:  lr = {math.exp(p.lr_intercept):.3g} N^{p.lr_coef_N} D^{p.lr_coef_D};  "
                     f"batch_tokens = {math.exp(p.bs_intercept):.3g} D^{p.bs_coef_D}")
        lines.append(f"  fit quality: RMSE log lr {result.rmse_log_lr:.3f}, RMSE log batch {result.rmse_log_bs:.3f}")
        return lines
    raise TypeError(f"no summary for {type(result).__name__}")


# ---------------------------------------------------------------------------------------- plots

def _figure(w: float = 6.4, h: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_loss_vs_compute(table: RunsTable, fit: ParametricFit, path: Path) -> Path:
    """Every run's loss against its compute, coloured by N, with the fitted compute-optimal frontier."""
    fig = _figure()
    ax = fig.add_subplot()
    C, L = 6 * table["N"] * table["D"], table["loss"]
    sc = ax.scatter(C, L, c=np.log10(table["N"]), cmap="viridis", s=14, label="runs")
    fig.colorbar(sc, ax=ax, label="log10 N")
    grid = np.logspace(np.log10(C.min()), np.log10(C.max()) + 0.5, 200)
    Nopt, Dopt = fit.allocation(grid)
    ax.plot(grid, fit.predict(Nopt, Dopt), "r-", label="fitted frontier L(N_opt(C), D_opt(C))")
    if fit.holdout:
        hC = [h["C"] for h in fit.holdout]
        ax.scatter(hC, [h["measured"] for h in fit.holdout], marker="x", c="k", s=50, label="held out: measured")
        ax.scatter(hC, [h["predicted"] for h in fit.holdout], marker="o", facecolors="none", edgecolors="r",
                   s=60, label="held out: predicted")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss",
           title=f"E={fit.E:.3f}, alpha={fit.alpha:.3f}, beta={fit.beta:.3f}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fitted_vs_measured(table: RunsTable, fit: ParametricFit, path: Path) -> Path:
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    pred = fit.predict(table["N"], table["D"])
    ax.scatter(table["loss"], pred, s=12, c=np.log10(6 * table["N"] * table["D"]), cmap="plasma")
    lo, hi = float(min(pred.min(), table["loss"].min())), float(max(pred.max(), table["loss"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="measured loss", ylabel="fitted loss", title=f"RMSE log-loss {fit.rmse_log:.4f}")
    return _save(fig, path)


def plot_isoflop(table: RunsTable, fits: list[IsoFLOPFit], path: Path) -> Path:
    """Left: loss against N per budget with the approach-2 parabolas. Right: N_opt against C for both."""
    fig = _figure(11, 4.4)
    ax, ax2 = fig.subplots(1, 2)
    by_approach = {f.approach: f for f in fits}
    if 2 in by_approach:
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        pts = by_approach[2].points
        for i, p in enumerate(pts):
            color = cmap(i / max(1, len(pts) - 1))
            x = np.linspace(np.log(p["N_opt"]) - 1.5, np.log(p["N_opt"]) + 1.5, 50)
            ax.plot(np.exp(x), np.polyval(p["parabola"], x), color=color, lw=1)
            ax.plot(p["N_opt"], p["loss"], "*", color=color, ms=9)
        C = table["budget"] if "budget" in table else 6 * table["N"] * table["D"]
        ax.scatter(table["N"], table["loss"], c=np.log10(C), cmap="viridis", s=10)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss", title="IsoFLOP curves, vertices starred")
    for f, marker in ((by_approach.get(1), "s"), (by_approach.get(2), "o")):
        if f is None:
            continue
        C = np.array([p["C"] for p in f.points])
        ax2.scatter(C, [p["N_opt"] for p in f.points], marker=marker, label=f"approach {f.approach}: a={f.a.value:.3f}")
        grid = np.logspace(np.log10(C.min()), np.log10(C.max()), 50)
        ax2.plot(grid, f.kN * grid ** f.a.value, lw=1)
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="N_opt ~ C^a")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_lr_bs_heatmaps(table: RunsTable, fit: HparamFit, path: Path, extra: dict[str, HparamCoefs] | None = None,
                        max_cells: int = 20) -> Path:
    """One panel per (N, D) cell: each run at (lr, batch) coloured by its loss above the cell's best;
    circles mark the runs kept by the 0.25% rule, stars the fitted law, triangles the published law."""
    laws = {"fitted": (fit.coefs, "*"), **{k: (v, "^") for k, v in (extra or {"published": PUBLISHED}).items()}}
    keep = select_near_best(table, fit.tolerance)
    cells = fit.cells[:max_cells]
    cols = min(5, len(cells))
    rows = math.ceil(len(cells) / cols)
    fig = _figure(3.0 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    nkey = "N_active" if "N_active" in table else "N"
    for ax, cell in zip(axes, cells):
        m = (table[nkey] == cell[nkey]) & (table["D"] == cell["D"])
        rel = table["loss"][m] / cell["best_loss"] - 1
        sc = ax.scatter(table["lr"][m], table["batch_tokens"][m], c=np.minimum(rel, 0.02), cmap="viridis_r",
                        marker="s", s=30, vmin=0, vmax=0.02)
        ax.scatter(table["lr"][m & keep], table["batch_tokens"][m & keep], facecolors="none", edgecolors="r", s=60)
        for name, (coefs, marker) in laws.items():
            ax.plot(coefs.lr(cell["N"], cell["D"]), coefs.batch_tokens(cell["D"]), marker, color="k", ms=9)
        ax.set(xscale="log", yscale="log", title=f"{nkey}={cell[nkey]:.3g} D={cell['D']:.3g}")
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    fig.colorbar(sc, ax=list(axes[:len(cells)]), label="loss / cell best - 1 (clipped at 2%)")
    fig.suptitle("lr (x) vs batch tokens (y); circles: kept runs; * fitted law, ^ published law", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # tight_layout fights the shared colorbar
    return path


def plots_for(table: RunsTable, result, outdir: str | Path) -> list[Path]:
    """The standard plots for a fit result, written into ``outdir``."""
    outdir = Path(outdir)
    if isinstance(result, ParametricFit):
        return [plot_loss_vs_compute(table, result, outdir / "loss_vs_compute.png"),
                plot_fitted_vs_measured(table, result, outdir / "fitted_vs_measured.png")]
    if isinstance(result, list):
        return [plot_isoflop(table, result, outdir / "isoflop.png")]
    if isinstance(result, HparamFit):
        return [plot_lr_bs_heatmaps(table, result, outdir / "lr_bs_heatmaps.png")]
    if getattr(result, "kind", None) in ("farseer", "kaplan"):
        return [plot_fitted_vs_measured(table, result, outdir / "fitted_vs_measured.png")]
    raise TypeError(f"no plots for {type(result).__name__}")


# --------------------------------------------------------------------------------------- report

@dataclass
class Report:
    """An ordered list of blocks rendered both as Markdown and as a self-contained HTML page."""
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> "Report":
        self.blocks.append(("h2", text))
        return self

    def paragraph(self, text: str) -> "Report":
        self.blocks.append(("p", text))
        return self

    def code(self, text: str) -> "Report":
        self.blocks.append(("pre", text))
        return self

    def table(self, header: list[str], rows: list[list]) -> "Report":
        self.blocks.append(("table", header, rows))
        return self

    def image(self, path: str, caption: str = "") -> "Report":
        self.blocks.append(("img", path, caption))
        return self

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out += [f"## {rest[0]}", ""]
            elif kind == "p":
                out += [rest[0], ""]
            elif kind == "pre":
                out += ["```", rest[0], "```", ""]
            elif kind == "table":
                header, rows = rest
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
            elif kind == "img":
                out += [f"![{rest[1]}]({rest[0]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
               "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}pre{background:#f4f4f4;padding:8px}"
               "</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(rest[0])}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(rest[0])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{e(rest[0])}</pre>")
            elif kind == "table":
                header, rows = rest
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f"<figure><img src='{e(rest[0])}' alt='{e(rest[1])}'><figcaption>{e(rest[1])}"
                           "</figcaption></figure>")
        return "\n".join(out + ["</body></html>"])

    def write(self, outdir: str | Path, stem: str = "report") -> tuple[Path, Path]:
        outdir = Path(outdir)
        md, page = outdir / f"{stem}.md", outdir / f"{stem}.html"
        atomic_write_text(md, self.markdown())
        atomic_write_text(page, self.html())
        return md, page


def fit_report(table: RunsTable, result, outdir: str | Path) -> tuple[Path, Path]:
    """Plots + a Markdown/HTML report of one fit of one table; returns (report.md, report.html)."""
    outdir = Path(outdir)
    rep = Report(f"Scaling-law fit: {Path(table.source).name}")
    rep.paragraph(f"Table {table.source}, adapter {table.adapter}, {len(table)} runs.")
    for note in getattr(result, "notes", None) or (result[0].notes if isinstance(result, list) else []):
        rep.paragraph(f"Note: {note}")
    rep.heading("Fitted values").code("\n".join(summary_lines(result)))
    if isinstance(result, HparamFit):
        d = result.to_dict()
        rep.heading("Fitted vs published Step Law coefficients")
        rep.table(["coefficient", "this table", "bootstrap sd", "published (~3,700 runs)"],
                  [[k, f"{d[k]:+.4f}", f"{d[k + '_sd']:.4f}", f"{getattr(PUBLISHED, k):+.4f}"] for k in COEF_NAMES])
    if isinstance(result, ParametricFit) and result.holdout:
        rep.heading("Held-out runs: predicted vs measured")
        rep.table(["N", "D", "C", "measured", "predicted", "95% interval", "error"],
                  [[f"{h['N']:.3g}", f"{h['D']:.3g}", f"{h['C']:.3g}", f"{h['measured']:.4f}", f"{h['predicted']:.4f}",
                    f"[{h['predicted_ci'][0]:.4f}, {h['predicted_ci'][1]:.4f}]", f"{h['rel_err']:+.2%}"]
                   for h in result.holdout])
    warns = result.warnings if not isinstance(result, list) else [w for r in result for w in r.warnings]
    if warns:
        rep.heading("Warnings")
        for w in warns:
            rep.paragraph(w)
    rep.heading("Plots")
    for p in plots_for(table, result, outdir):
        rep.image(p.name, p.stem.replace("_", " "))
    return rep.write(outdir)


# ----------------------------------------------------------------------------------------- quickstart

def plot_quickstart_prediction(table, fit, summary: dict, predicted, ci, path: Path) -> Path:
    """Sweep runs (loss vs compute, one colour per size, the fitted L(N, D) through each size), the fitted
    compute-optimal frontier, and the planned run: predicted (with its interval) and measured."""
    fig = _figure()
    ax = fig.add_subplot()
    N, D, L = table["N"], table["D"], table["loss"]
    C = 6 * N * D
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    sizes = np.unique(N)
    C_big = summary["C_6ND"]
    for i, n in enumerate(sizes):
        m = N == n
        color = cmap(i / max(1, len(sizes) - 1))
        ax.scatter(C[m], L[m], color=color, s=22, zorder=3, label=f"N={n:,.0f}")
        if fit is not None:  # the fitted law along this size's budgets
            grid = np.logspace(np.log10(C[m].min()) - 0.1, np.log10(C[m].max()) + 0.1, 60)
            ax.plot(grid, fit.predict(n, grid / (6 * n)), color=color, lw=0.8, alpha=0.7)
    if fit is not None:
        n_big = summary["N_active"]  # the law's N (= N for dense)
        grid = np.logspace(np.log10(6 * n_big * D.min()), np.log10(C_big) + 0.05, 60)
        ax.plot(grid, fit.predict(n_big, grid / (6 * n_big)), color="r", lw=0.8, alpha=0.7,
                label=f"fitted law at the planned N={n_big:,}")
        grid = np.logspace(np.log10(C.min()), np.log10(C_big) + 0.3, 100)
        Nopt, Dopt = fit.allocation(grid)
        ax.plot(grid, fit.predict(Nopt, Dopt), "r--", lw=1.2, label="fitted frontier (compute-optimal)")
    if predicted is not None:
        ax.errorbar([C_big], [predicted], yerr=[[predicted - ci[0]], [ci[1] - predicted]], fmt="o", mfc="none",
                    color="r", ms=9, capsize=4, label=f"planned run: predicted {predicted:.3f}")
    ax.scatter([C_big], [summary["val_loss"]], marker="x", color="k", s=70, zorder=4,
               label=f"planned run: measured {summary['val_loss']:.3f}")
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats/token)",
           title="quickstart: sweep, fit, and the planned run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def quickstart_report(out_dir: Path, table, fit, why, summary, predicted, ci, plan_note, big, target_C) -> Path:
    """report.md/.html of `steplab quickstart`: the prediction against the measurement, the sweep, the fit, plots."""
    rep = Report("steplab quickstart: predict, then train")
    measured = summary["val_loss"]
    if predicted is not None:
        err = predicted / measured - 1
        rep.paragraph(f"Predicted validation loss of the planned run: **{predicted:.4f}** (95% interval for one run "
                      f"[{ci[0]:.4f}, {ci[1]:.4f}]: the law's bootstrap draws and a run's own scatter around the law, "
                      f"as the sweep's runs show it); measured **{measured:.4f}**; relative error **{err:+.2%}**.")
    else:
        rep.paragraph(f"No prediction: {why}. Measured validation loss {measured:.4f}.")
    rep.table(["", "planned run"], [
        ["N (non-embedding)", f"{summary['N']:,}" + (f" total, {summary['N_active']:,} active (the law's N)"
                                                     if summary["N_active"] != summary["N"] else "")],
        ["D (tokens)", f"{summary['D']:,}"],
        ["C = 6ND", f"{summary['C_6ND']:.3g} (target {target_C:.3g})"],
        ["shape", "d_model {d_model}, {n_layer} layers, {n_head} heads, d_ff {d_ff}".format(**big["config"]["model"])],
        ["lr, batch", f"{summary['lr']:.3g} (the sweep's lr rule), {summary['batch_tokens']:,} tokens (Step Law batch)"],
        ["validation loss", f"{measured:.4f} nats/token, {summary['val_bpb']:.4f} bits per byte"],
        ["training time", f"{summary['train_seconds']:.0f} s, {summary['tok_per_s']:,.0f} tokens/s"]])
    if plan_note:
        rep.paragraph(f"Note: {plan_note}")
    rep.heading("The sweep")
    order = np.lexsort((table["D"], table["N"]))
    rep.table(["N", "D", "C", "lr", "batch tokens", "val loss", "fitted"],
              [[f"{table['N'][i]:,.0f}", f"{table['D'][i]:,.0f}", f"{table['C'][i]:.3g}", f"{table['lr'][i]:.3g}",
                f"{table['batch_tokens'][i]:,.0f}", f"{table['loss'][i]:.4f}",
                "" if fit is None else f"{float(fit.predict(table['N'][i], table['D'][i])):.4f}"] for i in order])
    rep.heading("The fit")
    if fit is not None:
        rep.code("\n".join(summary_lines(fit)))
        for w in fit.warnings:
            rep.paragraph(f"Warning: {w}")
    else:
        rep.paragraph(f"Not usable: {why}.")
    rep.heading("Plots")
    rep.image(plot_quickstart_prediction(table, fit, summary, predicted, ci, out_dir / "prediction.png").name,
              "loss vs compute: sweep, fitted law and frontier, planned run")
    if fit is not None:
        rep.image(plot_fitted_vs_measured(table, fit, out_dir / "fitted_vs_measured.png").name, "fitted vs measured (sweep)")
    rep.image("run/loss.png", "the planned run's loss curve")
    rep.paragraph("Planned run directory: run/ (config.json, summary.json, metrics.jsonl, checkpoints); its train "
                  "config: plan.toml; the sweep: sweep/runs.csv.")
    md, _ = rep.write(out_dir)
    return md
