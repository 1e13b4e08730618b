"""`prep verify`: passes on a sound build, fails (exit 1) on every kind of mismatch."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.build import build_shards
from pipelines.plan import BuildOptions
from pipelines.verify import verify_build
from prep.cli import app
from prep.config import PrepConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build_dir(synth_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify_build") / "b"
    options = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=2),
                           shard_max_samples=6, group_pairs=4, codec="png")
    build_shards(synth_archive, options, out=out / "shards", manifests=out / "manifests",
                 build="v", workers=0)
    return out


@pytest.fixture
def copy(build_dir, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(build_dir, target)
    return target


def run_verify(root):
    return CliRunner().invoke(app, ["verify", "--shards", str(root / "shards"), "--manifests", str(root / "manifests")])


def test_sound_build_passes(build_dir):
    result = run_verify(build_dir)
    assert result.exit_code == 0, result.output
    report = verify_build(build_dir / "shards", build_dir / "manifests")
    assert report.ok and report.shards > 1
    assert f"verify: {report.shards}/{report.shards} shards (100%)" in result.output  # progress lines in a log
    assert report.samples == pq.read_table(build_dir / "manifests" / "samples.parquet").num_rows


def test_a_changed_byte_in_a_tar_fails(copy):
    tar = sorted((copy / "shards").rglob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-2048] ^= 0xFF  # inside the last member's payload region, or its padding
    data[600] ^= 0xFF  # inside the first member's payload
    tar.write_bytes(bytes(data))
    result = run_verify(copy)
    assert result.exit_code == 1 and "sha256" in result.output


def test_missing_and_unlisted_tars_fail(copy):
    tars = sorted((copy / "shards").rglob("*.tar"))
    tars[0].rename(tars[0].with_name("stray-000000.tar"))
    result = run_verify(copy)
    assert result.exit_code == 1
    assert "missing" in result.output and "not listed" in result.output


def test_manifest_rows_that_disagree_with_the_shards_fail(copy):
    path = copy / "manifests" / "samples.parquet"
    table = pq.read_table(path)
    flipped = [not v for v in table.column("ipsi_abnormal").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("ipsi_abnormal"), "ipsi_abnormal",
                                    __import__("pyarrow").array(flipped)), path)
    result = run_verify(copy)
    assert result.exit_code == 1 and "ipsi_abnormal" in result.output

    pq.write_table(table.slice(1), path)  # a sample missing from the manifest
    assert run_verify(copy).exit_code == 1
