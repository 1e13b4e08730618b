"""WebDataset shards: sample encoding, reproducible tar writing, deterministic shard numbering.

Shard path: `<out>/<split>/<build>-<split>-NNNNNN.tar`. Shard group `g` of a split owns the index block
[g * SHARD_STRIDE, (g + 1) * SHARD_STRIDE): its k-th tar is `g * SHARD_STRIDE + k`. The index therefore depends
only on the plan (never on which worker finished first), a group can be rewritten without renumbering any
other, and a resumed build reproduces the same names. Index blocks are sparse (list shards with `wids.json`,
`shards.parquet` or a glob, not a brace range).

Tars are byte-reproducible: plain `tarfile` streams laid out exactly as webdataset's `TarWriter` writes them
(PAX, mtime=0, fixed user/group/mode), members of a sample in sorted order (`contra.<codec>`, `ipsi.<codec>`,
`json`), samples shuffled with a seeded RNG. `webdataset` itself is not imported here: it imports torch,
which slows every Dask worker's start and exit (docs/PERFORMANCE.md "Prep: Dask scaling").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

import numpy as np

from prep.io import atomic_open
from prep.codec import encode_patch
from prep.errors import ContralateralError
from prep.storage import Location

SHARD_STRIDE = 1000
TAR_BLOCK = 512
TAR_USER = "contralateral"
TAR_MODE = 0o444


class ShardLimitError(ContralateralError):
    """A shard group needs more than SHARD_STRIDE shards (reason `group_too_large`)."""


def shard_name(build: str, split: str, index: int) -> str:
    return f"{build}-{split}-{index:06d}.tar"


def shard_relpath(build: str, split: str, group: int, part: int) -> str:
    """`<split>/<build>-<split>-NNNNNN.tar` for the `part`-th tar of shard group `group`."""
    if part >= SHARD_STRIDE:
        raise ShardLimitError("group_too_large", f"group {group} of {split} needs more than {SHARD_STRIDE} "
                              "shards: lower --group-pairs or raise --shard-max-samples/--shard-max-bytes")
    return f"{split}/{shard_name(build, split, group * SHARD_STRIDE + part)}"


def group_of_shard_index(index: int) -> int:
    return index // SHARD_STRIDE


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any tuple of values (stable across processes and Python versions)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass
class EncodedSample:
    """One sample ready for a tar: `row` is its samples.parquet row minus shard/offset (= the json member)."""

    row: dict
    members: dict[str, bytes]

    @property
    def tar_bytes(self) -> int:
        return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in self.members.values())


def encode_sample(row: dict, ipsi: np.ndarray, contra: np.ndarray, codec: str) -> EncodedSample:
    members = {f"ipsi.{codec}": encode_patch(ipsi, codec), f"contra.{codec}": encode_patch(contra, codec),
               "json": json.dumps(row, sort_keys=True, separators=(",", ":")).encode()}
    return EncodedSample(row=row, members=members)


def tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    """The header webdataset's `TarWriter(user, group, mode, mtime=0)` writes for one member."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, TAR_MODE
    info.uname = info.gname = TAR_USER
    return info


class HashingWriter:
    """A write-only stream that hashes and counts what passes through it (a tar is hashed as it is written,
    never read back: on an object store that would be a second download)."""

    def __init__(self, handle):
        self.handle, self.digest, self.bytes = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += memoryview(data).nbytes
        return self.handle.write(data)


def write_tar(path: Location, samples: list[EncodedSample]) -> dict:
    """Write samples in the given order to `path`, atomically and byte-reproducibly; returns the done
    marker's record of it ({"sha256", "bytes"})."""
    with atomic_open(path) as raw:
        handle = HashingWriter(raw)
        # TarWriter's stream mode; PAX is what TarWriter gets (Python's default), pinned so bytes stay put
        stream = tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT)
        try:
            for sample in samples:
                for member in sorted(sample.members):
                    data = sample.members[member]
                    stream.addfile(tar_member(f"{sample.row['key']}.{member}", data), io.BytesIO(data))
        except BaseException:
            # close on failure too, or the tar stream's finaliser later writes into the closed temp file
            with contextlib.suppress(OSError):
                stream.close()
            raise
        stream.close()
    return {"sha256": handle.digest.hexdigest(), "bytes": handle.bytes}


@dataclass
class ShardRoller:
    """Buffers a group's samples and writes a shuffled tar whenever a limit would be exceeded.

    Memory is bounded by one shard (max_bytes). `rows` collects the samples.parquet rows (with shard and
    offset) and `shards` the shards.parquet rows of everything written so far.
    """

    shards_dir: Location
    build: str
    split: str
    group: int
    seed: int
    max_samples: int
    max_bytes: int
    rows: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    _buffer: list[EncodedSample] = field(default_factory=list)
    _buffer_bytes: int = 0

    def add(self, sample: EncodedSample) -> None:
        if self._buffer and (len(self._buffer) >= self.max_samples
                             or self._buffer_bytes + sample.tar_bytes > self.max_bytes):
            self.flush()
        self._buffer.append(sample)
        self._buffer_bytes += sample.tar_bytes

    def flush(self) -> None:
        if not self._buffer:
            return
        relpath = shard_relpath(self.build, self.split, self.group, len(self.shards))
        rng = np.random.default_rng(derive_seed(self.seed, relpath))
        ordered = [self._buffer[i] for i in rng.permutation(len(self._buffer))]
        record = write_tar(self.shards_dir / relpath, ordered)
        self.rows.extend({**s.row, "shard": relpath, "offset": offset} for offset, s in enumerate(ordered))
        self.shards.append({"shard": relpath, "split": self.split, "group": self.group, "nsamples": len(ordered),
                            "bytes": record["bytes"], "sha256": record["sha256"]})
        self._buffer, self._buffer_bytes = [], 0
