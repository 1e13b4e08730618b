"""Breast segmentation on a normalised ("bright = dense", background ~0) mammogram.

Classic public recipe (data.md sections 2 and 7.4): work at ~0.8 mm/px, clip the brightest tail so
saturated labels or implants do not drag the threshold, blur, Otsu, opening, keep the largest
connected component (which drops disconnected labels and markers), fill holes, grow it by
hysteresis over the faint skin rim (compressed thickness falls to zero there, so Otsu alone cuts
a few mm inside the skin line), and bring the mask back to full resolution with a smooth edge. Bad input never raises: it returns ok=False and a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from prep.geometry import resample_to_spacing, resize_to_shape

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
    """`mask`: bool, same shape as the input. `reason` is None when ok. `method`: one of METHODS."""

    mask: np.ndarray
    ok: bool
    reason: str | None
    method: str


def _odd(px: float) -> int:
    return max(3, int(round(px)) | 1)


def _largest_component(binary: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(binary)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def _candidate(smooth: np.ndarray, threshold: float, open_kernel: np.ndarray) -> np.ndarray:
    binary = (smooth > threshold).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, open_kernel)
    return ndimage.binary_fill_holes(_largest_component(binary.astype(bool)))


def _grow_to_skin(component: np.ndarray, smooth: np.ndarray, threshold: float, open_kernel: np.ndarray) -> np.ndarray:
    """Extend the component over the faint rim where compressed thickness falls to the skin line:
    hysteresis down to a level just above the background, keeping only what touches the component."""
    background = float(np.median(smooth[~component])) if (~component).any() else float(smooth.min())
    low = background + RIM_LEVEL * (threshold - background)
    rim = cv2.morphologyEx((smooth > low).astype(np.uint8), cv2.MORPH_OPEN, open_kernel).astype(bool)
    count, labels = cv2.connectedComponents(rim.view(np.uint8), connectivity=8)
    keep = np.unique(labels[component & rim])
    grown = np.isin(labels, keep[keep > 0]) | component
    return ndimage.binary_fill_holes(grown)


def _problem(component: np.ndarray) -> str | None:
    """Why a candidate component is not a plausible breast, or None if it is."""
    if component.mean() < MIN_AREA_FRACTION:
        return "no_breast_found"
    if component[:, 0].any() and component[:, -1].any():
        # A breast touches the chest-wall edge only; touching both means the background leaked in.
        return "background_not_separated"
    return None


def segment_breast(img: np.ndarray, mm_per_px: float, *, work_mm_per_px: float = 0.8) -> Segmentation:
    """Segment the breast in a float image (any range; "bright = dense") at isotropic `mm_per_px`."""
    img = np.asarray(img)
    if img.ndim != 2 or img.size == 0 or min(img.shape) < 2:
        return Segmentation(np.zeros(img.shape if img.ndim == 2 else (0, 0), bool), False, "empty_image", "none")
    empty = np.zeros(img.shape, dtype=bool)
    if not np.isfinite(img).all():
        return Segmentation(empty, False, "nan_pixels", "none")

    work = img.astype(np.float32, copy=False)
    if work_mm_per_px > mm_per_px:
        work, _ = resample_to_spacing(work, (mm_per_px, mm_per_px), work_mm_per_px)
    work_px = max(mm_per_px, work_mm_per_px)
    if min(work.shape) < MIN_WORK_PX:
        return Segmentation(empty, False, "empty_image", "none")

    low, high = np.percentile(work, (1.0, CLIP_PERCENTILE))
    if not high > low:
        reason = "constant_image" if work.max() == work.min() else "no_breast_found"
        return Segmentation(empty, False, reason, "none")
    clipped = np.minimum(work, np.float32(high))
    blur_px = _odd(BLUR_MM / work_px)
    smooth = cv2.GaussianBlur(clipped, (blur_px, blur_px), 0)
    open_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(OPEN_MM / work_px),) * 2)

    if not smooth.max() > smooth.min():  # e.g. a work image of a few pixels, blurred flat
        return Segmentation(empty, False, "no_breast_found", "none")
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
        return Segmentation(empty, False, reason, "none")
    grown = _grow_to_skin(component, smooth, threshold, open_kernel)
    if _problem(grown) is None:
        component = grown

    # Smooth edge: blur the low-res mask, upsample linearly, threshold at one half.
    edge_px = _odd(EDGE_SMOOTH_MM / work_px)
    soft = cv2.GaussianBlur(component.astype(np.float32), (edge_px, edge_px), 0)
    full, _ = resize_to_shape(soft, img.shape, cv2.INTER_LINEAR)
    return Segmentation(full > 0.5, True, None, method)


def breast_area_mm2(mask: np.ndarray, mm_per_px: float) -> float:
    """Breast area in mm^2 of a mask at isotropic `mm_per_px`."""
    return float(np.count_nonzero(mask)) * float(mm_per_px) ** 2
