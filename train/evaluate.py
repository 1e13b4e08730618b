"""Frozen-feature evaluation of an exported encoder on contralateral patch pairs.

Reads every selected sample exactly once (a plain, non-resampled pass over the shards), embeds the
ipsi and contra patches with the frozen backbone (pooled features, L2-normalised), then computes:
  - unsupervised lesion detection: pair distance as the score, ROC AUC (lesion on either side vs
    normal pairs) with a bootstrap 95 % CI, on the test split;
  - a linear probe for abnormal vs normal (label `ipsi_abnormal`, ipsi features), fitted on the
    training split only (C chosen by cross-validation inside it), tested on the test split, with
    1 %, 10 % and 100 % of the training labels;
  - BI-RADS and density (multinomial logistic regression: accuracy, macro AUC) where labels exist;
  - kNN accuracy (cosine, k = 20, training -> test) for each task.
Labels come from the sample json or the manifest rows; never from an archive's ground truth.
"""

from __future__ import annotations

import heapq
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from prep.errors import ContralateralError

# Fields carried from a sample's json / manifest row into evaluation outputs (an allow-list: no PHI).
EVAL_COLUMNS = (
    "key", "split", "study_id", "view", "ipsi_lat", "sampling", "ipsi_image_id",
    "ipsi_cx", "ipsi_cy", "ipsi_abnormal", "contra_abnormal", "finding_categories",
    "breast_birads_ipsi", "density",
)
PROBE_CS = (0.001, 0.01, 0.1, 1.0)  # C >= 10 is ~unregularised on 512-d features and costs most of the time
MULTICLASS_TASKS = {"birads": "breast_birads_ipsi", "density": "density"}


class EvaluationError(ContralateralError):
    """An evaluation that cannot be done as asked; `reason` is a stable code."""


@dataclass(frozen=True)
class EvalConfig:
    train_split: str = "training"
    test_split: str = "test"
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    n_boot: int = 1000
    seed: int = 0
    knn_k: int = 20
    batch_size: int = 64
    top_pairs: int = 12
    cv_folds: int = 5


# ---------------------------------------------------------------- reading and embedding


@dataclass
class EvalSample:
    key: str
    ipsi: np.ndarray  # uint16 (H, W)
    contra: np.ndarray
    meta: dict


def manifest_labels(manifest: str | Path) -> pd.DataFrame:
    """Allow-listed columns of `samples.parquet`, indexed by key."""
    table = pd.read_parquet(manifest)
    return table[[c for c in EVAL_COLUMNS if c in table.columns]].set_index("key", drop=False)


def iter_samples(urls: list[str], keys: frozenset[str] | None = None, labels: pd.DataFrame | None = None) -> Iterator[EvalSample]:
    """One plain pass over the shards (no resampling, no shuffling): each selected sample once.

    With `labels` (manifest rows by key) the meta comes from the manifest, otherwise from the json.
    """
    import webdataset as wds

    from prep.codec import decode_json, decode_pair

    stream = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(handler=wds.reraise_exception))
    for sample in stream:
        key = sample["__key__"]
        if keys is not None and key not in keys:
            continue
        meta = labels.loc[key].to_dict() if labels is not None else decode_json(sample)
        ipsi, contra = decode_pair(sample)
        yield EvalSample(key, ipsi, contra, {c: meta.get(c) for c in EVAL_COLUMNS if c != "key"})


@dataclass
class TopPair:
    distance: float
    key: str
    ipsi: np.ndarray
    contra: np.ndarray
    meta: dict


@dataclass
class Embeddings:
    """Per-sample features in reading order; `table` holds the allow-listed metadata and labels."""

    table: pd.DataFrame
    ipsi: np.ndarray  # (N, D) L2-normalised pooled backbone features
    contra: np.ndarray
    head_distance: np.ndarray | None = None
    top_pairs: list[TopPair] = field(default_factory=list)

    @property
    def distance(self) -> np.ndarray:
        return np.linalg.norm(self.ipsi - self.contra, axis=1)


