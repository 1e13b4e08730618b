"""Breast segmentation on a normalised ("bright = dense", background ~0) mammogram.

Classic public recipe (data.md sections 2 and 7.4): work at ~0.8 mm/px, clip the brightest tail so
saturated labels or implants do not drag the threshold, blur, Otsu, opening, keep the largest
connected component (which drops disconnected labels and markers), fill holes, grow it by
hysteresis over the faint skin rim (compressed thickness falls to zero there, so Otsu alone cuts
a few mm inside the skin line), and bring the mask back to full resolution with a smooth edge. Bad input never raises: it returns ok=False and a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu

from prep.geometry import points_affine, resample_to_spacing
from prep.opencv import cv2

CLIP_PERCENTILE = 99.0
BLUR_MM = 4.0
OPEN_MM = 6.0  # wider than a blurred collimator band (~1.5 mm) so it cannot bridge the background
EDGE_SMOOTH_MM = 1.6
MIN_AREA_FRACTION = 0.02
MIN_WORK_PX = 8  # below this at work resolution there is no image to segment
# Fallback: a low global threshold at this fraction of the (background .. bright tissue) range.
FALLBACK_LEVEL = 0.05
# Rim growth: hysteresis floor at this fraction of the way from background to the main threshold.
RIM_LEVEL = 0.15

METHODS = ("otsu", "low_threshold", "none")
REASONS = ("empty_image", "nan_pixels", "constant_image", "no_breast_found", "background_not_separated")


@dataclass(frozen=True)
class Segmentation:
    """`mask`: bool, same shape as the input. `reason` is None when ok. `method`: one of METHODS.

    When ok, also the work grid it was found on (`work` image, `soft` mask with a smoothed edge, `to_work`: input
    px -> work px), which registration reuses (`prep.register.grid_from_small`)."""

    mask: np.ndarray
    ok: bool
    reason: str | None
    method: str
    work: np.ndarray | None = None
    soft: np.ndarray | None = None
    to_work: np.ndarray | None = None


def _odd(px: float) -> int:
    return max(3, int(round(px)) | 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Bool mask with every background region that does not reach the border filled (4-connected background,
    as scipy's binary_fill_holes): one cv2.floodFill from a padded corner, much cheaper than a labelling."""
    background = np.pad(~np.asarray(mask, bool), 1, constant_values=True).astype(np.uint8)
    cv2.floodFill(background, None, (0, 0), 2, flags=4)
    return background[1:-1, 1:-1] != 2


def _largest_component(binary: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(binary)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def _candidate(smooth: np.ndarray, threshold: float, open_kernel: np.ndarray) -> np.ndarray:
    binary = (smooth > threshold).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, open_kernel)
    return fill_holes(_largest_component(binary.astype(bool)))


def _grow_to_skin(component: np.ndarray, smooth: np.ndarray, threshold: float, open_kernel: np.ndarray) -> np.ndarray:
    """Extend the component over the faint rim where compressed thickness falls to the skin line:
    hysteresis down to a level just above the background, keeping only what touches the component."""
    background = float(np.median(smooth[~component])) if (~component).any() else float(smooth.min())
    low = background + RIM_LEVEL * (threshold - background)
    rim = cv2.morphologyEx((smooth > low).astype(np.uint8), cv2.MORPH_OPEN, open_kernel).astype(bool)
    count, labels = cv2.connectedComponents(rim.view(np.uint8), connectivity=8)
    keep = np.unique(labels[component & rim])
    grown = np.isin(labels, keep[keep > 0]) | component
    return fill_holes(grown)


def _problem(component: np.ndarray) -> str | None:
    """Why a candidate component is not a plausible breast, or None if it is."""
    if component.mean() < MIN_AREA_FRACTION:
        return "no_breast_found"
    if component[:, 0].any() and component[:, -1].any():
        # A breast touches the chest-wall edge only; touching both means the background leaked in.
        return "background_not_separated"
    return None


@dataclass(frozen=True)
class WorkSegmentation:
    """`segment_at_work_resolution` output: `soft` is the mask with a smoothed edge (float32 in [0, 1], > 0.5
    inside) at the work grid, or None with `reason` set."""

    soft: np.ndarray | None
    reason: str | None
    method: str


