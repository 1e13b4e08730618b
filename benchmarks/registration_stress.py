"""Registration under left/right differences stronger than generator 2.0 draws: a stress table.

Every cell renders (study, view) pairs with generator 2.0 (`prep.synth.study.make_study`, its anatomy and its
per-side affine + elastic `anatomy.SideTransform`s, default draws for both sides) and then gives the right
breast one extra difference of a family at a strength:

  rotation_deg        the R breast rotated about the chest-wall point of the nipple axis (sign alternates)
  compression_pct     R compressed along the chest wall by that share (anisotropic scale 1 : 1 - c)
  elastic_<L>mm       R deformed by three extra sine displacements of wavelength L mm, amplitudes summing to
                      the strength (mm)
  shift_mm            R positioned that far along the chest wall and a quarter of it out of the field
  pectoral_mm (MLO)   R pulled that much less into the field: part of its pectoral muscle leaves the image
  fold_mm             a local skin fold: a Gaussian displacement (sigma 10 mm) of that amplitude near the skin line
  size_px             both stored images resampled to that width (the RSNA-layout false rejects were at 600 x 480)
  breast_scale        both images declared at that multiple of their pixel spacing: the same pixels as breasts
                      that much larger (or smaller) in mm, their texture coarser (finer) against the fit's mm bands
                      (generator 2.0's breasts are large: median area ~26,000 mm2, the real CBIS-DDSM films' at
                      0.05 mm/px 6,600-11,600)

Ground truth: the generator's true correspondences (256 points per pair, through both sides' transforms).
Per cell: median / p95 / worst point error (mm, L -> R, stored px x spacing) over the pairs QC passes, the
best-affine floor (least squares on the true points), QC pass rate of the right fits, QC pass rate of
deliberately wrong fits (registration_bench.WRONG_FITS) and of mismatched pairs (the cell's L against the next
pair's R: another woman), and how many mismatched pairs are rejected or flagged.

    python benchmarks/registration_stress.py [--quick] [--pairs N] [--scales 0.1 0.4] [--json PATH]

`--quick`: 3 pairs per cell and the strongest two strengths of each family (~2 min on one core);
results: docs/PERFORMANCE.md, section "Registration under stress".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registration_bench import best_affine_points, wrong_fit_verdicts  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.decode import DecodedImage  # noqa: E402
from prep.geometry import map_points  # noqa: E402
from prep.pairs import ImageInput, canonicalise, map_stored_points, register_pair  # noqa: E402
from prep.register import register_grids  # noqa: E402
from prep.synth import anatomy  # noqa: E402
from prep.synth import study as synth_study  # noqa: E402

# family -> strengths (the first is the generator's default draw: no extra difference)
FAMILIES = {
    "rotation_deg": (0.0, 5.0, 10.0, 15.0),
    "compression_pct": (0.0, 10.0, 20.0, 30.0),
    "elastic_60mm": (0.0, 2.0, 4.0, 8.0),
    "elastic_120mm": (0.0, 2.0, 4.0, 8.0),
    "elastic_240mm": (0.0, 2.0, 4.0, 8.0),
    "shift_mm": (0.0, 5.0, 10.0, 20.0),
    "pectoral_mm": (0.0, 5.0, 10.0, 20.0),
    "fold_mm": (0.0, 2.0, 4.0, 6.0),
    "size_px": (560.0, 480.0, 840.0),
    "breast_scale": (1.0, 0.6, 0.8, 1.2, 1.4),
}
# families that change how the generator's own pair is stored or declared, not how the generator draws it
STORAGE_FAMILIES = ("size_px", "breast_scale")
WRONG_PAIR_MEDIAN_MM = 3.0  # a QC-passed pair this far off (median) is a wrong fit that passed


@dataclasses.dataclass(frozen=True)
class FoldedTransform(anatomy.SideTransform):
    """A side transform plus a local Gaussian displacement (a skin fold): still analytic, so still exact truth."""

    fold_centre: tuple[float, float] = (0.0, 0.0)  # side mm
    fold_vector: tuple[float, float] = (0.0, 0.0)  # mm
    fold_sigma: float = 10.0

    def elastic(self, px, py):
        ux, uy = super().elastic(px, py)
        weight = np.exp(-((px - self.fold_centre[0]) ** 2 + (py - self.fold_centre[1]) ** 2) / (2 * self.fold_sigma**2))
        return ux + self.fold_vector[0] * weight, uy + self.fold_vector[1] * weight


def stressed(transform: anatomy.SideTransform, pivot: np.ndarray, family: str, strength: float, sign: float,
             rng: np.random.Generator) -> anatomy.SideTransform:
    """`transform` with the family's extra difference (side frame: P' = M (P - pivot) + pivot + shift)."""
    matrix, shift = np.eye(2), np.zeros(2)
    if family == "rotation_deg":
        t = np.deg2rad(sign * strength)
        matrix = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    elif family == "compression_pct":
        matrix = np.diag([1.0, 1.0 - strength / 100.0])
    elif family == "shift_mm":
        shift = np.array([-strength / 4.0, sign * strength])
    elif family == "pectoral_mm":
        shift = np.array([-strength, 0.0])
    a = matrix @ transform.matrix
    offset = matrix @ (transform.offset - pivot) + pivot + shift
    out = dataclasses.replace(transform, matrix=a, offset=offset)
    if family.startswith("elastic_") and strength > 0:
        wavelength = float(family.split("_")[1][:-2])
        angle, f_angle = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, 2 * np.pi, 3)
        out = dataclasses.replace(
            out, elastic_amp=np.concatenate([out.elastic_amp, np.full(3, strength / 3.0)]),
            elastic_dir=np.concatenate([out.elastic_dir, np.stack([np.cos(angle), np.sin(angle)], 1)]),
            elastic_freq=np.concatenate([out.elastic_freq,
                                         np.stack([np.cos(f_angle), np.sin(f_angle)], 1) / wavelength]),
            elastic_phase=np.concatenate([out.elastic_phase, rng.uniform(0, 2 * np.pi, 3)]))
    if family == "fold_mm" and strength > 0:
        centre = pivot + np.array([rng.uniform(50.0, 70.0), sign * rng.uniform(20.0, 40.0)])
        direction = rng.uniform(0, 2 * np.pi)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(anatomy.SideTransform)}
        out = FoldedTransform(**fields, fold_centre=tuple(centre),
                              fold_vector=(strength * np.cos(direction), strength * np.sin(direction)))
    return out


@contextlib.contextmanager
def stressing(family: str, strength: float, sign: float, rng: np.random.Generator):
    """Within the block, the generator's second side transform of a view (the R image) gets the extra difference."""
    original = anatomy.random_side_transform
    calls = []

    def patched(rng_draw, pivot_mm, *args):
        transform = original(rng_draw, pivot_mm, *args)
        calls.append(transform)
        if len(calls) % 2 == 0:
            transform = stressed(transform, np.asarray(pivot_mm, float), family, strength, sign, rng)
        return transform

    anatomy.random_side_transform = patched
    try:
        yield
    finally:
        anatomy.random_side_transform = original


