"""Training step time with the real loader vs the same step on in-memory batches: the data-stall fraction.

For each (method, backbone) the trainer's own loop (`train.loop.pretrain`, hence `train.methods` and
`train.data`) runs twice with one config:
  loader  -- the streaming loader over shards (`train.data.make_loader`: tar -> select -> shuffle -> decode
             -> crop -> uint16 batches), with --num-workers worker processes
  memory  -- the same loop with `make_loader` swapped for batches that loader already produced, held in memory
stall = 1 - t_memory / t_loader: the share of a step spent waiting for data. Step times come from the loop's
own metrics.jsonl (pairs/s per log window; the first window -- start-up, first mixture fit -- is dropped);
`data_wait` is the loop's own measure of the same thing. On CUDA the loop uses bf16 autocast and
channels_last; --compile adds torch.compile. Prints one table and writes benchmarks/results/train_bench.json.

    python benchmarks/train_bench.py [--methods siamese-soft,simclr,ld] [--backbones resnet18,resnet10t]
        [--patch-px 128] [--batch-size 32] [--steps 40] [--num-workers 2] [--shards DIR] [--compile]

Shards: --shards DIR (e.g. a `prep build-shards` output), else fixture shards in the build format are written
to a temp folder (tests/shard_fixture.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

import train.loop
from train.config import PretrainConfig
from train.data import StreamConfig, make_loader, select
from train.methods import get_method

REPO = Path(__file__).resolve().parents[1]


class InMemoryLoader:
    """Stands in for `make_loader`'s WebLoader: `n_batches` of the given (already decoded) batches, cycled."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_batches: int):
        self.batches = batches
        self.n_batches = n_batches

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.batches), self.n_batches)


def memory_batches(cfg: PretrainConfig, n: int, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`n` batches from the trainer's loader, exactly as the loop would request them."""
    selection = select(cfg.shards, cfg.manifest, cfg.where, cfg.include_finding)
    stream = StreamConfig(crop_px=cfg.crop_px, num_workers=0, include_finding=cfg.include_finding,
                          shuffle_buffer=cfg.shuffle_buffer)
    batches = list(make_loader(selection, stream, cfg.batch_size, n, cfg.seed, 0))
    return [(a.pin_memory(), b.pin_memory(), g) for a, b, g in batches] if pin else batches


def step_seconds(run_dir: Path, batch_size: int) -> tuple[float, float]:
    """(seconds per step, mean data_wait) over the log windows after the first."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    if not records:
        raise SystemExit("--steps must be at least 2 x --log-every")
    per_step = sum(batch_size / r["pairs_per_s"] for r in records) / len(records)
    return per_step, sum(r["data_wait"] for r in records) / len(records)


def run(cfg: PretrainConfig, in_memory: list | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = replace(cfg, out=out)
        if in_memory is None:
            train.loop.pretrain(cfg)
        else:
            with mock.patch.object(train.loop, "make_loader",
                                   lambda selection, stream, batch, n, seed, epoch: InMemoryLoader(in_memory, n)):
                train.loop.pretrain(cfg)
        return step_seconds(Path(out), cfg.batch_size)


def fixture_shards(root: Path, patch_px: int, n_shards: int, per_shard: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from shard_fixture import write_shards

    return write_shards(root, n_shards=n_shards, per_shard=per_shard, patch_px=patch_px, finding_every=0)["shards"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--methods", default="siamese-soft,simclr,ld", help="comma-separated (default: %(default)s)")
    ap.add_argument("--backbones", default="resnet18,resnet10t", help="timm names (default: %(default)s)")
    ap.add_argument("--patch-px", type=int, default=256 if cuda else 96, help="fixture patch side, px")
    ap.add_argument("--crop-px", type=int, default=None, help="crop side, px (default: the trainer's 7/8)")
    ap.add_argument("--batch-size", type=int, default=256 if cuda else 32, help="pairs per step")
    ap.add_argument("--steps", type=int, default=60 if cuda else 24, help="steps per run")
    ap.add_argument("--log-every", type=int, default=10 if cuda else 4, help="steps per timing window")
    ap.add_argument("--num-workers", type=int, default=min(8, (os.cpu_count() or 2) - 1) if cuda else 1,
                    help="loader worker processes")
    ap.add_argument("--shards", type=Path, default=None, help="shard dir (default: fixture shards in a temp dir)")
    ap.add_argument("--memory-batches", type=int, default=8, help="distinct batches held in memory")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_shards = max(2, args.num_workers)
        shards = args.shards or fixture_shards(Path(tmp), args.patch_px, n_shards,
                                               per_shard=max(64, 2 * args.batch_size))
        crop = args.crop_px or train.loop.default_crop(args.patch_px)
        for method, backbone in itertools.product(args.methods.split(","), args.backbones.split(",")):
            cfg = PretrainConfig(shards=str(shards), method=method, backbone=backbone, crop_px=crop,
                                 batch_size=args.batch_size, steps=args.steps, ckpt_every=args.steps,
                                 log_every=args.log_every, num_workers=args.num_workers, shuffle_buffer=256,
                                 compile=args.compile, progress=False, resume="never")
            row = {"method": method, "backbone": backbone}
            try:
                get_method(method)
                t_loader, wait = run(cfg, None)
                t_mem, _ = run(cfg, memory_batches(cfg, args.memory_batches, pin=cuda))
                row.update(t_loader=t_loader, t_memory=t_mem, stall=1 - t_mem / t_loader, data_wait=wait,
                           pairs_per_s_loader=args.batch_size / t_loader, pairs_per_s_memory=args.batch_size / t_mem)
            except Exception as exc:  # a method that is not importable or not runnable here: say so, go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(f"done {method} {backbone}", file=sys.stderr)

    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"\ntrain step, {device}, batch {args.batch_size} pairs, crop {crop}px, {args.num_workers} loader "
          f"worker(s), torch threads {torch.get_num_threads()}" + (", compiled" if args.compile else ""))
    print(f"{'method':13} {'backbone':10} {'ms/step mem':>11} {'ms/step ldr':>11} {'pairs/s':>8} {'stall':>6} "
          f"{'data_wait':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:13} {r['backbone']:10} {r['error']}")
            continue
        print(f"{r['method']:13} {r['backbone']:10} {r['t_memory'] * 1e3:11.1f} {r['t_loader'] * 1e3:11.1f} "
              f"{r['pairs_per_s_loader']:8.1f} {r['stall']:6.2f} {r['data_wait']:9.2f}")
    print("stall = 1 - t_memory / t_loader; data_wait = the loop's own share of time spent waiting for a batch")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": cuda,
              "batch_size": args.batch_size, "patch_px": args.patch_px, "crop_px": crop, "steps": args.steps,
              "num_workers": args.num_workers, "compile": args.compile, "threads": torch.get_num_threads(),
              "shards": str(args.shards) if args.shards else "fixture", "rows": rows}
    name = "train_bench_cuda.json" if cuda else "train_bench.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
