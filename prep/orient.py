"""Chest-wall side from image evidence, cross-check with the laterality tag, canonical flips.

Canonical frame: chest wall on the left (x = 0), nipple pointing right. The side is decided from
the breast mask, never from the tag alone; a disagreement is flagged, not silently resolved.
Boxes use pixel-edge coordinates (xmin' = W - xmax); points use pixel centres (x' = W - 1 - x).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("left", "right")
# Edge band (fraction of the width) in which the breast counts as touching that edge.
EDGE_BAND_FRACTION = 0.02
# Contact must differ by this fraction of the breast's height to decide; otherwise mass decides.
CONTACT_MARGIN = 0.2

FLAGS = ("ok", "image_vs_tag_disagree", "no_laterality_tag")


@dataclass(frozen=True)
class OrientationCheck:
    """`side`: chest-wall side seen in the image; `expected`: from the tag (None if unknown);
    `agrees`: None when there is no tag to compare with."""

    side: str
    expected: str | None
    agrees: bool | None
    flag: str


def chest_wall_side(mask: np.ndarray) -> str:
    """"left" or "right": the edge the breast touches along most of its height; when contact does not
    decide (e.g. both or neither edge), the half holding more breast. Raises ValueError on an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("chest_wall_side needs a non-empty 2-D breast mask")
    rows_with_breast = int(np.count_nonzero(mask.any(axis=1)))
    band = max(1, int(round(mask.shape[1] * EDGE_BAND_FRACTION)))
    left_contact = int(np.count_nonzero(mask[:, :band].any(axis=1)))
    right_contact = int(np.count_nonzero(mask[:, -band:].any(axis=1)))
    if abs(left_contact - right_contact) > CONTACT_MARGIN * rows_with_breast:
        return "left" if left_contact > right_contact else "right"
    half = mask.shape[1] // 2
    left_mass = np.count_nonzero(mask[:, :half])
    right_mass = np.count_nonzero(mask[:, mask.shape[1] - half :])
    return "left" if left_mass >= right_mass else "right"


def stored_chest_wall_side(laterality: str) -> str:
    """Where the chest wall sits in a VinDr-style stored image: L -> "left", R -> "right"."""
    value = str(laterality).strip().upper()
    if value == "L":
        return "left"
    if value == "R":
        return "right"
    raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")


def check_orientation(mask: np.ndarray, laterality: str | None) -> OrientationCheck:
    """Image-derived side plus the tag's expectation; flag "ok", "image_vs_tag_disagree" or
    "no_laterality_tag"."""
    side = chest_wall_side(mask)
    try:
        expected = stored_chest_wall_side(laterality) if laterality is not None else None
    except ValueError:
        expected = None
    if expected is None:
        return OrientationCheck(side, None, None, "no_laterality_tag")
    agrees = side == expected
    return OrientationCheck(side, expected, agrees, "ok" if agrees else "image_vs_tag_disagree")


def _check_side(side: str) -> bool:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side == "right"


def to_canonical(arr: np.ndarray, side: str) -> np.ndarray:
    """Mirror an image or mask (HxW or HxWxC) so the chest wall is on the left; contiguous result."""
    if _check_side(side):
        return np.ascontiguousarray(arr[:, ::-1])
    return arr


def from_canonical(arr: np.ndarray, side: str) -> np.ndarray:
    """Inverse of `to_canonical` (a mirror is its own inverse)."""
    return to_canonical(arr, side)


def boxes_to_canonical(boxes: np.ndarray, width: int, side: str) -> np.ndarray:
    """(N, 4) boxes (xmin, ymin, xmax, ymax) in pixel-edge units -> canonical frame."""
    bxs = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    if _check_side(side):
        bxs[:, [0, 2]] = width - bxs[:, [2, 0]]
    return bxs


def boxes_from_canonical(boxes: np.ndarray, width: int, side: str) -> np.ndarray:
    return boxes_to_canonical(boxes, width, side)


def points_to_canonical(points: np.ndarray, width: int, side: str) -> np.ndarray:
    """(N, 2) pixel-centre points (x, y) -> canonical frame."""
    pts = np.array(points, dtype=np.float64).reshape(-1, 2)
    if _check_side(side):
        pts[:, 0] = width - 1 - pts[:, 0]
    return pts


def canonical_affine(width: int, side: str) -> np.ndarray:
    """`points_to_canonical` as a (2, 3) affine; a mirror, so it is also the map back."""
    if _check_side(side):
        return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])
    return np.eye(3)[:2].copy()


def points_from_canonical(points: np.ndarray, width: int, side: str) -> np.ndarray:
    return points_to_canonical(points, width, side)
