"""Patch-pair sampling in the canonical frame: pure functions over NumPy arrays.

A patch is the square of `patch_px` canonical pixels whose top-left pixel is (x0, y0); its centre is
(x0 + (P - 1) / 2, y0 + (P - 1) / 2) in pixel-centre coordinates. The ipsi patch is a slice of the
ipsi image; the contra patch is the same pixel grid sent through the ipsi -> contra affine and
resampled from the contra image (only the patch grid is warped, never the whole image). With the deformable
stage's displacement (`prep.deform`), each patch uses the affine that agrees with the full transform at its
centre (`prep.deform.local_affine`), and its contra centre is the full transform of its centre.

Boxes are dicts with category, birads, xmin, ymin, xmax, ymax in canonical pixels (edges, so a
box [xmin, xmax] covers pixel centres xmin + 0.5 ... xmax - 0.5).

Label rule: a patch is abnormal for a box when the intersection covers >= `cfg.abnormal_overlap`
of the box (a small lesion fully inside) OR of the patch (a large lesion filling it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prep.config import PrepConfig
from prep.deform import Displacement, local_affine, transform_points
from prep.opencv import cv2, exact_distance
from prep.register import apply_affine, compose_affines

UINT16_MAX = 65535


@dataclass
class SampledPatch:
    """One sampled patch pair before ids are attached (see `prep.pairs.PatchSample`)."""

    ipsi: np.ndarray  # uint16 (P, P)
    contra: np.ndarray  # uint16 (P, P)
    ipsi_centre: tuple[float, float]  # canonical px
    contra_centre: tuple[float, float]  # canonical px
    tissue_frac_ipsi: float
    tissue_frac_contra: float
    ipsi_abnormal: bool
    contra_abnormal: bool
    lesion_overlap: float  # largest fraction of any ipsi box inside the patch (0 = none)
    finding_categories: list[str]
    finding_birads: list[str]
    sampling: str  # "grid" | "finding"


def to_uint16(patch: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 as round(x * 65535), clipped."""
    return np.round(np.clip(patch, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def top_left(centres: np.ndarray, patch_px: int) -> np.ndarray:
    """Integer top-left pixel of the patch nearest to each (x, y) centre."""
    return np.round(np.asarray(centres, np.float64).reshape(-1, 2) - (patch_px - 1) / 2).astype(np.int64)


def snapped_centres(corners: np.ndarray, patch_px: int) -> np.ndarray:
    """Exact centres of patches with these integer top-left pixels."""
    return np.asarray(corners, np.float64) + (patch_px - 1) / 2


def crop(image: np.ndarray, x0: int, y0: int, patch_px: int) -> np.ndarray:
    """Slice a patch_px square at top-left (x0, y0); pixels outside the canvas are 0."""
    out = np.zeros((patch_px, patch_px), dtype=image.dtype)
    h, w = image.shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + patch_px, w), min(y0 + patch_px, h)
    if xa < xb and ya < yb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
    return out


def patch_grid_affine(affine: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """(2, 3) map from patch pixel (u, v) to contra canonical px: ipsi px (x0 + u, y0 + v) through `affine`."""
    shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])
    return compose_affines(shift, affine)


def warp_patch(image: np.ndarray, affine: np.ndarray, x0: int, y0: int, patch_px: int, nearest: bool = False):
    """Contra patch: resample `image` on the ipsi patch grid mapped through `affine` (patch-sized output)."""
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
        image, patch_grid_affine(affine, x0, y0), (patch_px, patch_px), flags=flags,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def registered_patch(image: np.ndarray, affine: np.ndarray, displacement: Displacement | None, x0: int, y0: int,
                     patch_px: int, nearest: bool = False) -> np.ndarray:
    """Contra patch of the ipsi patch at (x0, y0) through the whole registration: `warp_patch` with the affine
    moved to agree with T(x) = A(x + d(x)) at the patch centre (`prep.deform.local_affine`; the affine alone when
    the deformable stage gave no displacement)."""
    local = local_affine(affine, displacement, snapped_centres(np.array([[x0, y0]]), patch_px)[0])
    return warp_patch(image, local, x0, y0, patch_px, nearest=nearest)


