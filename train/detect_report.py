"""`train detect` end to end: load the encoder, run the detector (`train.detect`), evaluate every method and
variant where the archive has labels, and write the outputs (all atomically, via `prep.io`):

  detections.parquet  the marks: study_id, image_id, side, view, method, variant, rank, x_mm, y_mm (stored
                      image frame, from its first pixel's centre), score, hit (None: not judged), edge distances
  positions.parquet   every scored grid position with every score (the dense maps)
  exams.parquet       breast and exam scores per method and variant, beside the exam's labels
  lesions.parquet     per located finding: the score at which it is found, whether the top mark hits it
  images.parquet      the scored images and whether their marks could be judged (FROC)
  detect.json         config, encoder, metrics per method and variant, timings, notes
  detect.md           the tables; froc.png; overlays/{top,bottom}_N.png
"""

from __future__ import annotations

import io
import json
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from prep.io import write_bytes_atomic, write_json_atomic, write_parquet_atomic  # noqa: E402
from prep.orient import from_canonical  # noqa: E402
from train.detect import (  # noqa: E402
    EDGE_MM, VARIANTS, Detection, DetectConfig, DetectError, detect, evaluate_method, exam_labels, judged_images,
    nearest_map)
from train.detect_metrics import FP_RATES, froc_curve  # noqa: E402
from train.metrics import Bootstrap  # noqa: E402

RUN_FIELDS = ("method", "tag", "seed", "steps", "backbone")


