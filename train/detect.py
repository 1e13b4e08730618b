"""Unsupervised lesion detection over whole studies: a dense score map per image, marks, breast and exam scores.

For every (study, view) the image core the build uses (`prep.decode`, `prep.pairs.canonicalise`,
`prep.pairs.register_pair`, `prep.patches.crop` / `registered_patch`) puts both breasts in the canonical frame and
registers them; a regular grid of patches (stride <= half a patch, every patch inside the canvas, so nothing
is zero-padded at the chest wall) covers each breast, in both registration directions. Each position gets:

- `pair`: the distance between the embedding of its patch and of the registered contralateral patch (symmetric:
  at corresponding positions both breasts score alike, so it says *whether*, not *which side*);
- `one-sided`: the mean distance of its patch embedding to its k nearest neighbours in a bank of patch
  embeddings from other studies (the archive's training split, label-free): how unlike ordinary tissue the
  patch is, measured per breast, so it can lateralise. The bank holds every grid position of its studies,
  skin-line and chest-wall patches included, so an edge patch is compared with edge patches and does not
  light up for being an edge;
- `combined`: the mean of the two after each is standardised by its median and MAD over the bank.

A position is scored when its patch centre lies in the breast mask; it is a *candidate* (for marks and breast
scores) when its patch is at least `min_tissue` breast. Breast score = mean of the top-k candidate scores of
its two views; exam score = the larger breast score; marks = candidate peaks after non-maximum suppression
with a radius of half a patch. The same path runs the label-free pixel baselines (`raw-pixel`: 8 x 8 block
means, `mean-intensity`: the patch mean) in place of the encoder's features. Labels are read only for metrics.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from prep.config import PrepConfig
from prep.datasets import get_adapter
from prep.decode import UnsupportedImage
from prep.errors import ContralateralError
from prep.opencv import cv2, exact_distance
from prep.pairs import CanonicalImage, canonicalise, load_image_input, register_pair
from prep.patches import crop, registered_patch, snapped_centres, to_uint16
from prep.knobs import knob

VARIANTS = ("pair", "one-sided", "combined")
PIXEL_METHODS = ("raw-pixel", "mean-intensity")
SIDES = ("L", "R")
THUMB_PX = 400  # longest side of the kept canonical thumbnails (overlays)


class DetectError(ContralateralError):
    """A detection run that cannot be done as asked. `reason`: bad_option, no_studies, bad_manifest."""


@dataclass
class DetectConfig:
    # data
    root: str | None = knob(None, "Archive root (read with --dataset's adapter); required.", "Data")
    dataset: str = knob("vindr", "Dataset adapter of --root (prep.datasets).", "Data")
    manifest: str | None = knob(None, "A build's samples/images/pairs.parquet (a path or a URL): score only the studies it lists (after --where).", "Data")
    where: str | None = knob(None, "pandas query selecting studies: over --manifest if given, else over the archive's images (columns study_id, image_id, split, view, laterality), e.g. \"split == 'test'\" [default: every study].", "Data")
    assume_spacing_mm: float | None = knob(None, "Pixel spacing (mm) for images whose header has none (CBIS-DDSM), as for prep build-shards [default: such images are refused].", "Data", min=0.001)
    # detector
    encoder: str | None = knob(None, "Run dir or encoder.safetensors of the encoder to detect with [default: the pixel baselines alone].", "Detector")
    mm_per_px: float | None = knob(None, "Canonical spacing [default: the encoder's; 0.1 without one].", "Detector", min=0.001)
    patch_px: int | None = knob(None, "Patch size [default: the encoder's; 256 without one].", "Detector", min=8)
    stride: float = knob(0.5, "Grid stride as a fraction of the patch (<= 0.5: every point of the breast lies in several patches).", "Detector", min=0.05, max=0.5)
    min_tissue: float = knob(0.75, "Fraction of a patch that must be breast for its position to be a mark or enter a breast score (edge handling).", "Detector", min=0.0, max=1.0)
    bank_split: str = knob("training", "Split whose studies form the one-sided score's bank (label-free).", "Detector")
    bank_studies: int = knob(8, "Studies in the bank (0: the scored studies themselves, each left out of its own scoring).", "Detector", min=0)
    knn_k: int = knob(5, "Nearest bank patches averaged by the one-sided score.", "Detector", min=1)
    pair_weight: float = knob(0.5, "Weight of the standardised pair distance in the combined score (the one-sided score gets the rest).", "Detector", min=0.0, max=1.0)
    edge_bins: int = knob(4, "Standardise each score against bank positions at a similar distance from the breast edge (this many quantile bins; 1: one global scale): the skin line and chest wall differ from the interior in every image, not only in abnormal ones.", "Detector", min=1)
    top_k: int = knob(3, "Breast score = mean of this many highest candidate positions over its views.", "Detector", min=1)
    max_marks: int = knob(10, "Marks kept per image (peaks after non-maximum suppression, radius half a patch).", "Detector", min=1)
    baselines: bool = knob(True, "Also run the pixel baselines (raw-pixel, mean-intensity) through the same path.", "Detector")
    # evaluation and output
    n_boot: int = knob(2000, "Study-level bootstrap resamples for the 95 % CIs.", "Output", min=0)
    seed: int = knob(0, "Seed of the bank pick and the bootstrap.", "Output")
    overlays: int = knob(3, "Overlay PNGs for this many top and this many bottom exams.", "Output", min=0)
    out: str = knob("detect", "Output dir (local): detections.parquet, positions.parquet, exams.parquet, detect.md, detect.json, PNGs.", "Output")
    batch_size: int = knob(64, "Patches per forward pass.", "Run", min=1)
    device: str = knob("auto", "auto (CUDA if present) | cpu | cuda | cuda:N.", "Run")

    def validate(self) -> "DetectConfig":
        from prep.knobs import ConfigError, check_knobs

        check_knobs(self)
        if not self.root:
            raise ConfigError("bad_option", "--root ARCHIVE is required")
        if not self.encoder and not self.baselines:
            raise ConfigError("bad_option", "nothing to detect with: give --encoder or keep --baselines")
        return self


# ---------------------------------------------------------------- study selection


def usable_views(records, assumed_spacing_mm: float | None) -> tuple[dict, list[str]]:
    """{(study, view): {"L": record, "R": record}} of pairs with both breasts whose header check passed and that
    carry no label/header disagreement flag, and a note per (study, view) left out."""
    by_pair: dict[tuple[str, str], dict[str, object]] = {}
    for r in records:
        by_pair.setdefault((r.study_id, r.view), {})[r.laterality] = r
    usable, dropped = {}, []
    for key, sides in sorted(by_pair.items()):
        if set(sides) < set(SIDES):
            dropped.append(f"{key[0]} {key[1]}: one breast only")
        elif any(sides[s].header_refusal(assumed_spacing_mm) or sides[s].flags for s in SIDES):
            why = [sides[s].header_refusal(assumed_spacing_mm) or ",".join(sides[s].flags) for s in SIDES]
            dropped.append(f"{key[0]} {key[1]}: {' / '.join(w for w in why if w)}")
        else:
            usable[key] = sides
    return usable, dropped


def records_table(records) -> pd.DataFrame:
    """The selectable columns of an archive's images (no labels: selection must not look at the answer)."""
    return pd.DataFrame([{"study_id": r.study_id, "image_id": r.image_id, "split": r.split, "view": r.view,
                          "laterality": r.laterality} for r in records])


