"""Registration on a bilateral phantom written apart from `prep.synth`: how much of the accuracy is our generator's.

Every other registration number comes from generator 2.0, the world the registration was developed on. This
phantom is a second world with its own code, built from the bilateral model of research/data.md section 6.2
(the description an independently generated archive follows), not from generator 2.0's anatomy:

  shape      a superellipse breast on a body frame (CC), or one tilted towards the feet with an axillary tail
             up the chest wall and a pectoral wedge (MLO); the chest continues past the canvas cut
  texture    a 1/f^beta field shared by both sides in body coordinates, low-passed at `shared_cutoff_mm`, mixed
             with a full-band field of each side's own (`shared_fraction` of the variance shared), thresholded
             smoothly into fibroglandular tissue; optionally confined to a central gland envelope
  per side   an affine (rotation, isotropic scale, anisotropy, shift) and a smooth elastic displacement,
             then the skin fall-off of that side's own compressed outline and quantum-like noise
  storage    R mirrored (chest wall right), 0.2 mm/px; ground truth: L breast points through L's backward map
             into the body and through R's map inverted (fixed point) into R

Per setting (SETTINGS): QC pass rate, median / p95 / worst point error of the QC-passed fits against the truth
(L -> R, mm), the best affine's (least squares on the true points: the floor), how many QC-passed pairs are more
than 3 mm off (median), how many deliberately wrong fits QC accepts (registration_bench.WRONG_FITS), and how
many L breasts registered to another pair's R of the same view (another woman) QC accepts without a flag.
`--realisations K` also renders `--scatter-pairs` pairs K times under new unshared texture and splits the error
as registration_limits does: the fits' spread about their mean (scatter under the texture the fit cannot use)
and the mean fit's distance from the best affine (bias of the objective).

    python benchmarks/registration_phantom.py [--pairs 48] [--settings NAME ...] [--realisations 6]

~3 min on one core for the six settings at 48 pairs, ~1 min more with `--realisations 6`. Results:
docs/PERFORMANCE.md, "Registration on a phantom we did not tune on".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import map_coordinates  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registration_bench import best_affine_points, wrong_fit_verdicts  # noqa: E402
from registration_limits import (  # noqa: E402
    decomposition,
    decomposition_arguments,
    one_thread_config,
    summary,
    view_of,
)
from registration_stress import WRONG_PAIR_MEDIAN_MM, canonical  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.pairs import map_stored_points, register_pair  # noqa: E402
from prep.register import register_grids  # noqa: E402

SPACING_MM = 0.2
CANVAS_MM = (190.0, 240.0)  # width, height
# the shared field is drawn on a body grid this coarse (mm/px) over this extent (x0, y0, width, height in mm)
BODY_GRID_MM = 0.8
BODY_EXTENT_MM = (-60.0, -200.0, 260.0, 400.0)
# the elastic displacement lives on an image grid this coarse (mm/px), bilinear in between
ELASTIC_GRID_MM = 2.0


@dataclasses.dataclass(frozen=True)
class PhantomSettings:
    """What the phantom draws per side (uniform ranges) and how much texture the two sides share."""

    rotation_deg: float = 10.0  # each side's rotation, uniform +-
    scale: float = 0.08  # each side's isotropic scale, 1 +- this
    anisotropy: float = 0.05  # each side's compression (x / y scale ratio), 1 +- this
    shift_mm: float = 10.0  # each side's position along the chest wall, +-
    elastic_mm: tuple[float, float] = (2.0, 6.0)  # each side's largest elastic displacement, uniform in
    elastic_length_mm: float = 40.0  # its smoothing length
    shared_cutoff_mm: float = 25.0  # the shared texture keeps wavelengths above about this
    shared_fraction: float = 0.7  # of the texture variance
    envelope: float = 0.0  # > 0: fibroglandular tissue only inside this fraction of the breast's radius


# what the rows change (research/data.md section 6.2's model first, then one thing each)
SETTINGS = {
    "data.md bilateral model": {},
    "no elastic (truth an affine)": {"elastic_mm": (0.0, 0.0)},
    "generator 2.0's geometry (4 deg, 4 %, no anisotropy)": {"rotation_deg": 4.0, "scale": 0.04, "anisotropy": 0.0},
    "texture shared >= 5 mm": {"shared_cutoff_mm": 5.0},
    "texture all shared": {"shared_fraction": 1.0},
    "gland envelope (80 % of the radius)": {"envelope": 0.8},
}


def power_law_field(rng: np.random.Generator, shape: tuple[int, int], mm_per_px: float, beta: float,
                    cutoff_mm: float | None = None) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian field with power spectrum 1/f^beta, optionally low-passed: amplitude
    times exp(-(f * cutoff)^2 / 2)."""
    fy = np.fft.fftfreq(shape[0], mm_per_px)[:, None]
    fx = np.fft.rfftfreq(shape[1], mm_per_px)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    if cutoff_mm is not None:
        amplitude *= np.exp(-0.5 * (f * cutoff_mm) ** 2)
    spectrum = amplitude * (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape))
    field = np.fft.irfft2(spectrum, s=shape)
    return (field - field.mean()) / field.std()


