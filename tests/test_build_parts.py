"""Parts of the build that need no full build: tar bytes, worker imports, progress lines, the reject check,
header reads on the cluster."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import plan as plan_module
from pipelines.build import reject_problem
from pipelines.cluster import DaskSession, stop_heartbeat
from pipelines.plan import load_records
from pipelines.progress import build_progress
from pipelines.shards import TAR_MODE, TAR_USER, encode_sample, write_tar
from prep import progress as prep_progress
from prep.datasets import get_adapter
from prep.progress import format_duration


def test_shard_tars_are_byte_identical_to_webdataset_tarwriter(tmp_path):
    from webdataset.writer import TarWriter

    rng = np.random.default_rng(0)
    samples = [encode_sample({"key": f"vindr_s{i}_CC_L_{i}", "i": i},
                             rng.integers(0, 65535, (64, 64), dtype=np.uint16),
                             rng.integers(0, 65535, (64, 64), dtype=np.uint16), "npy") for i in range(5)]
    write_tar(tmp_path / "ours.tar", samples)
    theirs = io.BytesIO()
    writer = TarWriter(theirs, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, encoder=False, mtime=0)
    for sample in samples:
        writer.write({"__key__": sample.row["key"], **sample.members})
    writer.close()
    assert (tmp_path / "ours.tar").read_bytes() == theirs.getvalue()


def test_a_dask_worker_imports_neither_torch_nor_pandas():
    """What a worker imports to run a group or read headers (the task modules and the image core): torch
    slows every worker's start and exit (pipelines/cluster.py); pandas is only needed to read CSVs."""
    code = ("import sys, pipelines.worker, pipelines.plan, prep.pairs; "
            "print(sorted({'torch', 'pandas', 'webdataset'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.slow
def test_the_embedded_cluster_leaves_the_callers_thread_settings_alone():
    """Dask's nannies set OMP_NUM_THREADS=1 in the process that starts them; after a build, torch imported by
    the same process (the demo trains right after building) must still get all its threads."""
    code = (
        "import os; from pipelines.cluster import DaskSession\n"
        "s = DaskSession(1, None, None, None); s.client(); s.close()\n"
        "print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.stdout.strip().splitlines()[-1:] == ["None None"], out.stderr[-2000:]


def test_plain_progress_lines_every_tenth_or_interval(monkeypatch):
    class Printed:  # what the progress factory uses of a Console: a log file's, not a terminal's
        is_interactive = False

        def __init__(self):
            self.lines: list[str] = []

        def print(self, line, **_):
            self.lines.append(line)

    clock = iter(range(0, 10_000))
    monkeypatch.setattr(prep_progress.time, "monotonic", lambda: float(next(clock)))
    console = Printed()
    progress = build_progress(console, total=100, interval_s=1e9)
    for done in range(1, 101):
        progress.update(done, samples=done * 3, rejects=0)
    assert [line.split()[1] for line in console.lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert console.lines[-1].startswith("build: 100/100 pairs (100%), 300 samples, 0 rejects")

    console.lines.clear()
    timed = build_progress(console, total=100, interval_s=5)  # one update per clock tick: a line every 5
    for done in range(1, 21):
        timed.update(done, samples=0, rejects=0)
    assert len(console.lines) == 4
    assert format_duration(273) == "4m33s" and format_duration(7500) == "2h05m" and format_duration(9) == "9s"


def test_reject_problem_names_reasons_and_the_rejects_manifest():
    summary = {"images": 10, "images_rejected": 8, "manifests_dir": "/m",
               "rejects": {"unreadable": 4, "partner_rejected": 3, "duplicate_view": 1}}
    message = reject_problem(summary, 0.5)
    assert "8 of 10 images rejected (80%" in message
    assert "unreadable 4, partner_rejected 3, duplicate_view 1" in message and "/m/rejects.parquet" in message
    assert reject_problem(summary, 0.8) is None and reject_problem(summary, None) is None
    assert reject_problem({**summary, "images": 0, "images_rejected": 0}, 0.0) is None


@pytest.mark.slow
def test_header_reads_on_the_cluster_match_the_adapter(synth_archive, monkeypatch):
    expected = get_adapter("vindr")(synth_archive).images()
    monkeypatch.setattr(plan_module, "HEADER_CHUNK", 5)  # several chunks from a small archive
    dask = DaskSession(workers=1, scheduler=None, scheduler_file=None, memory_limit=None)
    try:
        dask.client().wait_for_workers(1, timeout=120)
        records = load_records("vindr", synth_archive, dask)
        worker_modules = dask.client().run(lambda: sorted({"torch", "pandas"} & set(sys.modules)))
        # the first step of the shutdown order reaches into distributed's worker: check it still fits
        dask.client().run(stop_heartbeat)
        beating = dask.client().run(lambda dask_worker: dask_worker.periodic_callbacks["heartbeat"].is_running())
    finally:
        dask.close()
    assert records == expected
    assert list(worker_modules.values()) == [[]]  # the header tasks ran there without either
    assert list(beating.values()) == [False]
    assert any(r.header_error for r in records) and any(r.flags for r in records)  # the traps came through
