"""No PHI in any output: every shard member and every manifest column is searched for the planted canaries."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.build import build_shards
from pipelines.manifests import IMAGES_SCHEMA
from pipelines.plan import BuildOptions
from prep.config import PrepConfig
from prep.synth import PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID, PLANTED_PATIENT_NAME

pytestmark = pytest.mark.slow

PATIENT_FOLDER = "DOE^JANE"  # real archives often name folders after patients


def with_spaces(canaries: list[str]) -> list[str]:
    """DICOM PN components are `^`-separated; a rendered name has spaces instead."""
    return canaries + [c.replace("^", " ") for c in canaries if "^" in c]


def small_build(dataset: str, root: Path, out: Path) -> Path:
    options = BuildOptions(dataset=dataset, prep=PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=2))
    build_shards(root, options, out=out / "shards", manifests=out / "manifests", build="phi",
                 workers=0)
    return out


def parquet_texts(path: Path) -> dict[str, bytes]:
    """One text per column (compressed pages could hide a string from a byte search) plus the schema metadata."""
    table = pq.read_table(path)
    texts = {name: json.dumps(table.column(name).to_pylist(), default=str).encode() for name in table.column_names}
    texts["<metadata>"] = repr(table.schema.metadata).encode()
    return texts


def tar_texts(path: Path) -> dict[str, bytes]:
    """One text per shard member: its name followed by its bytes."""
    with tarfile.open(path) as tar:
        return {m.name: m.name.encode() + b"\n" + tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def canary_hits(folder: Path, canaries: list[str]) -> set[tuple[str, str]]:
    """(file name, column | member | "<file>") for every place under `folder` that holds a canary."""
    hits = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        texts = {"<file>": path.read_bytes()}
        if path.suffix == ".parquet":
            texts = parquet_texts(path)
        elif path.suffix == ".tar":
            texts.update(tar_texts(path))
        hits |= {(path.name, where) for where, text in texts.items() for c in canaries if c.encode() in text}
    return hits


def test_no_planted_phi_reaches_shards_or_manifests(synth_archive, tmp_path):
    out = small_build("vindr", synth_archive, tmp_path)
    outputs = sorted(p for p in out.rglob("*") if p.is_file())
    assert any(p.suffix == ".tar" for p in outputs) and any(p.suffix == ".parquet" for p in outputs)
    assert canary_hits(out, with_spaces([PLANTED_PATIENT_NAME, PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID])) == set()
    # images.parquet carries allow-listed columns only
    assert pq.read_schema(out / "manifests" / "images.parquet").names == IMAGES_SCHEMA.names
    assert not {"patient_name", "patient_id", "birth_date", "patient_age"} & set(IMAGES_SCHEMA.names)


@pytest.fixture(scope="module")
def patient_folder_build(synth_archive, tmp_path_factory) -> Path:
    """A dicom-dir build of the synthetic images filed under a folder named like a patient."""
    root = tmp_path_factory.mktemp("dicom_dir_archive")
    shutil.copytree(synth_archive / "images", root / PATIENT_FOLDER)
    return small_build("dicom-dir", root, tmp_path_factory.mktemp("dicom_dir_build"))


def test_dicom_dir_folder_names_reach_no_shard_or_manifest(patient_folder_build):
    """Neither the folder name nor planted PHI appears anywhere: not in images.parquet's rel_path (a keyed hash),
    not in a reject's detail (decode errors never quote the path), not in a shard member."""
    out = patient_folder_build
    canaries = with_spaces([PATIENT_FOLDER, PLANTED_PATIENT_NAME, PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID])
    assert canary_hits(out, canaries) == set()
    rejects = pq.read_table(out / "manifests" / "rejects.parquet").to_pylist()
    assert any(r["stage"] == "decode" for r in rejects)  # the truncated file's detail was written, without the path
    images = pq.read_table(out / "manifests" / "images.parquet").to_pylist()
    assert images and all(len(row["rel_path"]) == 32 and "/" not in row["rel_path"] for row in images)
