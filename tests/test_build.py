"""End-to-end builds on the synthetic archive: content, determinism, resume after kill -9, external scheduler."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner

from build_helpers import BUILD, OPTIONS, cli, cli_args, local_dask, tar_digests
from pipelines.build import build_shards, plan_build
from pipelines.pair_work import process_planned_pair
from pipelines.verify import verify_build
from prep.cli import app
from prep.codec import decode_json, decode_pair

pytestmark = pytest.mark.slow


def test_build_writes_verified_shards_and_manifests(synth_archive, reference_build):
    out, summary = reference_build
    report = verify_build(out / "shards", out / "manifests")
    assert report.ok, report.problems
    samples = pq.read_table(out / "manifests" / "samples.parquet")
    assert report.samples == samples.num_rows == summary["n_samples"] > 0
    assert {"ipsi_image_id", "contra_image_id", "ipsi_abnormal", "contra_abnormal", "sampling"} <= set(
        samples.column_names)
    # every DICOM of the archive has exactly one images row
    truth = json.loads((synth_archive / "ground_truth" / "truth.json").read_text())
    images = pq.read_table(out / "manifests" / "images.parquet").to_pylist()
    assert sorted(r["image_id"] for r in images) == sorted(truth["images"])
    # the truncated file only shows when its pixels are read: a decode-stage reject, the build went on
    rejects = pq.read_table(out / "manifests" / "rejects.parquet").to_pylist()
    truncated = [r for r in rejects if r["image_id"] in truth["traps"]["truncated_file"]]
    assert [(r["stage"], r["reason"]) for r in truncated] == [("decode", "unreadable")]
    assert {"retake_not_chosen", "missing_partner", "laterality_disagreement", "for_processing"} <= set(summary["rejects"])
    build_json = json.loads((out / "manifests" / "build.json").read_text())
    assert build_json["config"] == OPTIONS.to_dict() and build_json["counts"]["n_samples"] == summary["n_samples"]
    wids = json.loads((out / "manifests" / "wids.json").read_text())
    assert wids["wids_version"] == 1
    assert sum(e["nsamples"] for e in wids["shardlist"]) == samples.num_rows
    assert all((out / "manifests" / e["url"]).is_file() for e in wids["shardlist"])
    # shard names follow <split>/<build>-<split>-NNNNNN.tar
    for name in tar_digests(out / "shards"):
        split, base = name.split("/")
        assert base.startswith(f"{BUILD}-{split}-") and len(base.rsplit("-", 1)[1]) == len("000000.tar")


def test_shards_hold_exactly_the_patches_process_pair_makes(synth_archive, reference_build):
    out, _ = reference_build
    plan = plan_build(synth_archive, OPTIONS)
    planned = next(p for p in plan.pairs if p.left.findings or p.right.findings)
    expected = {row["key"]: (row, s) for row, s in process_planned_pair(planned, OPTIONS).samples}
    assert expected
    urls = [str(p) for p in sorted((out / "shards").rglob("*.tar"))]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if sample["__key__"] not in expected:
            continue
        row, patch = expected[sample["__key__"]]
        ipsi, contra = decode_pair(sample)
        assert ipsi.dtype == np.uint16 and np.array_equal(ipsi, patch.ipsi) and np.array_equal(contra, patch.contra)
        meta = decode_json(sample)
        assert {k: meta[k] for k in ("ipsi_abnormal", "contra_abnormal", "finding_categories", "sampling")} == {
            k: row[k] for k in ("ipsi_abnormal", "contra_abnormal", "finding_categories", "sampling")}
        seen += 1
    assert seen == len(expected)


def test_kill_9_half_way_then_rerun_gives_the_same_bytes(synth_archive, reference_build, tmp_path):
    ref_out, _ = reference_build
    n_groups = len(list((ref_out / "manifests" / "parts").glob("*.done.json")))
    command = cli(synth_archive, tmp_path, "--workers", "1")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp_path / "manifests" / "parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.done.json"))) < max(1, n_groups // 3) and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers, mid-build
    proc.wait()
    finished = len(list(parts.glob("*.done.json")))
    assert 0 < finished < n_groups
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert tar_digests(tmp_path / "shards") == tar_digests(ref_out / "shards")
    assert (tmp_path / "manifests" / "samples.parquet").read_bytes() == (
        ref_out / "manifests" / "samples.parquet").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))
    assert verify_build(tmp_path / "shards", tmp_path / "manifests").ok


def test_a_rerun_of_a_finished_build_trusts_its_markers_and_starts_no_cluster(synth_archive, reference_build, tmp_path,
                                                                              monkeypatch):
    """No file is re-hashed (a same-size change goes unnoticed by the rerun) and no cluster starts;
    `prep verify` is what re-hashes."""
    from pipelines import cluster

    ref_out, _ = reference_build
    shutil.copytree(ref_out, tmp_path, dirs_exist_ok=True)
    changed = sorted((tmp_path / "shards").rglob("*.tar"))[0]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF  # in the tar's end padding: same size, still readable, another sha256
    changed.write_bytes(bytes(data))
    started = []
    monkeypatch.setattr(cluster, "start_dask", lambda *args: started.append(args) or None)
    summary = build_shards(synth_archive, OPTIONS, out=tmp_path / "shards",
                           manifests=tmp_path / "manifests", build=BUILD, workers=2)
    assert summary["groups_run"] == 0 and summary["groups_skipped"] == len(list(
        (ref_out / "manifests" / "parts").glob("*.done.json")))
    assert started == []
    problems = verify_build(tmp_path / "shards", tmp_path / "manifests").problems
    assert problems == [f"{changed.relative_to(tmp_path / 'shards').as_posix()}: sha256 differs from shards.parquet"]


def test_a_finished_group_whose_file_was_cut_is_redone(synth_archive, reference_build, tmp_path):
    ref_out, _ = reference_build
    shutil.copytree(ref_out, tmp_path, dirs_exist_ok=True)
    cut = sorted((tmp_path / "shards").rglob("*.tar"))[1]
    cut.write_bytes(cut.read_bytes()[:-512])
    summary = build_shards(synth_archive, OPTIONS, out=tmp_path / "shards",
                           manifests=tmp_path / "manifests", build=BUILD, workers=0)
    assert summary["groups_run"] == 1
    assert tar_digests(tmp_path / "shards") == tar_digests(ref_out / "shards")
    assert verify_build(tmp_path / "shards", tmp_path / "manifests").ok


def test_changed_config_is_refused_and_dry_run_writes_nothing(synth_archive, reference_build, tmp_path):
    out, _ = reference_build
    before = tar_digests(out / "shards")
    result = CliRunner().invoke(app, cli_args(synth_archive, out, "--workers", "0", "--patch-px", "32"))
    assert result.exit_code == 2
    assert "config_changed" in result.output and "patch_px" in result.output
    assert tar_digests(out / "shards") == before

    dry = CliRunner().invoke(app, cli_args(synth_archive, tmp_path, "--dry-run"))
    assert dry.exit_code == 0, dry.output
    assert "est. disk" in dry.output
    assert not (tmp_path / "shards").exists() and not (tmp_path / "manifests").exists()


def test_a_mostly_unreadable_archive_is_written_but_exits_3(synth_archive, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(synth_archive, archive, ignore=shutil.ignore_patterns("ground_truth"))
    studies = sorted((archive / "images").iterdir())
    for dicom in (f for study in studies[1:] for f in study.glob("*.dicom")):  # all but the first study
        raw = dicom.read_bytes()
        dicom.write_bytes(raw[: len(raw) * 3 // 5])  # cut inside Pixel Data: the header still reads
    out = tmp_path / "out"
    result = CliRunner().invoke(app, cli_args(archive, out, "--workers", "0"))
    assert result.exit_code == 3, result.output
    message = " ".join(result.output.split())
    assert "too_many_rejects" in message and "unreadable" in message and "partner_rejected" in message
    assert str(out / "manifests" / "rejects.parquet") in message
    # nothing lost: every image has its row, the one usable study made its shards
    images = pq.read_table(out / "manifests" / "images.parquet")
    assert images.num_rows == len(list(archive.glob("images/*/*.dicom")))
    assert verify_build(out / "shards", out / "manifests").ok

    relaxed = CliRunner().invoke(app, cli_args(archive, out, "--workers", "0", "--max-reject-fraction", "1"))
    assert relaxed.exit_code == 0, relaxed.output


PROGRESS_LINE = re.compile(r"^build: (\d+)/(\d+) pairs \(\d+%\), \d+ samples, \d+ rejects, [\d.]+ pairs/s, eta \S+$")


def test_two_local_workers_give_the_same_bytes_plain_progress_and_a_clean_shutdown(synth_archive, reference_build,
                                                                                    tmp_path):
    """stderr is a pipe here, as in CI logs, nohup or SLURM: plain progress lines instead of a live bar."""
    ref_out, _ = reference_build
    run = subprocess.run(cli(synth_archive, tmp_path, "--workers", "2"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert tar_digests(tmp_path / "shards") == tar_digests(ref_out / "shards")
    assert (tmp_path / "manifests" / "samples.parquet").read_bytes() == (
        ref_out / "manifests" / "samples.parquet").read_bytes()
    progress = [m for m in map(PROGRESS_LINE.match, run.stderr.splitlines()) if m]
    assert progress, run.stderr[-2000:]
    done = [int(m.group(1)) for m in progress]
    assert done == sorted(done) and done[-1] == int(progress[-1].group(2))  # ends at N/N
    assert "\x1b[" not in run.stderr  # no terminal control codes in a log
    assert "still alive" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


@pytest.fixture
def dask_cluster(tmp_path):
    with local_dask(tmp_path, ["--nworkers", "1"]) as address:
        yield address


def test_external_scheduler_rebuild_is_byte_identical(synth_archive, reference_build, dask_cluster, tmp_path):
    ref_out, ref_summary = reference_build
    summary = build_shards(synth_archive, OPTIONS, out=tmp_path / "shards",
                           manifests=tmp_path / "manifests", build=BUILD, scheduler=dask_cluster)
    assert summary["n_samples"] == ref_summary["n_samples"]
    assert tar_digests(tmp_path / "shards") == tar_digests(ref_out / "shards")
    for table in ("samples", "images", "pairs", "rejects", "shards"):
        a = pq.read_table(tmp_path / "manifests" / f"{table}.parquet").drop_columns(
            [c for c in ("seconds",) if table == "pairs"])
        b = pq.read_table(ref_out / "manifests" / f"{table}.parquet").drop_columns(
            [c for c in ("seconds",) if table == "pairs"])
        assert a.equals(b), table
