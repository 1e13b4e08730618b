"""Real faults, injected from outside: kill -9 during `train pretrain`, a Dask worker killed mid-build, a full
disk (EFBIG from RLIMIT_FSIZE) and an unwritable output folder during `prep build-shards`.

(kill -9 of the whole `prep build-shards` process tree is tested in tests/test_build.py; both compare with
the session's `reference_build`.)
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from build_helpers import cli, cli_args, local_dask, tar_digests
from pipelines.verify import verify_build
from prep.cli import app as prep_app
from shard_fixture import write_shards

pytestmark = pytest.mark.slow

SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the box is shared; also keeps CPU kernels identical


def assert_same_as_clean_build(out: Path, clean: Path) -> None:
    """Nothing lost, nothing duplicated: the same tars, and manifest rows = shard samples with unique keys."""
    assert tar_digests(out / "shards") == tar_digests(clean / "shards")
    samples = pq.read_table(out / "manifests" / "samples.parquet")
    keys = samples.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == sum(r["nsamples"] for r in pq.read_table(
        out / "manifests" / "shards.parquet").to_pylist())
    assert samples.equals(pq.read_table(clean / "manifests" / "samples.parquet"))
    assert verify_build(out / "shards", out / "manifests").ok


# ----------------------------------------------------------------------------------------------- trainer

TRAIN_STEPS, CKPT_EVERY = 120, 20


def test_kill_9_during_pretrain_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_trainer):
    data = write_shards(tmp_path / "data", n_shards=2, per_shard=24)
    flags = tiny_trainer.flags(batch_size=16, deterministic=True, steps=TRAIN_STEPS, ckpt_every=CKPT_EVERY,
                               log_every=10)

    def pretrain_command(out: Path) -> list[str]:
        return [sys.executable, "-m", "train", "pretrain", "--shards", str(data["shards"]), "--out", str(out), *flags]

    straight = subprocess.run(pretrain_command(tmp_path / "straight"), env=SINGLE_THREAD,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "killed"
    command = pretrain_command(run)
    proc = subprocess.Popen(command, env=SINGLE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / f"step-{CKPT_EVERY:08d}.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint before the end"
        time.sleep(0.02)
    time.sleep(random.Random(TRAIN_STEPS).uniform(0.2, 1.5))  # lands mid data-epoch, maybe mid-save
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)["step"]  # the newest complete checkpoint
    assert CKPT_EVERY <= killed_at < TRAIN_STEPS

    rerun = subprocess.run(command, env=SINGLE_THREAD, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed {run / 'last.pt'} at step {killed_at}" in rerun.stdout
    steps = logged_steps(run)
    # one history, no duplicate records after the kill: the same records (log steps and mixture refits) as the
    # uninterrupted run
    assert steps == logged_steps(tmp_path / "straight") and set(range(10, TRAIN_STEPS + 1, 10)) <= set(steps)
    resumed = torch.load(run / "last.pt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert resumed["step"] == reference["step"] == TRAIN_STEPS
    for name, tensor in reference["method"].items():
        torch.testing.assert_close(resumed["method"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- Dask worker


@pytest.fixture
def scheduler_and_two_workers(tmp_path):
    """`dask scheduler` + 2 `dask worker --no-nanny --nthreads 1` on 127.0.0.1: each worker is its own process."""
    from dask.distributed import Client

    with local_dask(tmp_path, ["--no-nanny"], n_workers=2, env=SINGLE_THREAD) as address:
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client


def test_a_dask_worker_killed_mid_build_loses_and_duplicates_nothing(synth_archive, reference_build, tmp_path,
                                                                     scheduler_and_two_workers):
    address, client = scheduler_and_two_workers
    pid_of = client.run(os.getpid)  # worker address -> pid (no nanny: the worker is that process)
    build = subprocess.Popen(cli(synth_archive, tmp_path, "--scheduler", address), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "manifests" / "parts"
    deadline = time.monotonic() + 180
    while not list(parts.glob("*.done.json")):
        assert build.poll() is None and time.monotonic() < deadline, "the build ended before the first group"
        time.sleep(0.02)
    busy = [worker for worker, keys in client.processing().items() if keys]
    assert busy, "no group in flight to interrupt"
    os.kill(pid_of[busy[0]], signal.SIGKILL)  # the worker dies holding a task; the scheduler must reschedule it

    _, stderr = build.communicate(timeout=300)
    assert build.returncode == 0, stderr[-2000:]
    assert len(client.scheduler_info()["workers"]) == 1  # the kill really took a worker away
    assert_same_as_clean_build(tmp_path, reference_build[0])


# ----------------------------------------------------------------------------------------------- disk


def file_size_limit(nbytes: int):
    """preexec_fn: files larger than `nbytes` fail with EFBIG (SIGXFSZ ignored, as Python does by default)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def test_disk_full_while_writing_a_shard_fails_cleanly_then_resumes(synth_archive, reference_build, tmp_path):
    clean_build = reference_build[0]
    sizes = sorted({p.stat().st_size for p in (clean_build / "shards").rglob("*.tar")})
    others = [p.stat().st_size for p in (clean_build / "manifests").rglob("*") if p.is_file()]
    assert len(sizes) >= 2 and max(others) < sizes[-2], "needs tars of several sizes, all above the manifests"
    limit = (sizes[-2] + sizes[-1]) // 2  # some shards fit, the largest do not
    command = cli(synth_archive, tmp_path, "--workers", "0")
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(limit),
                          env=SINGLE_THREAD)
    assert full.returncode != 0
    message = " ".join(full.stderr.split())
    assert "error: group_failed" in message and "[Errno 27] File too large" in message, message
    # readers never see a partial shard: every *.tar is a complete, correct one; temp files are gone
    written, clean = tar_digests(tmp_path / "shards"), tar_digests(clean_build / "shards")
    assert written and set(written) < set(clean)  # some shards were written, the too-large ones were not
    assert all(written[name] == clean[name] for name in written)
    for tar in (tmp_path / "shards").rglob("*.tar"):
        with tarfile.open(tar) as handle:
            assert handle.getmembers()
    assert not list(tmp_path.rglob("*.tmp"))

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=SINGLE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_as_clean_build(tmp_path, clean_build)


def test_a_failed_shard_write_leaves_no_unraisable_exception(tmp_path):
    import gc

    import numpy as np

    from pipelines.shards import encode_sample, write_tar

    patch = np.zeros((64, 64), np.uint16)
    sample = encode_sample({"key": "k"}, patch, patch, "npy")
    unraisable, previous_hook = [], sys.unraisablehook
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    sys.unraisablehook = unraisable.append
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            write_tar(tmp_path / "x.tar", [sample])
        gc.collect()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.unraisablehook = previous_hook
    assert not list(tmp_path.iterdir())  # neither the tar nor its temp file
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable]


@pytest.mark.parametrize("folder", ["--out", "--manifests"])
def test_an_output_folder_that_cannot_be_created_is_a_one_line_error(synth_archive, tmp_path, folder):
    """As root, permission bits do not stop writes; a folder below a regular file cannot be created by anyone."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = cli_args(synth_archive, tmp_path, "--workers", "0")
    args[args.index(folder) + 1] = str(blocker / "sub")
    result = CliRunner().invoke(prep_app, args)
    assert result.exit_code in (1, 2) and not isinstance(result.exception, OSError), result.exception
    assert "Not a directory" in result.output or "File exists" in result.output, result.output
