"""What the build tests share (a helper module, not a test module): the reference build's options and CLI
flags, tar digests, and a separately started Dask scheduler with workers."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import sys
from pathlib import Path

from pipelines.plan import BuildOptions
from prep.config import PrepConfig

BUILD = "t"
CLI_FLAGS = ["--mm-per-px", "0.4", "--patch-px", "64", "--grid-patches", "3", "--group-pairs", "1",
             "--shard-max-samples", "12", "--build", BUILD]
OPTIONS = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=3),
                       group_pairs=1, shard_max_samples=12)


def tar_digests(shards_dir: Path) -> dict[str, str]:
    return {p.relative_to(shards_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(shards_dir.rglob("*.tar"))}


def cli_args(archive: Path, out: Path, *extra: str) -> list[str]:
    """`prep build-shards` arguments for the reference options, writing under `out`."""
    return ["build-shards", "--root", str(archive), "--out", str(out / "shards"),
            "--manifests", str(out / "manifests"), *CLI_FLAGS, *extra]


def cli(archive: Path, out: Path, *extra: str) -> list[str]:
    """The same as a command line (a separate process, as users run it)."""
    return [sys.executable, "-m", "prep", *cli_args(archive, out, *extra)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_dask(cwd, worker_args: list[str], n_workers: int = 1, env: dict | None = None):
    """A separately started `dask scheduler` + `n_workers` `dask worker` processes on 127.0.0.1; yields the
    scheduler address and tears everything down afterwards."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard", *worker_args],
                               cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for _ in range(n_workers)]
    try:
        yield address
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
