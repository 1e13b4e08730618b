"""Contralateral registration: a 2x3 affine mapping ipsi canonical pixels to contra canonical pixels.

Both breasts arrive in the canonical frame (chest wall left) at the same spacing, and everything
runs on a small grid at `cfg.reg_mm_per_px` (cost independent of the canonical spacing), prepared once per
image as a `RegistrationGrid` (`registration_grid`, or `grid_from_small` from segmentation's work grid).

Left and right breasts share their outline, fat fall-off, pectoral muscle and coarse density layout, not their
fine texture, and each is compressed its own way (scale, shear). The fit therefore sees only the shared scales:
the "shared pattern" (`_shared_pattern`) is the breast's intensity (zero outside the mask) band-passed between
SHARED_BLUR_MM and LAYOUT_BLUR_MM, which keeps the skin line, the pectoral edge and the gland layout and drops
both the independent texture and each side's own overall density.

  A. start: the translation between the mask centroids,
  B. outline: ECC MOTION_EUCLIDEAN on Gaussian-blurred masks (rigid: the canvas cuts the breast at the chest
     wall, so the outline alone constrains scale and shear poorly),
  C. if `cfg.reg_refine_intensity`, a full affine (anisotropic scale and shear: compression differences) on the
     shared pattern, coarse to fine over PYRAMID_LEVELS (`_refine_intensity`), the ipsi breast grown by
     OUTLINE_MARGIN_MM as template mask and the contra canvas as input mask, so pixels that leave the contra
     canvas drop out instead of dragging the fit:
     C1. at the coarsest level, affine ECC from (rotation, scale, slide) offsets of the outline fit about the ipsi
         centroid (the outline fit can slide tens of mm along a breast cut by the canvas) and, with a quota of
         their own, of the centroid translation A (the rigid outline fit can also spin along a cut outline whose
         shape differs between the sides); the best plausible score wins (`_plausible`: no stretch beyond
         MAX_ANISOTROPY),
     C2. each finer level polishes the answer while it stays plausible, the last step on a sharper band of the
         pattern (POLISH_BLUR_MM) at the finest level; the result is kept only if no breast point moved more than
         `cfg.reg_refine_max_shift_mm` from the coarse answer.
  D. only when that answer fails QC: the same fit from the outline let stretch (affine ECC of the blurred masks) and
     allowed up to MAX_CONFIRMED_ANISOTROPY (a compression difference up to ~30 %); QC accepts such a stretch only
     where the outline confirms it (`stretch_confirmed`), and the answer is used only if it passes.

  E. if `cfg.reg_symmetric`, the same fit the other way round (R onto L), and the mean of the two (L -> R)
     where it passes QC both ways (`register_both_ways`).

A pair's registration is one L -> R affine; R -> L is its inverse (`inverse_registration`), judged again in its
own frame.
No non-rigid step: dense warps register unilateral lesions away, which would poison the labels.

QC (`_judge`) decides `reg_ok`: outline agreement (blurred-mask ECC), shared-pattern agreement
(`_pattern_agreement`, what stage C maximised), a second criterion in mm that the correlation does not make
(`_outline_p90_mm`: the anterior skin line mapped through the fit must lie on the other breast's skin line), that
the fit sits on the agreement peak (`_off_peak`: a wrong affine scores higher when moved towards the right one),
Dice of the aligned masks, rotation and (isotropic) scale bounds, and a stretch past MAX_UNCONFIRMED_ANISOTROPY only
where the skin line and the masks confirm it (`stretch_confirmed`). Pair identity (`_identity_flag`) flags, without
rejecting, a pair whose breasts disagree in shared pattern, size or density beyond what one woman's do.
`judge_affine` applies the same QC to any given affine. Degenerate input gives `reg_ok=False` with a reason
code instead of an exception. Accuracy, QC and speed: benchmarks/registration_bench.py, docs/PERFORMANCE.md.

Pixel coordinates everywhere are (x, y) of pixel centres, the OpenCV convention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from prep.config import PrepConfig
from prep.geometry import points_affine, resize_to_shape
from prep.opencv import cv2, exact_distance

# reason codes for reg_ok=False
REASONS = (
    "empty_mask",
    "tiny_breast",
    "non_finite",
    "bad_input",
    "ecc_failed",
    "low_ecc",
    "outline_mismatch",
    "off_peak",
    "low_dice",
    "rotation_out_of_bounds",
    "scale_out_of_bounds",
    "unconfirmed_stretch",
)
# a breast smaller than this (mm^2) cannot be registered meaningfully (a 25 x 20 mm blob)
MIN_BREAST_AREA_MM2 = 500.0
# blurred-mask ECC correlation below this means the outlines did not match
MIN_ECC_MASK = 0.8
# shared-pattern correlation (`_pattern_agreement`) below this means the fit found no common structure
MIN_ECC_SHARED = 0.5
# a fit must score at least as high as itself moved by each of these (rotation deg about the ipsi centroid,
# shift mm): an affine off the agreement peak is wrong by about that much, whatever its absolute score
PEAK_PROBES = ((0.0, (4.0, 0.0)), (0.0, (-4.0, 0.0)), (0.0, (0.0, 4.0)), (0.0, (0.0, -4.0)), (3.0, (0.0, 0.0)),
               (-3.0, (0.0, 0.0)))
# the anterior skin line of the ipsi breast mapped through the fit must lie this close (mm, 90th percentile of
# its points) to the contra skin line: a geometric check in mm that the shared-pattern correlation does not make
# (right fits on generator 2.0: <= 2 mm, on the real CBIS-DDSM MLO films up to 6.8 mm; fits 10 mm off: 8-10 mm;
# the 8 mm wrong fit the shared pattern preferred, generator 2.0 seed 138 MLO: 7.6 mm, caught by a thin margin)
MAX_OUTLINE_P90_MM = 7.5
# pair identity (flags, not rejections: two women's breasts can agree as well as one woman's, so these mark a
# pair for a look instead of dropping it): shared-pattern agreement below this is weaker than most right pairs
# (synthetic right pairs 0.66-0.96, mismatched pairs that pass QC 0.50-0.67; real films 0.60-0.87) ...
IDENTITY_MIN_SHARED = 0.7
# ... the two breast areas differ by more than this factor (right pairs on generator 2.0: 0.86-1.21) ...
IDENTITY_MAX_AREA_RATIO = 1.43
# ... or their dense-tissue fractions (`_dense_fraction`) differ by more than this (right pairs: <= 0.19)
IDENTITY_MAX_DENSITY_GAP = 0.3
# the dense fraction is measured this far (mm) inside the skin line, away from the compression fall-off
DENSITY_INSET_MM = 15.0
# (iterations, eps) of the outline ECC and the finer levels of the affine fit
_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
# the coarse starts: one near the answer converges in a few iterations; a far one would wander for all of them
_SEARCH_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 15, 1e-4)
# what the fit sees: the breast's intensity blurred at this sigma (mm) (see `_shared_pattern`)
SHARED_BLUR_MM = 2.4
# ... minus its blur at this sigma (mm): each side's own large-scale density (a denser upper half, one
# breast denser overall) would otherwise pull the fit
LAYOUT_BLUR_MM = 10.0
# the last step of the fit polishes the finest level's answer on a sharper band of the same pattern (sigmas in mm):
# the skin line and the pectoral edge, which carry most of the shared signal, localise better there (generator
# 2.0, 40 pairs: 1.40 / 3.58 -> 1.32 / 3.27 mm median / p95); the coarser levels keep the wider band, whose
# basin is wider
POLISH_BLUR_MM = (1.2, 8.0)
# the template mask of the fit: the ipsi breast grown by this (mm), so the skin line and the background just
# outside it count
OUTLINE_MARGIN_MM = 8.0
# pixels kept around the template mask's bounding box (`PyramidLevel.template`): more than any ECC step reads
# beyond a compared pixel (the fit runs with no pre-blur)
TEMPLATE_MARGIN_PX = 2
# coarse-to-fine levels of the affine fit (0.8, 1.6, 3.2 mm/px at the default grid)
PYRAMID_LEVELS = 3
# a pyramid level needs at least this many pixels a side
MIN_LEVEL_PX = 16
# (rotation, scale) offsets tried about the ipsi centroid at the coarsest level: L and R each carry a few degrees
# and per cent of their own, beyond the ECC basin from the rigid outline fit
START_ROTATIONS_DEG = (-5.0, 0.0, 5.0)
START_SCALES = (0.94, 1.0, 1.06)
# a fitted affine whose linear part stretches more than this (ratio of its singular values) is not a
# compression difference but the fit sliding a breast cut by the canvas edges (seen on real MLO films)
MAX_ANISOTROPY = 1.2
# ... unless the outline confirms it: a fit stretched up to this ratio (a 30 % compression difference between the
# two sides, 1 : 0.7, plus each side's own several per cent) is a compression difference when the mapped skin line lies
# on the other breast's (90th percentile within MAX_STRETCH_OUTLINE_P90_MM) and the masks overlap by
# MIN_STRETCH_DICE: the outline, which the shared-pattern correlation does not measure in mm, must agree with the
# stretch (the real P_00173 MLO film, whose shared-pattern fits slide it past 1.2:1, does not: see PERFORMANCE.md)
MAX_CONFIRMED_ANISOTROPY = 1.6
MAX_STRETCH_OUTLINE_P90_MM = 3.0
MIN_STRETCH_DICE = 0.95
# the same confirmation is asked of any stretch past this ratio, within MAX_ANISOTROPY too: on an MLO view the
# shared pattern can prefer the breast slid along the canvas cut and stretched 1.11-1.13:1, 5-6 mm off the truth
# (generator 2.0, 2 of 400 fresh pairs), and a first fit stopped 1.15:1 short of a 20-30 % compression difference
# passed QC 20 mm off (then the stretched second fit, which finds the truth, never ran); their skin lines lay 4-7.5 mm
# from the other's, while right fits there stretch at most 1.08:1 and the real films' fits past 1.1:1 (both CC,
# 1.11 and 1.12) keep their skin lines within 1.6 mm
MAX_UNCONFIRMED_ANISOTROPY = 1.1
# ... each also slid this far (mm) along the chest wall: where the canvas cuts the breast at the chest wall and
# the top edge (MLO), the rigid outline fit can slide along the cut by tens of mm
START_SHIFTS_MM = (0.0, -12.0, 12.0)
# how many of those starts, ranked by how well their patterns already agree, get an ECC run
START_POLISH_TOP = 8
# ... and the best this many of the same offsets about the centroid translation (`_refine_intensity`)
CENTROID_POLISH_TOP = 4


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
    outline_p90_mm: float = float("nan")  # 90th percentile distance of the mapped skin line to the contra one
    # pair-identity flags ("weak_shared_pattern", "area_ratio", "density_gap", comma-joined) or None
    identity_flag: str | None = None
    # a `prep.deform.Displacement` on the ipsi grid when the deformable stage was used (T(x) = A(x + d(x))), else
    # None: the affine alone is the transform
    displacement: object | None = None

    @property
    def transform(self) -> str:
        """The transform kind pairs.parquet records: "affine" or "affine+flow"."""
        return "affine" if self.displacement is None else "affine+flow"


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


def warp_to_template(image: np.ndarray, affine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
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


def _shared_pattern(image: np.ndarray, mask: np.ndarray, mm_per_px: float,
                    band_mm: tuple[float, float] = (SHARED_BLUR_MM, LAYOUT_BLUR_MM)) -> np.ndarray:
    """The breast as the fit sees it: intensity inside the breast (zero outside: labels, markers and scanner
    borders drop out), blurred at SHARED_BLUR_MM minus its blur at LAYOUT_BLUR_MM. Left and right breasts share
    their outline, fat fall-off, pectoral muscle and gland layout, not their finer texture nor their overall
    density, so the fit sees only what both sides have."""
    breast = image * mask
    fine = cv2.GaussianBlur(breast, (0, 0), band_mm[0] / mm_per_px, borderType=cv2.BORDER_REPLICATE)
    coarse = cv2.GaussianBlur(breast, (0, 0), band_mm[1] / mm_per_px, borderType=cv2.BORDER_REPLICATE)
    return (fine - coarse).astype(np.float32)


def _grown(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """uint8 mask of the breast grown by `radius_px`: the skin line and the background just outside it are signal."""
    radius = max(1, int(round(radius_px)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    return cv2.dilate((mask > 0.5).astype(np.uint8), kernel)


@dataclass(frozen=True)
class PyramidLevel:
    """One resolution of the fit: the shared pattern, the template mask, and the map from grid px to its px."""

    pattern: np.ndarray  # float32
    template_mask: np.ndarray  # uint8: the breast grown by OUTLINE_MARGIN_MM
    canvas_mask: np.ndarray  # uint8: ones (every pixel of the canvas is valid input)
    from_grid: np.ndarray  # (2, 3) grid px -> level px
    mm_per_px: float
    # as the template of a fit only the template mask's bounding box (plus TEMPLATE_MARGIN_PX) is compared, so
    # the pattern and mask are kept cut to it, with the maps between its px and grid px. The background around a
    # breast is about half of a canvas; leaving it out of every warp and ECC iteration changes no compared pixel.
    template: np.ndarray = dataclasses.field(init=False, repr=False)
    template_valid: np.ndarray = dataclasses.field(init=False, repr=False)
    template_to_grid: np.ndarray = dataclasses.field(init=False, repr=False)  # (2, 3) template px -> grid px
    grid_to_template: np.ndarray = dataclasses.field(init=False, repr=False)
    level_to_grid: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        ys, xs = np.nonzero(self.template_mask)
        h, w = self.pattern.shape
        if ys.size:
            y0, y1 = max(0, ys.min() - TEMPLATE_MARGIN_PX), min(h, ys.max() + 1 + TEMPLATE_MARGIN_PX)
            x0, x1 = max(0, xs.min() - TEMPLATE_MARGIN_PX), min(w, xs.max() + 1 + TEMPLATE_MARGIN_PX)
        else:
            y0, y1, x0, x1 = 0, h, 0, w
        object.__setattr__(self, "template", np.ascontiguousarray(self.pattern[y0:y1, x0:x1]))
        object.__setattr__(self, "template_valid", np.ascontiguousarray(self.template_mask[y0:y1, x0:x1]))
        level_to_grid = invert_affine(self.from_grid)
        template_to_grid = compose_affines(np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]), level_to_grid)
        object.__setattr__(self, "level_to_grid", level_to_grid)
        object.__setattr__(self, "template_to_grid", template_to_grid)
        object.__setattr__(self, "grid_to_template", invert_affine(template_to_grid))


def _polish_level(image: np.ndarray, mask: np.ndarray, mm_per_px: float) -> PyramidLevel:
    """The grid's own resolution with the sharper POLISH_BLUR_MM band: what the fit's last step sees."""
    return PyramidLevel(
        pattern=_shared_pattern(image, mask, mm_per_px, POLISH_BLUR_MM),
        template_mask=_grown(mask, OUTLINE_MARGIN_MM / mm_per_px), canvas_mask=np.ones(image.shape, np.uint8),
        from_grid=np.eye(3)[:2].copy(), mm_per_px=mm_per_px,
    )


def _pyramid(image: np.ndarray, mask: np.ndarray, mm_per_px: float) -> tuple[PyramidLevel, ...]:
    """Levels finest first, each half the resolution of the one before; stops before a side gets too small."""
    pattern = _shared_pattern(image, mask, mm_per_px)
    levels, from_grid = [], np.eye(3)[:2].copy()
    for level in range(PYRAMID_LEVELS):
        if level:
            if min(pattern.shape) < 2 * MIN_LEVEL_PX:
                break
            pattern, half = _downsample(pattern, 0.5)
            mask, _ = _downsample(mask, 0.5)
            mm_per_px, from_grid = 2.0 * mm_per_px, compose_affines(from_grid, half)
        levels.append(PyramidLevel(
            pattern=pattern, template_mask=_grown(mask, OUTLINE_MARGIN_MM / mm_per_px),
            canvas_mask=np.ones(pattern.shape, np.uint8), from_grid=from_grid, mm_per_px=mm_per_px,
        ))
    return tuple(levels)


def _to_level(affine: np.ndarray, ipsi: PyramidLevel, contra: PyramidLevel) -> np.ndarray:
    """A grid px affine (ipsi -> contra) from the px of the ipsi level's template to the contra level's px."""
    return compose_affines(ipsi.template_to_grid, affine, contra.from_grid)


def _from_level(affine: np.ndarray, ipsi: PyramidLevel, contra: PyramidLevel) -> np.ndarray:
    return compose_affines(ipsi.grid_to_template, affine, contra.level_to_grid)


def _ecc_affine(ipsi: PyramidLevel, contra: PyramidLevel, start: np.ndarray, criteria) -> tuple[float, np.ndarray] | None:
    """(ECC score, grid px affine) of an affine ECC at one level from a grid px start, or None if it diverged."""
    try:
        score, warp = cv2.findTransformECCWithMask(
            ipsi.template, contra.pattern, ipsi.template_valid, contra.canvas_mask,
            _to_level(start, ipsi, contra).astype(np.float32), cv2.MOTION_AFFINE, criteria, 1,
        )
    except cv2.error:
        return None
    return float(score), _from_level(warp.astype(np.float64), ipsi, contra)


def _starts(ipsi: RegistrationGrid, start: np.ndarray) -> list[np.ndarray]:
    """(rotation, scale) offsets of the outline fit about the ipsi centroid, each also slid along the chest wall
    by START_SHIFTS_MM (grid px affines)."""
    centre = tuple(float(v) for v in _centroid(ipsi.mask))
    out = []
    for shift in START_SHIFTS_MM:
        slid = start.copy()
        slid[1, 2] += shift / ipsi.levels[0].mm_per_px
        for rotation in START_ROTATIONS_DEG:
            for scale in START_SCALES:
                out.append(compose_affines(cv2.getRotationMatrix2D(centre, rotation, scale), slid))
    return out


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
    levels: tuple[PyramidLevel, ...]  # the shared pattern, finest first: what the affine fit sees
    to_grid: np.ndarray  # (2, 3) canonical px -> grid px
    area_mm2: float  # breast area measured on the canonical mask
    problem: str | None  # a REASONS code when this image cannot be registered
    skin_line: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2)))  # (N, 2) grid px
    skin_distance: np.ndarray | None = None  # float32 grid px: distance of every pixel to the skin line
    dense_fraction: float = float("nan")  # see `_dense_fraction`
    polish: PyramidLevel | None = None  # the sharper band at the finest level (see POLISH_BLUR_MM)


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
    return RegistrationGrid(empty, empty, empty, (), np.eye(3)[:2], 0.0, problem)


def grid_from_small(small_image: np.ndarray, small_mask: np.ndarray, to_grid: np.ndarray, area_mm2: float,
                    cfg: PrepConfig) -> RegistrationGrid:
    """A RegistrationGrid from an image and breast-fraction mask already at max(mm_per_px, cfg.reg_mm_per_px)
    (e.g. segmentation's work grid), `to_grid` mapping canonical px to their px."""
    small_image = np.asarray(small_image, np.float32)
    small_mask = np.asarray(small_mask, np.float32)
    sigma = max(cfg.reg_blur_mm / cfg.reg_mm_per_px, 0.5)
    problem = "empty_mask" if area_mm2 == 0 else "tiny_breast" if area_mm2 < MIN_BREAST_AREA_MM2 else None
    usable = problem is None
    return RegistrationGrid(
        image=small_image, mask=small_mask, blurred_mask=cv2.GaussianBlur(small_mask, (0, 0), sigma),
        levels=_pyramid(small_image, small_mask, cfg.reg_mm_per_px) if usable else (), to_grid=np.asarray(to_grid, np.float64), area_mm2=area_mm2,
        problem=problem, skin_line=_skin_line(small_mask) if usable else np.zeros((0, 2)),
        skin_distance=_skin_distance(small_mask) if usable else None,
        dense_fraction=_dense_fraction(small_image, small_mask, cfg.reg_mm_per_px) if usable else float("nan"),
        polish=_polish_level(small_image, small_mask, cfg.reg_mm_per_px) if usable else None,
    )


def _skin_line(mask: np.ndarray) -> np.ndarray:
    """(N, 2) grid px of the anterior skin line: the breast's farthest pixel from the chest wall on every row,
    except rows where the breast runs off the canvas (top, bottom or the far edge)."""
    inside = mask > 0.5
    h, w = inside.shape
    rows = np.nonzero(inside.any(axis=1))[0]
    far = w - 1 - np.argmax(inside[rows, ::-1], axis=1)
    keep = (far < w - 2) & (rows > 1) & (rows < h - 2)
    return np.stack([far[keep], rows[keep]], axis=1).astype(np.float64)


def _skin_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (grid px) of every pixel to the breast's boundary pixels, where the breast's cut by the canvas
    edge counts as boundary: where the canvas cuts the breast (MLO axilla, chest wall) the outline says nothing."""
    inside = (mask > 0.5).astype(np.uint8)
    eroded = cv2.erode(inside, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    boundary = inside - eroded
    return exact_distance(1 - boundary)


def _dense_fraction(image: np.ndarray, mask: np.ndarray, mm_per_px: float) -> float:
    """Share of the breast interior (DENSITY_INSET_MM inside the skin line) brighter than halfway between its
    2nd and 98th intensity percentiles: a per-image density estimate, compared between the two sides."""
    depth = cv2.distanceTransform((mask > 0.99).astype(np.uint8), cv2.DIST_L2, 3) * mm_per_px
    values = image[depth > DENSITY_INSET_MM]
    if values.size < MIN_LEVEL_PX**2:
        return float("nan")
    lo, hi = np.percentile(values, (2, 98))
    return float(np.mean(values > 0.5 * (lo + hi)))


def _outline_p90_mm(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray,
                    mm_per_px: float) -> float:
    """90th percentile distance (mm) from the ipsi skin line mapped through the fit to the contra skin line;
    points that leave the contra canvas do not count (NaN when too few stay)."""
    if contra.skin_distance is None or len(ipsi.skin_line) < MIN_LEVEL_PX:
        return float("nan")
    mapped = apply_affine(ipsi.skin_line, grid_affine)
    h, w = contra.skin_distance.shape
    on = (mapped[:, 0] >= 0) & (mapped[:, 0] <= w - 1) & (mapped[:, 1] >= 0) & (mapped[:, 1] <= h - 1)
    if on.sum() < MIN_LEVEL_PX:
        return float("nan")
    cols, rows = np.round(mapped[on]).astype(int).T
    return float(np.percentile(contra.skin_distance[rows, cols], 90) * mm_per_px)


def _identity_flag(ipsi: RegistrationGrid, contra: RegistrationGrid, ecc_intensity: float) -> str | None:
    """Pair-identity flags (see IDENTITY_MIN_SHARED): a pair whose breasts disagree beyond what one woman's do."""
    flags = []
    if not ecc_intensity >= IDENTITY_MIN_SHARED:
        flags.append("weak_shared_pattern")
    ratio = contra.area_mm2 / ipsi.area_mm2
    if not 1.0 / IDENTITY_MAX_AREA_RATIO <= ratio <= IDENTITY_MAX_AREA_RATIO:
        flags.append("area_ratio")
    if abs(ipsi.dense_fraction - contra.dense_fraction) > IDENTITY_MAX_DENSITY_GAP:
        flags.append("density_gap")
    return ",".join(flags) or None


def _centroid_start(ipsi: RegistrationGrid, contra: RegistrationGrid) -> np.ndarray:
    """The translation that puts the two breasts' centroids together (grid px affine)."""
    return np.hstack([np.eye(2), (_centroid(contra.mask) - _centroid(ipsi.mask))[:, None]])


def _fit_outline(ipsi: RegistrationGrid, contra: RegistrationGrid, cfg: PrepConfig) -> tuple[np.ndarray, str]:
    """Stages A and B: centroid translation, then a rigid ECC of the blurred masks (grid px affine, method)."""
    # rigid, not affine, on the outline alone: the canvas cuts the breast at the chest wall, which leaves
    # scale and shear poorly constrained by masks (docs/PERFORMANCE.md has the comparison)
    start = _centroid_start(ipsi, contra)
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


def anisotropy(affine: np.ndarray) -> float:
    """Ratio of the singular values of an affine's linear part (1 = no stretch)."""
    singular = np.linalg.svd(np.asarray(affine, np.float64)[:, :2], compute_uv=False)
    return float(singular[0] / singular[1]) if singular[1] > 0 else float("inf")


def _stretched_outline(ipsi: RegistrationGrid, contra: RegistrationGrid, start: np.ndarray) -> np.ndarray:
    """The outline fit let stretch: an affine ECC of the blurred masks from the rigid one (grid px affine), as the
    start of a fit that may go past MAX_ANISOTROPY; the rigid fit itself when this diverges or spins past it."""
    try:
        _, warp = cv2.findTransformECC(
            ipsi.blurred_mask, contra.blurred_mask, start.astype(np.float32), cv2.MOTION_AFFINE, _ECC_CRITERIA, None, 1,
        )
    except cv2.error:
        return start
    warp = warp.astype(np.float64)
    return warp if _plausible(warp, MAX_CONFIRMED_ANISOTROPY) else start


def _plausible(affine: np.ndarray, max_anisotropy: float = MAX_ANISOTROPY) -> bool:
    """A linear part that could be two breasts' compression difference (see MAX_ANISOTROPY)."""
    return bool(np.linalg.det(affine[:, :2]) > 0 and anisotropy(affine) <= max_anisotropy)


def _refine_intensity(ipsi: RegistrationGrid, contra: RegistrationGrid, start: np.ndarray, cfg: PrepConfig,
                      max_anisotropy: float = MAX_ANISOTROPY):
    """Stage C (module docstring): the grid px affine of the coarse-to-fine fit of the shared pattern, or None."""
    levels = min(len(ipsi.levels), len(contra.levels))
    if levels == 0:
        return None
    coarse_i, coarse_c = ipsi.levels[levels - 1], contra.levels[levels - 1]

    def most_agreeing(starts: list[np.ndarray], n: int) -> list[np.ndarray]:
        return sorted(starts, key=lambda guess: -np.nan_to_num(_level_agreement(coarse_i, coarse_c, guess), nan=-1.0))[:n]

    # an ECC run per start is the costly part: only the starts whose patterns already agree best get one. Two
    # families of starts, each with its own quota: about the outline fit, and about the plain centroid translation
    # (a rigid outline fit can spin along a round outline the canvas cuts, by more than START_ROTATIONS_DEG, when
    # the two breasts' outlines differ in shape, e.g. by compression)
    centroid = _centroid_start(ipsi, contra)
    guesses = most_agreeing(_starts(ipsi, start), START_POLISH_TOP)
    if not np.allclose(centroid, start):
        guesses += most_agreeing(_starts(ipsi, centroid), CENTROID_POLISH_TOP)
    tried = (_ecc_affine(coarse_i, coarse_c, guess, _SEARCH_CRITERIA) for guess in guesses)
    tried = [t for t in tried if t is not None and _plausible(t[1], max_anisotropy)]
    if not tried:
        return None
    coarse = best = max(tried, key=lambda t: t[0])[1]
    # finer levels polish the coarse answer where they can: a level whose ECC diverges, stretches the breast past
    # MAX_ANISOTROPY or ends agreeing less than it started (Gauss-Newton steps can overshoot) has lost the shared
    # pattern at its scale, and the answer so far stands
    finer = [(ipsi.levels[level], contra.levels[level]) for level in range(levels - 2, -1, -1)]
    if ipsi.polish is not None and contra.polish is not None:
        finer.append((ipsi.polish, contra.polish))
    for level_i, level_c in finer:
        fitted = _ecc_affine(level_i, level_c, best, _ECC_CRITERIA)
        if fitted is None or not _plausible(fitted[1], max_anisotropy):
            continue
        if _level_agreement(level_i, level_c, fitted[1]) >= _level_agreement(level_i, level_c, best):
            best = fitted[1]
    # the finer levels polish the coarse answer; one that wanders off it has lost the shared pattern
    breast_pts = np.argwhere(ipsi.mask > 0.5)[:, ::-1].astype(np.float64)
    if _max_shift(best, coarse, breast_pts) > cfg.reg_refine_max_shift_mm / cfg.reg_mm_per_px:
        return None
    return best


def _level_agreement(level_i: PyramidLevel, level_c: PyramidLevel, grid_affine: np.ndarray) -> float:
    """Correlation of the shared patterns at one level where the ipsi template sees the contra canvas."""
    affine = _to_level(grid_affine, level_i, level_c)
    shape = level_i.template.shape
    seen = warp_to_template(level_c.canvas_mask.astype(np.float32), affine, shape) > 0.99
    valid = (seen & (level_i.template_valid > 0)).astype(np.uint8)
    if valid.sum() < MIN_LEVEL_PX**2:
        return float("nan")
    return float(cv2.computeECC(level_i.template, warp_to_template(level_c.pattern, affine, shape), valid))


def _pattern_agreement(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray) -> float:
    """Shared-pattern correlation at the finest level: what the fit maximised, so a fit that found no common
    structure scores low (NaN without a pyramid)."""
    if not ipsi.levels or not contra.levels:
        return float("nan")
    return _level_agreement(ipsi.levels[0], contra.levels[0], grid_affine)


def _off_peak(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray, score: float,
              mm_per_px: float) -> bool:
    """True when moving the fit by one of PEAK_PROBES makes the shared patterns agree better."""
    centre = tuple(float(v) for v in _centroid(ipsi.mask))
    for rotation, shift_mm in PEAK_PROBES:
        probe = compose_affines(cv2.getRotationMatrix2D(centre, rotation, 1.0), grid_affine)
        probe[:, 2] += np.asarray(shift_mm) / mm_per_px
        if _pattern_agreement(ipsi, contra, probe) > score:
            return True
    return False


def _judge(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray, method: str,
           cfg: PrepConfig) -> Registration:
    """QC of a grid px affine (outline and intensity agreement, Dice, rotation, scale) and its canonical px form."""
    ecc_mask = float("nan")
    if method != "moments":
        ecc_mask = float(cv2.computeECC(
            ipsi.blurred_mask, warp_to_template(contra.blurred_mask, grid_affine, ipsi.mask.shape)
        ))
    aligned_c = warp_to_template(contra.mask, grid_affine, ipsi.mask.shape) > 0.5
    ecc_intensity = _pattern_agreement(ipsi, contra, grid_affine)
    # back to canonical px: canonical ipsi -> grid ipsi -> grid contra -> canonical contra
    affine = compose_affines(ipsi.to_grid, grid_affine, invert_affine(contra.to_grid))
    rotation, scale = rotation_and_scale(affine)
    # only where the ipsi pixel lands on the contra canvas: a breast cut by the edge is not a misfit
    seen = warp_to_template(np.ones_like(contra.mask), grid_affine, ipsi.mask.shape) > 0.5
    dice = _dice((ipsi.mask > 0.5) & seen, aligned_c & seen)

    # the size bounds apply to the isotropic scale (the `scale` pairs.parquet records); a stretch is judged apart
    # (`stretch_confirmed`): a 30 % compression difference is a stretch of 1 : 0.7, not a 0.7 size change
    lo, hi = cfg.scale_bounds
    outline = _outline_p90_mm(ipsi, contra, grid_affine, cfg.reg_mm_per_px)
    reason = None
    if method == "moments":
        reason = "ecc_failed"  # neither ECC stage converged
    elif not ecc_mask >= MIN_ECC_MASK or not ecc_intensity >= MIN_ECC_SHARED:
        reason = "low_ecc"
    elif outline > MAX_OUTLINE_P90_MM:
        reason = "outline_mismatch"
    elif _off_peak(ipsi, contra, grid_affine, ecc_intensity, cfg.reg_mm_per_px):
        reason = "off_peak"
    elif abs(rotation) > cfg.max_rotation_deg:
        reason = "rotation_out_of_bounds"
    elif np.linalg.det(affine[:, :2]) <= 0 or not lo <= scale <= hi:
        reason = "scale_out_of_bounds"
    elif dice < cfg.min_dice:
        reason = "low_dice"
    elif not stretch_confirmed(anisotropy(affine), outline, dice):
        reason = "unconfirmed_stretch"
    return Registration(
        affine=affine, method=method, ecc_mask=ecc_mask, ecc_intensity=ecc_intensity, dice=float(dice),
        area_ratio=contra.area_mm2 / ipsi.area_mm2, rotation_deg=float(rotation), scale=float(scale),
        reg_ok=reason is None, reason=reason, outline_p90_mm=outline,
        identity_flag=_identity_flag(ipsi, contra, ecc_intensity),
    )


def stretch_confirmed(stretch: float, outline_p90_mm: float, dice: float) -> bool:
    """A stretch up to MAX_UNCONFIRMED_ANISOTROPY needs no confirmation; up to MAX_CONFIRMED_ANISOTROPY the outline
    must agree with it in mm (skin line and mask overlap, see MAX_CONFIRMED_ANISOTROPY); beyond, nothing confirms it."""
    if stretch <= MAX_UNCONFIRMED_ANISOTROPY:
        return True
    return bool(stretch <= MAX_CONFIRMED_ANISOTROPY and outline_p90_mm <= MAX_STRETCH_OUTLINE_P90_MM
                and dice >= MIN_STRETCH_DICE)


def judge_affine(ipsi: RegistrationGrid, contra: RegistrationGrid, affine: np.ndarray, cfg: PrepConfig,
                 method: str = "given") -> Registration:
    """QC of any ipsi -> contra canonical px affine, exactly as a fitted one is judged (e.g. to check a stored one)."""
    failed = _grid_problem(ipsi, contra)
    if failed is not None:
        return failed
    return _judge(ipsi, contra, grid_affine(ipsi, contra, affine), method, cfg)


def grid_affine(ipsi: RegistrationGrid, contra: RegistrationGrid, affine: np.ndarray) -> np.ndarray:
    """An ipsi -> contra canonical px affine as the grid px affine the fit and QC work in."""
    return compose_affines(invert_affine(ipsi.to_grid), np.asarray(affine, np.float64), contra.to_grid)


def _grid_problem(ipsi: RegistrationGrid, contra: RegistrationGrid) -> Registration | None:
    """The failed Registration when either grid could not be made (checks in REASONS order), else None."""
    for reason in ("bad_input", "non_finite", "empty_mask", "tiny_breast"):
        if reason in (ipsi.problem, contra.problem):
            ratio = contra.area_mm2 / ipsi.area_mm2 if ipsi.area_mm2 and contra.area_mm2 else float("nan")
            return _failed(reason, **({"area_ratio": ratio} if reason == "tiny_breast" else {}))
    return None


def register_grids(ipsi: RegistrationGrid, contra: RegistrationGrid, cfg: PrepConfig) -> Registration:
    """Affine ipsi canonical px -> contra canonical px from two prepared grids, with QC (never raises); the
    forward half of `register_both_ways`."""
    return register_both_ways(ipsi, contra, cfg)[0]


def register_both_ways(ipsi: RegistrationGrid, contra: RegistrationGrid,
                       cfg: PrepConfig) -> tuple[Registration, Registration]:
    """(ipsi -> contra, contra -> ipsi): one registration and its inverse (`inverse_registration`), each with QC.

    Stage E (`cfg.reg_symmetric`): the fit one way (`_register_one_way`) is averaged with the inverse of an
    independent fit the other way, and the mean is used where it passes QC in both directions, else the one-way
    fit stands. Each one-way fit takes one breast's pattern as the template (its mask, its pixel grid) and is
    pulled by the texture the two breasts do not share as seen from that side; the mean halves that asymmetry."""
    forward = _register_one_way(ipsi, contra, cfg)
    if forward.reg_ok and cfg.reg_symmetric and cfg.reg_refine_intensity:
        backward = _register_one_way(contra, ipsi, cfg)
        if backward.reg_ok:
            mean = 0.5 * (forward.affine + invert_affine(backward.affine))
            judged = judge_affine(ipsi, contra, mean, cfg, method=forward.method + "+symmetric")
            if judged.reg_ok:
                judged_back = inverse_registration(judged, ipsi, contra, cfg)
                if judged_back.reg_ok:
                    return judged, judged_back
    return forward, inverse_registration(forward, ipsi, contra, cfg)


def _register_one_way(ipsi: RegistrationGrid, contra: RegistrationGrid, cfg: PrepConfig) -> Registration:
    """Stages A-D (module docstring): the fit of the ipsi pattern onto the contra one, with QC."""
    failed = _grid_problem(ipsi, contra)
    if failed is not None:
        return failed
    outline_fit, outline_method = _fit_outline(ipsi, contra, cfg)
    grid_affine, method = outline_fit, outline_method
    if cfg.reg_refine_intensity:
        refined = _refine_intensity(ipsi, contra, outline_fit, cfg)
        if refined is not None:
            grid_affine, method = refined, outline_method + "+ecc_intensity"
    judged = _judge(ipsi, contra, grid_affine, method, cfg)
    if judged.reg_ok or not cfg.reg_refine_intensity:
        return judged
    # a compression difference beyond MAX_ANISOTROPY (one side pressed flatter): the fit may stretch further, and
    # QC accepts the stretch only where the outline confirms it (`stretch_confirmed`); an answer within
    # MAX_ANISOTROPY is not what this second fit is for (it would be a second chance from another start)
    stretched = _refine_intensity(ipsi, contra, _stretched_outline(ipsi, contra, outline_fit), cfg,
                                  max_anisotropy=MAX_CONFIRMED_ANISOTROPY)
    if stretched is None or anisotropy(stretched) <= MAX_ANISOTROPY:
        return judged
    candidate = _judge(ipsi, contra, stretched, outline_method + "+ecc_intensity", cfg)
    return candidate if candidate.reg_ok else judged


def inverse_registration(forward: Registration, ipsi: RegistrationGrid, contra: RegistrationGrid,
                         cfg: PrepConfig) -> Registration:
    """The contra -> ipsi registration as the inverse of `forward` (ipsi -> contra), judged in the contra frame.

    Inverse-consistent by construction (a patch pair is the same pair whichever side is ipsi) and half the cost
    of a second independent fit; QC runs again because Dice and the scale bounds are not symmetric.
    """
    if not np.isfinite(forward.affine).all():
        return dataclasses.replace(forward, area_ratio=1.0 / forward.area_ratio)
    return _judge(contra, ipsi, invert_affine(grid_affine(ipsi, contra, forward.affine)), forward.method, cfg)


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
