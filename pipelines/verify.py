"""`verify_build`: check shards against their manifests, reading every sample.

Checks: every tar of `shards.parquet` exists with its sha256 and no unlisted tar lies in the shard folder;
every sample is read back (plain `webdataset`), its key sits at the offset `samples.parquet` gives and its
json equals the manifest row (minus shard/offset); counts agree with `shards.parquet` and `wids.json`;
one sample per shard decodes (`prep.codec.decode_pair`) to two uint16 patches of the manifest's patch_px.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from prep.io import sha256_file
from prep.codec import decode_json, decode_pair
from prep.storage import Location, location
from train.data import shard_samples


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def same_value(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def check_sample_json(meta: dict, row: dict) -> list[str]:
    expected = {k: v for k, v in row.items() if k not in ("shard", "offset")}
    if set(meta) != set(expected):
        return [f"json fields differ from the manifest: {sorted(set(meta) ^ set(expected))}"]
    return [f"json {k}={meta[k]!r} but manifest {expected[k]!r}" for k in expected if not same_value(meta[k], expected[k])]


def check_decoded(sample: dict, patch_px: int) -> list[str]:
    ipsi, contra = decode_pair(sample)
    problems = []
    for name, patch in (("ipsi", ipsi), ("contra", contra)):
        if patch.dtype != np.uint16 or patch.shape != (patch_px, patch_px):
            problems.append(f"{name} decodes to {patch.dtype} {patch.shape}, expected uint16 ({patch_px}, {patch_px})")
    return problems


def verify_shard(path: Location, rows: list[dict]) -> tuple[int, list[str]]:
    """Read every sample of one tar and compare with its manifest rows (sorted by offset)."""
    problems, count = [], 0
    try:
        stream = wds.DataPipeline(wds.SimpleShardList([path.url]), wds.pipelinefilter(shard_samples)())
        for offset, sample in enumerate(stream):
            count += 1
            if offset >= len(rows):
                continue
            row = rows[offset]
            if sample["__key__"] != row["key"]:
                problems.append(f"offset {offset}: key {sample['__key__']} but manifest says {row['key']}")
                continue
            try:
                problems += [f"{row['key']}: {p}" for p in check_sample_json(decode_json(sample), row)]
                if offset == 0:
                    problems += [f"{row['key']}: {p}" for p in check_decoded(sample, row["patch_px"])]
            except (KeyError, ValueError) as exc:  # undecodable json or patch: a mismatch, not a crash
                problems.append(f"{row['key']}: cannot decode: {type(exc).__name__}: {exc}")
    except (OSError, tarfile.TarError, ValueError) as exc:
        problems.append(f"unreadable tar after {count} samples: {type(exc).__name__}: {exc}")
    if count != len(rows):
        problems.append(f"{count} samples in the tar, {len(rows)} in samples.parquet")
    return count, problems


def verify_build(shards_dir: Path | str | Location, manifests_dir: Path | str | Location,
                 on_shard: Callable[[int, int, str], None] | None = None) -> VerifyReport:
    """Folders or URLs (`prep.storage`); an unserved scheme raises `StorageError`. `on_shard(done, total, name)`
    before each shard is read."""
    shards_dir, manifests_dir = location(shards_dir), location(manifests_dir)
    report = VerifyReport()
    present = manifests_dir.listing()
    missing = [n for n in ("shards.parquet", "samples.parquet", "wids.json") if n not in present]
    if missing:
        report.problems.append(f"missing manifest file(s) in {manifests_dir}: {', '.join(missing)}")
        return report
    shards, samples = (read_rows(manifests_dir / name) for name in ("shards.parquet", "samples.parquet"))
    by_shard: dict[str, list[dict]] = {}
    for row in samples:
        by_shard.setdefault(row["shard"], []).append(row)
    listed = {s["shard"] for s in shards}
    on_disk = {rel for rel in shards_dir.listing() if rel.endswith(".tar")}
    report.problems += [f"{s}: tar not listed in shards.parquet" for s in sorted(on_disk - listed)]
    report.problems += [f"{s}: samples.parquet names a shard not in shards.parquet"
                        for s in sorted(set(by_shard) - listed)]
    wids = json.loads((manifests_dir / "wids.json").read_text())
    wids_counts = {wids_target(manifests_dir, e["url"]): e["nsamples"] for e in wids.get("shardlist", [])}

    for done, shard in enumerate(sorted(shards, key=lambda s: s["shard"])):
        name, path = shard["shard"], shards_dir / shard["shard"]
        report.shards += 1
        if on_shard:
            on_shard(done, len(shards), name)
        if name not in on_disk:
            report.problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            report.problems.append(f"{name}: sha256 differs from shards.parquet")
        rows = sorted(by_shard.get(name, []), key=lambda r: r["offset"])
        if [r["offset"] for r in rows] != list(range(len(rows))):
            report.problems.append(f"{name}: offsets in samples.parquet are not 0..{len(rows) - 1}")
        count, problems = verify_shard(path, rows)
        report.samples += count
        report.problems += [f"{name}: {p}" for p in problems]
        if count != shard["nsamples"]:
            report.problems.append(f"{name}: {count} samples, shards.parquet says {shard['nsamples']}")
        wids_count = wids_counts.get(path.url)
        if wids_count != count:
            report.problems.append(f"{name}: wids.json nsamples {wids_count} != {count}")
    return report


def read_rows(path: Location) -> list[dict]:
    with path.open("rb") as handle:
        return pq.read_table(handle).to_pylist()


def wids_target(manifests_dir: Location, url: str) -> str:
    """The full URL a wids.json entry names (relative entries resolve against the manifest folder)."""
    return url if "://" in url else (manifests_dir / url).url
