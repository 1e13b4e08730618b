"""Per-image step times of the image core on one core, for a full-size 3518 x 2800 synthetic mammogram.

Steps timed (median of --repeats): resample to the common spacing, segment, chest-wall side +
tag check, canonical flip of image and mask. Decoding is reported for information only (it depends
on the transfer syntax, see shared/research/data.md section 4) and is not part of the budget.

    python benchmarks/image_steps_bench.py [--repeats 5] [--mm-per-px 0.1] [--budget-s 0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402

from prep.decode import decode_dicom  # noqa: E402
from prep.geometry import resample_to_spacing  # noqa: E402
from prep.orient import check_orientation, to_canonical  # noqa: E402
from prep.segment import segment_breast  # noqa: E402
from prep.synth.anatomy import burn_label, power_law_field  # noqa: E402

ROWS, COLS = 3518, 2800
SPACING_MM = 0.085
BITS = 12


def synthetic_dataset(seed: int = 0) -> Dataset:
    """A right MLO-sized breast stored chest wall right (VinDr), 12-bit, windowed, with a corner label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ROWS, :COLS].astype(np.float32) * SPACING_MM
    breast = ((COLS * SPACING_MM - xx) / 170.0) ** 2 + ((yy - 150.0) / 125.0) ** 2 < 1
    tissue = np.clip(0.3 * (1 + 0.4 * power_law_field((ROWS, COLS), 3.0, rng)), 0.18, 1.0)
    image = np.where(breast, tissue, 0.0) + np.abs(rng.normal(0, 0.01, (ROWS, COLS)))
    label = burn_label(np.zeros((ROWS, COLS), np.uint8), "R-MLO", right_side=False, spacing_mm=SPACING_MM)
    image = np.maximum(image, label / 255.0)
    stored = np.round(np.clip(image, 0, 1) * (2**BITS - 1)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(stored, "MONOCHROME2", BITS)
    ds.ImagerPixelSpacing = [SPACING_MM, SPACING_MM]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImageLaterality = "R"
    return ds


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per step, median reported (default 5)")
    parser.add_argument("--mm-per-px", type=float, default=0.1, help="common spacing in mm/px (default 0.1)")
    parser.add_argument("--budget-s", type=float, default=0.3, help="target for all per-image steps, s (default 0.3)")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    ds = synthetic_dataset()
    t_decode, decoded = timed(lambda: decode_dicom(ds), args.repeats)
    steps = {}
    steps["resample"], (image, _) = timed(
        lambda: resample_to_spacing(decoded.pixels, decoded.spacing_mm, args.mm_per_px), args.repeats
    )
    steps["segment"], seg = timed(lambda: segment_breast(image, args.mm_per_px), args.repeats)
    steps["orient"], check = timed(lambda: check_orientation(seg.mask, decoded.meta["laterality_tag"]), args.repeats)
    steps["canonical"], _ = timed(lambda: (to_canonical(image, check.side), to_canonical(seg.mask, check.side)),
                                  args.repeats)

    print(f"image {ROWS}x{COLS} @ {SPACING_MM} mm -> {image.shape[0]}x{image.shape[1]} @ {args.mm_per_px} mm, "
          f"1 thread, median of {args.repeats}")
    print(f"  {'decode (info, uncompressed)':28s} {t_decode * 1000:7.1f} ms")
    for name, seconds in steps.items():
        print(f"  {name:28s} {seconds * 1000:7.1f} ms")
    total = sum(steps.values())
    verdict = "OK" if total <= args.budget_s else "OVER BUDGET"
    print(f"  {'per-image steps total':28s} {total * 1000:7.1f} ms  (budget {args.budget_s * 1000:.0f} ms: {verdict})")
    print(f"  segmentation ok={seg.ok} method={seg.method}; chest wall {check.side} ({check.flag})")


if __name__ == "__main__":
    main()
