"""Where the registration error at generator 2.0's default draws comes from: bias or scatter, and what limits it.

Issue 23 asks for median <= 1.0 / p95 <= 2.5 mm at default draws; the fit stops at ~1.3 / 3.3 whatever its
objective (docs/PERFORMANCE.md). This script separates the causes on generator 2.0's own pairs
(`registration_stress.render_pair`, default draws, demo scale 0.4 mm/px unless `--mm-per-px`), registering each
pair as the build does (`prep.pairs.register_pair`):

  rows         L -> R median / p95 / worst point error against the true correspondences, and the best affine's
               (least squares on the true points: the floor any affine has), for
                 generator 2.0          as drawn
                 no elastic             each side's elastic displacement off: the truth is an affine, floor 0
                 no compression jitter  both breasts share one skin fall-off length and one exposure
                 texture shared >= 3 mm texture shared down to ~3 mm instead of ~25 mm (the calibrated value,
                                        measured on real films: docs/REALISM.md); nothing else changes
  decomposition  each of `--scatter-pairs` studies rendered `--realisations` times with the same anatomy,
               transforms and shared texture under new independent (unshared) texture
               (`anatomy.bilateral_power_law_fields(own_rng=...)`); per point, "spread" = distance of each fit
               from the mean fit (the fit's scatter under the texture it cannot use), "bias" = distance of the
               mean fit from the best affine (what would remain with the texture averaged away; the mean of K fits
               still carries ~spread / sqrt(K) of scatter, printed beside it).

    python benchmarks/registration_limits.py [--pairs 30] [--scatter-pairs 12] [--realisations 8]

~1.5 min on one core with the defaults. Results: docs/PERFORMANCE.md, "Registration: what limits the default draws".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registration_bench import best_affine_points  # noqa: E402
from registration_stress import canonical, render_pair  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.pairs import map_stored_points, register_pair  # noqa: E402
from prep.synth import anatomy  # noqa: E402
from prep.synth import study as synth_study  # noqa: E402

# row label -> generator 2.0 module constants changed for it
GENERATORS = {
    "generator 2.0": {},
    "no elastic": {"_MAX_ELASTIC_MM": 0.0},
    "no compression jitter": {"_COMPRESSION_JITTER": 0.0, "_EXPOSURE_JITTER": 0.0},
    "texture shared >= 3 mm": {"_SHARED_WAVELENGTH_MM": 3.0},
}


@contextlib.contextmanager
def generator_constants(**values):
    """Within the block, generator 2.0's module constants take these values."""
    saved = {name: getattr(synth_study, name) for name in values}
    for name, value in values.items():
        setattr(synth_study, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(synth_study, name, value)


@contextlib.contextmanager
def independent_texture(realisation: int):
    """Within the block, each side's own texture is drawn from a generator seeded by `realisation`."""
    original = anatomy.bilateral_power_law_fields
    anatomy.bilateral_power_law_fields = functools.partial(
        original, own_rng=np.random.default_rng([realisation, 0x0DD5]))
    try:
        yield
    finally:
        anatomy.bilateral_power_law_fields = original


def view_of(seed: int) -> str:
    """The view a study seed is registered in: CC and MLO alternate, as in registration_stress."""
    return "MLO" if seed % 2 else "CC"


def fit_pair(seed: int, cfg: PrepConfig) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(fitted true L points in R, mm, or None when QC rejects; true R points, mm; best affine's R points, mm)."""
    view = view_of(seed)
    left, right, spacing, truth = render_pair(seed, view, "none", 0.0)
    canon = {lat: canonical(image, lat, view, spacing, str(seed), cfg) for lat, image in (("L", left), ("R", right))}
    forward, backward = register_pair(canon["L"], canon["R"], cfg)
    fitted = None
    if forward.reg_ok and backward.reg_ok:
        fitted = map_stored_points(truth[:, :2], canon["L"].frame, canon["R"].frame, forward) * spacing
    return fitted, truth[:, 2:] * spacing, best_affine_points(truth, canon) * spacing


def summary(errors: list[np.ndarray]) -> str:
    e = np.concatenate(errors) if errors else np.array([np.nan])
    return f"{np.median(e):.2f} / {np.percentile(e, 95):.2f} / {e.max():.1f}"


def generator_row(label: str, seeds: list[int], cfg: PrepConfig) -> str:
    errors, floors, rejected = [], [], 0
    with generator_constants(**GENERATORS[label]):
        for seed in seeds:
            fitted, true, best = fit_pair(seed, cfg)
            floors.append(np.linalg.norm(best - true, axis=1))
            if fitted is None:
                rejected += 1
            else:
                errors.append(np.linalg.norm(fitted - true, axis=1))
    return f"| {label} | {len(seeds) - rejected} / {len(seeds)} | {summary(errors)} | {summary(floors)} |"


def decomposition_row(seed: int, realisations: int, fit) -> tuple[str, dict]:
    """One decomposed pair: `fit(seed, realisation)` -> (fitted points or None, true points, best affine's)."""
    fits, true, best = [], None, None
    for realisation in range(realisations):
        fitted, true, best = fit(seed, realisation)
        if fitted is not None:
            fits.append(fitted)
    if len(fits) < 2:
        return f"| {seed} | {len(fits)} / {realisations} | | | | |", {}
    fits = np.array(fits)
    mean = fits.mean(axis=0)
    parts = {
        "error": np.linalg.norm(fits - true, axis=2).ravel(),
        "spread": np.linalg.norm(fits - mean, axis=2).ravel(),
        "bias": np.linalg.norm(mean - best, axis=1),
        "floor": np.linalg.norm(best - true, axis=1),
    }
    cells = " | ".join(f"{np.median(parts[k]):.2f} / {np.percentile(parts[k], 95):.2f}" for k in parts)
    return (f"| {seed} {view_of(seed)} | {len(fits)} / {realisations} | {cells} | "
            f"{np.median(parts['spread']) / np.sqrt(len(fits)):.2f} |"), parts


def decomposition(seeds, realisations: int, fit) -> None:
    """Print the decomposition table of `seeds` (see the module docstring), pooled over them in its last row."""
    print(f"\ndecomposition over {realisations} independent textures per study (mm, median / p95 over points)\n"
          "| study | QC passed | error | spread about the mean fit | mean fit vs best affine (bias) | best affine "
          "| spread / sqrt(K) |\n|---|---|---|---|---|---|---|", flush=True)
    pooled: dict[str, list] = {}
    for seed in seeds:
        line, parts = decomposition_row(seed, realisations, fit)
        print(line, flush=True)
        for key, values in parts.items():
            pooled.setdefault(key, []).append(values)
    cells = " | ".join(f"{np.median(np.concatenate(v)):.2f} / {np.percentile(np.concatenate(v), 95):.2f}"
                       for v in pooled.values())
    print(f"| all | | {cells} | |", flush=True)


def generator_fit(seed: int, realisation: int, cfg: PrepConfig):
    """generator 2.0's pair `seed` under its `realisation`-th draw of the texture the two sides do not share."""
    with independent_texture(realisation):
        return fit_pair(seed, cfg)


def decomposition_arguments(parser: argparse.ArgumentParser, realisations: int) -> None:
    """The decomposition's options and the canonical spacing, shared with registration_phantom."""
    parser.add_argument("--scatter-pairs", type=int, default=12, help="studies in the decomposition; default 12")
    parser.add_argument("--realisations", type=int, default=realisations,
                        help=f"independent textures per decomposed study (0: no decomposition); default {realisations}")
    parser.add_argument("--mm-per-px", type=float, default=0.4, help="canonical spacing; default 0.4 (the demo's)")


def one_thread_config(mm_per_px: float, note: str = "") -> PrepConfig:
    """The config the registration benchmarks run at (patch field 25.6 mm), after one OpenCV thread and the machine
    line are set and printed."""
    cv2.setNumThreads(1)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"OpenCV {cv2.__version__}, one thread; {mm_per_px} mm/px{note}", flush=True)
    return PrepConfig(mm_per_px=mm_per_px, patch_px=round(25.6 / mm_per_px))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30, help="default-draw pairs per generator row; default 30")
    decomposition_arguments(parser, realisations=8)
    args = parser.parse_args()
    cfg = one_thread_config(args.mm_per_px)
    started = time.perf_counter()
    print("\n| generator | QC passed | fit L -> R median / p95 / worst (mm) | best affine |\n|---|---|---|---|",
          flush=True)
    for label in GENERATORS:
        print(generator_row(label, list(range(args.pairs)), cfg), flush=True)
    if args.realisations:
        decomposition(range(args.scatter_pairs), args.realisations, functools.partial(generator_fit, cfg=cfg))
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
