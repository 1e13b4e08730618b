"""Pictures and `report.md` for one evaluation (matplotlib Agg; every file written atomically).

  roc.png        ROC curves: unsupervised detection (pair distance) and the linear probe
  distances.png  pair-distance histograms, normal vs lesion pairs, with the fitted 2-component mixture
  top_pairs.png  the most distant pairs (ipsi | contra), labelled
  heatmap.png    pair distance over one whole canonical breast (when the archive was given)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prep.io import write_bytes_atomic  # noqa: E402
from train.embed import TopPair  # noqa: E402

if TYPE_CHECKING:  # drawing a heat map needs only its fields, not prep's image core
    from train.heatmap import Heatmap


@dataclass
class ReportInputs:
    """What the figures are drawn from (the numbers come from metrics.json)."""

    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # ROC name -> (y_true, score)
    distance: np.ndarray  # pair distances of the histogram's rows
    lesion: np.ndarray  # bool, same rows
    top_pairs: list[TopPair] = field(default_factory=list)
    heatmap: Heatmap | None = None


NORMAL_COLOUR = "#4C72B0"
LESION_COLOUR = "#DD5555"


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(Path(path), buf.getvalue())
    return Path(path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for name, (y, score) in curves.items():
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, lw=2, label=f"{name}: AUC {roc_auc_score(y, score):.3f} (n={len(y)})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5, frameon=True)
    return save_figure(fig, path)


def mixture_densities(params: dict, grid: np.ndarray) -> np.ndarray:
    """(2, len(grid)) weighted Gaussian densities of a fitted mixture {means, sds, weights}."""
    means, sds, weights = (np.asarray(params[k], dtype=float)[:, None] for k in ("means", "sds", "weights"))
    return weights * np.exp(-0.5 * ((grid[None] - means) / sds) ** 2) / (np.sqrt(2 * math.pi) * sds)


def plot_distance_histograms(distance: np.ndarray, lesion: np.ndarray, mixture: dict | None, path: Path,
                             title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.histogram_bin_edges(distance, bins=int(np.clip(2 * np.sqrt(len(distance)), 10, 40)))
    ax.hist(distance[~lesion], bins=bins, density=True, alpha=0.55, color=NORMAL_COLOUR,
            label=f"normal pairs (n={int((~lesion).sum())})")
    if lesion.any():
        ax.hist(distance[lesion], bins=bins, density=True, alpha=0.55, color=LESION_COLOUR,
                label=f"pairs with a lesion (n={int(lesion.sum())})")
    if mixture:
        grid = np.linspace(bins[0], bins[-1], 400)
        similar, different = mixture_densities(mixture, grid)
        ax.plot(grid, similar, color="black", lw=1.8, label=f"mixture: 'similar' (w={mixture['weights'][0]:.2f})")
        ax.plot(grid, different, color="black", lw=1.8, ls="--",
                label=f"mixture: 'different' (w={mixture['weights'][1]:.2f})")
    ax.set(xlabel="pair distance ||z_ipsi - z_contra|| (L2-normalised backbone features)", ylabel="density",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _pair_label(pair: TopPair) -> str:
    meta = pair.meta
    flags = []
    if meta.get("ipsi_abnormal"):
        flags.append("ipsi lesion")
    if meta.get("contra_abnormal"):
        flags.append("contra lesion")
    cats = meta.get("finding_categories")
    cats = ", ".join(cats) if cats is not None and len(cats) else ""
    status = " + ".join(flags) if flags else "normal"
    side = f"{meta.get('view', '')} {meta.get('ipsi_lat', '')}".strip()
    return f"d={pair.distance:.3f}  {status}\n{side} {meta.get('split', '')}" + (f"\n{cats[:34]}" if cats else "")


def plot_top_pairs(pairs: list[TopPair], path: Path, title: str, columns: int = 4) -> Path | None:
    if not pairs:
        return None
    rows = math.ceil(len(pairs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.15 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, pair in zip(axes.ravel(), pairs):
        sep = np.full((pair.ipsi.shape[0], max(2, pair.ipsi.shape[1] // 32)), 65535, np.uint16)
        ax.imshow(np.hstack([pair.ipsi, sep, pair.contra]), cmap="gray", vmin=0, vmax=65535)
        abnormal = bool(pair.meta.get("ipsi_abnormal") or pair.meta.get("contra_abnormal"))
        ax.set_title(_pair_label(pair), fontsize=7.5, color=LESION_COLOUR if abnormal else "black")
    fig.suptitle(title + "  (each tile: ipsi | registered contra)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(heatmap: Heatmap, path: Path, title: str) -> Path:
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(9, 5.2), constrained_layout=True)
    for ax in axes:
        ax.imshow(heatmap.image, cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    finite = heatmap.distance_map[np.isfinite(heatmap.distance_map)]
    im = axes[1].imshow(heatmap.distance_map, cmap="inferno", alpha=0.6,
                        vmin=float(finite.min()), vmax=float(finite.max()))
    for box in heatmap.boxes:
        for ax in axes:
            ax.add_patch(Rectangle((box["xmin"], box["ymin"]), box["xmax"] - box["xmin"], box["ymax"] - box["ymin"],
                                   fill=False, ec="#33DD55", lw=1.5))
    axes[0].set_title("canonical breast\nannotated findings in green", fontsize=9)
    axes[1].set_title(f"pair distance of the nearest grid position\n({heatmap.n_patches} grid pairs)", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8, pad=0.02, label="pair distance ||z_ipsi - z_contra||")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _fmt(value, ci=None, digits=3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _auc_cell(d: dict) -> str:
    return d.get("skipped") or _fmt(d.get("auc"), d.get("auc_ci"))


def _positives(d: dict) -> str:
    """The lesion studies and pairs an AUC rests on, and the normals it is ranked against."""
    if "n_pos" not in d:
        return ""
    return f"{d.get('n_pos_studies', '?')} / {d['n_pos']} / {d.get('n_neg', 0)}"


SCORE_LABELS = {
    "backbone": "backbone distance",
    "head": "head distance",
    "pixel_l2": "raw-pixel L2 (baseline)",
    "mean_intensity_diff": "mean-intensity difference (baseline)",
}


def render_markdown(metrics: dict, figures: dict[str, Path | None]) -> str:
    enc = metrics.get("encoder", {})
    test_split = metrics["config"]["test_split"]
    lines = [
        f"# Evaluation: {enc.get('method', '?')} encoder ({enc.get('timm_name', '?')}, step {enc.get('step', '?')})",
        "",
        f"Encoder: `{metrics.get('encoder_path', '')}`; data: `{metrics.get('data', {}).get('source', '')}`; "
        f"{metrics.get('data', {}).get('n_samples', 0)} samples read once, frozen features, "
        f"probes fitted on the `{metrics['config']['train_split']}` split only and tested on `{test_split}`. "
        "Intervals are 95 % bootstrap CIs over test *studies* (a resample draws studies, with all their pairs). "
        "Beside every AUC: lesion studies / lesion pairs / normal pairs it rests on.",
        "",
        "## Data",
        "",
        "| split | studies | pairs | ipsi abnormal | pairs with a lesion (studies) | grid pairs with a lesion (studies) | finding-centred |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, c in sorted(metrics.get("counts", {}).items()):
        lines.append(f"| {split} | {c.get('studies', '')} | {c['pairs']} | {c['ipsi_abnormal']} | "
                     f"{c['lesion_pairs']} ({c.get('lesion_studies', '')}) | "
                     f"{c.get('grid_lesion_pairs', '')} ({c.get('grid_lesion_studies', '')}) | {c['finding_sampled']} |")
    lines += ["", f"## Unsupervised lesion detection (a label-free pair score, `{test_split}` split)", "",
              "Grid: lesion vs normal pairs, both from the tissue-checked grid. Finding-centred: lesion-centred "
              "pairs vs the same grid normals (they skip the tissue check, so position alone can move a score). "
              "A learned distance claims something only where it beats the pixel baselines.", "",
              "| score | grid AUC [95 % CI] | lesion studies / pairs / normals | finding-centred AUC [95 % CI] | lesion studies / pairs / normals |",
              "|---|---|---|---|---|"]
    for name, d in metrics.get("detection", {}).items():
        grid, finding = d.get("grid", {}), d.get("finding", {})
        lines.append(f"| {SCORE_LABELS.get(name, name)} | {_auc_cell(grid)} | {_positives(grid)} | "
                     f"{_auc_cell(finding)} | {_positives(finding)} |")
    lines += ["", "## Linear probe: abnormal vs normal patch (ipsi features, class-balanced, grid samples)", "",
              "Fitted on the training split's grid samples and scored on the test grid samples, both drawn by the "
              "same tissue-checked grid: finding-centred samples sit on the lesion and skip the tissue check, so a "
              "probe that saw them could learn how a sample was drawn. The same probe on finding-centred lesion "
              "pairs vs the grid normals is reported apart, below the table.", "",
              "| training labels | n train (pos) | AUC [95 % CI] | lesion studies / pairs / normals | "
              "balanced accuracy [95 % CI] | accuracy (majority class) | C |",
              "|---|---|---|---|---|---|---|"]
    for fraction, p in metrics.get("probe_abnormal", {}).items():
        if "skipped" in p:
            lines.append(f"| {fraction} | {p.get('n_train', 0)} | skipped: {p['skipped']} | | | | |")
            continue
        lines.append(
            f"| {fraction} | {p['n_train']} ({p['n_train_pos']}) | {_auc_cell(p)} | {_positives(p)} | "
            f"{_fmt(p['balanced_accuracy'], p['balanced_accuracy_ci'])} | {_fmt(p['accuracy'])} "
            f"({_fmt(p['majority_accuracy'])}) | {p['C']:g} |"
        )
    finding = metrics.get("probe_abnormal_finding")
    if finding:
        lines += ["", f"Finding-centred lesion pairs vs the test grid normals, probe of {finding.get('labels', '')} "
                  f"labels: AUC {_auc_cell(finding)} ({_positives(finding)} lesion studies / pairs / normals)."]
    lines += ["", "## BI-RADS and density (multinomial probes), kNN vote (cosine), grid samples", "",
              "For abnormal the kNN vote is reported by its AUC only: at a few % prevalence the majority of k "
              "neighbours is normal for nearly every pair, so the vote's balanced accuracy is 0.5 whatever the "
              "features.", "",
              "| task | probe balanced accuracy [95 % CI] | probe macro AUC | kNN balanced accuracy | kNN AUC | classes | n train / test |",
              "|---|---|---|---|---|---|---|"]
    knn = metrics.get("knn", {})
    for task in ("abnormal", "birads", "density"):
        k = knn.get(task, {})
        if task == "abnormal":
            knn_auc = f"{_auc_cell(k)} ({_positives(k)}, k={k.get('k')})" if k else "n/a"
            lines.append(f"| abnormal | see probe | see probe | not reported (majority vote) | {knn_auc} | 2 | |")
            continue
        knn_bacc = f"{_fmt(k.get('balanced_accuracy'), k.get('balanced_accuracy_ci'))} (k={k.get('k')})" if k else "n/a"
        m = metrics.get(task)
        if not m or "skipped" in m:
            lines.append(f"| {task} | {m['skipped'] if m else 'no labels'} | | | | | |")
            continue
        lines.append(f"| {task} | {_fmt(m['balanced_accuracy'], m['balanced_accuracy_ci'])} | {_fmt(m['macro_auc'])} | "
                     f"{knn_bacc} | macro {_fmt(k.get('macro_auc'))} | {len(m['classes'])} | {m['n_train']} / {m['n_test']} |")
    mixture = metrics.get("distance_mixture")
    if mixture:
        lines += ["", f"Backbone-distance mixture ({mixture.get('scope')} rows, the trainer's 2-component EM): "
                  f"means {', '.join(f'{v:.3f}' for v in mixture['means'])}, "
                  f"sds {', '.join(f'{v:.3f}' for v in mixture['sds'])}, "
                  f"weights {', '.join(f'{v:.2f}' for v in mixture['weights'])}."]
    lines += ["", "## Figures", ""]
    for caption, fig in figures.items():
        if fig is not None:
            lines += [f"**{caption}**", "", f"![{caption}]({fig.name})", ""]
    notes = metrics.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, inputs: ReportInputs) -> Path:
    """All figures + report.md into `out` (reads `metrics`, never changes it); returns the report path."""
    out = Path(out)
    name = metrics.get("encoder", {}).get("method", "encoder")
    mixture = metrics.get("distance_mixture")
    scope = mixture.get("scope", "test") if mixture else "test"
    figures: dict[str, Path | None] = {
        "ROC curves": plot_roc(inputs.curves, out / "roc.png", f"{name}: ROC on the test split"),
        "Pair distances with the fitted 2-component mixture": plot_distance_histograms(
            inputs.distance, inputs.lesion, mixture, out / "distances.png", f"{name}: pair distances ({scope} rows)"),
        "Most distant pairs": plot_top_pairs(inputs.top_pairs, out / "top_pairs.png", f"{name}: most distant pairs"),
    }
    if inputs.heatmap is not None:
        hm = inputs.heatmap
        figures["Whole-breast pair distance"] = plot_heatmap(
            hm, out / "heatmap.png", f"{name}: study {hm.study_id} {hm.view}, {hm.ipsi_lat} breast")
    report = out / "report.md"
    write_bytes_atomic(report, render_markdown(metrics, figures).encode())
    return report