def eroded_mask(mask_u8: np.ndarray, erosion_px: float) -> tuple[np.ndarray, int]:
    """(inside, k): uint8 flags of every k-th pixel (rows and columns from k // 2) farther than ~`erosion_px`
    from the background.

    A Euclidean distance threshold, which is linear in the pixels (a large-kernel erode is not), on a grid k
    times coarser with k keeping >= 8 px of erosion. The margin is exact to within k pixels, which is all a
    "keep off the skin line" rule needs.
    """
    k = max(1, int(erosion_px // 8))
    coarse = np.ascontiguousarray(mask_u8[k // 2 :: k, k // 2 :: k])
    if erosion_px <= 0:
        return coarse, k
    # +1 coarse px so the result lies inside a discrete elliptical erode of the same radius
    dist = exact_distance(coarse)
    return (dist > erosion_px / k + 1).astype(np.uint8), k


def grid_candidates(mask: np.ndarray, erosion_px: int, n_target: int, rng: np.random.Generator) -> np.ndarray:
    """Jittered grid centres (x, y) inside `mask` eroded by `erosion_px`, about 4 * n_target of them.

    Oversampled so the tissue threshold can reject some and the final pick still spans the breast.
    """
    inside, k = eroded_mask(np.asarray(mask, np.uint8), erosion_px)
    area = int(inside.sum()) * k * k
    if area == 0 or n_target <= 0:
        return np.zeros((0, 2))
    step = max(np.sqrt(area / (4.0 * n_target)), 1.0)
    h, w = np.shape(mask)
    off_x, off_y = rng.uniform(0, step, size=2)
    gx, gy = np.meshgrid(np.arange(off_x, w, step), np.arange(off_y, h, step))
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    pts += rng.uniform(-0.25 * step, 0.25 * step, size=pts.shape)
    pts[:, 0] = np.clip(pts[:, 0], 0, w - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, h - 1)
    rows = np.clip(np.round((pts[:, 1] - k // 2) / k).astype(int), 0, inside.shape[0] - 1)
    cols = np.clip(np.round((pts[:, 0] - k // 2) / k).astype(int), 0, inside.shape[1] - 1)
    return pts[inside[rows, cols] > 0]


def finding_candidates(
    boxes: list[dict], patch_px: int, n_per_box: int, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Centres jittered around each box so the whole box stays inside the patch.

    A box larger than the patch gets centres inside it (the patch lies within the lesion).
    """
    h, w = shape
    out = []
    for box in boxes:
        xmin, ymin = max(float(box["xmin"]), 0.0), max(float(box["ymin"]), 0.0)
        xmax, ymax = min(float(box["xmax"]), float(w)), min(float(box["ymax"]), float(h))
        if xmax <= xmin or ymax <= ymin:
            continue
        # the patch spans [c - P/2, c + P/2]: keep [lo, hi] inside it (or it inside [lo, hi]), with
        # 1 px to spare for snapping the centre to the pixel grid
        ranges = []
        for lo, hi in ((xmin, xmax), (ymin, ymax)):
            a, b = sorted((hi - patch_px / 2, lo + patch_px / 2))
            ranges.append((a + 1, b - 1) if b - a > 2 else ((a + b) / 2,) * 2)
        for _ in range(n_per_box):
            out.append([rng.uniform(*ranges[0]), rng.uniform(*ranges[1])])
    return np.asarray(out, np.float64).reshape(-1, 2)


def _box_polygon(box: dict) -> np.ndarray:
    x0, y0, x1, y1 = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def patch_footprint(affine: np.ndarray | None, x0: int, y0: int, patch_px: int) -> np.ndarray:
    """Corners (edges, not centres) of the patch in ipsi px, or in contra px when `affine` is given."""
    lo, hi = -0.5, patch_px - 0.5
    corners = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]]) + [x0, y0]
    if affine is not None:
        corners = apply_affine(corners, affine)
    return corners.astype(np.float32)


def box_overlaps(footprint: np.ndarray, boxes: list[dict]) -> list[tuple[dict, float, float]]:
    """Boxes meeting this footprint polygon: (box, fraction of the box inside, fraction of the footprint covered)."""
    out = []
    footprint_area = abs(cv2.contourArea(footprint))
    for box in boxes:
        poly = _box_polygon(box)
        box_area = abs(cv2.contourArea(poly))
        if box_area <= 0 or footprint_area <= 0:
            continue
        inter, _ = cv2.intersectConvexConvex(footprint, poly)
        if inter > 0:
            out.append((box, inter / box_area, inter / footprint_area))
    return out


def abnormal_hits(overlaps: list[tuple[dict, float, float]], min_fraction: float) -> list[dict]:
    """The boxes that make the patch abnormal under the module's label rule."""
    return [box for box, of_box, of_patch in overlaps if max(of_box, of_patch) >= min_fraction]


def sample_patch_pairs(
    ipsi_img: np.ndarray,
    ipsi_mask: np.ndarray,
    contra_img: np.ndarray,
    contra_mask: np.ndarray,
    affine: np.ndarray,
    ipsi_boxes: list[dict],
    contra_boxes: list[dict],
    cfg: PrepConfig,
    rng: np.random.Generator,
    displacement: Displacement | None = None,
) -> list[SampledPatch]:
    """Grid samples (label-agnostic, tissue >= threshold on both sides) then finding samples.

    Images float [0, 1] canonical at cfg.mm_per_px; `affine` maps ipsi px -> contra px, after `displacement`
    when the deformable stage gave one (`prep.deform.transform_points`).
    Finding samples skip the tissue threshold (a lesion by the skin line must still be sampled);
    their tissue fractions are recorded so evaluation can filter.
    """
    P = cfg.patch_px
    ipsi_f = np.asarray(ipsi_img, np.float32)
    contra_f = np.asarray(contra_img, np.float32)
    ipsi_m = np.asarray(ipsi_mask, np.uint8)
    contra_m = np.asarray(contra_mask, np.uint8)

    def patch_affine(x0: int, y0: int) -> np.ndarray:
        return local_affine(affine, displacement, snapped_centres(np.array([[x0, y0]]), P)[0])

    def tissue(x0: int, y0: int) -> tuple[float, float]:
        frac_i = float(crop(ipsi_m, x0, y0, P).mean())
        frac_c = float(warp_patch(contra_m, patch_affine(x0, y0), x0, y0, P, nearest=True).mean())
        return frac_i, frac_c

    erosion_px = int(round(cfg.mask_erosion_mm / cfg.mm_per_px))
    grid = top_left(grid_candidates(ipsi_m, erosion_px, cfg.grid_patches_per_direction, rng), P)
    grid = np.unique(grid, axis=0)
    chosen: list[tuple[int, int, float, float, str]] = []
    for x0, y0 in grid[rng.permutation(len(grid))]:
        frac_i, frac_c = tissue(int(x0), int(y0))
        if frac_i >= cfg.min_tissue_fraction and frac_c >= cfg.min_tissue_fraction:
            chosen.append((int(x0), int(y0), frac_i, frac_c, "grid"))
            if len(chosen) == cfg.grid_patches_per_direction:
                break
    finding = top_left(finding_candidates(ipsi_boxes, P, cfg.finding_patches_per_lesion, ipsi_m.shape, rng), P)
    for x0, y0 in finding:
        chosen.append((int(x0), int(y0), *tissue(int(x0), int(y0)), "finding"))

    out = []
    for x0, y0, frac_i, frac_c, sampling in chosen:
        centre = snapped_centres(np.array([[x0, y0]]), P)
        local = patch_affine(x0, y0)
        ipsi_overlaps = box_overlaps(patch_footprint(None, x0, y0, P), ipsi_boxes)
        ipsi_hits = abnormal_hits(ipsi_overlaps, cfg.abnormal_overlap)
        contra_hits = abnormal_hits(box_overlaps(patch_footprint(local, x0, y0, P), contra_boxes), cfg.abnormal_overlap)
        out.append(
            SampledPatch(
                ipsi=to_uint16(crop(ipsi_f, x0, y0, P)),
                contra=to_uint16(warp_patch(contra_f, local, x0, y0, P)),
                ipsi_centre=tuple(float(v) for v in centre[0]),
                contra_centre=tuple(float(v) for v in transform_points(centre, affine, displacement)[0]),
                tissue_frac_ipsi=frac_i,
                tissue_frac_contra=frac_c,
                ipsi_abnormal=bool(ipsi_hits),
                contra_abnormal=bool(contra_hits),
                lesion_overlap=float(max((of_box for _, of_box, _ in ipsi_overlaps), default=0.0)),
                finding_categories=sorted({str(b["category"]) for b in ipsi_hits}),
                finding_birads=sorted({str(b["birads"]) for b in ipsi_hits}),
                sampling=sampling,
            )
        )
    return out
