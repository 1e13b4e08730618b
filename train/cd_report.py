"""The contrast-detail report: `cd.md` tables and `cd_curves.png` from a `train.contrast_detail.CDResult`
(matplotlib Agg; no other side effects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from train.contrast_detail import CDResult, psychometric
from train.report import save_figure


def _g(value: float) -> str:
    return f"{value:.3g}" if value is not None and np.isfinite(value) else "–"


def c75_text(row: pd.Series) -> str:
    """`0.052 [0.041, 0.066]`, `> 0.32` (never reached 0.75), `< 0.02` (above it at the faintest contrast)."""
    if row["censored"] == ">max":
        return f"> {_g(row['c_max_tested'])}"
    if row["censored"] == "<min":
        return f"< {_g(row['c_min_tested'])}"
    lo = f"< {_g(row['c_min_tested'])}" if row["lo_censored"] else _g(row["c75_lo"])
    hi = f"> {_g(row['c_max_tested'])}" if row["hi_censored"] else _g(row["c75_hi"])
    return f"{_g(row['c75'])} [{lo}, {hi}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _diameter(d) -> str:
    return "mean over diameters" if d == "all" else f"{float(d):g} mm"


def render_markdown(result: CDResult, meta: dict, figure: str) -> str:
    cells, thresholds, deltas, size = result.cells, result.thresholds, result.deltas, result.cell_size
    methods = sorted(thresholds["method"].unique()) if len(thresholds) else []
    kinds = sorted(cells["kind"].unique()) if len(cells) else []
    extraction = meta.get("extraction", {})
    lines = [
        "# Contrast-detail benchmark",
        "",
        "Detection AUC of each method's pair score for a lesion-on ipsi patch against the lesion-off twin's patch "
        "at the same canonical place (same anatomy, exposure and noise; 0.5 = chance, the 2-AFC proportion "
        "correct), per cell of kind x diameter x contrast, and the threshold contrast c75 at which a fitted "
        "psychometric curve AUC(c) = 0.5 + 0.5 / (1 + exp(-k (ln c - ln c75))) crosses 0.75. Contrast is the "
        "cell's median measured contrast (lesion-on vs twin over the lesion core). 95 % intervals: "
        f"{result.n_boot} resamples of the {result.n_studies} background (twin) studies, drawn once for every "
        "cell and method, so differences are paired. `> x`: 0.75 never reached up to the highest tested "
        "contrast; `< x`: already reached at the faintest.",
        "",
        f"Trials: {extraction.get('ok', '?')} of {extraction.get('trials', '?')} cut "
        f"({extraction.get('reg_failed', 0)} with the pair's registration QC failed, kept: the contra patch is "
        f"shared by both pairs){'; not cut: ' + str(extraction['failed']) if extraction.get('failed') else ''}.",
        f"Supervised ceiling: {meta.get('supervised', 'not run')}.",
        "`matched_filter` sees the lesion (the trial's own template on the ipsi patch): it anchors each cell's "
        "difficulty and is not a method. `/head`: distance in the run's projection head.",
        "",
        f"![curves]({figure})",
        "",
        "## Threshold contrast c75 per diameter",
    ]
    for kind in kinds:
        sub = thresholds[thresholds["kind"] == kind]
        diameters = sorted(sub["diameter_mm"].unique())
        rows = [[m] + [c75_text(sub[(sub["method"] == m) & (sub["diameter_mm"] == d)].iloc[0]) for d in diameters]
                for m in methods]
        lines += ["", f"### {kind}", "", *_table(["method"] + [f"{d:g} mm" for d in diameters], rows)]
    if len(deltas):
        lines += ["", "## Paired differences of ln c75",
                  "", "Δ = ln c75(a) - ln c75(b) on the same resamples (negative: a detects fainter lesions; "
                  "ratio = exp Δ); a censored threshold is held at the tested bound, so two censored methods "
                  "differ by 0. p: two-sided, normal reference with the bootstrap SD. Holm: over the 'mean over "
                  "diameters' rows (the headline family), and separately over the per-diameter rows.", ""]
        rows = [[r["a"], r["b"], r["kind"], _diameter(r["diameter_mm"]), f"{r['delta_ln_c75']:+.2f}",
                 _g(r["ratio_c75"]), f"[{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]", f"{r['p']:.3g}", f"{r['p_holm']:.3g}"]
                for _, r in deltas.sort_values("family", kind="stable").iterrows()]
        lines += _table(["a", "b", "kind", "diameter", "Δ ln c75", "ratio", "95 % CI", "p", "p (Holm)"], rows)
    if size:
        lines += ["", "## What the cell size buys", "",
                  f"Measured from the bootstrap: with {size['trials_per_cell']:g} trials per cell the median "
                  f"{size['level']:.0%} CI of a cell AUC is {size['ci_width_median']:.3f} wide ({size['scope']}, "
                  f"{size['n_cells']} cells). A width scales as 1/sqrt(trials): "
                  + ", ".join(f"{k} trials -> {v:.3f}" for k, v in size["width_at"].items())
                  + "; a width of " + ", ".join(f"{t} needs {n}" for t, n in size["trials_for_width"].items())
                  + " trials per cell."]
    costs = meta.get("score_seconds") or {}
    if costs or meta.get("stage_seconds"):
        lines += ["", "## Cost of this run", "",
                  "Stages (s, measured when each stage did its work; a resumed run keeps them): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in (meta.get("stage_seconds") or {}).items())
                  + (f". Extraction: median {extraction['seconds_per_trial']:.2f} s per trial (one process)"
                     if extraction.get("seconds_per_trial") else "")
                  + (". Scoring: " + ", ".join(f"{k} {v:.1f} s" for k, v in costs.items()) if costs else "") + "."]
    lines += ["", "## Cell AUCs", ""]
    for kind in kinds:
        sub = cells[cells["kind"] == kind]
        contrasts = sorted(sub["contrast"].unique())
        rows = []
        for m in methods:
            for d in sorted(sub["diameter_mm"].unique()):
                cell = sub[(sub["method"] == m) & (sub["diameter_mm"] == d)].set_index("contrast")
                rows.append([m, f"{d:g} mm"] + [
                    f"{cell.loc[c, 'auc']:.2f} [{cell.loc[c, 'auc_lo']:.2f}, {cell.loc[c, 'auc_hi']:.2f}]"
                    if c in cell.index else "–" for c in contrasts])
        n = int(sub["n_trials"].median()) if len(sub) else 0
        lines += [f"### {kind} (median {n} trials per cell)", "",
                  *_table(["method", "diameter"] + [f"c = {c:g}" for c in contrasts], rows), ""]
    return "\n".join(lines) + "\n"


def _log_ticks(ax, axis: str, ticks) -> None:
    """A log axis with plain numbers (the tested values as ticks when given), no minor-tick labels."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    if ticks is not None:
        target.set_ticks(list(ticks))
    target.set_major_formatter(FormatStrFormatter("%g"))
    target.set_minor_formatter(NullFormatter())