def selected_studies(records, manifest: str | None, where: str | None) -> list[str]:
    """Study ids chosen by the manifest (its study_id column; a path or a URL, `prep.storage`) and the query."""
    if manifest:
        from prep.storage import StorageError, location

        try:
            with location(manifest).open("rb") as handle:
                table = pd.read_parquet(handle)
        except StorageError as exc:
            raise DetectError(exc.reason, exc.detail) from None
        except (OSError, ValueError) as exc:
            raise DetectError("bad_manifest", f"{manifest}: {exc}") from exc
        if "study_id" not in table.columns:
            raise DetectError("bad_manifest", f"{manifest} has no study_id column")
    else:
        table = records_table(records)
    if where:
        try:
            table = table.query(where)
        except Exception as exc:  # pandas raises many kinds for a bad query
            raise DetectError("bad_option", f"--where {where!r}: {exc}") from exc
    return sorted(set(table["study_id"].astype(str))) if len(table) else []


def stable_order(ids, seed: int) -> list[str]:
    """A seeded order that does not depend on how the archive lists its studies."""
    return sorted(ids, key=lambda s: hashlib.sha256(f"{seed}|{s}".encode()).hexdigest())


def bank_studies(views: dict, split: str, n: int, exclude: set[str], seed: int) -> list[str]:
    """`n` usable studies of `split` outside `exclude`, in a seeded order."""
    candidates = {study for (study, _), sides in views.items() if sides["L"].split == split} - exclude
    return stable_order(candidates, seed)[:n]


# ---------------------------------------------------------------- grid geometry (pure)


def grid_corners(shape: tuple[int, int], patch_px: int, stride_px: int) -> np.ndarray:
    """(N, 2) top-left (x0, y0) of a regular grid of patches lying inside the canvas, the last row and column
    moved flush with the far edges so every pixel lies in some patch. Empty when the canvas is smaller."""
    h, w = shape
    if h < patch_px or w < patch_px:
        return np.zeros((0, 2), np.int64)

    def axis(n: int) -> np.ndarray:
        steps = np.arange(0, n - patch_px + 1, stride_px)
        return np.unique(np.r_[steps, n - patch_px])

    xs, ys = np.meshgrid(axis(w), axis(h))
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def window_means(mask: np.ndarray, corners: np.ndarray, patch_px: int) -> np.ndarray:
    """Fraction of each patch that is mask (an integral image: one pass, any number of patches)."""
    integral = cv2.integral(np.asarray(mask, np.uint8), sdepth=cv2.CV_64F)
    x0, y0 = corners[:, 0], corners[:, 1]
    x1, y1 = x0 + patch_px, y0 + patch_px
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / float(patch_px * patch_px)


