"""`pipelines.contrast_detail` end to end on a tiny contrast-detail archive (one kind, one diameter, the faintest
and the most conspicuous contrast), 2-step runs of timm's test backbone."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.contrast_detail import MATCHED_FILTER, SUPERVISED, CDJobConfig, run_contrast_detail

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_benchmark_writes_its_report_and_resumes(tmp_path, tiny_trainer):
    tiny = tiny_trainer.config()
    cfg = CDJobConfig(
        out=str(tmp_path / "cd"), seed=0, trials_per_cell=4,
        archive_options={"train_studies": 2, "kinds": ("circumscribed mass",), "diameters_mm": (12.0,),
                         "contrasts": (0.02, 0.32)},
        methods=("random", "siamese-hard"), steps=2, batch_size=8, backbone=tiny["backbone"], crop_px=tiny["crop_px"],
        num_workers=0, pretrain_overrides={"embed_dim": tiny["embed_dim"], "head_hidden": tiny["head_hidden"]},
        finetune_overrides={"val_fraction": 0.0, "n_boot": 0}, workers=0, n_boot=200, device="cpu",
    )  # fmt: skip
    said: list[str] = []
    run_contrast_detail(cfg, say=said.append)
    out = tmp_path / "cd"
    for name in ("cd.md", "cd_curves.png", "cd.json", "cd_scores.parquet"):
        assert (out / name).is_file(), name

    report = json.loads((out / "cd.json").read_text())
    methods = {"random", "siamese-hard", "siamese-hard/head", SUPERVISED, "pixel_l2", "mean_intensity_diff",
               MATCHED_FILTER}
    assert {row["method"] for row in report["thresholds"]} == methods  # a c75 row per method
    scores = pd.read_parquet(out / "cd_scores.parquet")
    assert set(scores["method"]) == methods and scores.groupby("method").size().nunique() == 1

    reference = pd.DataFrame(report["cells"]).query("method == @MATCHED_FILTER").sort_values("contrast")
    assert reference["auc"].iloc[-1] >= 0.9 and reference["auc"].iloc[-1] > reference["auc"].iloc[0]
    assert "## Threshold contrast c75 per diameter" in (out / "cd.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in [out / "patches" / "patches.npz", *(out / "scores").glob("*.parquet")]}
    said.clear()
    run_contrast_detail(cfg, say=said.append)
    assert not [line for line in said if line.startswith(("pretrain", "finetune", "scored", "patches:"))], said
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    costs = json.loads((out / "cd.json").read_text())
    assert set(costs["stage_seconds"]) == {"synthesize", "build", "pretrain", "supervised", "extract"}  # kept from the first run
    assert MATCHED_FILTER in costs["score_seconds"]