def run_detection(cfg: DetectConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Detect, evaluate and write every output of `cfg.out`; returns detect.json's content. `progress(done,
    total)` counts the studies cut (`train.detect.detect`)."""
    from prep.storage import local_path
    from train.checkpoint import run_config, run_dir_of
    from train.models import EncoderError, load_encoder

    out = local_path(cfg.out, "--out")  # the report's folder stays local; refused before any work

    backbone, meta, run = None, {}, {}
    encoder_name = "encoder"
    if cfg.encoder:
        from train.detect import _device

        try:
            backbone, meta = load_encoder(cfg.encoder, _device(cfg.device))
        except EncoderError as exc:
            raise DetectError(exc.reason, exc.detail) from exc
        config = run_config(run_dir_of(cfg.encoder))
        run = {k: config.get(k, meta.get(k)) for k in RUN_FIELDS}
        encoder_name = run.get("tag") or run.get("method") or "encoder"
    started = time.perf_counter()
    det = detect(cfg, backbone, meta, encoder_name, progress)
    seconds = time.perf_counter() - started
    boot = Bootstrap(cfg.n_boot, cfg.seed)
    exams = exam_labels(det.images)
    metrics, tables = {}, {}
    for method in det.methods:
        for variant in VARIANTS:
            metrics.setdefault(method, {})[variant], tables[(method, variant)] = evaluate_method(
                det, f"{method}:{variant}", cfg, exams, boot)
    primary = (det.methods[0], "combined")
    summary = {
        "config": asdict(cfg), "encoder": meta, "run": run, "encoder_name": encoder_name if backbone is not None else None,
        "primary": list(primary), "methods": det.methods, "labelled": det.labelled,
        "patch_px": det.patch_px, "mm_per_px": det.mm_per_px, "bank": det.bank,
        "counts": {"studies": int(det.positions["study_id"].nunique()), "images": len(det.images),
                   "positions": int(len(det.positions)), "candidates": int(det.positions["candidate"].sum()),
                   "exams_with_finding": int(exams["has_finding"].sum()),
                   "judged_images": int(judged_images(det.images).sum())},
        "timing": {**det.timing, "seconds": seconds,
                   "seconds_per_study": seconds / max(det.timing["studies"], 1)},
        "metrics": metrics, "notes": det.notes,
    }
    write_outputs(out, det, exams, tables, summary, cfg)
    return summary


# ---------------------------------------------------------------- tables


def long_table(tables: dict, name: str, columns: list[str]) -> pd.DataFrame:
    frames = [t[name][columns].assign(method=m, variant=v) for (m, v), t in tables.items()]
    return pd.concat(frames, ignore_index=True)[["method", "variant", *columns]]


def write_outputs(out: Path, det: Detection, exams: pd.DataFrame, tables: dict, summary: dict, cfg: DetectConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mark_columns = ["study_id", "image_id", "side", "view", "rank", "x_mm", "y_mm", "score", "hit", "cx", "cy",
                    "chest_wall_mm", "edge_mm", "tissue"]
    marks = long_table(tables, "marks", mark_columns)
    marks["cx_mm"], marks["cy_mm"] = marks.pop("cx") * det.mm_per_px, marks.pop("cy") * det.mm_per_px
    write_parquet_atomic(out / "detections.parquet", marks)
    write_parquet_atomic(out / "positions.parquet", det.positions.drop(columns=["image_key"]))
    exam_table = long_table(tables, "exams", ["study_id", "score_L", "score_R", "score", "has_finding", "lesion_side"])
    write_parquet_atomic(out / "exams.parquet", exam_table)
    write_parquet_atomic(out / "lesions.parquet", long_table(tables, "lesions", ["study_id", "image_id", "kind", "lesion_score",
                                                                      "top_mark_hit"]))
    judged = judged_images(det.images)
    write_parquet_atomic(out / "images.parquet", pd.DataFrame([{"study_id": im.study_id, "image_id": im.image_id, "side": im.side,
                                                    "view": im.view, "judged": bool(j)}
                                                   for im, j in zip(det.images, judged)]))
    figures = {}
    if det.labelled:
        figures["FROC"] = plot_froc(tables, det.methods, out / "froc.png")
    figures.update(write_overlays(out / "overlays", det, tables[tuple(summary["primary"])], exams, cfg.overlays))
    write_json_atomic(out / "detect.json", json.loads(json.dumps(summary, default=_plain)))
    write_bytes_atomic(out / "detect.md", render_markdown(summary, figures, out).encode())


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (set, tuple, np.ndarray)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------- figures


def plot_froc(tables: dict, methods: list[str], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = False
    for method in methods:
        for variant in VARIANTS:
            inputs = tables[(method, variant)]["froc_inputs"]
            fp, sens = froc_curve(inputs["lesion_score"], inputs["fp_score"], inputs["n_images"])
            if len(fp) < 2:
                continue
            style = "-" if variant == "combined" else (":" if variant == "pair" else "--")
            ax.step(fp, sens, where="post", linestyle=style, label=f"{method}, {variant}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for rate in FP_RATES:
        ax.axvline(rate, color="grey", lw=0.5)
    ax.set_xlim(0, max(FP_RATES) * 1.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false marks per image")
    ax.set_ylabel("sensitivity (located findings)")
    ax.legend(fontsize=7)
    ax.set_title("FROC", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def overlay_exam(det: Detection, table: dict, study: str, column: str, title: str, path: Path, n_marks: int = 3) -> Path:
    """The study's images as stored (R breasts keep their orientation), its score map, its top marks (circles
    of half a patch, numbered by rank) and the truth boxes where known (green)."""
    images = sorted([(k, im) for k, im in enumerate(det.images) if im.study_id == study],
                    key=lambda ki: (ki[1].view, ki[1].side))
    pos = det.positions
    finite = pos[column][np.isfinite(pos[column])]
    vmin, vmax = (np.percentile(finite, [5, 99.5]) if len(finite) else (0, 1))
    fig, axes = plt.subplots(1, max(len(images), 1), figsize=(3.2 * max(len(images), 1), 4.2), squeeze=False)
    marks = table["marks"]
    for ax, (key, im) in zip(axes[0], images):
        mine = pos[pos["image_key"] == key]
        side = im.canonical.frame.chest_wall_side
        value_map = nearest_map(im.thumb.shape, mine[["cx", "cy"]].to_numpy(), mine[column].to_numpy(),
                                im.thumb_mask, im.thumb_scale)
        # canonical thumbnail -> the stored orientation; extent in mm of the stored image
        h, w = im.thumb.shape
        extent = [0, w * im.thumb_scale * det.mm_per_px, h * im.thumb_scale * det.mm_per_px, 0]
        ax.imshow(from_canonical(im.thumb, side), cmap="gray", extent=extent)
        ax.imshow(from_canonical(value_map, side), cmap="inferno", alpha=0.5, vmin=vmin, vmax=vmax, extent=extent)
        for f in im.findings:
            if f.get("xmin") is None:
                continue
            sx, sy = im.spacing_mm[1], im.spacing_mm[0]
            ax.add_patch(plt.Rectangle((f["xmin"] * sx, f["ymin"] * sy), (f["xmax"] - f["xmin"]) * sx,
                                       (f["ymax"] - f["ymin"]) * sy, fill=False, color="lime", lw=1.2))
        top = marks[(marks["image_key"] == key) & (marks["rank"] < n_marks)]
        for _, m in top.iterrows():
            ax.add_patch(plt.Circle((m["x_mm"], m["y_mm"]), det.patch_px * det.mm_per_px / 2, fill=False,
                                    color="cyan", lw=1.0))
            ax.text(m["x_mm"], m["y_mm"], str(int(m["rank"]) + 1), color="cyan", fontsize=7, ha="center", va="center")
        ax.set_title(f"{im.side} {im.view}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    return _save(fig, path)


def write_overlays(folder: Path, det: Detection, table: dict, exams: pd.DataFrame, n: int) -> dict[str, Path]:
    scores = table["exams"].sort_values(["score", "study_id"], ascending=[False, True])
    studies = scores["study_id"].tolist()
    column = f"{det.methods[0]}:combined"
    picks = [("top", i, s) for i, s in enumerate(studies[:n])]
    picks += [("bottom", i, s) for i, s in enumerate(studies[::-1][:n]) if s not in studies[:n]]
    out = {}
    labels = exams.set_index("study_id")
    for kind, i, study in picks:
        row = scores.set_index("study_id").loc[study]
        truth = ""
        if det.labelled:
            lab = labels.loc[study]
            truth = f"; truth: {lab['lesion_side'] + ' ' + ', '.join(lab['kinds']) if lab['has_finding'] else 'no finding'}"
        title = (f"{kind} {i + 1}: exam {study}, {column} exam score {row['score']:.2f} "
                 f"(L {row['score_L']:.2f}, R {row['score_R']:.2f}){truth}")
        out[f"{kind} {i + 1} ({study})"] = overlay_exam(det, table, study, column, title, folder / f"{kind}_{i + 1}.png")
    return out


# ---------------------------------------------------------------- markdown


def _ci(value, ci, digits=3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def metric_cells(m: dict) -> list[str]:
    exam, lat, loc, fr = (m.get(k, {}) for k in ("exam", "lateralisation", "localisation", "froc"))
    cells = [_ci(exam.get("auc"), exam.get("auc_ci")), _ci(lat.get("accuracy"), lat.get("accuracy_ci")),
             _ci(lat.get("auc"), lat.get("auc_ci")), _ci(loc.get("hit_rate"), loc.get("hit_rate_ci"))]
    cells += [_ci(fr.get(f"sensitivity@{r:g}"), fr.get(f"sensitivity@{r:g}_ci")) for r in FP_RATES]
    return cells


HEADER = ["exam AUC", "lateralisation accuracy", "lateralisation AUC", "localisation (top mark)",
          *[f"FROC sens @ {r:g} FP/img" for r in FP_RATES]]


def render_markdown(s: dict, figures: dict, out: Path) -> str:
    c, t = s["counts"], s["timing"]
    md = ["# Unsupervised lesion detection", "",
          f"{c['studies']} studies, {c['images']} images, {c['positions']} grid positions ({c['candidates']} "
          f"candidates: patch >= {s['config']['min_tissue']:.0%} breast); patch {s['patch_px']} px at "
          f"{s['mm_per_px']} mm/px, stride {s['config']['stride']:g} patch; bank: {s['bank']['studies']} studies "
          f"({s['bank']['source']}), k = {s['config']['knn_k']}; {t['seconds']:.0f} s in all, "
          f"{t['seconds_per_study']:.1f} s per scored study.", "",
          "Variants: **pair** = contralateral pair distance (symmetric: cannot say which breast), **one-sided** = "
          "mean distance to the k nearest bank patches of other studies (label-free), **combined** = "
          f"{s['config']['pair_weight']:g} x pair + {1 - s['config']['pair_weight']:g} x one-sided, each standardised "
          "by its median and MAD over the bank. Breast score = mean of the top-"
          f"{s['config']['top_k']} candidates over its views; exam score = the larger breast. Pixel baselines "
          "(raw-pixel: 8 x 8 block means; mean-intensity) run through the same path.", ""]
    if not s["labelled"]:
        md += ["The archive carries no labels: scores, marks and overlays only.", ""]
    else:
        md += [f"Labels (evaluation only): {c['exams_with_finding']} of {c['studies']} exams with a finding; "
               f"{c['judged_images']} images whose marks can be judged (no finding, or all findings boxed). "
               f"95 % CIs: {s['config']['n_boot']} study-level bootstrap resamples. A mark hits a finding inside "
               "its box or within half a patch of it.", "",
               "| method | variant | " + " | ".join(HEADER) + " |", "|---|---|" + "---|" * len(HEADER)]
        for method, variants in s["metrics"].items():
            for variant, m in variants.items():
                md.append(f"| {method} | {variant} | " + " | ".join(metric_cells(m)) + " |")
        exam = s["metrics"][s["methods"][0]]["combined"]
        md += ["", f"Positives: exam AUC {exam['exam'].get('n_pos', 0)} exams with a finding vs "
               f"{exam['exam'].get('n_neg', 0)} without; lateralisation {exam['lateralisation'].get('n_exams', 0)} "
               f"exams with a finding in one breast; localisation {exam['localisation'].get('n_findings', 0)} boxed "
               f"findings; FROC {exam['froc'].get('n_findings', 0)} findings over {exam['froc'].get('n_images', 0)} "
               "images.", ""]
        per_kind = s["metrics"][s["primary"][0]][s["primary"][1]].get("per_kind", {})
        if per_kind:
            md += [f"## Per finding kind ({s['primary'][0]}, combined)", "",
                   "| kind | " + " | ".join(HEADER) + " |", "|---|" + "---|" * len(HEADER)]
            md += [f"| {kind} | " + " | ".join(metric_cells(m)) + " |" for kind, m in per_kind.items()]
            md.append("")
    md += ["## Edge marks", "", f"Top marks (one per image) whose patch reaches within {EDGE_MM:g} mm of the breast's "
           "chest-wall edge, or of the skin line / canvas edge (positions standardised within "
           f"{s['config']['edge_bins']} bins of their distance from the breast edge):", "", "| method | variant | near chest wall | near skin line |",
           "|---|---|---|---|"]
    for method, variants in s["metrics"].items():
        for variant, m in variants.items():
            e = m["edge"]
            md.append(f"| {method} | {variant} | {e['near_chest_wall']}/{e['top_marks']} "
                      f"({e.get('candidates_near_chest_wall', float('nan')):.0%} of candidates) | "
                      f"{e['near_skin_line']}/{e['top_marks']} ({e.get('candidates_near_skin_line', float('nan')):.0%}) |")
    md.append("")
    for name, path in figures.items():
        if path is not None:
            md += [f"### {name}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    if s["notes"]:
        md += ["## Notes", "", *[f"- {n}" for n in s["notes"]], ""]
    return "\n".join(md)
