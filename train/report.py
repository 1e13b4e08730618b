"""Pictures and `report.md` for one evaluation (matplotlib Agg; every file written atomically).

  roc.png        ROC curves: unsupervised detection (pair distance) and the linear probe
  distances.png  pair-distance histograms, normal vs lesion pairs, with the fitted 2-component mixture
  top_pairs.png  the most distant pairs (ipsi | contra), labelled
  heatmap.png    pair distance over one whole canonical breast (when the archive was given)
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prep.io import write_bytes_atomic  # noqa: E402
from train.evaluate import Embeddings, EvaluationResult, Heatmap, TopPair, lesion_labels  # noqa: E402

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


def _mixture_density(distance: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """The 1-D, 2-component mixture the trainer uses (train.gmm), fitted to all distances."""
    import torch

    from train.gmm import em_fit, initial_mixture

    x = torch.as_tensor(distance, dtype=torch.float64)
    var_floor = max(float(x.var()) * 1e-3, 1e-8)
    mix = em_fit(x, initial_mixture(x, var_floor), iterations=200, var_floor=var_floor)
    means, variances, weights = (t.numpy() for t in (mix.means, mix.variances, mix.weights))
    comps = weights[:, None] * np.exp(-0.5 * (grid[None] - means[:, None]) ** 2 / variances[:, None]) / np.sqrt(
        2 * math.pi * variances[:, None]
    )
    return comps[0], comps[1], {"means": means.tolist(), "sds": np.sqrt(variances).tolist(), "weights": weights.tolist()}


def plot_distance_histograms(distance: np.ndarray, lesion: np.ndarray, path: Path, title: str) -> tuple[Path, dict]:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.histogram_bin_edges(distance, bins=int(np.clip(2 * np.sqrt(len(distance)), 10, 40)))
    ax.hist(distance[~lesion], bins=bins, density=True, alpha=0.55, color=NORMAL_COLOUR,
            label=f"normal pairs (n={int((~lesion).sum())})")
    if lesion.any():
        ax.hist(distance[lesion], bins=bins, density=True, alpha=0.55, color=LESION_COLOUR,
                label=f"pairs with a lesion (n={int(lesion.sum())})")
    grid = np.linspace(bins[0], bins[-1], 400)
    similar, different, params = _mixture_density(distance, grid)
    ax.plot(grid, similar, color="black", lw=1.8, label=f"mixture: 'similar' (w={params['weights'][0]:.2f})")
    ax.plot(grid, different, color="black", lw=1.8, ls="--",
            label=f"mixture: 'different' (w={params['weights'][1]:.2f})")
    ax.set(xlabel="pair distance ||z_ipsi - z_contra|| (L2-normalised backbone features)", ylabel="density",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path), params


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
    axes[1].set_title(f"pair distance, mean of the covering patches\n({heatmap.n_patches} grid pairs)", fontsize=9)
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


def render_markdown(metrics: dict, figures: dict[str, Path | None], notes: list[str]) -> str:
    enc = metrics.get("encoder", {})
    lines = [
        f"# Evaluation: {enc.get('method', '?')} encoder ({enc.get('timm_name', '?')}, step {enc.get('step', '?')})",
        "",
        f"Encoder: `{metrics.get('encoder_path', '')}`; data: `{metrics.get('data', {}).get('source', '')}`; "
        f"{metrics.get('data', {}).get('n_samples', 0)} samples read once, frozen features, "
        f"probes fitted on the `{metrics['config']['train_split']}` split only and tested on "
        f"`{metrics['config']['test_split']}`. Intervals are bootstrap 95 % CIs over test rows.",
        "",
        "## Data",
        "",
        "| split | pairs | ipsi abnormal | pairs with a lesion | finding-centred |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, c in sorted(metrics.get("counts", {}).items()):
        lines.append(f"| {split} | {c['pairs']} | {c['ipsi_abnormal']} | {c['lesion_pairs']} | {c['finding_sampled']} |")
    lines += ["", "## Unsupervised lesion detection (pair distance as the score)", "",
              "| score | split | AUC [95 % CI] | lesion / normal pairs |", "|---|---|---|---|"]
    for name, d in metrics.get("detection", {}).items():
        score, _, scope = name.partition("_")
        scope = "all" if scope else metrics["config"]["test_split"]
        result = d.get("skipped") or _fmt(d.get("auc"), d.get("auc_ci"))
        lines.append(f"| {score} distance | {scope} | {result} | {d.get('n_pos', 0)} / {d.get('n_neg', 0)} |")
    lines += ["", "## Linear probe: abnormal vs normal patch (ipsi features)", "",
              "| training labels | n train (pos) | AUC [95 % CI] | accuracy [95 % CI] | majority class | C |",
              "|---|---|---|---|---|---|"]
    for fraction, p in metrics.get("probe_abnormal", {}).items():
        if "skipped" in p:
            lines.append(f"| {fraction} | {p.get('n_train', 0)} | skipped: {p['skipped']} | | | |")
            continue
        lines.append(
            f"| {fraction} | {p['n_train']} ({p['n_train_pos']}) | {_fmt(p.get('auc'), p.get('auc_ci'))} | "
            f"{_fmt(p['accuracy'], p['accuracy_ci'])} | {_fmt(p['majority_accuracy'])} | {p['C']:g} |"
        )
    lines += ["", "## BI-RADS and density (multinomial logistic regression), kNN (cosine)", "",
              "| task | accuracy [95 % CI] | macro AUC | kNN accuracy | classes | n train / test |",
              "|---|---|---|---|---|---|"]
    knn = metrics.get("knn", {})
    for task in ("abnormal", "birads", "density"):
        k = knn.get(task, {})
        knn_text = f"{_fmt(k.get('accuracy'))} (k={k.get('k')})" if k else "n/a"
        if task == "abnormal":
            lines.append(f"| abnormal | see probe | see probe | {knn_text} | 2 | |")
            continue
        m = metrics.get(task)
        if not m or "skipped" in m:
            lines.append(f"| {task} | {m['skipped'] if m else 'no labels'} | | | | |")
            continue
        lines.append(f"| {task} | {_fmt(m['accuracy'], m['accuracy_ci'])} | {_fmt(m['macro_auc'])} | {knn_text} | "
                     f"{len(m['classes'])} | {m['n_train']} / {m['n_test']} |")
    lines += ["", "## Figures", ""]
    for caption, fig in figures.items():
        if fig is not None:
            lines += [f"**{caption}**", "", f"![{caption}]({fig.name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_report(out: Path, metrics: dict, result: EvaluationResult, emb: Embeddings,
                 heatmap: Heatmap | None, notes: list[str]) -> Path:
    """All figures + report.md into `out`; returns the report path. Adds the mixture fit to `metrics`."""
    out = Path(out)
    name = metrics.get("encoder", {}).get("method", "encoder")
    test = (emb.table["split"].astype(str) == metrics["config"]["test_split"]).to_numpy()
    scope = test if test.any() else np.ones(len(test), bool)
    figures: dict[str, Path | None] = {
        "ROC curves": plot_roc(result.curves, out / "roc.png", f"{name}: ROC on the test split"),
    }
    hist, params = plot_distance_histograms(
        emb.distance[scope], lesion_labels(emb.table)[scope], out / "distances.png",
        f"{name}: pair distances ({'test split' if test.any() else 'all samples'})",
    )
    figures["Pair distances with the fitted 2-component mixture"] = hist
    metrics["distance_mixture"] = params
    figures["Most distant pairs"] = plot_top_pairs(emb.top_pairs, out / "top_pairs.png", f"{name}: most distant pairs")
    if heatmap is not None:
        figures["Whole-breast pair distance"] = plot_heatmap(
            heatmap, out / "heatmap.png", f"{name}: study {heatmap.study_id} {heatmap.view}, {heatmap.ipsi_lat} breast"
        )
    report = out / "report.md"
    write_bytes_atomic(report, render_markdown(metrics, figures, notes).encode())
    return report