def plot_curves(result: CDResult, path: Path) -> Path:
    """Rows = kinds; one panel per diameter (AUC vs contrast, log x, one line per method: points and the fitted
    curve), and a last panel of c75 vs diameter (log-log, as on a CDMAM sheet; censored thresholds drawn
    hollow at the tested bound)."""
    import matplotlib.pyplot as plt

    cells, thresholds = result.cells, result.thresholds
    kinds = sorted(cells["kind"].unique())
    diameters = sorted(cells["diameter_mm"].unique())
    methods = sorted(cells["method"].unique())
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(kinds), len(diameters) + 1, figsize=(3.0 * (len(diameters) + 1), 2.8 * len(kinds)),
                             squeeze=False)
    for ki, kind in enumerate(kinds):
        for di, d in enumerate(diameters):
            ax = axes[ki, di]
            for m in methods:
                c = cells[(cells["kind"] == kind) & (cells["diameter_mm"] == d) & (cells["method"] == m)]
                if c.empty:
                    continue
                c = c.sort_values("contrast_x")
                ax.plot(c["contrast_x"], c["auc"], "o", ms=3, color=colours[m])
                t = thresholds[(thresholds["kind"] == kind) & (thresholds["diameter_mm"] == d) & (thresholds["method"] == m)]
                if len(t) and np.isfinite(t.iloc[0]["slope"]) and t.iloc[0]["censored"] == "":
                    grid = np.geomspace(c["contrast_x"].min(), c["contrast_x"].max(), 60)
                    ax.plot(grid, psychometric(grid, t.iloc[0]["c75"], t.iloc[0]["slope"]), "-", lw=1, color=colours[m])
                else:
                    ax.plot(c["contrast_x"], c["auc"], ":", lw=1, color=colours[m])
            ax.axhline(0.75, color="grey", lw=0.5, ls="--")
            ax.axhline(0.5, color="grey", lw=0.5)
            _log_ticks(ax, "x", sorted(cells["contrast"].unique()))
            ax.set_ylim(0.3, 1.02)
            ax.set_title(f"{kind}, {d:g} mm", fontsize=8)
            if ki == len(kinds) - 1:
                ax.set_xlabel("contrast", fontsize=8)
            if di == 0:
                ax.set_ylabel("AUC vs twin", fontsize=8)
            ax.tick_params(labelsize=7)
        ax = axes[ki, -1]
        for m in methods:
            t = thresholds[(thresholds["kind"] == kind) & (thresholds["method"] == m)].sort_values("diameter_mm")
            if t.empty:
                continue
            ax.plot(t["diameter_mm"], t["c75"], "-", lw=1, color=colours[m], label=m)
            inside = t["censored"] == ""
            ax.plot(t.loc[inside, "diameter_mm"], t.loc[inside, "c75"], "o", ms=3, color=colours[m])
            ax.plot(t.loc[~inside, "diameter_mm"], t.loc[~inside, "c75"], "o", ms=4, mfc="none", color=colours[m])
        _log_ticks(ax, "x", diameters)
        _log_ticks(ax, "y", None)
        ax.set_title(f"{kind}: c75 vs diameter", fontsize=8)
        ax.set_xlabel("diameter (mm)", fontsize=8)
        ax.set_ylabel("threshold contrast c75", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, Path(path))
