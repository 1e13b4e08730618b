"""Evaluation's embedding throughput beside the bare backbone's forward on the same tensors, in one run.

The same shards (fixture pairs in the build format, tests/shard_fixture.py, or --shards/--manifest) are
embedded three ways with one backbone, one batch size and the same torch threads:
  bare        -- the backbone's forward alone (`to_model_input` + forward + L2 norm, `torch.inference_mode`)
                 over the batches already decoded and held in memory: the ceiling
  evaluation  -- what `train evaluate` runs (`train.embed.shard_batches` + `embed_batches`): read, select,
                 decode and pixel baselines in --num-workers DataLoader workers while the model runs,
                 manifest meta looked up once, top-12 pairs kept
  inline      -- the same loop with decoding in the main process (`iter_samples` -> `embed_pairs`):
                 what the DataLoader takes off the model's path
After one warm-up pass each, the rows are timed in --repeats rounds (one pass of each per round, so a
neighbour's load on a shared machine falls on all of them alike). Prints each row's best pass in pairs/s,
the ratio evaluation/bare (the median over rounds of the per-round ratio; target >= 0.8) and the machine;
writes benchmarks/results/embed_bench.json.

    python benchmarks/embed_bench.py [--pairs 2048] [--patch-px 64] [--backbone resnet18] [--batch-size 128]
        [--num-workers 1] [--threads 2] [--device cpu] [--repeats 3] [--shards DIR --manifest samples.parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from train.data import select
from train.embed import (
    batch_samples, embed_batches, embed_pairs, iter_samples, manifest_labels, pooled_features, shard_batches,
)
from train.models import create_backbone

REPO = Path(__file__).resolve().parents[1]


def fixture(root: Path, pairs: int, patch_px: int) -> tuple[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from shard_fixture import write_shards

    per_shard = 256
    fx = write_shards(root, n_shards=max(1, pairs // per_shard), per_shard=per_shard, patch_px=patch_px,
                      codec="png", finding_every=8)
    return str(fx["shards"]), str(fx["manifest"])


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each function, after one warm-up pass each, taken in rounds (one pass of every
    function per round) so that a neighbour's load on a shared machine falls on all rows alike."""
    n = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            assert fn() == n[name]
            times[name].append(time.perf_counter() - t0)
    return n, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--patch-px", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the main process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards")
    ap.add_argument("--manifest")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = create_backbone(args.backbone).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        shards, manifest = (args.shards, args.manifest) if args.shards else fixture(Path(tmp), args.pairs, args.patch_px)
        selection = select(shards=shards, manifest=manifest, include_finding=True)
        labels = manifest_labels(manifest)
        held = [b.pixels for b in batch_samples(iter_samples(selection.urls, selection.keys, labels), args.batch_size)]
        if device.type == "cuda":
            held = [x.pin_memory() for x in held]

        def bare() -> int:
            with torch.inference_mode():
                for x in held:
                    pooled_features(backbone, x, device)[1].cpu()
            return sum(len(x) for x in held) // 2

        def evaluation() -> int:
            batches = shard_batches(selection.urls, selection.keys, read_json=False, batch_size=args.batch_size,
                                    num_workers=args.num_workers, pin_memory=device.type == "cuda")
            return len(embed_batches(backbone, batches, device, labels=labels).table)

        def inline() -> int:
            samples = iter_samples(selection.urls, selection.keys, labels)
            return len(embed_pairs(backbone, samples, args.batch_size, device).table)

        n, times = interleaved({"bare": bare, "evaluation": evaluation, "inline": inline}, args.repeats)
    rows = {name: {"pairs": n[name], "seconds": t, "pairs_per_s": n[name] / min(t)} for name, t in times.items()}
    # per round, so that the ratio compares passes taken under the same load
    rounds = [tb / te for tb, te in zip(times["bare"], times["evaluation"])]
    ratio = statistics.median(rounds)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    print(f"\nembedding throughput: {rows['bare']['pairs']} pairs of {args.patch_px}-px patches, {args.backbone}, "
          f"batch {args.batch_size}, {args.threads} torch threads, {args.num_workers} decode worker(s), "
          f"device {device}; best of {args.repeats} interleaved rounds")
    print(f"machine: {machine}")
    print(f"{'bare forward':>14} {'evaluation':>12} {'inline decode':>14}   evaluation/bare  inline/bare")
    print(f"{rows['bare']['pairs_per_s']:14.0f} {rows['evaluation']['pairs_per_s']:12.0f} "
          f"{rows['inline']['pairs_per_s']:14.0f}   {ratio:15.3f}  {rows['inline']['pairs_per_s'] / rows['bare']['pairs_per_s']:11.3f}")
    print(f"(pairs/s, best pass; evaluation/bare is the median over rounds of the per-round ratio: "
          f"{', '.join(f'{r:.2f}' for r in rounds)}; target >= 0.8)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "device": str(device), "threads": args.threads, "num_workers": args.num_workers,
              "backbone": args.backbone, "patch_px": args.patch_px, "batch_size": args.batch_size,
              "repeats": args.repeats, "rows": rows, "evaluation_over_bare_per_round": rounds,
              "evaluation_over_bare": ratio}
    (args.out / "embed_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
