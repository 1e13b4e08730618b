"""Resampling between pixel grids and the coordinate maps that go with it.

Convention: pixel (i, j) covers [j, j+1) x [i, i+1); a *point* is a pixel centre and maps as
``x_new = (x_old + 0.5) * sx - 0.5`` (what cv2.resize does); a *box edge* maps as ``x_new = x_old * sx``.
`scale_xy` = (sx, sy) = new pixels per old pixel along x (columns) and y (rows).
"""

from __future__ import annotations

import numpy as np

from prep.opencv import cv2


def _resize(img: np.ndarray, size_wh: tuple[int, int], interpolation: int | None) -> np.ndarray:
    width, height = size_wh
    if img.dtype == bool:
        # Masks: nearest with pixel-centre alignment (INTER_NEAREST is off by half a pixel).
        small = cv2.resize(img.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        return small.astype(bool)
    if interpolation is None:
        # area averaging only where linear interpolation would skip input pixels (shrinking below one half);
        # between 1/2 and 1 every input pixel already weighs in, and linear is the cheaper of the two
        heavy_shrink = width < 0.5 * img.shape[1] or height < 0.5 * img.shape[0]
        interpolation = cv2.INTER_AREA if heavy_shrink else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interpolation)


def resize_to_shape(
    img: np.ndarray, shape_hw: tuple[int, int], interpolation: int | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize to exactly `shape_hw` (rows, cols); returns (image, scale_xy).

    Default interpolation: INTER_AREA when shrinking below one half on either axis, INTER_LINEAR otherwise; bool
    masks always use centre-aligned nearest and stay bool.
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"target shape must be positive, got {shape_hw}")
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {img.shape}")
    scale_xy = (width / img.shape[1], height / img.shape[0])
    if (height, width) == img.shape:
        return img, scale_xy
    return _resize(img, (width, height), interpolation), scale_xy


def resample_to_spacing(
    img: np.ndarray,
    spacing_mm: tuple[float, float],
    target_mm_per_px: float,
    interpolation: int | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample an image with (row, col) `spacing_mm` to isotropic `target_mm_per_px`.

    Returns (image, scale_xy); the output size is rounded to whole pixels and `scale_xy` is the exact
    ratio of the sizes, so `map_points` stays consistent with the pixels.
    """
    row_mm, col_mm = (float(v) for v in spacing_mm)
    if not (row_mm > 0 and col_mm > 0 and target_mm_per_px > 0):
        raise ValueError(f"spacings must be positive, got {spacing_mm} -> {target_mm_per_px}")
    height = max(1, round(img.shape[0] * row_mm / target_mm_per_px))
    width = max(1, round(img.shape[1] * col_mm / target_mm_per_px))
    return resize_to_shape(img, (height, width), interpolation)


def map_points(points: np.ndarray, scale_xy: tuple[float, float]) -> np.ndarray:
    """(N, 2) pixel-centre points (x, y) in the old grid -> the resampled grid."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts + 0.5) * np.asarray(scale_xy, dtype=np.float64) - 0.5


def points_affine(scale_xy: tuple[float, float]) -> np.ndarray:
    """`map_points` (old grid -> resampled grid) written as a (2, 3) affine."""
    sx, sy = (float(v) for v in scale_xy)
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def unmap_points(points: np.ndarray, scale_xy: tuple[float, float]) -> np.ndarray:
    """Inverse of `map_points`: resampled-grid points back to the original (e.g. DICOM) pixels."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts + 0.5) / np.asarray(scale_xy, dtype=np.float64) - 0.5


def map_boxes(boxes: np.ndarray, scale_xy: tuple[float, float]) -> np.ndarray:
    """(N, 4) boxes (xmin, ymin, xmax, ymax), edges in pixel units, old grid -> resampled grid."""
    bxs = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = scale_xy
    return bxs * np.array([sx, sy, sx, sy])


def unmap_boxes(boxes: np.ndarray, scale_xy: tuple[float, float]) -> np.ndarray:
    """Inverse of `map_boxes`."""
    sx, sy = scale_xy
    return map_boxes(boxes, (1.0 / sx, 1.0 / sy))
