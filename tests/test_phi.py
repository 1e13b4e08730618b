"""No PHI in any output: every byte of the shards and manifests is searched for the planted canaries."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.build import build_shards
from pipelines.manifests import IMAGES_SCHEMA
from pipelines.plan import BuildOptions
from prep.config import PrepConfig
from prep.synth import PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID, PLANTED_PATIENT_NAME

pytestmark = pytest.mark.slow


def test_no_planted_phi_reaches_shards_or_manifests(synth_archive, tmp_path):
    options = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=2))
    build_shards("vindr", synth_archive, options=options, out=tmp_path / "shards", manifests=tmp_path / "manifests",
                 build="phi", workers=0)
    canaries = [PLANTED_PATIENT_NAME, PLANTED_BIRTH_DATE, PLANTED_PATIENT_ID]
    canaries += [c.replace("^", " ") for c in canaries if "^" in c]
    outputs = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert any(p.suffix == ".tar" for p in outputs) and any(p.suffix == ".parquet" for p in outputs)
    for path in outputs:
        texts = [path.read_bytes()]
        if path.suffix == ".parquet":  # compressed pages could hide a string from a byte search
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str).encode())
        for text in texts:
            for canary in canaries:
                assert canary.encode() not in text, f"{canary!r} found in {path}"
    # images.parquet carries allow-listed columns only
    assert pq.read_schema(tmp_path / "manifests" / "images.parquet").names == IMAGES_SCHEMA.names
    assert not {"patient_name", "patient_id", "birth_date", "patient_age"} & set(IMAGES_SCHEMA.names)
