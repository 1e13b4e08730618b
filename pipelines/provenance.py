"""What a build records about the software that made it (build.json `versions`, `git_commit`)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

VERSION_PACKAGES = ("contralateral", "numpy", "pydicom", "opencv-python-headless", "scikit-image", "pyarrow",
                    "webdataset", "dask", "distributed")


def package_versions() -> dict:
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