@dataclasses.dataclass(frozen=True)
class SideWarp:
    """One side's pose: image mm p -> body mm b = Ainv (p - image_pivot) + d(p); the body origin is the chest wall
    on the breast's centre line, which the pose puts at `image_pivot`."""

    linear: np.ndarray  # (2, 2) body -> image about the pivots
    image_pivot: np.ndarray
    displacement: np.ndarray  # (2, H, W) mm on the ELASTIC_GRID_MM image grid

    def elastic(self, points: np.ndarray) -> np.ndarray:
        grid = points[:, ::-1].T / ELASTIC_GRID_MM
        return np.stack([map_coordinates(self.displacement[k], grid, order=1, mode="nearest") for k in range(2)], 1)

    def to_body(self, points: np.ndarray) -> np.ndarray:
        return (points - self.image_pivot) @ np.linalg.inv(self.linear).T + self.elastic(points)

    def to_image(self, body: np.ndarray, iterations: int = 30) -> np.ndarray:
        """The inverse of `to_body` by fixed-point iteration (the displacement is smooth and small)."""
        points = body @ self.linear.T + self.image_pivot
        for _ in range(iterations):
            points = (body - self.elastic(points)) @ self.linear.T + self.image_pivot
        return points


def random_side_warp(rng: np.random.Generator, s: PhantomSettings, mlo: bool) -> SideWarp:
    angle = np.deg2rad(rng.uniform(-s.rotation_deg, s.rotation_deg))
    scale = 1.0 + rng.uniform(-s.scale, s.scale)
    stretch = 1.0 + rng.uniform(-s.anisotropy, s.anisotropy)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = scale * rotation @ np.diag([1.0 / np.sqrt(stretch), np.sqrt(stretch)])
    # the chest wall at the canvas edge, the breast centred (MLO: higher, the axilla runs off the top)
    chest_wall = rng.uniform(-3.0, 3.0)
    pivot = np.array([chest_wall, CANVAS_MM[1] * (0.38 if mlo else 0.5) + rng.uniform(-s.shift_mm, s.shift_mm)])
    shape = (int(CANVAS_MM[1] / ELASTIC_GRID_MM) + 1, int(CANVAS_MM[0] / ELASTIC_GRID_MM) + 1)
    field = np.stack([cv2.GaussianBlur(rng.normal(size=shape), (0, 0), s.elastic_length_mm / ELASTIC_GRID_MM)
                      for _ in range(2)])
    largest = rng.uniform(*s.elastic_mm)
    field *= largest / max(float(np.hypot(*field).max()), 1e-12)
    return SideWarp(linear, pivot, field)