def _batches(samples: Iterable[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    it = iter(samples)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def embed_pairs(
    backbone,
    samples: Iterable[EvalSample],
    batch_size: int = 64,
    device="cpu",
    head: Callable | None = None,
    top_k: int = 12,
    on_batch: Callable[[int], None] | None = None,
) -> Embeddings:
    """Frozen pooled features of both members of every pair; keeps the `top_k` most distant pairs' pixels
    so the report's montage needs no second pass over the data."""
    import torch
    import torch.nn.functional as F

    from train.data import to_model_input

    backbone.eval()
    rows, ipsi_feats, contra_feats, head_d = [], [], [], []
    top: list[tuple[float, int, TopPair]] = []
    counter = itertools.count()
    with torch.no_grad():
        for chunk in _batches(samples, batch_size):
            x = torch.from_numpy(np.stack([s.ipsi for s in chunk] + [s.contra for s in chunk])[:, None])
            pooled = backbone(to_model_input(x.to(device)))
            z = F.normalize(pooled.float(), dim=1)
            zi, zc = z[: len(chunk)], z[len(chunk):]
            ipsi_feats.append(zi.cpu().numpy())
            contra_feats.append(zc.cpu().numpy())
            if head is not None:
                h = F.normalize(head(pooled).float(), dim=1)
                head_d.append((h[: len(chunk)] - h[len(chunk):]).norm(dim=1).cpu().numpy())
            dist = (zi - zc).norm(dim=1).cpu().numpy()
            for s, d in zip(chunk, dist):
                rows.append({"key": s.key, **s.meta})
                item = (float(d), next(counter), TopPair(float(d), s.key, s.ipsi, s.contra, s.meta))
                if len(top) < top_k:
                    heapq.heappush(top, item)
                elif top_k and item[0] > top[0][0]:
                    heapq.heapreplace(top, item)
            if on_batch is not None:
                on_batch(len(chunk))
    if not rows:
        raise EvaluationError("no_samples", "the selected shards hold no samples")
    return Embeddings(
        table=pd.DataFrame(rows),
        ipsi=np.concatenate(ipsi_feats),
        contra=np.concatenate(contra_feats),
        head_distance=np.concatenate(head_d) if head_d else None,
        top_pairs=[t[2] for t in sorted(top, key=lambda t: -t[0])],
    )


# ---------------------------------------------------------------- metrics (pure NumPy / scikit-learn)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_ci(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) < 20:  # too few usable resamples for a percentile interval
        return None
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def resampled_aucs(y: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of every resample `idx[b]` at once through the rank-sum identity
    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), ties at average ranks as in `roc_auc_score`;
    NaN for a resample holding one class only."""
    from scipy.stats import rankdata

    yb, sb = np.asarray(y, dtype=bool)[idx], np.asarray(score, dtype=float)[idx]
    n_pos = yb.sum(1)
    n_neg = yb.shape[1] - n_pos
    rank_pos = np.where(yb, rankdata(sb, axis=1), 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_auc_ci(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap CI of the ROC AUC over resampled test rows."""
    return _percentile_ci(resampled_aucs(y, score, bootstrap_indices(len(y), n_boot, seed)), level)


def bootstrap_mean_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95):
    """Percentile bootstrap CI of a mean (accuracy = mean of per-row correctness)."""
    values = np.asarray(values, dtype=float)
    return _percentile_ci(values[bootstrap_indices(len(values), n_boot, seed)].mean(1), level)


def auc_with_ci(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return {"skipped": f"needs both classes (positives {n_pos}, negatives {n_neg})", "n_pos": n_pos, "n_neg": n_neg}
    return {
        "auc": float(roc_auc_score(y, score)),
        "auc_ci": bootstrap_auc_ci(y, score, n_boot, seed),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def lesion_labels(table: pd.DataFrame) -> np.ndarray:
    """A pair 'has a lesion' when either side is abnormal."""
    return table["ipsi_abnormal"].fillna(False).astype(bool).to_numpy() | table["contra_abnormal"].fillna(False).astype(bool).to_numpy()


def stratified_fraction(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded, stratified subsample holding `fraction` of the rows (all rows at 1.0)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if fraction >= 1.0:
        return idx
    n_keep = max(int(round(fraction * len(y))), len(np.unique(y)))
    kept, _ = train_test_split(idx, train_size=n_keep, stratify=y, random_state=seed)
    return np.sort(kept)


def fit_probe(X: np.ndarray, y: np.ndarray, seed: int, cv_folds: int = 5):
    """Standardised features -> logistic regression (multinomial for > 2 classes). C is chosen by
    stratified cross-validation on (X, y) only -- the caller passes training rows, never test rows;
    with too few examples of a class for 2 folds, C = 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = min(cv_folds, int(np.unique(y, return_counts=True)[1].min()))
    if folds < 2:
        return model.fit(X, y)
    search = GridSearchCV(
        model,
        {"logisticregression__C": list(PROBE_CS)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
    )
    return search.fit(X, y).best_estimator_


def _accuracy_ci(y: np.ndarray, pred: np.ndarray, cfg: EvalConfig):
    return bootstrap_mean_ci(np.asarray(y) == np.asarray(pred), cfg.n_boot, cfg.seed)


def binary_probe(X_train, y_train, X_test, y_test, cfg: EvalConfig, fraction: float = 1.0) -> tuple[dict, object]:
    """Abnormal-vs-normal probe on `fraction` of the training labels; returns (metrics, fitted model)."""
    y_train = np.asarray(y_train, dtype=bool)
    y_test = np.asarray(y_test, dtype=bool)
    idx = stratified_fraction(y_train, fraction, cfg.seed) if y_train.sum() >= 2 else np.arange(len(y_train))
    n_pos, n_neg = int(y_train[idx].sum()), int((~y_train[idx]).sum())
    if n_pos < 2 or n_neg < 2:
        return {"skipped": f"{n_pos} positive / {n_neg} negative training labels at {fraction:.0%} (< 2)",
                "n_train": int(len(idx))}, None
    model = fit_probe(X_train[idx], y_train[idx], cfg.seed, cfg.cv_folds)
    proba = model.predict_proba(X_test)[:, 1]
    pred = proba >= 0.5
    metrics = {
        **auc_with_ci(y_test, proba, cfg.n_boot, cfg.seed),
        "accuracy": float((pred == y_test).mean()),
        "accuracy_ci": _accuracy_ci(y_test, pred, cfg),
        "majority_accuracy": float(max(y_test.mean(), 1 - y_test.mean())),
        "C": float(model[-1].C),
        "n_train": int(len(idx)),
        "n_train_pos": n_pos,
        "n_test": int(len(y_test)),
    }
    return metrics, model


def macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over the classes that have positives and negatives in `y`."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == c, proba[:, j]) for j, c in enumerate(classes) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


def multiclass_probe(X_train, y_train, X_test, y_test, cfg: EvalConfig) -> tuple[dict, object]:
    """Multinomial logistic regression on string labels; test rows of classes unseen in training are
    dropped (and counted)."""
    from sklearn.metrics import accuracy_score

    y_train, y_test = np.asarray(y_train, dtype=object), np.asarray(y_test, dtype=object)
    classes = np.unique(y_train)
    if len(classes) < 2:
        return {"skipped": f"training split has {len(classes)} class(es)"}, None
    seen = np.isin(y_test, classes)
    if seen.sum() == 0:
        return {"skipped": "no test rows with a class seen in training"}, None
    model = fit_probe(X_train, y_train, cfg.seed, cfg.cv_folds)
    X_test, y_test = X_test[seen], y_test[seen]
    proba = model.predict_proba(X_test)
    pred = model.classes_[proba.argmax(1)]
    return {
        "accuracy": float(accuracy_score(y_test, pred)),
        "accuracy_ci": _accuracy_ci(y_test, pred, cfg),
        "macro_auc": macro_auc(y_test, proba, model.classes_),
        "classes": [str(c) for c in model.classes_],
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_test_unseen_class": int((~seen).sum()),
    }, model


def knn_accuracy(X_train, y_train, X_test, y_test, k: int) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    k_used = min(k, len(y_train))
    model = KNeighborsClassifier(n_neighbors=k_used, metric="cosine", algorithm="brute").fit(X_train, y_train)
    return {"accuracy": float((model.predict(X_test) == np.asarray(y_test)).mean()), "k": k_used}


@dataclass
class EvaluationResult:
    metrics: dict
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (y_true, score) for ROC plots
    probes: dict[str, object]  # "task@fraction" -> fitted scikit-learn model
    notes: list[str]


def _has_labels(values: pd.Series) -> pd.Series:
    return values.notna() & (values.astype(str).str.strip() != "") & (values.astype(str) != "None")


def compute_metrics(emb: Embeddings, cfg: EvalConfig) -> EvaluationResult:
    """All metrics from embeddings + labels. Probes fit on `cfg.train_split` rows only."""
    from threadpoolctl import threadpool_limits

    # small dense problems: BLAS threads only contend (measured 3x slower on 2 busy cores)
    with threadpool_limits(1):
        return _compute_metrics(emb, cfg)


def _compute_metrics(emb: Embeddings, cfg: EvalConfig) -> EvaluationResult:
    table = emb.table.reset_index(drop=True)
    split = table["split"].astype(str).to_numpy()
    train, test = split == cfg.train_split, split == cfg.test_split
    notes: list[str] = []
    metrics: dict = {"counts": split_counts(table)}
    curves: dict = {}
    probes: dict = {}
    lesion = lesion_labels(table)

    # unsupervised detection: no label is used to compute the score
    detection = {}
    scores = {"backbone": emb.distance}
    if emb.head_distance is not None:
        scores["head"] = emb.head_distance
    for name, score in scores.items():
        detection[name] = auc_with_ci(lesion[test], score[test], cfg.n_boot, cfg.seed)
        detection[f"{name}_all_splits"] = auc_with_ci(lesion, score, cfg.n_boot, cfg.seed)
        if "auc" in detection[name]:
            curves[f"detection, {name} distance (test)"] = (lesion[test], score[test])
    metrics["detection"] = detection

    if not train.any() or not test.any():
        notes.append(f"probes skipped: need rows in both '{cfg.train_split}' and '{cfg.test_split}' splits "
                     f"(have {sorted(set(split))})")
        return EvaluationResult(metrics, curves, probes, notes)

    X = emb.ipsi
    abnormal = table["ipsi_abnormal"].fillna(False).astype(bool).to_numpy()
    probe = {}
    for fraction in cfg.label_fractions:
        name = f"{fraction:.0%}"
        result, model = binary_probe(X[train], abnormal[train], X[test], abnormal[test], cfg, fraction)
        probe[name] = result
        if model is None:
            notes.append(f"abnormal probe at {name} of the labels skipped: {result['skipped']}")
            continue
        probes[f"abnormal@{name}"] = model
        if fraction == max(cfg.label_fractions):
            curves[f"linear probe, {name} labels (test)"] = (abnormal[test], model.predict_proba(X[test])[:, 1])
    metrics["probe_abnormal"] = probe
    knn = {"abnormal": knn_accuracy(X[train], abnormal[train], X[test], abnormal[test], cfg.knn_k)}

    for task, column in MULTICLASS_TASKS.items():
        if column not in table.columns:
            notes.append(f"{task}: no '{column}' labels in the data")
            continue
        labelled = _has_labels(table[column]).to_numpy()
        tr, te = train & labelled, test & labelled
        if not tr.any() or not te.any():
            notes.append(f"{task}: no labelled rows in one of the splits")
            continue
        y = table[column].astype(str).to_numpy()
        result, model = multiclass_probe(X[tr], y[tr], X[te], y[te], cfg)
        metrics[task] = result
        if model is None:
            notes.append(f"{task} probe skipped: {result['skipped']}")
            continue
        probes[f"{task}@100%"] = model
        knn[task] = knn_accuracy(X[tr], y[tr], X[te], y[te], cfg.knn_k)
    metrics["knn"] = knn
    return EvaluationResult(metrics, curves, probes, notes)


def split_counts(table: pd.DataFrame) -> dict:
    """{split: {"pairs", "ipsi_abnormal", "lesion_pairs", "finding_sampled"}} for the report and compare."""
    lesion = lesion_labels(table)
    out = {}
    for split, idx in table.groupby(table["split"].astype(str)).groups.items():
        rows = table.loc[idx]
        out[split] = {
            "pairs": int(len(rows)),
            "ipsi_abnormal": int(rows["ipsi_abnormal"].fillna(False).astype(bool).sum()),
            "lesion_pairs": int(lesion[np.asarray(idx)].sum()),
            "finding_sampled": int((rows.get("sampling", pd.Series(dtype=str)) == "finding").sum()),
        }
    return out


def summary(metrics: dict) -> dict[str, float | None]:
    """The flat headline numbers `train compare` tabulates (None where not computed)."""

    def get(*path):
        node = metrics
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return None if node is None or (isinstance(node, float) and math.isnan(node)) else node

    out = {
        "detection_auc": get("detection", "backbone", "auc"),
        "detection_auc_head": get("detection", "head", "auc"),
    }
    for fraction in metrics.get("probe_abnormal", {}):
        out[f"probe_auc_{fraction}"] = get("probe_abnormal", fraction, "auc")
    out["probe_accuracy_100%"] = get("probe_abnormal", "100%", "accuracy")
    out["knn_accuracy_abnormal"] = get("knn", "abnormal", "accuracy")
    for task in MULTICLASS_TASKS:
        out[f"{task}_accuracy"] = get(task, "accuracy")
        out[f"{task}_macro_auc"] = get(task, "macro_auc")
        out[f"knn_accuracy_{task}"] = get("knn", task, "accuracy")
    return out


# ---------------------------------------------------------------- whole-breast heat map (needs the archive)


@dataclass
class Heatmap:
    """Pair distance over one canonical breast: `distance_map` is NaN outside the breast / patches."""

    study_id: str
    view: str
    ipsi_lat: str
    image: np.ndarray  # canonical float32 [0, 1]
    distance_map: np.ndarray
    boxes: list[dict]  # findings in canonical px
    n_patches: int


def coverage_mean(shape: tuple[int, int], corners: np.ndarray, patch_px: int, values: np.ndarray) -> np.ndarray:
    """Per pixel, the mean value of the patches covering it (NaN where none does)."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for (x0, y0), v in zip(corners.astype(int), values):
        window = (slice(max(y0, 0), y0 + patch_px), slice(max(x0, 0), x0 + patch_px))
        total[window] += v
        count[window] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _pick_study(records, study_id: str | None, test_split: str):
    """(study, view, L record, R record, lesion side): the requested study or the first test study with a finding."""
    by_pair: dict[tuple[str, str], dict[str, object]] = {}
    for r in records:
        by_pair.setdefault((r.study_id, r.view), {})[r.laterality] = r
    candidates = [(k, v) for k, v in by_pair.items() if set(v) >= {"L", "R"}]
    if study_id is not None:
        candidates = [(k, v) for k, v in candidates if k[0] == study_id]
    else:
        candidates = [(k, v) for k, v in candidates if any(v[s].findings for s in "LR")]
        candidates.sort(key=lambda kv: (kv[1]["L"].split != test_split, kv[0]))
    if not candidates:
        return None
    (study, view), sides = candidates[0]
    lesion_side = "L" if sides["L"].findings or not sides["R"].findings else "R"
    return study, view, sides["L"], sides["R"], lesion_side


def study_heatmap(
    backbone,
    root: str | Path,
    encoder_meta: dict,
    dataset: str = "vindr",
    study_id: str | None = None,
    n_patches: int = 256,
    batch_size: int = 64,
    device="cpu",
    test_split: str = "test",
) -> tuple[Heatmap | None, str]:
    """Cut a dense grid of registered pairs over one study with a lesion (prep's own functions) and
    map the pair distance over the lesion-side canonical breast. Returns (heatmap or None, note)."""
    from prep.config import PrepConfig
    from prep.datasets import get_adapter
    from prep.decode import UnsupportedImage, decode_dicom, read_dicom
    from prep.pairs import ImageInput, canonicalise, process_pair
    from prep.patches import top_left

    picked = _pick_study(get_adapter(dataset)(root).images(), study_id, test_split)
    if picked is None:
        return None, f"no study with both breasts{' and a finding' if study_id is None else ''} in {root}"
    study, view, left_rec, right_rec, lesion_side = picked
    cfg = PrepConfig(
        mm_per_px=float(encoder_meta.get("mm_per_px", 0.1)),
        patch_px=int(encoder_meta.get("patch_px", 256)),
        grid_patches_per_direction=n_patches,
        finding_patches_per_lesion=0,
        min_tissue_fraction=0.3,
    )
    inputs = {}
    try:
        for rec in (left_rec, right_rec):
            decoded = decode_dicom(read_dicom(rec.path))
            inputs[rec.laterality] = ImageInput(
                rec.image_id, rec.laterality, rec.view, decoded, rec.findings,
                rec.breast_birads, rec.breast_density, rec.study_id,
            )
    except UnsupportedImage as exc:
        return None, f"study {study} {view}: {exc}"
    result = process_pair(inputs["L"], inputs["R"], cfg, seed=0)
    samples = [s for s in result.samples if s.meta["ipsi_lat"] == lesion_side]
    if not samples:
        return None, f"study {study} {view}: no pairs ({result.error or 'no patch passed the tissue check'})"
    emb = embed_pairs(
        backbone,
        (EvalSample(str(i), s.ipsi, s.contra, {}) for i, s in enumerate(samples)),
        batch_size=batch_size, device=device, top_k=0,
    )
    canon = canonicalise(inputs[lesion_side], cfg)
    centres = np.array([[s.meta["ipsi_cx"], s.meta["ipsi_cy"]] for s in samples])
    corners = top_left(centres, cfg.patch_px)
    dmap = coverage_mean(canon.image.shape, corners, cfg.patch_px, emb.distance)
    dmap[~canon.mask] = np.nan
    return Heatmap(study, view, lesion_side, canon.image, dmap, canon.boxes, len(samples)), (
        f"study {study} {view}, {lesion_side} breast: {len(samples)} grid pairs"
    )


# ---------------------------------------------------------------- the run being evaluated


def run_dir_of(encoder: str | Path) -> Path | None:
    """The training run an encoder path belongs to (the dir itself, or the folder of its files)."""
    path = Path(encoder)
    run = path if path.is_dir() else path.parent
    return run if (run / "config.json").is_file() or (run / "last.pt").is_file() else None


def run_config(run: Path | None) -> dict:
    """The run's resolved config (`config.json` of `train pretrain`: options, then resolved values), or {}."""
    import json

    if run is None or not (run / "config.json").is_file():
        return {}
    saved = json.loads((run / "config.json").read_text())
    return {**saved.get("config", {}), **{k: v for k, v in saved.get("resolved", {}).items() if v is not None}}


def load_projection_head(run: Path | None, device="cpu"):
    """(head, note): the trained projection head sitting on the exported backbone (the first `EmbeddingNet`
    of the run's `last.pt`), or None with the reason (LD and random have none; no checkpoint)."""
    from train.checkpoint import CheckpointError, load_checkpoint
    from train.models import ProjectionHead

    if run is None or not (run / "last.pt").is_file():
        return None, "no run checkpoint beside the encoder: head distance not reported"
    try:
        state = load_checkpoint(run / "last.pt").get("method") or {}
    except CheckpointError as exc:
        return None, f"head distance not reported: {exc.reason}: {exc.detail.splitlines()[0]}"
    prefixes = sorted(k[: -len("head.layers.0.weight")] for k in state if k.endswith("head.layers.0.weight"))
    if not prefixes:
        return None, "the method has no projection head: head distance not reported"
    prefix = prefixes[0] + "head."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hidden, in_features = sub["layers.0.weight"].shape
    head = ProjectionHead(in_features, hidden, sub["layers.3.weight"].shape[0])
    head.load_state_dict(sub)
    return head.to(device).eval(), f"head distance from the projection head {prefix[:-1]!r} of {run / 'last.pt'}"


RUN_FIELDS = ("method", "seed", "steps", "batch_size", "backbone", "crop_px", "lr", "deterministic")


def evaluate_encoder(
    encoder: str | Path,
    out: str | Path,
    shards: str | None = None,
    manifest: str | None = None,
    root: str | None = None,
    dataset: str = "vindr",
    heatmap_study: str | None = None,
    heatmap_patches: int = 256,
    cfg: EvalConfig = EvalConfig(),
    device: str = "cpu",
    on_batch: Callable[[int], None] | None = None,
    on_total: Callable[[int | None], None] | None = None,
) -> dict:
    """Evaluate one encoder end to end: embed -> metrics -> metrics.json, scores.parquet, report.md, PNGs."""
    from prep.io import write_bytes_atomic, write_json_atomic
    from train.data import DataError, select
    from train.models import EncoderError, load_encoder
    from train.report import write_report

    out = Path(out)
    try:
        backbone, meta = load_encoder(encoder, device)
        selection = select(shards=shards, manifest=manifest, include_finding=True)
    except (EncoderError, DataError) as exc:
        raise EvaluationError(exc.reason, exc.detail) from exc
    run = run_dir_of(encoder)
    head, head_note = load_projection_head(run, device)
    labels = manifest_labels(manifest) if manifest else None
    if on_total is not None:
        on_total(selection.n_samples)
    emb = embed_pairs(backbone, iter_samples(selection.urls, selection.keys, labels), cfg.batch_size, device,
                      head=head, top_k=cfg.top_pairs, on_batch=on_batch)
    result = compute_metrics(emb, cfg)
    notes = [head_note, *result.notes]
    heatmap = None
    if root:
        heatmap, note = study_heatmap(backbone, root, meta, dataset, heatmap_study, heatmap_patches,
                                      cfg.batch_size, device, cfg.test_split)
        notes.append(f"heat map: {note}")
    else:
        notes.append("heat map skipped: give --root ARCHIVE to map pair distance over a whole breast")
    config = run_config(run)
    metrics = {
        **result.metrics,
        "encoder": meta,
        "encoder_path": str(encoder),
        "run": {k: config.get(k, meta.get(k)) for k in RUN_FIELDS},
        "data": {"source": str(manifest or shards), "n_samples": int(len(emb.table)), "n_shards": len(selection.urls)},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, metrics, result, emb, heatmap, notes)  # adds the distance mixture to metrics
    metrics["summary"] = summary(metrics)
    scores = emb.table.assign(distance=emb.distance)
    if emb.head_distance is not None:
        scores = scores.assign(head_distance=emb.head_distance)
    buf = io.BytesIO()
    scores.to_parquet(buf, index=False)
    write_bytes_atomic(out / "scores.parquet", buf.getvalue())
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
