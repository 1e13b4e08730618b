"""Small file-writing helpers shared by every layer: atomic writes, hashing, temp-file cleanup.

Every write of the project goes through `atomic_open` (tests/test_storage_seam.py checks it). A local target
is written to a temp file in its folder, fsynced and then renamed over it, so a reader (or a resumed build)
never sees a partial file; `remove_stray_temp_files` clears what a killed writer left behind. An object-store
target (`prep.storage.Location`) is written to a local temp file and uploaded whole: the object appears
complete or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from prep.storage import Location, location

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: Path | Location | str) -> Iterator[IO[bytes]]:
    """Write `path` through a temp file in the same folder: fsync, then os.replace (never a partial file);
    an object through a local temp file, uploaded whole once written."""
    target = location(path)
    if not target.is_local:
        with tempfile.NamedTemporaryFile(suffix=TMP_SUFFIX) as handle:
            yield handle
            handle.flush()
            target.fs.put_file(handle.name, target.path)
        return
    path = Path(target.path)
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


def write_bytes_atomic(path: Path | Location | str, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def write_parquet_atomic(path: Path | Location | str, frame) -> None:
    """A pandas DataFrame as one Parquet file (no index), written whole or not at all. pandas is the caller's:
    this module stays importable without it (Dask workers)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: Path | Location | str, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path | Location | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with location(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stray_temp_files(folder: Path | Location | str) -> list[Path]:
    """Delete leftovers of interrupted atomic writes (`*.tmp`) under a local `folder` (an object store never
    sees a temp file); returns what was removed."""
    target = location(folder)
    if not target.is_local:
        return []
    folder, removed = Path(target.path), []
    if Path(folder).is_dir():
        for tmp in sorted(Path(folder).rglob(f"*{TMP_SUFFIX}")):
            tmp.unlink()
            removed.append(tmp)
    return removed
