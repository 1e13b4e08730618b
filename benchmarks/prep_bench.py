"""Prep cost, measured side by side in one run (one process, one core).

Part 1 -- per image: DICOM decode alone vs the whole per-pair work on the same files (decode both
sides, resample, segment, orient, register both directions, sample and cut patch pairs, encode them
for the shard), for full-size synthetic images stored uncompressed and as JPEG 2000 lossless.
Part 2 -- the Dask build on a small synthetic archive with 1 and N workers: parallel efficiency
t1 / (N * tN).

    python benchmarks/prep_bench.py [--pairs 3] [--studies 16] [--workers 2] [--skip-dask]
Targets (issue "Speed and fault tolerance"): whole/decode <= 1.25 on JPEG 2000; whole per image
<= 0.3 s uncompressed; Dask efficiency >= 85 % from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: E402

from prep.codec import encode_patch  # noqa: E402
from prep.config import PrepConfig  # noqa: E402
from prep.decode import decode_dicom, read_dicom  # noqa: E402
from prep.pairs import ImageInput, process_pair  # noqa: E402
from prep.synth import make_study, to_dicom_dataset  # noqa: E402

cv2.setNumThreads(1)
SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless}


def write_pair_files(tmp: Path, seed: int, syntax_uid: str) -> list[tuple[Path, object]]:
    """One full-size CC pair of a synthetic study as DICOM files; returns [(path, SynthImage)] for L, R."""
    study = make_study(seed, "full", finding="Mass", images=(("L", "CC"), ("R", "CC")))
    out = []
    for img in study.images:
        ds = to_dicom_dataset(img.image, img.spacing_mm, transfer_syntax=syntax_uid,
                              laterality=img.laterality, view=img.view)
        path = tmp / f"{seed}_{img.laterality}.dicom"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, img))
    return out


def decode_only(path: Path) -> float:
    t0 = time.perf_counter()
    decode_dicom(read_dicom(path))
    return time.perf_counter() - t0


def whole_pair(files: list[tuple[Path, object]], cfg: PrepConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    inputs = []
    for path, img in files:
        decoded = decode_dicom(read_dicom(path))
        inputs.append(ImageInput(image_id=path.stem, laterality=img.laterality, view=img.view, decoded=decoded,
                                 findings=list(img.findings), study_id="bench"))
    result = process_pair(inputs[0], inputs[1], cfg, seed=0)
    for s in result.samples:
        encode_patch(s.ipsi, "npy")
        encode_patch(s.contra, "npy")
    return time.perf_counter() - t0, len(result.samples)


def per_image_rows(n_pairs: int, cfg: PrepConfig) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, uid in SYNTAXES.items():
            decode_t, whole_t, n_samples = [], [], 0
            for seed in range(n_pairs):
                files = write_pair_files(Path(tmp), seed, uid)
                for path, _ in files:
                    path.read_bytes()  # page cache: both columns read cached bytes
                decode_t += [decode_only(p) for p, _ in files]
                t, n = whole_pair(files, cfg)
                whole_t.append(t / 2)  # per image
                n_samples += n
            d, w = statistics.median(decode_t), statistics.median(whole_t)
            rows.append({"input": name, "decode_s": d, "whole_s": w, "ratio": w / d, "steps_s": w - d,
                         "samples_per_pair": n_samples / n_pairs})
    return rows


def dask_rows(studies: int, workers: int) -> list[dict]:
    from rich.console import Console

    from pipelines.build import build_shards
    from pipelines.plan import BuildOptions
    from prep.synth import write_archive

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        write_archive(root, studies, 3, "small")
        for n in sorted({1, workers}):
            out = Path(tmp) / f"w{n}"
            t0 = time.perf_counter()
            options = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64), group_pairs=4)
            summary = build_shards("vindr", root, options=options, out=out / "shards", manifests=out / "manifests",
                                   build="bench", workers=n, console=Console(quiet=True))
            rows.append({"workers": n, "seconds": time.perf_counter() - t0,
                         "pairs": sum(summary.get("pairs_ok", {}).values()), "samples": summary.get("n_samples")})
            shutil.rmtree(out)
    t1 = rows[0]["seconds"]
    for r in rows:
        r["efficiency"] = t1 / (r["workers"] * r["seconds"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="full-size pairs per transfer syntax")
    ap.add_argument("--studies", type=int, default=16, help="studies in the Dask scaling archive")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    cfg = PrepConfig()  # the product default: 0.1 mm/px, 256-px patches
    rows = per_image_rows(args.pairs, cfg)
    print(f"\nper image, full-size synthetic (3518x2800-class), one core, default config "
          f"({cfg.mm_per_px} mm/px, {cfg.patch_px}px patches), median of {args.pairs} pairs")
    print(f"{'input':13} {'decode s':>9} {'whole s':>9} {'steps s':>9} {'whole/decode':>13} {'samples/pair':>13}")
    for r in rows:
        print(f"{r['input']:13} {r['decode_s']:9.3f} {r['whole_s']:9.3f} {r['steps_s']:9.3f} {r['ratio']:13.2f} "
              f"{r['samples_per_pair']:13.1f}")
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "per_image": rows}
    if not args.skip_dask:
        drows = dask_rows(args.studies, args.workers)
        print(f"\nDask build, {args.studies}-study small archive (0.4 mm/px, 64-px patches)")
        print(f"{'workers':>7} {'seconds':>9} {'pairs':>6} {'samples':>8} {'efficiency':>11}")
        for r in drows:
            print(f"{r['workers']:7d} {r['seconds']:9.2f} {r['pairs']!s:>6} {r['samples']!s:>8} {r['efficiency']:11.2f}")
        result["dask"] = drows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prep_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
