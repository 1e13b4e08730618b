"""Small file-writing helpers shared by every layer: atomic writes, hashing, temp-file cleanup.

An atomic write goes through a temp file in the target's folder, fsynced and then renamed over the target,
so a reader (or a resumed build) never sees a partial file; `remove_stray_temp_files` clears what a killed
writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` through a temp file in the same folder: fsync, then os.replace (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def write_json_atomic(path: Path, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stray_temp_files(folder: Path) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (`*.tmp`) under `folder`; returns what was removed."""
    removed = []
    if Path(folder).is_dir():
        for tmp in sorted(Path(folder).rglob(f"*{TMP_SUFFIX}")):
            tmp.unlink()
            removed.append(tmp)
    return removed
