"""`train compare` and the study job: mean and 95 % t-intervals over >= 3 seeds, honest verdicts,
resumable and reproducible studies."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from train.cli import app
from train.compare import aggregate, compare_evaluations, find_evaluations, t_interval, verdicts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_eval(root, method, seed, **summary):
    out = root / "evals" / method / f"seed{seed}"
    out.mkdir(parents=True)
    metrics = {
        "summary": summary,
        "run": {"method": method, "seed": seed, "steps": 50, "batch_size": 16, "backbone": "test_resnet", "crop_px": 16},
        "data": {"source": "shards/x"},
        "counts": {"test": {"pairs": 48, "ipsi_abnormal": 12, "lesion_pairs": 12, "finding_sampled": 12}},
    }
    (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def study_dir(tmp_path):
    # siamese-soft clearly ahead of random on detection, level with simclr on the probe
    for seed, (soft, rand, sim) in enumerate([(0.80, 0.50, 0.61), (0.82, 0.52, 0.66), (0.81, 0.49, 0.64)]):
        _write_eval(tmp_path, "siamese-soft", seed, detection_auc=soft, **{"probe_auc_100%": 0.70 + seed / 100})
        _write_eval(tmp_path, "random", seed, detection_auc=rand, **{"probe_auc_100%": 0.55 + seed / 100})
        _write_eval(tmp_path, "simclr", seed, detection_auc=sim, **{"probe_auc_100%": 0.72 - seed / 50})
    return tmp_path


def test_t_interval_by_hand():
    stat = t_interval([0.6, 0.7, 0.8])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2) from a table
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.7) and stat["sd"] == pytest.approx(0.1)
    assert stat["ci"] == pytest.approx([0.7 - half, 0.7 + half], rel=1e-5)
    assert t_interval([0.7])["ci"] is None


def test_table_with_intervals_from_three_seeds(study_dir, tmp_path):
    result = compare_evaluations([study_dir], tmp_path / "cmp")
    assert result["n_evaluations"] == 9
    md = (tmp_path / "cmp" / "compare.md").read_text()
    soft = next(line for line in md.splitlines() if line.startswith("| siamese-soft |"))
    assert "0.810 [" in soft and "(n=3)" in soft
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    det = next(r for r in rows if r["method"] == "random" and r["metric"] == "detection_auc")
    assert int(det["n"]) == 3 and float(det["ci_low"]) < 0.5033 < float(det["ci_high"]) and det["seeds"] == "0 1 2"
    assert "steps: 50 for every run" in md and "seeds: random: [0, 1, 2]" in md


def test_verdicts_claim_only_what_the_seeds_support(study_dir):
    lines = verdicts(aggregate(find_evaluations([study_dir])))
    text = "\n".join(lines)
    assert "best mean siamese-soft 0.810, ahead of simclr" in text
    vs_random = next(line for line in lines if "vs **random**" in line)
    assert "beats it on detection AUC" in vs_random
    vs_simclr = next(line for line in lines if "vs **simclr**" in line)
    assert "not distinguishable on probe AUC, 100 % labels" in vs_simclr
    overall = lines[-1]
    assert "beats every baseline (random, simclr) on detection AUC (backbone distance) (" in overall


def test_compare_command_without_evaluations_fails_with_a_reason(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 1 and "no_evaluations" in result.output


@pytest.mark.slow
def test_study_runs_resumes_and_reproduces_the_table(tmp_path, tiny_trainer):
    from pipelines.study import StudyConfig, run_study
    from shard_fixture import write_split_fixture

    data = write_split_fixture(tmp_path / "data")
    tiny = tiny_trainer.config()

    def study(out):
        return StudyConfig(
            shards=str(data["shards"]), manifests=str(data["manifest"]), out=str(out), seeds=(0, 1, 2),
            methods=("random", "siamese-soft"), steps=2, batch_size=8, backbone=tiny["backbone"],
            crop_px=tiny["crop_px"], num_workers=tiny["num_workers"], device="cpu", n_boot=50,
            pretrain_overrides={"embed_dim": tiny["embed_dim"], "head_hidden": tiny["head_hidden"], "ckpt_every": 2},
        )  # fmt: skip

    first = run_study(study(tmp_path / "a"), say=lambda _: None)
    assert first["pretrained"] == 6 and first["evaluated"] == 6
    table = (tmp_path / "a" / "compare" / "compare.csv").read_text()
    md = (tmp_path / "a" / "compare" / "compare.md").read_text()
    assert "| siamese-soft |" in md and "| random |" in md and "(n=3)" in md
    assert "steps: 2 for every run" in md and "batch_size: 8 for every run" in md

    again = run_study(study(tmp_path / "a"), say=lambda _: None)
    assert again["pretrained"] == 0 and again["evaluated"] == 0 and again["skipped"] == 6

    run_study(study(tmp_path / "b"), say=lambda _: None)
    assert (tmp_path / "b" / "compare" / "compare.csv").read_text() == table
