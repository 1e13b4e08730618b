"""The Dask task of a build: one shard group in; its tars, Parquet parts and (last) done marker out.

`run_group(GroupTask)` processes the group's pairs (`pipelines.pair_work`), writes its shards through a
`ShardRoller` and its five Parquet parts, then its done marker (`pipelines.resume`), and returns a small
counts dict: arrays never travel through the scheduler. The same function runs in this process for
`--workers 0`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from pipelines import manifests as mf
from pipelines.pair_work import process_planned_pair
from pipelines.plan import BuildOptions, ShardGroup
from pipelines.resume import write_done_marker
from pipelines.shards import ShardRoller, encode_sample
from prep.storage import Location


@dataclass(frozen=True)
class GroupTask:
    """One unit of work: a shard group and what its task needs to write it where the build lives."""

    group: ShardGroup
    options: BuildOptions
    build: str
    shards_dir: Location
    manifests_dir: Location
    config_hash: str

    @property
    def key(self) -> str:
        """The Dask key: unique per config and group, so a shared scheduler never confuses two builds."""
        return f"group-{self.config_hash}-{self.group.name}"


def run_group(task: GroupTask) -> dict:
    """Process one shard group, write its tars, parts and (last) its done marker; return its counts. OpenCV runs
    one thread in the worker (`prep.opencv`, imported by the image core): the cores are the workers'."""
    group, options, manifests_dir = task.group, task.options, task.manifests_dir
    roller = ShardRoller(shards_dir=task.shards_dir, build=task.build, split=group.split, group=group.group,
                         seed=options.prep.seed, max_samples=options.shard_max_samples,
                         max_bytes=options.shard_max_bytes)
    images, pairs, rejects = [], [], []
    timings = Counter()
    for planned in group.pairs:
        outcome = process_planned_pair(planned, options)
        images += outcome.images
        rejects += outcome.rejects
        if outcome.pair is not None:
            pairs.append(outcome.pair)
        timings.update(outcome.timings)
        started = time.perf_counter()
        for row, sample in outcome.samples:
            roller.add(encode_sample(row, sample.ipsi, sample.contra, options.codec))
        timings["write_s"] += time.perf_counter() - started
    started = time.perf_counter()
    roller.flush()
    tables = {"images": images, "pairs": pairs, "samples": roller.rows, "rejects": rejects, "shards": roller.shards}
    files = {f"shards/{s['shard']}": {"sha256": s["sha256"], "bytes": s["bytes"]} for s in roller.shards}
    for name, rows in tables.items():
        path = mf.part_path(manifests_dir, group.name, name)
        files[f"manifests/{path.relative_to(manifests_dir)}"] = mf.write_table(path, name, rows)
    timings["write_s"] += time.perf_counter() - started
    counts = {"split": group.split, "group": group.group, "pairs": len(group.pairs),
              "pairs_ok": sum(p["status"] == "ok" for p in pairs), "samples": len(roller.rows),
              "rejects": len({r["image_id"] for r in rejects}), "shards": len(roller.shards),
              "bytes": sum(s["bytes"] for s in roller.shards), "timings": dict(timings)}
    write_done_marker(manifests_dir, group, task.config_hash, counts, files)
    return counts
