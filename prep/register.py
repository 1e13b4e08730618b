"""Contralateral registration: a 2x3 affine mapping ipsi canonical pixels to contra canonical pixels.

Both breasts arrive in the canonical frame (chest wall left) at the same spacing, and everything
runs on a small grid at `cfg.reg_mm_per_px` (cost independent of the canonical spacing), prepared once per
image as a `RegistrationGrid` (`registration_grid`, or `grid_from_small` from segmentation's work grid):

  A. start: the translation between the mask centroids (not the covariance axes as a rotation start:
     near-round outlines have no reliable axis),
  B. ECC MOTION_EUCLIDEAN on Gaussian-blurred masks (rigid: the canvas cuts the breast at the chest
     wall, so the outline alone constrains scale and shear poorly),
  C. if `cfg.reg_refine_intensity`, on band-passed intensities (the shared tissue pattern fixes what the
     outline cannot: scale, shear and sliding along an outline cut by the canvas), with the eroded overlap
     of both breasts as ECC `inputMask` so skin line and canvas edges do not drag the fit:
     C1. search on a grid twice as coarse: (rotation, scale) offsets about the ipsi centroid around the
         outline fit, each with the translation from phase correlation; the outline fit and the
         SEARCH_POLISH_TOP offsets with the highest correlation peaks are polished by a short affine ECC,
         and the highest ECC score wins,
     C2. ECC MOTION_AFFINE from the winner on the registration grid, kept only if no breast point moves
         more than `cfg.reg_refine_max_shift_mm`.

A pair is fitted once (L -> R); R -> L is its inverse (`inverse_registration`), judged again in its own frame.
Accuracy and cost on the synthetic archive: benchmarks/registration_bench.py and docs/PERFORMANCE.md
("Image core: measured choices"). No non-rigid step: dense warps register unilateral lesions away,
which would poison the labels. QC (Dice of the aligned masks, mask ECC score, rotation, scale)
decides `reg_ok`; degenerate input gives `reg_ok=False` with a reason code instead of an exception.

Pixel coordinates everywhere are (x, y) of pixel centres, the OpenCV convention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

from prep.config import PrepConfig
from prep.geometry import points_affine, resize_to_shape

# reason codes for reg_ok=False
REASONS = (
    "empty_mask",
    "tiny_breast",
    "non_finite",
    "bad_input",
    "ecc_failed",
    "low_ecc",
    "low_dice",
    "rotation_out_of_bounds",
    "scale_out_of_bounds",
)
# a breast smaller than this (mm^2) cannot be registered meaningfully (a 25 x 20 mm blob)
MIN_BREAST_AREA_MM2 = 500.0
# blurred-mask ECC correlation below this means the outlines did not match
MIN_ECC_MASK = 0.8
# (iterations, eps) of the outline and final intensity ECC: tighter criteria cost time and gain no accuracy
# (docs/PERFORMANCE.md "Image core: measured choices")
_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
# a search candidate near the answer converges in a few iterations; one far off wanders for all of them, so
# the search stops early (the same errors as the final ECC's criteria: docs/PERFORMANCE.md)
_SEARCH_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 15, 1e-4)
# intensity stages see the image minus its Gaussian blur of this sigma (mm): fine enough to keep the tissue
# pattern, coarse enough to drop pixel noise (the sweep: docs/PERFORMANCE.md)
BAND_HIGHPASS_MM = 5.0
# the intensity ECC ignores this much (mm) inside the skin line and the canvas edges, whose contrast would
# otherwise drag the fit
OVERLAP_EROSION_MM = 3.0
# (rotation, scale) offsets tried about the ipsi centroid before the intensity ECC: L and R each carry up to
# 4 deg / 4 %, so the pair differs by up to ~8 deg / 8 %, beyond the ECC basin from the rigid outline fit
SEARCH_ROTATIONS_DEG = (-4.0, 0.0, 4.0)
SEARCH_SCALES = (0.93, 1.0, 1.07)
# how many of those offsets, ranked by their phase-correlation peak, get the ECC polish (the outline fit always
# does): the best peak is nearly always the answer; a second keeps a spare at a fraction of polishing all
SEARCH_POLISH_TOP = 2
# a search candidate must keep this fraction of the (eroded) ipsi breast inside the overlap
MIN_SEARCH_OVERLAP = 0.5
# the coarse search grid needs at least this many pixels a side (erosion, phase correlation)
MIN_SEARCH_PX = 16


@dataclass
class Registration:
    """Result of `register_contralateral`; `affine` maps ipsi canonical px -> contra canonical px."""

    affine: np.ndarray  # (2, 3) float64
    method: str
    ecc_mask: float
    ecc_intensity: float
    dice: float
    area_ratio: float  # contra breast area / ipsi breast area
    rotation_deg: float
    scale: float  # sqrt(|det|) of the linear part
    reg_ok: bool
    reason: str | None


def to_homogeneous(affine: np.ndarray) -> np.ndarray:
    """(2, 3) affine -> (3, 3) matrix, so transforms compose by matrix product."""
    out = np.eye(3)
    out[:2] = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    return out


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine (contra -> ipsi for an ipsi -> contra matrix)."""
    return np.linalg.inv(to_homogeneous(affine))[:2].copy()