def segment_at_work_resolution(work: np.ndarray, work_mm_per_px: float) -> WorkSegmentation:
    """Segment a finite float image already at the (coarse, ~0.8 mm/px) work resolution; never raises."""
    if min(work.shape) < MIN_WORK_PX:
        return WorkSegmentation(None, "empty_image", "none")
    low, high = np.percentile(work, (1.0, CLIP_PERCENTILE))
    if not high > low:
        reason = "constant_image" if work.max() == work.min() else "no_breast_found"
        return WorkSegmentation(None, reason, "none")
    clipped = np.minimum(work, np.float32(high))
    blur_px = _odd(BLUR_MM / work_mm_per_px)
    smooth = cv2.GaussianBlur(clipped, (blur_px, blur_px), 0)
    open_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(OPEN_MM / work_mm_per_px),) * 2)

    if not smooth.max() > smooth.min():  # e.g. a work image of a few pixels, blurred flat
        return WorkSegmentation(None, "no_breast_found", "none")
    threshold = float(threshold_otsu(smooth))
    component = _candidate(smooth, threshold, open_kernel)
    method = "otsu"
    reason = _problem(component)
    if reason is not None:
        threshold = float(low + FALLBACK_LEVEL * (high - low))
        fallback = _candidate(smooth, threshold, open_kernel)
        if _problem(fallback) is None:
            component, method, reason = fallback, "low_threshold", None
    if reason is not None:
        return WorkSegmentation(None, reason, "none")
    grown = _grow_to_skin(component, smooth, threshold, open_kernel)
    if _problem(grown) is None:
        component = grown
    # smooth edge: blurred here, thresholded at one half after any upsampling
    edge_px = _odd(EDGE_SMOOTH_MM / work_mm_per_px)
    return WorkSegmentation(cv2.GaussianBlur(component.astype(np.float32), (edge_px, edge_px), 0), None, method)


def work_image(img: np.ndarray, mm_per_px: float, work_mm_per_px: float = 0.8) -> tuple[np.ndarray, float, np.ndarray]:
    """(float32 image at max(mm_per_px, work_mm_per_px), that spacing, (2, 3) map from `img` px to its px):
    what segmentation (and registration) work on.

    A whole factor k (0.1 -> 0.8 mm/px) drops the last partial block of rows and columns (< k px, under a mm)
    so INTER_AREA takes its integer block-mean path, much cheaper than its general one.
    """
    img = np.asarray(img).astype(np.float32, copy=False)
    if work_mm_per_px <= mm_per_px:
        return img, mm_per_px, np.eye(3)[:2].copy()
    ratio = work_mm_per_px / mm_per_px
    k = int(round(ratio))
    h, w = img.shape
    if abs(ratio - k) < 1e-9 and h >= k and w >= k:
        work = cv2.resize(img[: h - h % k, : w - w % k], (w // k, h // k), interpolation=cv2.INTER_AREA)
        return work, work_mm_per_px, points_affine((1.0 / k, 1.0 / k))
    work, scale_xy = resample_to_spacing(img, (mm_per_px, mm_per_px), work_mm_per_px)
    return work, work_mm_per_px, points_affine(scale_xy)


def upsample_mask(soft: np.ndarray, shape: tuple[int, int], to_work: np.ndarray) -> np.ndarray:
    """Bool mask at `shape` from a work-grid soft mask (`to_work`: full px -> work px, a pure scale): linear
    upsampling, threshold at one half; rows and columns beyond the work grid's extent repeat its edge."""
    scale_x, scale_y = float(to_work[0, 0]), float(to_work[1, 1])
    covered_h = min(int(shape[0]), round(soft.shape[0] / scale_y))
    covered_w = min(int(shape[1]), round(soft.shape[1] / scale_x))
    full = cv2.resize(np.asarray(soft, np.float32), (covered_w, covered_h), interpolation=cv2.INTER_LINEAR) > 0.5
    if (covered_h, covered_w) == tuple(shape):
        return full
    return np.pad(full, ((0, shape[0] - covered_h), (0, shape[1] - covered_w)), mode="edge")


def segment_breast(img: np.ndarray, mm_per_px: float, *, work_mm_per_px: float = 0.8) -> Segmentation:
    """Segment the breast in a float image (any range; "bright = dense") at isotropic `mm_per_px`."""
    img = np.asarray(img)
    if img.ndim != 2 or img.size == 0 or min(img.shape) < 2:
        return Segmentation(np.zeros(img.shape if img.ndim == 2 else (0, 0), bool), False, "empty_image", "none")
    if not np.isfinite(img).all():
        return Segmentation(np.zeros(img.shape, bool), False, "nan_pixels", "none")
    work, work_px, to_work = work_image(img, mm_per_px, work_mm_per_px)
    seg = segment_at_work_resolution(work, work_px)
    if seg.soft is None:
        return Segmentation(np.zeros(img.shape, bool), False, seg.reason, "none")
    return Segmentation(upsample_mask(seg.soft, img.shape, to_work), True, None, seg.method, work, seg.soft, to_work)


def breast_area_mm2(mask: np.ndarray, mm_per_px: float) -> float:
    """Breast area in mm^2 of a mask at isotropic `mm_per_px`."""
    return float(np.count_nonzero(mask)) * float(mm_per_px) ** 2
