"""Loader throughput per core, per patch codec, side by side in one run.

For each codec the same patch pairs are written to shards, then read back four ways on one core:
  tar      -- plain `tarfile` iteration over the same bytes (the I/O floor)
  wds      -- webdataset grouping into samples, no decode
  decode   -- webdataset + the 16-bit-safe decoder (`prep.codec.decode_pair`)
  loader   -- the trainer's own pretraining pipeline (`train.data`), 0 workers, batched, uint16
Prints pairs/s and the ratio to plain tar iteration; writes JSON to benchmarks/results/.

    python benchmarks/loader_bench.py [--pairs 2000] [--patch-px 256] [--shards DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402

import torch  # noqa: E402

from prep.codec import CODECS, decode_pair, encode_patch, sample_key  # noqa: E402
from train.data import Selection, StreamConfig, make_loader, resolve_shards  # noqa: E402
from train.loop import default_crop  # noqa: E402

cv2.setNumThreads(1)


def texture_patch(rng: np.random.Generator, px: int, beta: float = 3.0) -> np.ndarray:
    """A 1/f^beta uint16 texture patch (what mammogram patches look like to a codec)."""
    fy = np.fft.fftfreq(px)[:, None]
    fx = np.fft.rfftfreq(px)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (beta / 2)
    img = np.fft.irfft2(spectrum, s=(px, px))
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    img = 0.2 + 0.6 * img + rng.normal(scale=0.01, size=img.shape)
    return np.clip(img * 65535, 0, 65535).astype(np.uint16)


def write_shards(out: Path, codec: str, patches: list[tuple[np.ndarray, np.ndarray]], per_shard: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    urls = []
    for start in range(0, len(patches), per_shard):
        path = out / f"bench-{codec}-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i, (a, b) in enumerate(patches[start : start + per_shard], start):
                meta = {"sampling": "grid", "patch_px": int(a.shape[0])}
                sink.write({"__key__": sample_key("bench", f"s{i:06d}", "CC", "L", i % 10000),
                            f"ipsi.{codec}": encode_patch(a, codec), f"contra.{codec}": encode_patch(b, codec),
                            "json": json.dumps(meta).encode()})
        urls.append(str(path))
    return urls


def rate(fn, n_expected: int) -> float:
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    assert n == n_expected, (n, n_expected)
    return n / dt


def read_tar(urls: list[str]) -> int:
    members = 0
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf:
                if m.isfile():
                    tf.extractfile(m).read()
                    members += 1
    return members // 3


def read_wds(urls: list[str], decode: bool) -> int:
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if decode:
            decode_pair(sample)
        n += 1
    return n


def read_trainer_loader(shard_dir: Path, n_pairs: int, patch_px: int, batch_size: int = 64) -> int:
    """Pairs through the trainer's own pipeline (`train.data.make_loader`: select, shuffle, decode, crop,
    batch to uint16 tensors), 0 workers and one torch thread, as `train pretrain` runs it."""
    torch.set_num_threads(1)
    selection = Selection(urls=resolve_shards(shard_dir), keys=None, n_samples=None)
    stream = StreamConfig(crop_px=default_crop(patch_px), num_workers=0)
    n = 0
    for ipsi, _contra, _groups in make_loader(selection, stream, batch_size, n_pairs // batch_size, seed=0, data_epoch=0):
        n += int(ipsi.shape[0])
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--patch-px", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    base = [texture_patch(rng, args.patch_px) for _ in range(64)]
    patches = [(base[i % 64], base[(i * 7 + 3) % 64]) for i in range(args.pairs)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in CODECS:
            shard_dir = Path(tmp) / codec
            urls = write_shards(shard_dir, codec, patches, args.per_shard)
            size = sum(os.path.getsize(u) for u in urls)
            read_tar(urls)  # warm the page cache: every row below reads cached bytes
            r_tar = rate(lambda: read_tar(urls), args.pairs)
            r_wds = rate(lambda: read_wds(urls, decode=False), args.pairs)
            r_dec = rate(lambda: read_wds(urls, decode=True), args.pairs)
            t0 = time.perf_counter()
            n_loader = read_trainer_loader(shard_dir, args.pairs, args.patch_px)
            r_loader = None if not n_loader else n_loader / (time.perf_counter() - t0)
            rows.append({"codec": codec, "bytes_per_pair": size / args.pairs, "tar": r_tar, "wds": r_wds,
                         "decode": r_dec, "loader": r_loader})

    print(f"\nloader throughput, one core, {args.pairs} pairs of {args.patch_px}px uint16 patches")
    print(f"{'codec':6} {'kB/pair':>8} {'tar':>9} {'wds':>9} {'decode':>9} {'loader':>9}   decode/tar  loader/tar")
    for r in rows:
        loader = f"{r['loader']:9.0f}" if r["loader"] else "      n/a"
        lratio = f"{r['loader'] / r['tar']:10.3f}" if r["loader"] else "       n/a"
        print(f"{r['codec']:6} {r['bytes_per_pair'] / 1e3:8.1f} {r['tar']:9.0f} {r['wds']:9.0f} {r['decode']:9.0f} "
              f"{loader}   {r['decode'] / r['tar']:10.3f}  {lratio}")
    print("(pairs/s; ratios are to plain tar iteration of the same bytes)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "pairs": args.pairs, "patch_px": args.patch_px, "rows": rows}
    (args.out / "loader_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