def edge_distance_px(mask: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Distance (px) from each centre to the nearest non-breast pixel, the canvas edge counting as one."""
    padded = np.pad(np.asarray(mask, np.uint8), 1)
    dist = exact_distance(padded)[1:-1, 1:-1]
    return dist[_rows_cols(centres, mask.shape)]


def chest_wall_distance_px(mask: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Distance (px) along x from each centre to the breast's chest-wall edge in its row (the first breast pixel
    from the left of the canonical frame; a film's border can sit between it and the canvas edge)."""
    rows, cols = _rows_cols(centres, mask.shape)
    any_breast = np.asarray(mask, bool).any(1)
    first = np.where(any_breast, np.asarray(mask, bool).argmax(1), 0)
    return np.asarray(centres, float)[:, 0] - first[rows]


def _rows_cols(centres: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(centres, float).reshape(-1, 2)
    return (np.clip(np.round(c[:, 1]).astype(int), 0, shape[0] - 1),
            np.clip(np.round(c[:, 0]).astype(int), 0, shape[1] - 1))


def non_maximum_suppression(points: np.ndarray, scores: np.ndarray, radius: float, limit: int) -> np.ndarray:
    """Indices of the highest-scoring points, each farther than `radius` from every higher one kept
    (greedy, at most `limit`); NaN scores are never kept."""
    points, scores = np.asarray(points, float).reshape(-1, 2), np.asarray(scores, float)
    kept: list[int] = []
    for i in np.argsort(-np.where(np.isfinite(scores), scores, -np.inf), kind="stable"):
        if not np.isfinite(scores[i]) or len(kept) >= limit:
            break
        if not kept or np.hypot(*(points[kept] - points[i]).T).min() > radius:
            kept.append(int(i))
    return np.asarray(kept, np.int64)


def top_k_mean(values: np.ndarray, k: int) -> float:
    """Mean of the k largest finite values (NaN when there is none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.sort(v)[-k:].mean()) if len(v) else float("nan")


def nearest_map(shape: tuple[int, int], centres: np.ndarray, values: np.ndarray, mask: np.ndarray,
                scale: float = 1.0) -> np.ndarray:
    """A map of `shape` pixels (each `scale` canonical px) holding, inside `mask`, the value of the nearest
    scored centre (canonical px); NaN elsewhere. Nearest, not averaged: a peak keeps its height."""
    out = np.full(shape, np.nan)
    if len(centres) == 0:
        return out
    ys, xs = np.nonzero(mask)
    _, nearest = cKDTree(np.asarray(centres, float)).query(np.stack([(xs + 0.5) * scale - 0.5, (ys + 0.5) * scale - 0.5], 1))
    out[ys, xs] = np.asarray(values, float)[nearest]
    return out


# ---------------------------------------------------------------- cutting one view


@dataclass
class ImagePatches:
    """One breast image on the detection grid: its patches, the registered contralateral patches (None when
    the pair did not register), and what the scores and overlays need of its geometry."""

    study_id: str
    image_id: str
    side: str
    view: str
    split: str
    centres: np.ndarray  # (N, 2) canonical px
    tissue: np.ndarray  # (N,) breast fraction of each patch
    contra_tissue: np.ndarray  # (N,) breast fraction of the registered contralateral patch (NaN: not registered)
    edge_mm: np.ndarray
    chest_wall_mm: np.ndarray
    ipsi: np.ndarray  # uint16 (N, P, P)
    contra: np.ndarray | None
    canonical: CanonicalImage
    spacing_mm: tuple[float, float]
    findings: list[dict]  # the archive's findings of this image (evaluation only)
    thumb: np.ndarray = field(default=None)  # uint8 canonical thumbnail
    thumb_mask: np.ndarray = field(default=None)
    thumb_scale: float = 1.0  # canonical px per thumbnail px

    def to_original_mm(self, centres: np.ndarray) -> np.ndarray:
        """(N, 2) canonical px -> (x, y) mm in the stored image (from its first pixel's centre)."""
        orig = self.canonical.frame.to_original(np.asarray(centres, float).reshape(-1, 2))
        return orig * np.array([self.spacing_mm[1], self.spacing_mm[0]])


def grid_patches(image: np.ndarray, corners: np.ndarray, patch_px: int) -> np.ndarray:
    """uint16 (N, P, P) patches at these top-left corners (all inside the canvas)."""
    return np.stack([to_uint16(crop(image, int(x0), int(y0), patch_px)) for x0, y0 in corners]) if len(corners) else \
        np.zeros((0, patch_px, patch_px), np.uint16)


def thumbnail(canon: CanonicalImage) -> tuple[np.ndarray, np.ndarray, float]:
    scale = max(canon.image.shape) / THUMB_PX
    size = (max(1, round(canon.image.shape[1] / scale)), max(1, round(canon.image.shape[0] / scale)))
    thumb = cv2.resize(canon.image, size, interpolation=cv2.INTER_AREA)
    mask = cv2.resize(canon.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return np.round(np.clip(thumb, 0, 1) * 255).astype(np.uint8), mask, scale


def cut_view(left, right, cfg: PrepConfig, stride_px: int) -> tuple[list[ImagePatches], str | None]:
    """Both breasts of one (study, view) -> their detection grids (both directions). `left`/`right` are
    `prep.pairs.ImageInput`s. The note says what failed (nothing, or no pair distance when the registration did
    not pass its QC: the one-sided score still runs)."""
    canon = {"L": canonicalise(left, cfg), "R": canonicalise(right, cfg)}
    failed = [s for s in SIDES if canon[s].info["status"] != "ok"]
    if failed:
        info = canon[failed[0]].info
        return [], f"{failed[0]}: {info['status']}: {info['reason']}"
    forward, backward = register_pair(canon["L"], canon["R"], cfg)
    registered = forward.reg_ok and backward.reg_ok
    note = None if registered else f"registration failed ({forward.reason or backward.reason}): one-sided score only"
    inputs = {"L": left, "R": right}
    out = []
    P = cfg.patch_px
    for side, other, reg in (("L", "R", forward), ("R", "L", backward)):
        c = canon[side]
        corners = grid_corners(c.image.shape, P, stride_px)
        centres = snapped_centres(corners, P)
        inside = c.mask[_rows_cols(centres, c.mask.shape)] if len(centres) else np.zeros(0, bool)
        corners, centres = corners[inside], centres[inside]
        contra, contra_tissue = None, np.full(len(corners), np.nan)
        if registered and len(corners):
            contra_mask = canon[other].mask.astype(np.uint8)
            at = [(int(x0), int(y0)) for x0, y0 in corners]
            contra = np.stack([to_uint16(registered_patch(canon[other].image, reg.affine, reg.displacement, x0, y0, P))
                               for x0, y0 in at])
            contra_tissue = np.array([registered_patch(contra_mask, reg.affine, reg.displacement, x0, y0, P,
                                                       nearest=True).mean() for x0, y0 in at])
        thumb, thumb_mask, scale = thumbnail(c)
        record = inputs[side]
        out.append(ImagePatches(
            study_id=record.study_id, image_id=record.image_id, side=side, view=record.view, split="",
            centres=centres, tissue=window_means(c.mask, corners, P), contra_tissue=contra_tissue,
            edge_mm=edge_distance_px(c.mask, centres) * cfg.mm_per_px,
            chest_wall_mm=chest_wall_distance_px(c.mask, centres) * cfg.mm_per_px,
            ipsi=grid_patches(c.image, corners, P), contra=contra, canonical=c,
            spacing_mm=tuple(float(v) for v in record.decoded.spacing_mm), findings=list(record.findings),
            thumb=thumb, thumb_mask=thumb_mask, thumb_scale=scale,
        ))
    return out, note


def cut_study(study: str, views: dict, cfg: PrepConfig, stride_px: int,
              assumed_spacing_mm: float | None) -> tuple[list[ImagePatches], list[str]]:
    """Every usable view of one study through decode -> canonicalise -> register -> grid."""
    images, notes = [], []
    for (sid, view), sides in sorted(views.items()):
        if sid != study:
            continue
        try:
            inputs = {s: load_image_input(sides[s], assumed_spacing_mm) for s in SIDES}
        except UnsupportedImage as exc:
            notes.append(f"{study} {view}: {exc}")
            continue
        cut, note = cut_view(inputs["L"], inputs["R"], cfg, stride_px)
        for im in cut:
            im.split = sides[im.side].split
            # the canonical image is kept only as the thumbnail and geometry: drop the full-size pixels
            im.canonical = CanonicalImage(np.zeros((0, 0), np.float32), im.canonical.mask, im.canonical.boxes,
                                          im.canonical.frame, im.canonical.info)
        images += cut
        if note:
            notes.append(f"{study} {view}: {note}")
    return images, notes


# ---------------------------------------------------------------- features


def block_mean_features(patches: np.ndarray, cells: int = 8) -> np.ndarray:
    """Raw-pixel baseline: each patch as its `cells` x `cells` block means in [0, 1], scaled so the distance
    of two patches is their RMS block difference (the pixel_l2 of `train.metrics.pixel_scores`, blurred)."""
    x = np.asarray(patches, np.float32) / 65535.0
    out = np.stack([cv2.resize(p, (cells, cells), interpolation=cv2.INTER_AREA).ravel() for p in x]) if len(x) else \
        np.zeros((0, cells * cells), np.float32)
    return out / cells


def mean_intensity_features(patches: np.ndarray) -> np.ndarray:
    """Mean-intensity baseline: the patch mean in [0, 1] as a one-number feature."""
    return (np.asarray(patches, np.float64).reshape(len(patches), -1).mean(1, keepdims=True) / 65535.0).astype(np.float32)


PIXEL_FEATURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "raw-pixel": block_mean_features, "mean-intensity": mean_intensity_features}


def encoder_features(backbone, batch_size: int, device) -> Callable[[np.ndarray], np.ndarray]:
    """The encoder's features of uint16 patches, the backbone prepared once for the run's many forwards."""
    from train.embed import embed_patches, inference_backbone

    model = inference_backbone(backbone, device)

    def features(patches: np.ndarray) -> np.ndarray:
        if len(patches) == 0:
            return np.zeros((0, 0), np.float32)
        return embed_patches(model, patches, batch_size=batch_size, device=device)

    return features


# ---------------------------------------------------------------- scores


@dataclass
class ImageFeatures:
    ipsi: np.ndarray  # (N, F)
    pair: np.ndarray  # (N,) NaN without a registration


def image_features(im: ImagePatches, features: Callable[[np.ndarray], np.ndarray], min_tissue: float) -> ImageFeatures:
    """Features of an image's patches and the pair distance to their registered contralateral patches (both
    sets through the features in one call). No pair distance where the contralateral patch is less than
    `min_tissue` breast: a patch the registration sends off the other breast (past its chest wall or skin
    line) differs from its own for that reason alone."""
    n = len(im.ipsi)
    if im.contra is None:
        return ImageFeatures(features(im.ipsi), np.full(n, np.nan))
    f = features(np.concatenate([im.ipsi, im.contra]))
    pair = np.linalg.norm(f[:n] - f[n:], axis=1)
    return ImageFeatures(f[:n], np.where(im.contra_tissue >= min_tissue, pair, np.nan))


def knn_distance(query: np.ndarray, query_groups: np.ndarray, bank: np.ndarray, bank_groups: np.ndarray,
                 k: int, chunk: int = 2048) -> np.ndarray:
    """Mean Euclidean distance of each query row to its k nearest bank rows of *other* groups (studies): a
    study never counts as its own reference. NaN where the bank holds no other group."""
    query, bank = np.asarray(query, np.float64), np.asarray(bank, np.float64)
    query_groups, bank_groups = np.asarray(query_groups).astype(str), np.asarray(bank_groups).astype(str)
    out = np.full(len(query), np.nan)
    if len(bank) == 0:
        return out
    bank_sq = (bank ** 2).sum(1)
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk]
        d2 = np.maximum((q ** 2).sum(1)[:, None] + bank_sq[None] - 2 * q @ bank.T, 0.0)
        d2[query_groups[start : start + chunk, None] == bank_groups[None]] = np.inf
        kk = min(k, len(bank))
        nearest = np.sqrt(np.partition(d2, kk - 1, axis=1)[:, :kk])
        with np.errstate(invalid="ignore"):
            out[start : start + chunk] = np.where(np.isfinite(nearest).all(1), nearest.mean(1), np.nan)
    return out


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of the finite values (scale floored so a constant score stays finite)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return 0.0, 1.0
    median = float(np.median(v))
    return median, max(1.4826 * float(np.median(np.abs(v - median))), 1e-9)


def standardise(values: np.ndarray, location_scale: tuple[float, float]) -> np.ndarray:
    return (np.asarray(values, float) - location_scale[0]) / location_scale[1]


def standardise_by_bin(values: np.ndarray, key: np.ndarray, bank_values: np.ndarray, bank_key: np.ndarray,
                       bins: int) -> np.ndarray:
    """`values` standardised by the median and MAD of the bank values in the same quantile bin of `key` (the
    bank's quantiles; values beyond the bank's range use the end bins)."""
    bank_key, bank_values = np.asarray(bank_key, float), np.asarray(bank_values, float)
    edges = np.unique(np.quantile(bank_key, np.linspace(0, 1, bins + 1)[1:-1])) if bins > 1 and len(bank_key) else np.zeros(0)
    which, bank_which = np.searchsorted(edges, key, side="right"), np.searchsorted(edges, bank_key, side="right")
    out = np.full(len(values), np.nan)
    for b in range(len(edges) + 1):
        rows = which == b
        out[rows] = standardise(np.asarray(values, float)[rows], robust_location_scale(bank_values[bank_which == b]))
    return out


def combine(z_pair: np.ndarray, z_one_sided: np.ndarray, pair_weight: float) -> np.ndarray:
    """Weighted mean of the standardised scores; the one-sided score alone where there is no pair distance."""
    z_pair, z_one = np.asarray(z_pair, float), np.asarray(z_one_sided, float)
    return np.where(np.isfinite(z_pair), pair_weight * z_pair + (1 - pair_weight) * z_one, z_one)


# ---------------------------------------------------------------- breast, exam, marks


def breast_scores(positions: pd.DataFrame, column: str, k: int) -> pd.DataFrame:
    """Per (study, side): mean of the top-k candidate scores over its views; per study: the larger side."""
    cand = positions[positions["candidate"]]
    rows = []
    for study, group in positions.groupby("study_id", sort=True):
        mine = cand[cand["study_id"] == study]
        sides = {s: top_k_mean(mine.loc[mine["side"] == s, column].to_numpy(), k) for s in SIDES}
        rows.append({"study_id": study, "score_L": sides["L"], "score_R": sides["R"],
                     "score": np.nanmax([sides["L"], sides["R"], -np.inf])})
    return pd.DataFrame(rows, columns=["study_id", "score_L", "score_R", "score"])


def image_marks(positions: pd.DataFrame, column: str, radius_px: float, limit: int) -> pd.DataFrame:
    """The marks of every image: candidate peaks of `column` after non-maximum suppression, ranked from 0."""
    out = []
    for _, group in positions[positions["candidate"]].groupby("image_key", sort=True):
        keep = non_maximum_suppression(group[["cx", "cy"]].to_numpy(), group[column].to_numpy(), radius_px, limit)
        marks = group.iloc[keep].copy()
        marks["rank"] = np.arange(len(keep))
        marks["score"] = marks[column]
        out.append(marks)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=[*positions.columns, "rank", "score"])


# ---------------------------------------------------------------- the run


@dataclass
class MethodScores:
    features: Callable[[np.ndarray], np.ndarray]
    feats: list[np.ndarray] = field(default_factory=list)  # per scored image
    pair: list[np.ndarray] = field(default_factory=list)
    bank: list[np.ndarray] = field(default_factory=list)
    bank_pair: list[np.ndarray] = field(default_factory=list)
    bank_groups: list[np.ndarray] = field(default_factory=list)
    bank_edge: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Detection:
    """What a run computed: the dense positions (one row per grid position, a score column per method and
    variant), the images it covered (with thumbnails), and notes."""

    positions: pd.DataFrame
    images: list[ImagePatches]
    methods: list[str]
    notes: list[str]
    patch_px: int
    mm_per_px: float
    timing: dict
    bank: dict
    labelled: bool  # the archive carries labels (findings or BI-RADS) at all


def score_columns(methods: list[str]) -> list[str]:
    return [f"{m}:{v}" for m in methods for v in VARIANTS]


def detect(cfg: DetectConfig, backbone=None, encoder_meta: dict | None = None, encoder_name: str = "encoder",
           progress: Callable[[int, int], None] | None = None) -> Detection:
    """Score every selected study (see the module docstring). `backbone`: a loaded encoder (None: baselines
    only); its meta gives the canonical spacing and patch size unless the config sets them. `progress(done,
    total)` counts the studies cut, bank studies first."""
    meta = encoder_meta or {}
    mm_per_px = float(cfg.mm_per_px or meta.get("mm_per_px") or 0.1)
    patch_px = int(cfg.patch_px or meta.get("patch_px") or 256)
    prep_cfg = PrepConfig(mm_per_px=mm_per_px, patch_px=patch_px)
    stride_px = max(1, int(cfg.stride * patch_px))
    methods: dict[str, MethodScores] = {}
    if backbone is not None:
        methods[encoder_name] = MethodScores(encoder_features(backbone, cfg.batch_size, _device(cfg.device)))
    if cfg.baselines:
        methods.update({name: MethodScores(PIXEL_FEATURES[name]) for name in PIXEL_METHODS})

    records = get_adapter(cfg.dataset)(cfg.root).images()
    views, dropped = usable_views(records, cfg.assume_spacing_mm)
    notes = [f"left out: {d}" for d in dropped]
    usable = {study for study, _ in views}
    chosen = [s for s in selected_studies(records, cfg.manifest, cfg.where) if s in usable]
    if not chosen:
        raise DetectError("no_studies", f"no selected study has both breasts of a view usable in {cfg.root}")
    bank_ids = bank_studies(views, cfg.bank_split, cfg.bank_studies, set(chosen), cfg.seed) if cfg.bank_studies else []
    if cfg.bank_studies and not bank_ids:
        notes.append(f"no '{cfg.bank_split}' study outside the scored ones: the bank is the scored studies, "
                     "each left out of its own scoring")
    if not bank_ids and len(chosen) == 1:
        notes.append("one study scored and no bank study: the one-sided and combined scores need another study "
                     "to compare with and stay empty; the pair score stands alone")
    timing = {"cut_seconds": 0.0, "studies": 0}
    cut = {"done": 0, "total": len(bank_ids) + len(chosen)}

    def run_study(study: str) -> list[ImagePatches]:
        started = time.perf_counter()
        images, study_notes = cut_study(study, views, prep_cfg, stride_px, cfg.assume_spacing_mm)
        timing["cut_seconds"] += time.perf_counter() - started
        notes.extend(study_notes)
        cut["done"] += 1
        if progress is not None:
            progress(cut["done"], cut["total"])
        return images

    def embed(im: ImagePatches) -> dict[str, ImageFeatures]:
        out = {}
        for name, scores in methods.items():
            t = time.perf_counter()
            out[name] = image_features(im, scores.features, cfg.min_tissue)
            scores.seconds += time.perf_counter() - t
        return out

    for study in bank_ids:
        for im in run_study(study):
            for name, f in embed(im).items():
                scores = methods[name]
                scores.bank.append(f.ipsi)
                scores.bank_pair.append(f.pair)
                scores.bank_groups.append(np.full(len(f.ipsi), study))
                scores.bank_edge.append(im.edge_mm)
    images: list[ImagePatches] = []
    for study in chosen:
        timing["studies"] += 1
        for im in run_study(study):
            for name, f in embed(im).items():
                methods[name].feats.append(f.ipsi)
                methods[name].pair.append(f.pair)
            im.ipsi = im.contra = None  # pixels no longer needed
            images.append(im)
    if not images:
        raise DetectError("no_studies", "no selected study could be cut: " + "; ".join(notes[-5:]))

    positions = positions_table(images, patch_px, cfg.min_tissue)
    groups = positions["study_id"].to_numpy()
    bank_info = {"studies": len(bank_ids) or len(chosen), "source": cfg.bank_split if bank_ids else "scored studies"}
    for name, scores in methods.items():
        feats, pair = _stack(scores.feats), np.concatenate(scores.pair)
        edge = positions["edge_mm"].to_numpy()
        if bank_ids:
            bank, bank_pair, bank_groups = _stack(scores.bank), np.concatenate(scores.bank_pair), np.concatenate(scores.bank_groups)
            bank_edge = np.concatenate(scores.bank_edge)
        else:
            bank, bank_pair, bank_groups, bank_edge = feats, pair, groups, edge
        one_sided = knn_distance(feats, groups, bank, bank_groups, cfg.knn_k)
        bank_one_sided = knn_distance(bank, bank_groups, bank, bank_groups, cfg.knn_k)
        z_pair = standardise_by_bin(pair, edge, bank_pair, bank_edge, cfg.edge_bins)
        z_one = standardise_by_bin(one_sided, edge, bank_one_sided, bank_edge, cfg.edge_bins)
        positions[f"{name}:pair"] = z_pair
        positions[f"{name}:one-sided"] = z_one
        positions[f"{name}:combined"] = combine(z_pair, z_one, cfg.pair_weight)
        timing[f"{name}_feature_seconds"] = scores.seconds
        bank_info[f"{name}_positions"] = int(len(bank))
    labelled = any(r.findings or r.breast_birads for r in records)
    return Detection(positions, images, list(methods), notes, patch_px, mm_per_px, timing, bank_info, labelled)


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _device(device: str):
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def positions_table(images: list[ImagePatches], patch_px: int, min_tissue: float) -> pd.DataFrame:
    """One row per scored grid position (geometry only; the scores are added per method)."""
    frames = []
    for i, im in enumerate(images):
        xy_mm = im.to_original_mm(im.centres)
        frames.append(pd.DataFrame({
            "image_key": i, "study_id": im.study_id, "image_id": im.image_id, "side": im.side, "view": im.view,
            "split": im.split, "cx": im.centres[:, 0], "cy": im.centres[:, 1],
            "x_mm": xy_mm[:, 0], "y_mm": xy_mm[:, 1], "tissue": im.tissue, "edge_mm": im.edge_mm,
            "chest_wall_mm": im.chest_wall_mm, "contra_tissue": im.contra_tissue, "candidate": im.tissue >= min_tissue,
        }))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- evaluation (labels read here only)

EDGE_MM = 5.0  # a top mark whose patch reaches this close to the chest wall or the skin line is an edge mark


def finding_kinds(findings: list[dict]) -> set[str]:
    return {str(f.get("category") or "unspecified") for f in findings}


def exam_labels(images: list[ImagePatches]) -> pd.DataFrame:
    """Per study: any finding, the breasts holding one, and the finding kinds (from the scored images)."""
    rows = {}
    for im in images:
        row = rows.setdefault(im.study_id, {"study_id": im.study_id, "has_finding": False, "L": False, "R": False,
                                            "kinds": set()})
        if im.findings:
            row["has_finding"] = row[im.side] = True
            row["kinds"] |= finding_kinds(im.findings)
    table = pd.DataFrame(list(rows.values()))
    table["lesion_side"] = np.where(table["L"] & ~table["R"], "L", np.where(table["R"] & ~table["L"], "R",
                                    np.where(table["L"], "both", "")))
    table["kinds"] = table["kinds"].map(sorted)
    return table.drop(columns=["L", "R"]).sort_values("study_id").reset_index(drop=True)


def judged_images(images: list[ImagePatches]) -> np.ndarray:
    """Images whose marks can be judged: no finding, or every finding with a box (a finding given without a
    location labels its breast only, so a mark there is neither a hit nor a false mark)."""
    return np.array([all(f.get("xmin") is not None for f in im.findings) for im in images], bool)


def mark_hits(marks: pd.DataFrame, images: list[ImagePatches], radius_px: float) -> np.ndarray:
    """Per mark: hits one of its image's boxes (canonical px) or lies within `radius_px` of it."""
    from train.detect_metrics import hits

    out = np.zeros(len(marks), bool)
    for key, idx in marks.groupby("image_key").groups.items():
        boxes = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in images[key].canonical.boxes]).reshape(-1, 4)
        rows = marks.index.get_indexer(idx)
        out[rows] = hits(marks.loc[idx, ["cx", "cy"]].to_numpy(), boxes, radius_px).any(1)
    return out


