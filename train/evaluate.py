"""Frozen-feature evaluation of an exported encoder on contralateral patch pairs.

The composition: embed every selected pair once (`train.embed`), compute the metrics from the features
and labels (`train.metrics`, `train.probes`), optionally map one whole breast (`train.heatmap`), draw the
report (`train.report`) and write metrics.json + scores.parquet. What is measured:
  - unsupervised lesion detection: a pair score (backbone / head distance, and the pixel-space baselines
    raw-pixel L2 and mean-intensity difference) ranks lesion pairs vs normal pairs; ROC AUC on the test
    split's grid samples (finding-centred samples reported separately), study-level bootstrap CIs, and
    the lesion studies / pairs each AUC rests on;
  - a class-balanced linear probe for abnormal vs normal (label `ipsi_abnormal`, ipsi features), fitted on
    the training split's grid samples only (C by study-grouped cross-validation inside it), with 1 %, 10 %
    and 100 % of the training labels: AUC and balanced accuracy on the test grid samples; the 100 % probe
    is also scored on finding-centred lesion pairs vs the grid normals, reported apart (finding-centred
    samples skip the tissue check and sit on the lesion: on them a probe can learn the sampling);
  - BI-RADS and density (multinomial probes on grid samples: balanced accuracy, macro AUC) where labels exist;
  - cosine kNN vote (k = 20, training -> test grid samples): AUC of the vote share (no balanced accuracy
    for abnormal: at a few % prevalence a majority vote answers "normal" whatever the features).
Labels come from the sample json or the manifest rows; never from an archive's ground truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from prep.io import write_json_atomic, write_parquet_atomic
from train.checkpoint import run_config, run_dir_of
from train.data import DataError, select
from train.embed import EvaluationError, Embeddings, embed_batches, load_projection_head, manifest_labels, shard_batches
from train.evaluate_config import EvaluateConfig
from train.gmm import em_fit, initial_mixture
from train.heatmap import study_heatmap
from train.metrics import auc_with_ci, detection_aucs
from train.models import EncoderError, load_encoder
from train.probes import binary_probe, knn_vote, multiclass_probe
from train.report import ReportInputs, write_report

__all__ = ["EvalConfig", "EvaluateConfig", "EvaluationError", "EvaluationResult", "compute_metrics", "evaluate",
           "evaluate_encoder", "summary"]

MULTICLASS_TASKS = {"birads": "breast_birads_ipsi", "density": "density"}
# score name in Embeddings.scores() -> column of scores.parquet
SCORE_COLUMNS = {"backbone": "distance", "head": "head_distance", "pixel_l2": "pixel_l2",
                 "mean_intensity_diff": "mean_intensity_diff"}
RUN_FIELDS = ("method", "tag", "seed", "steps", "batch_size", "backbone", "crop_px", "lr", "deterministic")


# the metric knobs are the command's: one dataclass (train/evaluate_config.py), under its historical name here
EvalConfig = EvaluateConfig


@dataclass
class EvaluationResult:
    metrics: dict
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (y_true, score) for ROC plots
    probes: dict[str, object]  # "task@fraction" -> fitted scikit-learn model
    notes: list[str]
    row_scores: dict[str, np.ndarray]  # supervised per-row scores for scores.parquet (NaN off the test split)


def lesion_labels(table: pd.DataFrame) -> np.ndarray:
    """A pair 'has a lesion' when either side is abnormal."""
    return (table["ipsi_abnormal"].fillna(False).astype(bool).to_numpy()
            | table["contra_abnormal"].fillna(False).astype(bool).to_numpy())


def _has_labels(values: pd.Series) -> pd.Series:
    return values.notna() & (values.astype(str).str.strip() != "") & (values.astype(str) != "None")


def compute_metrics(emb: Embeddings, cfg: EvalConfig) -> EvaluationResult:
    """All metrics from embeddings + labels. Probes fit on `cfg.train_split` rows only."""
    # small dense problems: BLAS threads only contend with each other on a shared box
    with threadpool_limits(1):
        return _compute_metrics(emb, cfg)


def _compute_metrics(emb: Embeddings, cfg: EvalConfig) -> EvaluationResult:
    table = emb.table.reset_index(drop=True)
    boot = cfg.bootstrap
    split = table["split"].astype(str).to_numpy()
    studies = table["study_id"].astype(str).to_numpy()
    sampling = (table["sampling"] if "sampling" in table.columns else pd.Series("", index=table.index)).astype(str).to_numpy()
    train, test = split == cfg.train_split, split == cfg.test_split
    notes: list[str] = []
    metrics: dict = {"counts": split_counts(table)}
    curves: dict = {}
    probes: dict = {}
    row_scores: dict[str, np.ndarray] = {}
    lesion = lesion_labels(table)
    if not np.isin(sampling, ("grid", "finding")).all():
        notes.append("some rows carry no `sampling` (grid | finding): they enter neither detection population")

    # unsupervised detection: no label is used to compute the score
    detection = {}
    for name, score in emb.scores().items():
        detection[name] = detection_aucs(lesion[test], score[test], sampling[test], studies[test], boot)
        if "auc" in detection[name]["grid"] and name != "mean_intensity_diff":
            grid = test & (sampling == "grid")
            curves[f"detection, {name} (test grid)"] = (lesion[grid], score[grid])
    metrics["detection"] = detection

    if cfg.detection_only:
        notes.append(f"detection only: the '{cfg.test_split}' split was embedded; probes and kNN not run")
        return EvaluationResult(metrics, curves, probes, notes, row_scores)
    if not train.any() or not test.any():
        notes.append(f"probes skipped: need rows in both '{cfg.train_split}' and '{cfg.test_split}' splits "
                     f"(have {sorted(set(split))})")
        return EvaluationResult(metrics, curves, probes, notes, row_scores)

    # supervised read-outs on grid samples: finding-centred samples sit on the lesion and skip the tissue
    # check, so a probe trained or scored on them learns how a sample was drawn, not what the patch shows
    grid = sampling == "grid"
    if not grid.any():
        grid = np.ones(len(table), bool)
        notes.append("no grid samples (`sampling`): probes and kNN use every row, finding-centred ones included")
    X = emb.ipsi
    abnormal = table["ipsi_abnormal"].fillna(False).astype(bool).to_numpy()
    fit_rows, score_rows = train & grid, test & grid
    finding_set = test & (((sampling == "finding") & abnormal) | (grid & ~abnormal))
    probe = {}
    for fraction in cfg.label_fractions:
        name = f"{fraction:.0%}"
        result, model, proba = binary_probe(X[fit_rows], abnormal[fit_rows], studies[fit_rows], X[score_rows],
                                            abnormal[score_rows], studies[score_rows], boot, cfg.cv_folds, fraction)
        probe[name] = result
        if model is None:
            notes.append(f"abnormal probe at {name} of the labels skipped: {result['skipped']}")
            continue
        probes[f"abnormal@{name}"] = model
        if fraction == max(cfg.label_fractions):
            curves[f"linear probe, {name} labels (test grid)"] = (abnormal[score_rows], proba)
            row_scores["probe_abnormal"] = _on_rows(test, model.predict_proba(X[test])[:, 1])
            # the same grid-trained probe on finding-centred lesion pairs vs the grid normals, kept apart
            if finding_set.any():
                metrics["probe_abnormal_finding"] = {
                    "labels": name,
                    **auc_with_ci(abnormal[finding_set], model.predict_proba(X[finding_set])[:, 1],
                                  studies[finding_set], boot),
                }
    metrics["probe_abnormal"] = probe
    knn_abnormal, share = knn_vote(X[fit_rows], abnormal[fit_rows], X[score_rows], abnormal[score_rows],
                                   studies[score_rows], cfg.knn_k, boot)
    knn = {"abnormal": knn_abnormal}
    row_scores["knn_abnormal"] = _on_rows(score_rows, share)

    for task, column in MULTICLASS_TASKS.items():
        if column not in table.columns:
            notes.append(f"{task}: no '{column}' labels in the data")
            continue
        labelled = _has_labels(table[column]).to_numpy()
        tr, te = fit_rows & labelled, score_rows & labelled
        if not tr.any() or not te.any():
            notes.append(f"{task}: no labelled rows in one of the splits")
            continue
        y = table[column].astype(str).to_numpy()
        result, model = multiclass_probe(X[tr], y[tr], studies[tr], X[te], y[te], studies[te], boot, cfg.cv_folds)
        metrics[task] = result
        if model is None:
            notes.append(f"{task} probe skipped: {result['skipped']}")
            continue
        probes[f"{task}@100%"] = model
        knn[task], _ = knn_vote(X[tr], y[tr], X[te], y[te], studies[te], cfg.knn_k, boot)
    metrics["knn"] = knn
    return EvaluationResult(metrics, curves, probes, notes, row_scores)


def _on_rows(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    out[rows] = values
    return out


def split_counts(table: pd.DataFrame) -> dict:
    """{split: {"pairs", "studies", "ipsi_abnormal", "lesion_pairs", "lesion_studies", "finding_sampled",
    "grid_lesion_pairs", "grid_lesion_studies"}} for the report and compare."""
    lesion = lesion_labels(table)
    sampling = table["sampling"].astype(str) if "sampling" in table.columns else pd.Series("", index=table.index)
    out = {}
    for split, idx in table.groupby(table["split"].astype(str)).groups.items():
        rows = table.loc[idx]
        is_lesion = lesion[np.asarray(idx)]
        grid_lesion = is_lesion & (sampling.loc[idx] == "grid").to_numpy()
        study = rows["study_id"].astype(str).to_numpy()
        out[split] = {
            "pairs": int(len(rows)),
            "studies": int(len(set(study))),
            "ipsi_abnormal": int(rows["ipsi_abnormal"].fillna(False).astype(bool).sum()),
            "lesion_pairs": int(is_lesion.sum()),
            "lesion_studies": int(len(set(study[is_lesion]))),
            "finding_sampled": int((sampling.loc[idx] == "finding").sum()),
            "grid_lesion_pairs": int(grid_lesion.sum()),
            "grid_lesion_studies": int(len(set(study[grid_lesion]))),
        }
    return out


def _get(node, *path):
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return None if node is None or (isinstance(node, float) and math.isnan(node)) else node


# summary key -> path to the AUC/accuracy dict in metrics.json (its value key is the last element)
def summary_paths(metrics: dict) -> dict[str, tuple]:
    paths = {}
    for name in metrics.get("detection", {}):
        suffix = "" if name == "backbone" else f"_{name}"
        paths[f"detection_auc_grid{suffix}"] = ("detection", name, "grid", "auc")
        paths[f"detection_auc_finding{suffix}"] = ("detection", name, "finding", "auc")
    for fraction in metrics.get("probe_abnormal", {}):
        paths[f"probe_auc_{fraction}"] = ("probe_abnormal", fraction, "auc")
    paths["probe_balanced_accuracy_100%"] = ("probe_abnormal", "100%", "balanced_accuracy")
    paths["probe_auc_finding"] = ("probe_abnormal_finding", "auc")
    paths["knn_auc_abnormal"] = ("knn", "abnormal", "auc")
    for task in MULTICLASS_TASKS:
        paths[f"{task}_balanced_accuracy"] = (task, "balanced_accuracy")
        paths[f"{task}_macro_auc"] = (task, "macro_auc")
        paths[f"knn_balanced_accuracy_{task}"] = ("knn", task, "balanced_accuracy")
    return paths


def summary(metrics: dict) -> dict[str, float | None]:
    """The flat headline numbers `train compare` tabulates (None where not computed)."""
    return {key: _get(metrics, *path) for key, path in summary_paths(metrics).items()}


def summary_counts(metrics: dict) -> dict[str, dict]:
    """Beside every AUC of the summary: the positives it rests on (lesion studies and pairs)."""
    out = {}
    for key, path in summary_paths(metrics).items():
        node = _get(metrics, *path[:-1])
        if isinstance(node, dict) and "n_pos_studies" in node:
            out[key] = {"lesion_studies": node["n_pos_studies"], "lesion_pairs": node["n_pos"]}
    return out


def distance_mixture(distance: np.ndarray) -> dict:
    """The 1-D, 2-component mixture the trainer fits (train.gmm), fitted to these distances:
    {means, sds, weights}, the 'similar' component first."""
    x = torch.as_tensor(np.asarray(distance), dtype=torch.float64)
    var_floor = max(float(x.var()) * 1e-3, 1e-8)
    mix = em_fit(x, initial_mixture(x, var_floor), iterations=200, var_floor=var_floor)
    means, variances, weights = (t.numpy() for t in (mix.means, mix.variances, mix.weights))
    return {"means": means.tolist(), "sds": np.sqrt(variances).tolist(), "weights": weights.tolist()}


def evaluate_encoder(
    encoder: str | Path,
    out: str | Path,
    shards: str | None = None,
    manifest: str | None = None,
    root: str | None = None,
    dataset: str = "vindr",
    heatmap_study: str | None = None,
    heatmap_patches: int = 256,
    assume_spacing_mm: float | None = None,
    cfg: EvalConfig = EvalConfig(),
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
    on_total: Callable[[int | None], None] | None = None,
) -> dict:
    """Evaluate one encoder end to end: embed -> metrics -> metrics.json, scores.parquet, report.md, PNGs."""
    out = Path(out)
    if cfg.detection_only and not manifest:
        raise EvaluationError("bad_option", "--detection-only selects the test split from --manifest: give --manifest samples.parquet")
    try:
        backbone, meta = load_encoder(encoder, device)
        where = f"split == '{cfg.test_split}'" if cfg.detection_only else None
        selection = select(shards=shards, manifest=manifest, where=where, include_finding=True)
    except (EncoderError, DataError) as exc:
        raise EvaluationError(exc.reason, exc.detail) from exc
    run = run_dir_of(encoder)
    head, head_note = load_projection_head(run, device)
    labels = manifest_labels(manifest) if manifest else None
    if on_total is not None:
        on_total(selection.n_samples)
    batches = shard_batches(selection.urls, selection.keys, read_json=labels is None, batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, pin_memory=str(device).startswith("cuda"))
    emb = embed_batches(backbone, batches, device, head=head, top_k=cfg.top_pairs, on_batch=on_batch, labels=labels)
    result = compute_metrics(emb, cfg)
    notes = [head_note, *result.notes]
    heatmap = None
    if root:
        heatmap, note = study_heatmap(backbone, root, meta, dataset, heatmap_study, heatmap_patches,
                                      cfg.batch_size, device, cfg.test_split, assume_spacing_mm)
        notes.append(f"heat map: {note}")
    else:
        notes.append("heat map skipped: give --root ARCHIVE to map pair distance over a whole breast")

    test = (emb.table["split"].astype(str) == cfg.test_split).to_numpy()
    scope = test if test.any() else np.ones(len(test), bool)
    config = run_config(run)
    metrics = {
        **result.metrics,
        "distance_mixture": {"scope": cfg.test_split if test.any() else "all", **distance_mixture(emb.distance[scope])},
        "encoder": meta,
        "encoder_path": str(encoder),
        "run": {k: config.get(k, meta.get(k)) for k in RUN_FIELDS},
        "data": {"source": str(manifest or shards), "n_samples": int(len(emb.table)), "n_shards": len(selection.urls)},
        "config": cfg.to_dict(),
        "notes": notes,
    }
    metrics["summary"] = summary(metrics)
    metrics["summary_counts"] = summary_counts(metrics)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, metrics, ReportInputs(
        curves=result.curves, distance=emb.distance[scope], lesion=lesion_labels(emb.table)[scope],
        top_pairs=emb.top_pairs, heatmap=heatmap,
    ))
    scores = emb.table.assign(**{SCORE_COLUMNS[k]: v for k, v in emb.scores().items()}, **result.row_scores)
    write_parquet_atomic(out / "scores.parquet", scores)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def evaluate(cfg: EvaluateConfig, on_batch: Callable[[int], None] | None = None,
             on_total: Callable[[int | None], None] | None = None) -> dict:
    """`evaluate_encoder` with every input, output and knob from one `EvaluateConfig` (the command's path)."""
    from prep.storage import local_path
    from train.distributed import resolve_device

    if cfg.encoder is None or cfg.out is None:
        raise EvaluationError("bad_option", "give --encoder and --out")
    local_path(cfg.out, "--out")  # the report's folder stays local
    return evaluate_encoder(
        cfg.encoder, cfg.out, shards=cfg.shards, manifest=cfg.manifest, root=cfg.root, dataset=cfg.dataset,
        heatmap_study=cfg.heatmap_study, heatmap_patches=cfg.heatmap_patches, assume_spacing_mm=cfg.assume_spacing_mm,
        cfg=cfg, device=resolve_device(cfg.device), on_batch=on_batch, on_total=on_total,
    )