def render_pair(seed: int, view: str, family: str, strength: float):
    """(stored L image, stored R image, their spacing in mm/px, true correspondences) of one stressed pair."""
    rng = np.random.default_rng([seed, 0x57E55])
    sign = 1.0 if (seed // 2) % 2 else -1.0
    stress = family if family not in STORAGE_FAMILIES else "none"
    with stressing(stress, strength, sign, rng):
        study = synth_study.make_study(seed, "small", images=(("L", view), ("R", view)))
    left, right = (next(im for im in study.images if im.laterality == lat) for lat in "LR")
    truth = study.correspondences[view]
    images, spacing = [left.image, right.image], left.spacing_mm
    if family == "size_px" and strength != left.image.shape[1]:
        factor = strength / left.image.shape[1]
        shape = (round(left.image.shape[1] * factor), round(left.image.shape[0] * factor))
        images = [cv2.resize(im, shape, interpolation=cv2.INTER_AREA) for im in images]
        scale_xy = (shape[0] / left.image.shape[1], shape[1] / left.image.shape[0])
        truth = np.hstack([map_points(truth[:, :2], scale_xy), map_points(truth[:, 2:], scale_xy)])
        spacing = spacing / scale_xy[0]
    if family == "breast_scale":
        spacing = spacing * strength
    return images[0], images[1], spacing, truth


def canonical(image: np.ndarray, lat: str, view: str, spacing: float, tag: str, cfg: PrepConfig):
    return canonicalise(ImageInput(f"{tag}-{lat}", lat, view, DecodedImage(image, (spacing, spacing))), cfg)


def run_cell(family: str, strength: float, seeds: list[int], cfg: PrepConfig) -> dict:
    errors, floors, passed, wrong, mismatch, mismatch_flagged, seconds, wrong_passed = [], [], [], [], [], [], [], 0
    right_flagged = 0
    pairs = []
    for seed in seeds:
        view = "MLO" if family == "pectoral_mm" or seed % 2 else "CC"
        left_img, right_img, spacing, truth = render_pair(seed, view, family, strength)
        canon = {lat: canonical(im, lat, view, spacing, str(seed), cfg) for lat, im in (("L", left_img), ("R", right_img))}
        if any(c.info["status"] != "ok" for c in canon.values()):
            passed.append(False)
            continue
        started = time.process_time()
        forward, backward = register_pair(canon["L"], canon["R"], cfg)
        seconds.append(time.process_time() - started)
        pairs.append((view, canon))
        ok = bool(forward.reg_ok and backward.reg_ok)
        passed.append(ok)
        if not np.isfinite(forward.affine).all():
            continue
        ahead = map_stored_points(truth[:, :2], canon["L"].frame, canon["R"].frame, forward)
        err = np.linalg.norm(ahead - truth[:, 2:], axis=1) * spacing
        floors.append(np.linalg.norm(best_affine_points(truth, canon) - truth[:, 2:], axis=1) * spacing)
        if ok:
            right_flagged += int(bool(forward.identity_flag or backward.identity_flag))
            errors.append(err)
            wrong_passed += int(np.median(err) > WRONG_PAIR_MEDIAN_MM)
            wrong += wrong_fit_verdicts(canon, forward, cfg)
    for view in ("CC", "MLO"):
        same = [canon for v, canon in pairs if v == view]
        for canon, other in zip(same, same[1:] + same[:1]) if len(same) > 1 else ():
            reg = register_grids(canon["L"].grid, other["R"].grid, cfg)
            mismatch.append(reg.reg_ok)
            mismatch_flagged.append(bool(reg.reg_ok and getattr(reg, "identity_flag", None)))
    err = np.concatenate(errors) if errors else np.array([np.nan])
    floor = np.concatenate(floors) if floors else np.array([np.nan])
    return {
        "family": family, "strength": strength, "pairs": len(seeds), "qc_pass": float(np.mean(passed)),
        "median_mm": float(np.median(err)), "p95_mm": float(np.percentile(err, 95)), "worst_mm": float(np.max(err)),
        "floor_median_mm": float(np.median(floor)), "floor_p95_mm": float(np.percentile(floor, 95)),
        "floor_worst_mm": float(np.max(floor)),
        "wrong_pairs_passed": wrong_passed, "right_flagged": right_flagged, "wrong_fits_passed": sum(wrong), "wrong_fits": len(wrong),
        "mismatch_accepted": sum(m and not f for m, f in zip(mismatch, mismatch_flagged)), "mismatch": len(mismatch),
        "cpu_ms": 1000 * float(np.median(seconds)) if seconds else float("nan"),
    }


def table(rows: list[dict]) -> str:
    lines = ["| cell | pairs | QC pass (right fits) | median / p95 / worst (mm, QC-passed) | best affine median / p95 / worst "
             "| passed > 3 mm | right flagged | wrong fits passed | mismatched accepted unflagged | CPU ms/pair |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['family']} {r['strength']:g} | {r['pairs']} | {100 * r['qc_pass']:.0f} % | {r['median_mm']:.2f} / "
            f"{r['p95_mm']:.2f} / {r['worst_mm']:.1f} | {r['floor_median_mm']:.2f} / {r['floor_p95_mm']:.2f} / {r['floor_worst_mm']:.1f} | "
            f"{r['wrong_pairs_passed']} | {r['right_flagged']} | {r['wrong_fits_passed']} / {r['wrong_fits']} | {r['mismatch_accepted']} / "
            f"{r['mismatch']} | {r['cpu_ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 pairs per cell, default + the two strongest levels")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per cell (default 8; --quick 3)")
    parser.add_argument("--seed", type=int, default=0, help="first study seed; default 0")
    parser.add_argument("--scales", type=float, nargs="+", default=(0.1, 0.4),
                        help="canonical mm/px to run at (patch field 25.6 mm); default 0.1 0.4")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--default-pairs", type=int, default=None,
                        help="pairs of the default-draw row (default 3x --pairs)")
    parser.add_argument("--deformable", action="store_true",
                        help="with the deformable stage after the affine (cfg.reg_deformable, prep.deform)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    n = args.pairs or (3 if args.quick else 8)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus (shared), Python {platform.python_version()}, "
          f"OpenCV {cv2.__version__}, one thread; {n} pairs per cell")
    results = []
    for scale in args.scales:
        cfg = PrepConfig(mm_per_px=scale, patch_px=round(25.6 / scale), reg_deformable=args.deformable)
        rows = [run_cell("default", 0.0, list(range(args.seed, args.seed + (args.default_pairs or 3 * n))), cfg)]
        rows[0]["family"] = "generator 2.0 default"
        for family in args.families:
            strengths = FAMILIES[family][1:]
            if args.quick:
                strengths = strengths[-2:] if family not in STORAGE_FAMILIES else strengths
            for strength in strengths:
                rows.append(run_cell(family, strength, list(range(args.seed, args.seed + n)), cfg))
                print(f"  {scale} mm/px {family} {strength:g}: done", flush=True)
        print(f"\n{scale} mm/px (patch {cfg.patch_px} px)\n{table(rows)}\n", flush=True)
        results += [{**r, "mm_per_px": scale} for r in rows]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
