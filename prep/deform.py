"""A smooth, capped displacement on top of the contralateral affine, kept only where held-back regions agree better.

The full ipsi -> contra map is T(x) = A(x + d(x)): the affine `A` of `prep.register` after a displacement `d`
defined on the ipsi registration grid (canonical px units), so that with d = 0 it is exactly the affine.

Fit (`fit_displacement`), on the registration grid, from the sharper band of the shared pattern the affine's last
step saw (`prep.register.POLISH_BLUR_MM`): dense Farneback optical flow between the ipsi pattern and the contra
pattern sent through the affine, smoothed inside the breast with a Gaussian of `cfg.reg_deform_smooth_mm` (normalised
convolution: only breast pixels vote), capped at `cfg.reg_deform_max_mm`. Cross-validated before use: the breast
is cut into a checkerboard of HOLDOUT_BLOCK_MM squares; the field smoothed from one colour's flow alone must raise
the shared-pattern correlation on the other colour's pixels, both ways round, by more than MIN_HELD_OUT_GAIN,
otherwise no displacement is used (the pair keeps its affine).

Measured on generator 2.0 (docs/PERFORMANCE.md, "Registration: the deformable stage"): the true deformation does
not raise the shared-pattern agreement at default draws, so no pattern-driven warp closes the gap there; the stage
is off by default (`cfg.reg_deformable`).

R -> L uses the inverse (`inverse_displacement`), a displacement of the same form on the contra grid. Patch pairs
use `local_affine`: the affine moved so that it agrees with T at the patch centre (d is smooth on the scale of a
patch). Points map through `transform_points`, the one mapping function for both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prep.opencv import cv2
from prep.register import RegistrationGrid, apply_affine, compose_affines, invert_affine, warp_to_template

# the flow's window (mm): wide enough that the skin line and pectoral edge, not one side's texture, drive it
FLOW_WINDOW_MM = 16.0
# checkerboard squares (mm) of the held-back check: wider than the flow's window, so a square's own flow does not
# see its neighbours' pixels much
HOLDOUT_BLOCK_MM = 24.0
# a field fitted on one colour must raise the correlation on the other colour's pixels by more than this, both ways
MIN_HELD_OUT_GAIN = 0.0
# fixed-point iterations of the inverse (converges while the field's gradient stays well below 1)
INVERSE_ITERATIONS = 12
# the 8-bit range the flow sees: these percentiles of the pattern inside the breast
_FLOW_PERCENTILES = (1.0, 99.0)
_REMAP_ROW = 1024


@dataclass(frozen=True)
class Displacement:
    """d on one image's registration grid, in that image's canonical px; T(x) = A(x + d(x))."""

    field: np.ndarray  # float32 (H, W, 2): (dx, dy) canonical px at every grid pixel
    to_grid: np.ndarray  # (2, 3) canonical px -> grid px of the image the field lives on
    held_out_gain: float = float("nan")  # the smaller of the two held-back correlation gains when it was fitted

    def at(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) canonical px -> (N, 2) displacement there (bilinear; the edge value continues off the grid)."""
        grid = apply_affine(points, self.to_grid).astype(np.float32)
        n = len(grid)
        # cv2.remap takes maps under 32767 a side: the points as rows of _REMAP_ROW
        rows = np.zeros((-(-n // _REMAP_ROW) * _REMAP_ROW, 2), np.float32)
        rows[:n] = grid
        rows = rows.reshape(-1, _REMAP_ROW, 2)
        sampled = cv2.remap(self.field, rows[..., 0], rows[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return sampled.reshape(-1, 2)[:n].astype(np.float64)

    def max_mm(self, mm_per_px: float) -> float:
        """Largest displacement (mm) anywhere on the grid."""
        return float(np.linalg.norm(self.field, axis=2).max() * mm_per_px) if self.field.size else 0.0


def transform_points(points: np.ndarray, affine: np.ndarray, displacement: Displacement | None = None) -> np.ndarray:
    """(N, 2) ipsi canonical px -> contra canonical px through T(x) = A(x + d(x)) (the affine alone without d)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if displacement is not None:
        pts = pts + displacement.at(pts)
    return apply_affine(pts, affine)


def local_affine(affine: np.ndarray, displacement: Displacement | None, centre: np.ndarray) -> np.ndarray:
    """The (2, 3) affine that equals T at `centre` (canonical px) and has A's linear part: what a patch there is
    resampled through (the field is smooth on the scale of a patch)."""
    a = np.asarray(affine, np.float64)
    if displacement is None:
        return a
    shift = np.hstack([np.eye(2), displacement.at(np.asarray(centre, np.float64).reshape(1, 2)).reshape(2, 1)])
    return compose_affines(shift, a)


def inverse_displacement(displacement: Displacement, affine: np.ndarray, contra_to_grid: np.ndarray,
                         contra_shape: tuple[int, int]) -> Displacement:
    """The R -> L displacement d' on the contra grid with T^-1(y) = A^-1(y + d'(y)): d'(y) = -A_lin d(x) where
    x = T^-1(y), found by fixed-point iteration x <- A^-1 y - d(x)."""
    h, w = contra_shape
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    y = apply_affine(grid, invert_affine(contra_to_grid))
    start = apply_affine(y, invert_affine(affine))
    x = start
    for _ in range(INVERSE_ITERATIONS):
        x = start - displacement.at(x)
    field = -(displacement.at(x) @ np.asarray(affine, np.float64)[:, :2].T)
    return Displacement(field.reshape(h, w, 2).astype(np.float32), np.asarray(contra_to_grid, np.float64),
                        displacement.held_out_gain)


def _to_u8(pattern: np.ndarray, inside: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pattern[inside], _FLOW_PERCENTILES)
    return np.clip((pattern - lo) * (255.0 / max(float(hi - lo), 1e-9)), 0, 255).astype(np.uint8)


def _smoothed(flow: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """The flow averaged over `weight`'s pixels with a Gaussian (normalised convolution)."""
    norm = cv2.GaussianBlur(weight, (0, 0), sigma_px)
    out = np.empty_like(flow)
    for c in range(2):
        out[..., c] = cv2.GaussianBlur(flow[..., c] * weight, (0, 0), sigma_px) / np.maximum(norm, 1e-6)
    return out


def warp_with_field(contra_image: np.ndarray, grid_affine: np.ndarray, grid_field: np.ndarray) -> np.ndarray:
    """Resample `contra_image` at A(x + d(x)) for every ipsi grid pixel x (grid px affine and field)."""
    h, w = grid_field.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    px, py = xs + grid_field[..., 0], ys + grid_field[..., 1]
    a = np.asarray(grid_affine, np.float32)
    return cv2.remap(contra_image, a[0, 0] * px + a[0, 1] * py + a[0, 2], a[1, 0] * px + a[1, 1] * py + a[1, 2],
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _correlation(template: np.ndarray, image: np.ndarray, where: np.ndarray) -> float:
    if where.sum() < 64:
        return float("nan")
    return float(cv2.computeECC(template, image, where.astype(np.uint8)))


def _capped(field: np.ndarray, cap_px: float) -> np.ndarray:
    magnitude = np.linalg.norm(field, axis=2, keepdims=True)
    return field * np.minimum(1.0, cap_px / np.maximum(magnitude, 1e-12))


def fit_displacement(ipsi: RegistrationGrid, contra: RegistrationGrid, grid_affine: np.ndarray, mm_per_px: float,
                     max_mm: float, smooth_mm: float) -> tuple[np.ndarray | None, float]:
    """(grid px field on the ipsi grid, or None when the held-back check refuses it; the held-back gain).

    `grid_affine` maps ipsi grid px -> contra grid px; see the module docstring for the method.
    """
    if ipsi.polish is None or contra.polish is None:
        return None, float("nan")
    template, shape = ipsi.polish.pattern, ipsi.polish.pattern.shape
    aligned = warp_to_template(contra.polish.pattern, grid_affine, shape)
    seen = warp_to_template(np.ones(contra.polish.pattern.shape, np.float32), grid_affine, shape) > 0.99
    inside = (ipsi.polish.template_mask > 0) & seen
    if inside.sum() < 256:
        return None, float("nan")
    window = int(round(FLOW_WINDOW_MM / mm_per_px)) | 1
    flow = cv2.calcOpticalFlowFarneback(_to_u8(template, inside), _to_u8(aligned, inside), None, 0.5, 3, window, 5, 7,
                                        1.5, cv2.OPTFLOW_FARNEBACK_GAUSSIAN)
    sigma = smooth_mm / mm_per_px
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    block = max(1, int(round(HOLDOUT_BLOCK_MM / mm_per_px)))
    colour = ((ys // block + xs // block) % 2).astype(bool)
    gains = []
    for fitted_on in (colour, ~colour):
        field = _smoothed(flow, (inside & fitted_on).astype(np.float32), sigma)
        held = inside & ~fitted_on
        gains.append(_correlation(template, warp_with_field(contra.polish.pattern, grid_affine, field), held)
                     - _correlation(template, aligned, held))
    gain = float(min(gains))
    if not gain > MIN_HELD_OUT_GAIN:
        return None, gain
    return _capped(_smoothed(flow, inside.astype(np.float32), sigma), max_mm / mm_per_px).astype(np.float32), gain


def displacement_from_grid(grid_field: np.ndarray, to_grid: np.ndarray, gain: float) -> Displacement:
    """A grid px field (on the grid `to_grid` maps canonical px to) as a Displacement in canonical px."""
    back = invert_affine(to_grid)[:, :2]
    field = grid_field.reshape(-1, 2).astype(np.float64) @ back.T
    return Displacement(field.reshape(grid_field.shape).astype(np.float32), np.asarray(to_grid, np.float64), gain)
