"""`train detect`'s encoder pass before and after preparing the backbone for inference, side by side in one run.

The studies of an archive (default: the 8-study synthetic archive of the tests, seed 7, size small, written to a
temporary folder) are cut onto the detection grid exactly as `train detect` cuts them (`train.detect.cut_study`),
and the patches of every image -- its own and the registered contralateral ones, one call per image, as the
detector makes them -- are embedded two ways with one backbone, one batch size and the same torch threads:
  eager      -- `train.embed.embed_patches` on the backbone as loaded (the detector's previous path)
  inference  -- `train.detect.encoder_features`: the same `embed_patches` on `train.embed.inference_backbone`
                (batch norm folded, oneDNN layout kept between layers), the detector's path now
After a warm-up on one image each, the two are timed in --repeats interleaved rounds (one pass of each per round, so a
neighbour's load on a shared machine falls on both alike). Prints patches/s (wall, best pass), patches per
CPU second (process CPU time, which a shared machine distorts less), the median per-round ratio and the largest
feature difference; with --whole also one whole `train.detect.detect` run (seconds per study and its parts).
Writes benchmarks/results/detect_bench.json.

    python benchmarks/detect_bench.py [--root ARCHIVE --dataset vindr --where QUERY] [--studies N] [--encoder RUN]
        [--backbone resnet18 --mm-per-px 0.4 --patch-px 64] [--batch-size 64] [--threads 2] [--repeats 3] [--whole]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prep.config import PrepConfig
from prep.datasets import get_adapter
from train.detect import DetectConfig, cut_study, detect, encoder_features, selected_studies, usable_views
from train.embed import embed_patches
from train.models import create_backbone, load_encoder


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def image_stacks(root: str, dataset: str, where: str | None, n_studies: int | None, mm_per_px: float,
                 patch_px: int) -> tuple[list[np.ndarray], int]:
    """Per image, its grid patches then its registered contralateral ones (what the detector embeds), and the
    number of studies cut."""
    records = get_adapter(dataset)(root).images()
    views, _ = usable_views(records, None)
    studies = [s for s in selected_studies(records, None, where) if s in {study for study, _ in views}][:n_studies]
    cfg = PrepConfig(mm_per_px=mm_per_px, patch_px=patch_px)
    stacks = []
    for study in studies:
        images, _ = cut_study(study, views, cfg, max(1, patch_px // 2), None)
        stacks += [im.ipsi if im.contra is None else np.concatenate([im.ipsi, im.contra]) for im in images]
    return stacks, len(studies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="archive [default: the tests' 8-study synthetic archive, written to a temp dir]")
    ap.add_argument("--dataset", default="vindr")
    ap.add_argument("--where", help="pandas query over the archive's images selecting studies")
    ap.add_argument("--studies", type=int, help="only the first N selected studies (in study-id order)")
    ap.add_argument("--encoder", help="run dir or encoder.safetensors [default: a random-init --backbone]")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--mm-per-px", type=float, default=0.4)
    ap.add_argument("--patch-px", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=DetectConfig.batch_size)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also one whole detect() run with the current path")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.encoder:
        backbone, meta = load_encoder(args.encoder, "cpu")
    else:
        torch.manual_seed(0)
        backbone, meta = create_backbone(args.backbone).eval(), {"mm_per_px": args.mm_per_px, "patch_px": args.patch_px}
    mm_per_px, patch_px = float(meta["mm_per_px"]), int(meta["patch_px"])
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from prep.synth import write_archive

            root = str(Path(tmp) / "archive")
            write_archive(Path(root), n_studies=8, seed=7, size="small")
        stacks, n_studies = image_stacks(root, args.dataset, args.where, args.studies, mm_per_px, patch_px)
        n_patches = sum(len(s) for s in stacks)
        paths = {"eager": lambda x: embed_patches(backbone, x, batch_size=args.batch_size, device="cpu"),
                 "inference": encoder_features(backbone, args.batch_size, "cpu")}
        for fn in paths.values():  # warm-up
            fn(stacks[0])
        wall, cpu, features = {name: [] for name in paths}, {name: [] for name in paths}, {}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                w, c = time.perf_counter(), cpu_seconds()
                features[name] = np.concatenate([fn(s) for s in stacks])
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(cpu_seconds() - c)
        max_diff = float(np.abs(features["eager"] - features["inference"]).max())
        whole = None
        if args.whole:
            cfg = DetectConfig(root=root, dataset=args.dataset, where=args.where, n_boot=0, batch_size=args.batch_size,
                               device="cpu").validate()
            w, c = time.perf_counter(), cpu_seconds()
            det = detect(cfg, backbone, meta, "encoder")
            seconds = time.perf_counter() - w
            whole = {"studies": det.timing["studies"], "bank_studies": det.bank["studies"], "seconds": seconds,
                     "cpu_seconds": cpu_seconds() - c, "seconds_per_study": seconds / det.timing["studies"],
                     "encoder_seconds": det.timing["encoder_feature_seconds"], "cut_seconds": det.timing["cut_seconds"],
                     "positions": int(len(det.positions))}
    rows = {name: {"patches_per_s": n_patches / min(wall[name]), "patches_per_cpu_s": n_patches / min(cpu[name]),
                   "seconds": wall[name], "cpu_seconds": cpu[name]} for name in paths}
    rounds = [e / i for e, i in zip(wall["eager"], wall["inference"])]
    cpu_rounds = [e / i for e, i in zip(cpu["eager"], cpu["inference"])]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average " + \
        " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\ndetection encoder pass: {n_patches} patches ({patch_px} px, {mm_per_px} mm/px) of {len(stacks)} images, "
          f"{n_studies} studies, {args.encoder or args.backbone + ' (random init)'}, batch {args.batch_size}, "
          f"{args.threads} torch threads; best of {args.repeats} interleaved rounds")
    print(f"machine: {machine}")
    print(f"{'':>10} {'patches/s':>10} {'patches/CPU-s':>14}")
    for name, row in rows.items():
        print(f"{name:>10} {row['patches_per_s']:10.0f} {row['patches_per_cpu_s']:14.0f}")
    print(f"inference/eager speed-up: best passes {rows['inference']['patches_per_s'] / rows['eager']['patches_per_s']:.2f}x "
          f"wall, {rows['inference']['patches_per_cpu_s'] / rows['eager']['patches_per_cpu_s']:.2f}x CPU; median per round "
          f"{statistics.median(rounds):.2f}x wall (rounds {', '.join(f'{r:.2f}' for r in rounds)}), "
          f"{statistics.median(cpu_rounds):.2f}x CPU; largest feature difference {max_diff:.1e}")
    if whole:
        print(f"whole detect(): {whole['studies']} studies (+ bank of {whole['bank_studies']}), {whole['positions']} "
              f"positions, {whole['seconds']:.1f} s ({whole['cpu_seconds']:.1f} CPU-s), "
              f"{whole['seconds_per_study']:.2f} s per study; encoder {whole['encoder_seconds']:.1f} s, "
              f"cut {whole['cut_seconds']:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "threads": args.threads, "batch_size": args.batch_size, "patch_px": patch_px,
              "mm_per_px": mm_per_px, "encoder": args.encoder or f"{args.backbone} random init", "patches": n_patches,
              "images": len(stacks), "studies": n_studies, "rows": rows, "speedup_wall_per_round": rounds,
              "speedup_cpu_per_round": cpu_rounds, "max_feature_difference": max_diff, "whole": whole}
    (args.out / "detect_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
