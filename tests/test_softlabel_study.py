"""`pipelines.softlabel_study` on a tiny contrast-detail folder (one kind, one diameter, two contrasts): two arms,
2-step runs of timm's test backbone, a learning-curve point; the table has a row per arm and a rerun trains
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.contrast_detail import CDJobConfig, run_contrast_detail
from pipelines.softlabel_study import SoftStudyConfig, SoftStudyError, run_softlabel_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_cd(tmp_path_factory, tiny_trainer):
    tiny = tiny_trainer.config()
    cfg = CDJobConfig(
        out=str(tmp_path_factory.mktemp("softstudy") / "cd"), seed=0, trials_per_cell=4,
        archive_options={"train_studies": 2, "kinds": ("circumscribed mass",), "diameters_mm": (12.0,),
                         "contrasts": (0.02, 0.32)},
        methods=("siamese-hard",), supervised=False, steps=2, batch_size=8, backbone=tiny["backbone"],
        crop_px=tiny["crop_px"], num_workers=0,
        pretrain_overrides={"embed_dim": tiny["embed_dim"], "head_hidden": tiny["head_hidden"]}, workers=0,
        n_boot=100, device="cpu",
    )  # fmt: skip
    run_contrast_detail(cfg, say=lambda line: None)
    return cfg.out


def test_study_writes_a_row_per_arm_and_resumes(tmp_path, tiny_cd):
    cfg = SoftStudyConfig(cd=tiny_cd, out=str(tmp_path / "study"), seeds=(0,), steps=2, curve_steps=(2, 3),
                          arms=("siamese-hard", "soft-anchored-shared"), n_boot=100)
    said: list[str] = []
    payload = run_softlabel_study(cfg, say=said.append)
    out = tmp_path / "study"
    report = (out / "softlabel_study.md").read_text()
    arm_table = report.split("## Pre-registered")[0]
    rows = [line.split(" | ")[0] for line in arm_table.splitlines() if line.startswith("| s")]
    assert rows == ["| siamese-hard", "| soft-anchored-shared **(best soft)**"], report  # one row per arm
    saved = json.loads((out / "softlabel_study.json").read_text())
    assert set(saved["arms"]) == {"siamese-hard", "soft-anchored-shared"}
    assert saved["best_soft_arm"] == "soft-anchored-shared"  # the only soft arm
    # the CD folder's siamese-hard run has the same configuration: used, not trained again
    assert list(saved["reused_runs"]) == ["siamese-hard@seed0"]
    assert not (out / "steps-2" / "runs" / "siamese-hard").exists()
    assert (out / "steps-2" / "runs" / "soft-anchored-shared" / "seed0" / "encoder.safetensors").is_file()
    assert {(r["arm"], r["steps"]) for r in saved["curves"]} == {
        (arm, steps) for arm in ("siamese-hard", "soft-anchored-shared") for steps in (2, 3)}
    primary = payload["primary"]
    assert primary["a"] == "soft-anchored-shared" and primary["b"] == "siamese-hard"
    assert primary["delta_ln_c75"]["n_seeds"] == 1 and primary["tost_pooled_auc"]["margin"] == 0.02
    assert saved["decision"]["complete"] is False and saved["decision"]["change_defaults"] == {}
    assert saved["arms"]["soft-anchored-shared"]["seconds"] > 0

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("steps-*/runs/*/seed*/encoder.safetensors")}
    said.clear()
    run_softlabel_study(cfg, say=said.append)
    assert not [line for line in said if line.startswith(("pretrain", "scored"))], said
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_folder_without_a_build_is_one_clear_error(tmp_path):
    with pytest.raises(SoftStudyError) as error:
        run_softlabel_study(SoftStudyConfig(cd=str(tmp_path), out=str(tmp_path / "study")))
    assert error.value.reason == "not_a_cd_folder"


def test_a_run_stopped_early_is_trained_on_not_taken_as_finished(tmp_path, tiny_cd):
    """A SIGTERM (or --stop-at) exports an encoder too: a resumed study must continue that run to its steps."""
    from pipelines.study import ensure_pretrained
    from train.config import PretrainConfig

    base = json.loads((Path(tiny_cd) / "runs" / "siamese-hard" / "seed0" / "config.json").read_text())["config"]
    config = PretrainConfig(**{**base, "out": str(tmp_path / "run"), "steps": 3})
    assert ensure_pretrained(PretrainConfig(**{**config.to_dict(), "stop_at": 1}), say=lambda line: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["stopped"], summary["step"]) == ("stop_at", 1)
    assert ensure_pretrained(config, say=lambda line: None)  # continued, not skipped
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3
    assert not ensure_pretrained(config, say=lambda line: None)  # now finished: skipped
