"""`pipelines.ablation`: arms of siamese-soft with one part changed, learning curves, detection-only evaluation."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_ablation_runs_each_arm_once_and_tabulates_them(tmp_path, tiny_trainer):
    from pipelines.ablation import ABLATIONS, run_ablation
    from pipelines.study import StudyConfig
    from shard_fixture import write_split_fixture

    data = write_split_fixture(tmp_path / "data")
    tiny = tiny_trainer.config()
    base = StudyConfig(
        shards=str(data["shards"]), manifests=str(data["manifest"]), out=str(tmp_path / "abl"), seeds=(0,),
        batch_size=8, backbone=tiny["backbone"], crop_px=tiny["crop_px"], num_workers=0, device="cpu", n_boot=50,
        pretrain_overrides={"embed_dim": tiny["embed_dim"], "head_hidden": tiny["head_hidden"], "ckpt_every": 2},
    )  # fmt: skip
    arms = tuple(a for a in ABLATIONS if a.name in ("siamese-soft", "soft-self-labels", "random"))
    said: list[str] = []
    report = run_ablation(base, steps=2, curve_steps=(2, 4), arms=arms, say=said.append)

    out = tmp_path / "abl"
    trained = {p.parent.parent.name + "@" + p.parent.parent.parent.parent.name
               for p in out.glob("steps-*/runs/*/seed0/encoder.safetensors")}
    # every arm at the ablation's step count; only the curve arms (soft, random) at the other
    assert trained == {"siamese-soft@steps-2", "soft-self-labels@steps-2", "random@steps-2",
                       "siamese-soft@steps-4", "random@steps-4"}
    config = json.loads((out / "steps-2/runs/soft-self-labels/seed0/config.json").read_text())["config"]
    assert config["label_source"] == "self" and config["method"] == "siamese-soft"

    metrics = json.loads((out / "steps-2/evals/soft-self-labels/seed0/metrics.json").read_text())
    test_rows = int((data["table"]["split"] == "test").sum())
    assert metrics["data"]["n_samples"] == test_rows  # detection only: the test split alone is embedded
    assert "probe_abnormal" not in metrics and metrics["run"]["tag"] == "soft-self-labels"
    assert "auc" in metrics["detection"]["backbone"]["grid"]

    compare_md = (out / "steps-2/compare/compare.md").read_text()
    assert "| soft-self-labels |" in compare_md and "| siamese-soft |" in compare_md
    text = report.read_text()
    assert "## 2 steps" in text and "## 4 steps" in text

    def cells(prefix: str) -> list[str]:
        row = next(line for line in text.splitlines() if line.startswith(prefix))
        return [c.strip() for c in row.strip("|").split("|")]

    # per arm: mean AUC, the paired difference from siamese-soft with its CI, the training seconds
    arm = cells("| soft-self-labels | 1 |")
    assert 0 <= float(arm[2]) <= 1 and arm[3].startswith(("+", "-")) and "[" in arm[3] and float(arm[6]) >= 0
    assert cells("| random | 1 |")[6] == "—"  # the seeded init is not trained
    # per evaluation: the study-level CI
    assert "[" in cells("| soft-self-labels | seed0 |")[2]

    said.clear()
    run_ablation(base, steps=2, curve_steps=(2, 4), arms=arms, say=said.append)  # resumes: nothing to do
    assert not [line for line in said if line.startswith(("pretrain", "evaluate"))]
    assert report.read_text() == text


def test_detection_only_needs_a_manifest(tmp_path):
    from train.evaluate import EvalConfig, EvaluationError, evaluate_encoder

    with pytest.raises(EvaluationError) as info:
        evaluate_encoder(tmp_path / "run", tmp_path / "eval", shards=str(tmp_path), cfg=EvalConfig(detection_only=True))
    assert info.value.reason == "bad_option" and "--manifest" in info.value.detail