def compose_affines(*affines: np.ndarray) -> np.ndarray:
    """`compose_affines(A, B)` applies A first, then B."""
    out = np.eye(3)
    for affine in affines:
        out = to_homogeneous(affine) @ out
    return out[:2].copy()


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (N, 2) points (x, y) through a (2, 3) affine."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    a = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    return pts @ a[:, :2].T + a[:, 2]


def rotation_and_scale(affine: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees, of the closest similarity) and isotropic scale sqrt(|det|) of the linear part."""
    a = np.asarray(affine, dtype=np.float64).reshape(2, 3)
    rotation = math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))
    return rotation, math.sqrt(abs(float(np.linalg.det(a[:, :2]))))


def _downsample(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Area-average to `factor` x size; also the (2, 3) map from full-res px to the small grid's px."""
    h, w = image.shape
    shape = (max(1, round(h * factor)), max(1, round(w * factor)))
    small, scale_xy = resize_to_shape(image.astype(np.float32), shape, cv2.INTER_AREA)
    return small, points_affine(scale_xy)


def _centroid(mask: np.ndarray) -> np.ndarray:
    m = cv2.moments(mask, binaryImage=False)
    return np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


def _warp_to_template(image: np.ndarray, affine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample `image` (contra grid) at affine(template pixel) for every template pixel."""
    return cv2.warpAffine(
        image, affine.astype(np.float64), (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 0.0


def _max_shift(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(apply_affine(points, a) - apply_affine(points, b), axis=1)))


def _band_pass(image: np.ndarray, mm_per_px: float) -> np.ndarray:
    """Intensity minus its Gaussian blur at BAND_HIGHPASS_MM: keeps the tissue pattern, drops density level and
    the thickness fall-off at the skin, which differ between the sides."""
    sigma = BAND_HIGHPASS_MM / mm_per_px
    return (image - cv2.GaussianBlur(image, (0, 0), sigma)).astype(np.float32)


def _overlap_mask(mask_i: np.ndarray, mask_c: np.ndarray, affine: np.ndarray, erosion_px: float) -> np.ndarray:
    """uint8 ECC `inputMask` on the ipsi grid: inside both breasts (contra seen through `affine`) and on the contra
    canvas, eroded so the skin line and the chest-wall cut of either canvas do not drag the fit."""
    on_canvas = _warp_to_template(np.ones_like(mask_c), affine, mask_i.shape) > 0.99
    valid = ((mask_i > 0.5) & (_warp_to_template(mask_c, affine, mask_i.shape) > 0.5) & on_canvas).astype(np.uint8)
    radius = int(round(erosion_px))
    if radius > 0:
        valid = cv2.erode(valid, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    return valid


def _soft_window(mask: np.ndarray, erosion_px: float) -> np.ndarray:
    """Eroded, blurred breast mask: tapers the phase-correlation input so no hard edge dominates the spectrum."""
    radius = max(1, int(round(erosion_px)))
    # zero border: the breast is eroded away from the canvas edges too, where the canvas cuts it hard
    core = cv2.erode(
        (mask > 0.5).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2),
        borderType=cv2.BORDER_CONSTANT, borderValue=0,
    )
    return cv2.GaussianBlur(core.astype(np.float32), (0, 0), erosion_px)


def _search_intensity(
    band_i: np.ndarray, band_c: np.ndarray, mask_i: np.ndarray, mask_c: np.ndarray, start: np.ndarray,
    mm_per_px: float,
) -> np.ndarray:
    """Best start for the intensity ECC, on a grid half as fine as the registration grid.

    Tries (rotation, scale) offsets about the ipsi breast centroid around the outline fit; for each, phase
    correlation of the windowed band-passed images finds the translation (the outline fit can slide 10-30 mm
    along a breast cut off by the canvas) and a short affine ECC polishes it; the outline fit itself is polished
    too. Keeps the highest ECC score; returns `start` unchanged if nothing converges. All affines are on the
    registration grid.
    """
    if min(*band_i.shape, *band_c.shape) < 2 * MIN_SEARCH_PX:
        return start  # too few pixels to search (only reachable with a coarse reg_mm_per_px)
    coarse_i, half_i = _downsample(band_i, 0.5)
    coarse_c, half_c = _downsample(band_c, 0.5)
    cmask_i, _ = _downsample(mask_i, 0.5)
    cmask_c, _ = _downsample(mask_c, 0.5)
    coarse_mm = 2.0 * mm_per_px
    erosion_px = OVERLAP_EROSION_MM / coarse_mm
    window_i = _soft_window(cmask_i, erosion_px)
    window_c = _soft_window(cmask_c, erosion_px)
    ipsi_windowed = (coarse_i * window_i).astype(np.float64)
    contra_windowed = coarse_c * window_c
    base = compose_affines(invert_affine(half_i), start, half_c)
    centre = tuple(float(v) for v in _centroid(cmask_i))

    def guesses():
        """(phase-correlation peak, guess) for each (rotation, scale) offset, translation from the peak."""
        for rotation in SEARCH_ROTATIONS_DEG:
            for scale in SEARCH_SCALES:
                guess = compose_affines(cv2.getRotationMatrix2D(centre, rotation, scale), base)
                moved = _warp_to_template(contra_windowed, guess, cmask_i.shape).astype(np.float64)
                # (dx, dy): where the ipsi pattern sits in `moved`; shift the contra sampling points by it
                (dx, dy), peak = cv2.phaseCorrelate(ipsi_windowed, moved)
                yield peak, compose_affines(np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]), guess)

    # only the offsets whose phase correlation peaks highest are worth an ECC polish (the slow part)
    ranked = sorted(guesses(), key=lambda item: -item[0])
    candidates = [base] + [guess for _, guess in ranked[:SEARCH_POLISH_TOP]]
    best, best_score = start, -np.inf
    min_overlap = MIN_SEARCH_OVERLAP * _overlap_mask(cmask_i, cmask_i, np.eye(3)[:2], erosion_px).sum()
    for guess in candidates:
        valid = _overlap_mask(cmask_i, cmask_c, guess, erosion_px)
        if valid.sum() < min_overlap:
            continue
        try:
            _, warp = cv2.findTransformECC(
                coarse_i, coarse_c, guess.astype(np.float32), cv2.MOTION_AFFINE, _SEARCH_CRITERIA, valid, 1
            )
        except cv2.error:
            continue
        # score on the overlap the fit ends with: a fit that shrank the overlap to a sliver scores ~1 on it
        valid = _overlap_mask(cmask_i, cmask_c, warp, erosion_px)
        if valid.sum() < min_overlap:
            continue
        score = cv2.computeECC(coarse_i, _warp_to_template(coarse_c, warp, coarse_i.shape), valid)
        if score > best_score:
            best, best_score = compose_affines(half_i, warp.astype(np.float64), invert_affine(half_c)), score
    return best


def _failed(reason: str, method: str = "none", **values: float) -> Registration:
    nan = float("nan")
    fields = dict(ecc_mask=nan, ecc_intensity=nan, dice=nan, area_ratio=nan, rotation_deg=nan, scale=nan)
    fields.update(values)
    return Registration(affine=np.full((2, 3), np.nan), method=method, reg_ok=False, reason=reason, **fields)


@dataclass(frozen=True)
class RegistrationGrid:
    """One breast on the registration grid, built once per image and shared by both directions of a pair."""

    image: np.ndarray  # float32 intensities
    mask: np.ndarray  # float32 breast fraction per grid pixel
    blurred_mask: np.ndarray  # float32, what the outline ECC sees
    band: np.ndarray  # float32 band-passed intensities, what the intensity stages see
    to_grid: np.ndarray  # (2, 3) canonical px -> grid px
    area_mm2: float  # breast area measured on the canonical mask
    problem: str | None  # a REASONS code when this image cannot be registered


def registration_grid(image: np.ndarray, mask: np.ndarray, mm_per_px: float, cfg: PrepConfig) -> RegistrationGrid:
    """Downsample one canonical breast (float [0, 1] "bright = dense", mask bool) to `cfg.reg_mm_per_px` and
    prepare what the registration stages need; bad input sets `problem` instead of raising."""
    if np.ndim(image) != 2 or min(np.shape(image)) < 2 or np.shape(image) != np.shape(mask) or not mm_per_px > 0:
        return _unusable_grid("bad_input")
    if not np.isfinite(image).all():
        return _unusable_grid("non_finite")
    mask = np.asarray(mask, bool)
    # work on a small grid at cfg.reg_mm_per_px: registration cost independent of mm_per_px
    factor = min(1.0, mm_per_px / cfg.reg_mm_per_px)
    small_mask, to_grid = _downsample(mask, factor)
    small_image, _ = _downsample(image, factor)
    return grid_from_small(small_image, small_mask, to_grid, float(np.count_nonzero(mask)) * mm_per_px**2, cfg)


def _unusable_grid(problem: str) -> RegistrationGrid:
    empty = np.zeros((1, 1), np.float32)
    return RegistrationGrid(empty, empty, empty, empty, np.eye(3)[:2], 0.0, problem)


def grid_from_small(small_image: np.ndarray, small_mask: np.ndarray, to_grid: np.ndarray, area_mm2: float,
                    cfg: PrepConfig) -> RegistrationGrid:
    """A RegistrationGrid from an image and breast-fraction mask already at max(mm_per_px, cfg.reg_mm_per_px)
    (e.g. segmentation's work grid), `to_grid` mapping canonical px to their px."""
    small_image = np.asarray(small_image, np.float32)
    small_mask = np.asarray(small_mask, np.float32)
    sigma = max(cfg.reg_blur_mm / cfg.reg_mm_per_px, 0.5)
    problem = "empty_mask" if area_mm2 == 0 else "tiny_breast" if area_mm2 < MIN_BREAST_AREA_MM2 else None
    return RegistrationGrid(
        image=small_image, mask=small_mask, blurred_mask=cv2.GaussianBlur(small_mask, (0, 0), sigma),
        band=_band_pass(small_image, cfg.reg_mm_per_px), to_grid=np.asarray(to_grid, np.float64), area_mm2=area_mm2,
        problem=problem,
    )


def _fit_outline(ipsi: RegistrationGrid, contra: RegistrationGrid, cfg: PrepConfig) -> tuple[np.ndarray, str]:
    """Stages A and B: centroid translation, then a rigid ECC of the blurred masks (grid px affine, method)."""
    # rigid, not affine, on the outline alone: the canvas cuts the breast at the chest wall, which leaves
    # scale and shear poorly constrained by masks
    start = np.hstack([np.eye(2), (_centroid(contra.mask) - _centroid(ipsi.mask))[:, None]])
    try:
        _, warp = cv2.findTransformECC(
            ipsi.blurred_mask, contra.blurred_mask, start.astype(np.float32), cv2.MOTION_EUCLIDEAN, _ECC_CRITERIA,
            None, 1,
        )
    except cv2.error:
        return start, "moments"  # QC decides whether the centroid start is usable
    # a rigid fit that spun past the QC bound slid along a round outline (seen on CC views):
    # refine from the centroid start instead; QC still judges whatever comes out
    if abs(rotation_and_scale(warp)[0]) <= cfg.max_rotation_deg:
        return warp.astype(np.float64), "moments+ecc_mask"
    return start, "moments"


def _refine_intensity(ipsi: RegistrationGrid, contra: RegistrationGrid, start: np.ndarray, cfg: PrepConfig):
    """Stage C (module docstring): the grid px affine after the search and the affine ECC, or None if it failed."""
    erosion_px = OVERLAP_EROSION_MM / cfg.reg_mm_per_px
    best = _search_intensity(ipsi.band, contra.band, ipsi.mask, contra.mask, start, cfg.reg_mm_per_px)
    try:
        valid = _overlap_mask(ipsi.mask, contra.mask, best, erosion_px)
        _, refined = cv2.findTransformECC(
            ipsi.band, contra.band, best.astype(np.float32), cv2.MOTION_AFFINE, _ECC_CRITERIA, valid, 1
        )
    except cv2.error:
        return None
    refined = refined.astype(np.float64)
    breast_pts = np.argwhere(ipsi.mask > 0.5)[:, ::-1].astype(np.float64)
    if _max_shift(refined, best, breast_pts) > cfg.reg_refine_max_shift_mm / cfg.reg_mm_per_px:
        return None
    return refined


def _judge(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray, method: str,
           cfg: PrepConfig) -> Registration:
    """QC of a grid px affine (outline and intensity agreement, Dice, rotation, scale) and its canonical px form."""
    ecc_mask = float("nan")
    if method != "moments":
        ecc_mask = float(cv2.computeECC(
            ipsi.blurred_mask, _warp_to_template(contra.blurred_mask, grid_affine, ipsi.mask.shape)
        ))
    aligned_c = _warp_to_template(contra.mask, grid_affine, ipsi.mask.shape) > 0.5
    overlap = ((ipsi.mask > 0.5) & aligned_c).astype(np.uint8)
    ecc_intensity = (
        float(cv2.computeECC(ipsi.image, _warp_to_template(contra.image, grid_affine, ipsi.image.shape), overlap))
        if overlap.any() else float("nan")
    )
    # back to canonical px: canonical ipsi -> grid ipsi -> grid contra -> canonical contra
    affine = compose_affines(ipsi.to_grid, grid_affine, invert_affine(contra.to_grid))
    rotation, scale = rotation_and_scale(affine)
    # only where the ipsi pixel lands on the contra canvas: a breast cut by the edge is not a misfit
    seen = _warp_to_template(np.ones_like(contra.mask), grid_affine, ipsi.mask.shape) > 0.5
    dice = _dice((ipsi.mask > 0.5) & seen, aligned_c & seen)

    singular = np.linalg.svd(affine[:, :2], compute_uv=False)
    lo, hi = cfg.scale_bounds
    reason = None
    if method == "moments":
        reason = "ecc_failed"  # neither ECC stage converged
    elif not ecc_mask >= MIN_ECC_MASK:
        reason = "low_ecc"
    elif abs(rotation) > cfg.max_rotation_deg:
        reason = "rotation_out_of_bounds"
    elif np.linalg.det(affine[:, :2]) <= 0 or singular.min() < lo or singular.max() > hi:
        reason = "scale_out_of_bounds"
    elif dice < cfg.min_dice:
        reason = "low_dice"
    return Registration(
        affine=affine, method=method, ecc_mask=ecc_mask, ecc_intensity=ecc_intensity, dice=float(dice),
        area_ratio=contra.area_mm2 / ipsi.area_mm2, rotation_deg=float(rotation), scale=float(scale),
        reg_ok=reason is None, reason=reason,
    )


def _grid_problem(ipsi: RegistrationGrid, contra: RegistrationGrid) -> Registration | None:
    """The failed Registration when either grid could not be made (checks in REASONS order), else None."""
    for reason in ("bad_input", "non_finite", "empty_mask", "tiny_breast"):
        if reason in (ipsi.problem, contra.problem):
            ratio = contra.area_mm2 / ipsi.area_mm2 if ipsi.area_mm2 and contra.area_mm2 else float("nan")
            return _failed(reason, **({"area_ratio": ratio} if reason == "tiny_breast" else {}))
    return None


def register_grids(ipsi: RegistrationGrid, contra: RegistrationGrid, cfg: PrepConfig) -> Registration:
    """Affine ipsi canonical px -> contra canonical px from two prepared grids, with QC (never raises)."""
    failed = _grid_problem(ipsi, contra)
    if failed is not None:
        return failed
    grid_affine, method = _fit_outline(ipsi, contra, cfg)
    if cfg.reg_refine_intensity:
        refined = _refine_intensity(ipsi, contra, grid_affine, cfg)
        if refined is not None:
            grid_affine, method = refined, method + "+ecc_intensity"
    return _judge(ipsi, contra, grid_affine, method, cfg)


def inverse_registration(forward: Registration, ipsi: RegistrationGrid, contra: RegistrationGrid,
                         cfg: PrepConfig) -> Registration:
    """The contra -> ipsi registration as the inverse of `forward` (ipsi -> contra), judged in the contra frame.

    Inverse-consistent by construction (a patch pair is the same pair whichever side is ipsi) and half the cost
    of a second independent fit; QC runs again because Dice and the scale bounds are not symmetric.
    """
    if not np.isfinite(forward.affine).all():
        return dataclasses.replace(forward, area_ratio=1.0 / forward.area_ratio)
    grid_forward = compose_affines(invert_affine(ipsi.to_grid), forward.affine, contra.to_grid)
    return _judge(contra, ipsi, invert_affine(grid_forward), forward.method, cfg)


def register_contralateral(
    ipsi_img: np.ndarray,
    ipsi_mask: np.ndarray,
    contra_img: np.ndarray,
    contra_mask: np.ndarray,
    mm_per_px: float,
    cfg: PrepConfig,
) -> Registration:
    """Affine ipsi canonical px -> contra canonical px (both at `mm_per_px`), with QC.

    Images are float [0, 1] "bright = dense", masks boolean/0-1, all 2-D; the two sides may have
    different canvas sizes. Never raises for bad pixels: returns `reg_ok=False` and a reason code.
    """
    return register_grids(
        registration_grid(ipsi_img, ipsi_mask, mm_per_px, cfg), registration_grid(contra_img, contra_mask, mm_per_px, cfg),
        cfg,
    )