def evaluate_method(det: Detection, column: str, cfg: DetectConfig, exams: pd.DataFrame, boot) -> tuple[dict, dict]:
    """Metrics of one score column and its tables (breast/exam scores, marks with hits, findings with scores)."""
    from train.detect_metrics import exam_auc, false_mark_scores, froc, hits, lateralisation, lesion_scores, localisation

    radius = det.patch_px / 2
    scores = breast_scores(det.positions, column, cfg.top_k).merge(exams, on="study_id")
    marks = image_marks(det.positions, column, radius, cfg.max_marks)
    judged = judged_images(det.images)
    marks["hit"] = pd.Series(mark_hits(marks, det.images, radius), index=marks.index, dtype=object)
    marks.loc[~judged[marks["image_key"].to_numpy().astype(int)], "hit"] = None
    top = marks[marks["rank"] == 0]
    half_patch_mm = radius * det.mm_per_px
    metrics = {"edge": {"top_marks": int(len(top)),
                        "near_chest_wall": int((top["chest_wall_mm"] - half_patch_mm < EDGE_MM).sum()),
                        "near_skin_line": int((top["edge_mm"] - half_patch_mm < EDGE_MM).sum())}}
    cand = det.positions[det.positions["candidate"]]
    if len(cand):  # the share a mark placed at random among the candidates would have
        metrics["edge"]["candidates_near_chest_wall"] = float((cand["chest_wall_mm"] - half_patch_mm < EDGE_MM).mean())
        metrics["edge"]["candidates_near_skin_line"] = float((cand["edge_mm"] - half_patch_mm < EDGE_MM).mean())
    lesions = []
    for key, im in enumerate(det.images):
        if not judged[key] or not im.canonical.boxes:
            continue
        mine = marks[marks["image_key"] == key]
        boxes = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in im.canonical.boxes])
        hit = hits(mine[["cx", "cy"]].to_numpy(), boxes, radius)
        best = lesion_scores(mine["score"].to_numpy(), hit)
        top_hit = hit[mine["rank"].to_numpy() == 0].any(0) if len(mine) else np.zeros(len(boxes), bool)
        for b, s, t in zip(im.canonical.boxes, best, top_hit):
            lesions.append({"study_id": im.study_id, "image_id": im.image_id, "kind": str(b.get("category")),
                            "lesion_score": float(s), "top_mark_hit": bool(t)})
    lesions = pd.DataFrame(lesions, columns=["study_id", "image_id", "kind", "lesion_score", "top_mark_hit"])
    image_study = np.array([im.study_id for im, j in zip(det.images, judged) if j])
    false = marks[marks["hit"].map(lambda h: h is False).to_numpy(bool)]  # None: not judged (an array: rows, even none)
    if det.labelled:
        kinds = sorted({k for ks in exams["kinds"] for k in ks})
        metrics["exam"] = exam_auc(scores["has_finding"].to_numpy(), scores["score"].to_numpy(),
                                   scores["study_id"].to_numpy(), boot)
        one_side = scores[scores["lesion_side"].isin(SIDES)]
        metrics["lateralisation"] = lateralisation(
            (one_side["lesion_side"] == "L").to_numpy(), one_side["score_L"].to_numpy(), one_side["score_R"].to_numpy(),
            one_side["study_id"].to_numpy(), boot)
        metrics["localisation"] = localisation(lesions["top_mark_hit"].to_numpy(), lesions["study_id"].to_numpy(), boot)
        metrics["froc"] = froc(lesions["lesion_score"].to_numpy(), lesions["study_id"].to_numpy(),
                               false["score"].to_numpy(), false["study_id"].to_numpy(), image_study, boot)
        per_kind = {}
        for kind in kinds:
            has = scores["kinds"].map(lambda ks, k=kind: k in ks)
            rows = has | ~scores["has_finding"]
            lk = lesions["kind"] == kind
            sub = scores[has & scores["lesion_side"].isin(SIDES)]
            per_kind[kind] = {
                "exam": exam_auc(has[rows].to_numpy(), scores.loc[rows, "score"].to_numpy(),
                                 scores.loc[rows, "study_id"].to_numpy(), boot),
                "lateralisation": lateralisation((sub["lesion_side"] == "L").to_numpy(), sub["score_L"].to_numpy(),
                                                 sub["score_R"].to_numpy(), sub["study_id"].to_numpy(), boot),
                "localisation": localisation(lesions.loc[lk, "top_mark_hit"].to_numpy(),
                                             lesions.loc[lk, "study_id"].to_numpy(), boot),
                "froc": froc(lesions.loc[lk, "lesion_score"].to_numpy(), lesions.loc[lk, "study_id"].to_numpy(),
                             false["score"].to_numpy(), false["study_id"].to_numpy(), image_study, boot),
            }
        metrics["per_kind"] = per_kind
    tables = {"exams": scores, "marks": marks, "lesions": lesions,
              "froc_inputs": {"lesion_score": lesions["lesion_score"].to_numpy(), "fp_score": false["score"].to_numpy(),
                              "n_images": int(judged.sum())}}
    return metrics, tables