def body_breast(bx: np.ndarray, by: np.ndarray, anatomy: dict, mlo: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inside, radius) on body points: the breast (radius 1 at the skin) and the chest beyond the canvas cut."""
    a, b, p = anatomy["depth"], anatomy["half_height"], anatomy["exponent"]
    if mlo:
        c, s = np.cos(anatomy["tilt"]), np.sin(anatomy["tilt"])
        u, v = bx * c + by * s, -bx * s + by * c
        radius = (np.abs(np.maximum(u, 0) / a) ** p + np.abs(v / b) ** p) ** (1 / p)
        axilla = (by < 0) & (bx < anatomy["axilla_width"] * (1 + by / 400.0))
        inside = ((bx < 0) & (by < b)) | (radius <= 1) | axilla
    else:
        radius = (np.abs(np.maximum(bx, 0) / a) ** p + np.abs(by / b) ** p) ** (1 / p)
        inside = ((bx < 0) & (np.abs(by) < b)) | (radius <= 1)
    return inside, radius


def make_pair(seed: int, view: str, settings: PhantomSettings = PhantomSettings(), own_seed: int | None = None):
    """(stored L image, stored R image (mirrored), spacing mm, true correspondences (N, 4) stored px: L x, y, R x, y).

    `own_seed` redraws only the texture each side does not share (same anatomy, poses and shared texture)."""
    rng = np.random.default_rng([seed, 0xF0E1])
    own_rng = rng if own_seed is None else np.random.default_rng([seed, own_seed, 0x0DD5])
    mlo = view == "MLO"
    anatomy = {"depth": rng.uniform(60, 100), "half_height": rng.uniform(70, 100), "exponent": rng.uniform(2.0, 3.0),
               "tilt": np.deg2rad(rng.uniform(15, 35)), "axilla_width": rng.uniform(45, 75)}
    pectoral_width, pectoral_apex = rng.uniform(25, 55), rng.uniform(-10, 50)
    fall_off_mm, beta, threshold = rng.uniform(5, 15), rng.uniform(2.7, 3.3), rng.uniform(-0.8, 0.6)
    x0, y0, width, height = BODY_EXTENT_MM
    shared = power_law_field(rng, (int(height / BODY_GRID_MM), int(width / BODY_GRID_MM)), BODY_GRID_MM, beta,
                             settings.shared_cutoff_mm)
    warps = [random_side_warp(rng, settings, mlo) for _ in range(2)]
    h, w = round(CANVAS_MM[1] / SPACING_MM), round(CANVAS_MM[0] / SPACING_MM)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels_mm = np.stack([xx.ravel(), yy.ravel()], 1) * SPACING_MM
    images, masks = [], []
    for warp in warps:
        bx, by = warp.to_body(pixels_mm).T
        inside, radius = body_breast(bx, by, anatomy, mlo)
        mask = inside.reshape(h, w).astype(np.uint8)
        thickness = 1.0 - np.exp(-cv2.distanceTransform(mask, cv2.DIST_L2, 5) * SPACING_MM / fall_off_mm)
        shared_here = cv2.remap(shared.astype(np.float32), ((bx - x0) / BODY_GRID_MM).astype(np.float32).reshape(h, w),
                                ((by - y0) / BODY_GRID_MM).astype(np.float32).reshape(h, w), cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
        own = power_law_field(own_rng, (h, w), SPACING_MM, beta)
        texture = np.sqrt(settings.shared_fraction) * shared_here + np.sqrt(1.0 - settings.shared_fraction) * own
        gland = 1.0 / (1.0 + np.exp(-(texture - threshold) / 0.35))
        if settings.envelope > 0:
            gland = gland / (1.0 + np.exp(-(settings.envelope - radius.reshape(h, w)) / 0.04))
        image = thickness * (0.30 + 0.45 * gland)
        if mlo:
            pectoral = (bx < pectoral_width * (pectoral_apex - by) / (pectoral_apex + 100.0)).reshape(h, w) & (mask > 0)
            image = np.where(pectoral, np.maximum(image, 0.8 * thickness + 0.05 * own), image)
        image = image * mask + own_rng.normal(0.0, 0.01, image.shape)
        images.append(np.clip(image + 0.02, 0.0, 1.0).astype(np.float32))
        masks.append(mask)
    # true points: L breast pixels at least 3 mm inside the skin, kept where they land in the R breast
    inset = 2 * round(3.0 / SPACING_MM) + 1
    ys, xs = np.nonzero(cv2.erode(masks[0], np.ones((inset, inset), np.uint8)))
    pick = rng.choice(len(xs), size=min(4000, len(xs)), replace=False)
    left = np.stack([xs[pick], ys[pick]], 1) * SPACING_MM
    right = warps[1].to_image(warps[0].to_body(left))
    col, row = np.round(right / SPACING_MM).astype(int).T
    keep = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    keep[keep] = masks[1][row[keep], col[keep]] > 0
    left, right = left[keep][:256] / SPACING_MM, right[keep][:256] / SPACING_MM
    right[:, 0] = w - 1 - right[:, 0]
    return images[0], images[1][:, ::-1].copy(), SPACING_MM, np.hstack([left, right])


@dataclasses.dataclass(frozen=True)
class PhantomFit:
    """One phantom pair registered as the build does (`prep.pairs.register_pair`); points in R, mm."""

    canon: dict  # canonical images by side
    forward: object | None  # the L -> R Registration (None when an image failed canonicalisation)
    fitted: np.ndarray | None  # the true L points through the fit, None unless QC passed both ways
    true: np.ndarray  # the true R points
    best: np.ndarray  # the true L points through the best affine


def register_phantom_pair(seed: int, settings: PhantomSettings, cfg: PrepConfig,
                          own_seed: int | None = None) -> PhantomFit:
    view = view_of(seed)
    left, right, spacing, truth = make_pair(seed, view, settings, own_seed)
    canon = {lat: canonical(image, lat, view, spacing, f"phantom{seed}", cfg)
             for lat, image in (("L", left), ("R", right))}
    forward, fitted = None, None
    if all(c.info["status"] == "ok" for c in canon.values()):
        forward, backward = register_pair(canon["L"], canon["R"], cfg)
        if forward.reg_ok and backward.reg_ok:
            fitted = map_stored_points(truth[:, :2], canon["L"].frame, canon["R"].frame, forward) * spacing
    return PhantomFit(canon, forward, fitted, truth[:, 2:] * spacing, best_affine_points(truth, canon) * spacing)


def fit_pair(seed: int, settings: PhantomSettings, cfg: PrepConfig, own_seed: int | None = None):
    """(fitted true L points in R (mm) or None when QC rejects, true R points (mm), best affine's R points (mm))."""
    fit = register_phantom_pair(seed, settings, cfg, own_seed)
    return fit.fitted, fit.true, fit.best


def settings_row(label: str, seeds: list[int], cfg: PrepConfig) -> dict:
    settings = PhantomSettings(**SETTINGS[label])
    errors, floors, far, wrong, canons = [], [], 0, [], {}
    for seed in seeds:
        fit = register_phantom_pair(seed, settings, cfg)
        floors.append(np.linalg.norm(fit.best - fit.true, axis=1))
        if fit.forward is not None:
            canons.setdefault(view_of(seed), []).append(fit.canon)
        if fit.fitted is not None:
            errors.append(np.linalg.norm(fit.fitted - fit.true, axis=1))
            far += int(np.median(errors[-1]) > WRONG_PAIR_MEDIAN_MM)
            wrong += wrong_fit_verdicts(fit.canon, fit.forward, cfg)
    # another woman: each L against the next pair's R of the same view, counted when QC accepts it unflagged
    mismatched = [register_grids(canon["L"].grid, other["R"].grid, cfg)
                  for same in canons.values() for canon, other in zip(same, same[1:] + same[:1]) if len(same) > 1]
    return {"setting": label, "pairs": len(seeds), "qc_passed": len(errors), "error": summary(errors),
            "floor": summary(floors), "passed_far": far, "wrong_fits": f"{sum(wrong)} / {len(wrong)}",
            "mismatched": f"{sum(m.reg_ok and not m.identity_flag for m in mismatched)} / {len(mismatched)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48, help="pairs per setting (CC and MLO alternate); default 48")
    parser.add_argument("--seed", type=int, default=0, help="first phantom seed; default 0")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                        help="rows to run (default all): " + ", ".join(repr(s) for s in SETTINGS).replace("%", "%%"))
    decomposition_arguments(parser, realisations=0)
    args = parser.parse_args()
    cfg = one_thread_config(args.mm_per_px, f"; {args.pairs} pairs per setting")
    started = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.pairs))
    print(f"\n| setting | QC passed | fit L -> R median / p95 / worst (mm) | best affine | passed > "
          f"{WRONG_PAIR_MEDIAN_MM:g} mm | wrong fits passed | mismatched accepted unflagged |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for label in args.settings:
        r = settings_row(label, seeds, cfg)
        print(f"| {label} | {r['qc_passed']} / {r['pairs']} | {r['error']} | {r['floor']} | {r['passed_far']} | "
              f"{r['wrong_fits']} | {r['mismatched']} |", flush=True)
    if args.realisations:
        settings = PhantomSettings(**SETTINGS[args.settings[0]])
        print(f"\ndecomposition, '{args.settings[0]}'", flush=True)
        decomposition(range(args.seed, args.seed + args.scatter_pairs), args.realisations,
                      lambda seed, realisation: fit_pair(seed, settings, cfg, own_seed=realisation))
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
