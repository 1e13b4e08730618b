"""Registration accuracy and speed on synthetic pairs with known correspondences.

For each (study, view) of `prep.synth.study.make_study`: canonicalise both sides, register L -> R
exactly as `prep.pairs.process_pair` does (`register_pair`: one fit and its inverse), map the generator's true left points (stored px) through
stored -> canonical -> affine -> canonical right -> stored right px, and compare with their true
positions (and the same for R -> L through the inverse). Prints median, p95 and worst point error in mm over all pairs against the target
(median <= 1.0 mm, p95 <= 3.0 mm, asserted by tests/test_pairs.py), and ms per pair
(canonicalisation excluded: resampling and segmentation have their own benchmark).

    python benchmarks/registration_bench.py [--pairs 40] [--mm-per-px 0.1] [--size small] [--no-refine]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.decode import DecodedImage  # noqa: E402
from prep.pairs import ImageInput, canonicalise, map_stored_points, register_pair  # noqa: E402
from prep.synth.study import make_study  # noqa: E402


# the acceptance target at the default spacing (tests/test_pairs.py asserts the same bounds)
TARGET_MEDIAN_MM = 1.0
TARGET_P95_MM = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40, help="number of L/R pairs (2 per study); default 40")
    parser.add_argument("--mm-per-px", type=float, default=0.1, help="canonical spacing in mm/px; default 0.1")
    parser.add_argument("--size", choices=("small", "full"), default="small",
                        help="synthetic detector size (full = 3518 x 2800, ~9 s per study); default small")
    parser.add_argument("--no-refine", action="store_true", help="skip the mask+intensity affine stage")
    parser.add_argument("--seed", type=int, default=0, help="first study seed; default 0")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cfg = PrepConfig(mm_per_px=args.mm_per_px, reg_refine_intensity=not args.no_refine)

    errors, back_errors, per_pair_median, times, failed = [], [], [], [], []
    seed = args.seed
    while len(times) + len(failed) < args.pairs:
        study = make_study(seed, args.size)
        for view in ("CC", "MLO"):
            if len(times) + len(failed) >= args.pairs:
                break
            images = {im.laterality: im for im in study.images if im.view == view}
            canon = {
                lat: canonicalise(ImageInput(f"{seed}-{lat}", lat, view,
                                             DecodedImage(im.image, (im.spacing_mm, im.spacing_mm))), cfg)
                for lat, im in images.items()
            }
            if any(c.info["status"] != "ok" for c in canon.values()):
                failed.append((seed, view, "segmentation"))
                continue
            started = time.perf_counter()
            forward, backward = register_pair(canon["L"], canon["R"], cfg)
            elapsed = time.perf_counter() - started
            if not (forward.reg_ok and backward.reg_ok):
                failed.append((seed, view, forward.reason or backward.reason))
                continue
            truth = study.correspondences[view]
            predicted = map_stored_points(truth[:, :2], canon["L"].frame, canon["R"].frame, forward.affine)
            err = np.linalg.norm(predicted - truth[:, 2:], axis=1) * images["R"].spacing_mm
            errors.append(err)
            per_pair_median.append(float(np.median(err)))
            back = map_stored_points(truth[:, 2:], canon["R"].frame, canon["L"].frame, backward.affine)
            back_errors.append(np.linalg.norm(back - truth[:, :2], axis=1) * images["L"].spacing_mm)
            times.append(elapsed)
        seed += 1

    all_err = np.concatenate(errors) if errors else np.zeros(0)
    print(f"pairs registered: {len(times)}  failed QC: {len(failed)} {failed if failed else ''}")
    print(f"config: mm_per_px={cfg.mm_per_px} reg_mm_per_px={cfg.reg_mm_per_px} refine={cfg.reg_refine_intensity} "
          f"size={args.size}")
    if len(all_err):
        median, p95 = float(np.median(all_err)), float(np.percentile(all_err, 95))
        print(f"point error (mm): median {median:.2f}  p95 {p95:.2f}  "
              f"worst {all_err.max():.2f}  (worst pair median {max(per_pair_median):.2f})")
        met = median <= TARGET_MEDIAN_MM and p95 <= TARGET_P95_MM and not failed
        print(f"target median <= {TARGET_MEDIAN_MM} mm, p95 <= {TARGET_P95_MM} mm, no QC failure: "
              f"{'met' if met else 'NOT met'}")
        back = np.concatenate(back_errors)
        print(f"R -> L (the inverse): median {np.median(back):.2f}  p95 {np.percentile(back, 95):.2f}  "
              f"worst {back.max():.2f}")
        print(f"time per pair (ms, both directions): median {1000 * np.median(times):.0f}  "
              f"max {1000 * max(times):.0f}")


if __name__ == "__main__":
    main()
