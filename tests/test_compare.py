"""`train compare` and the study job: t-intervals over seeds, pixel baselines beside every method, paired
tests over seeds and test studies with Holm correction, an honest one-seed verdict, resumable and
reproducible studies."""

from __future__ import annotations

import csv
import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from train.cli import app
from train.compare import compare_evaluations, find_evaluations, paired_tests, t_interval
from train.metrics import Bootstrap, auc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOOT = Bootstrap(n_boot=300)
N_STUDIES = 90
N_LESION_STUDIES = 30  # studies 0, 3, ..., 87


def _test_pairs() -> pd.DataFrame:
    """Test split: 90 studies x 4 grid pairs, a lesion pair in every third study, plus one finding-centred
    lesion pair per lesion study; a few training rows that every test must ignore."""
    rows = []
    for s in range(N_STUDIES):
        for j in range(4):
            rows.append({"key": f"t{s:03d}-{j}", "split": "test", "study_id": f"s{s:03d}", "sampling": "grid",
                         "ipsi_abnormal": s % 3 == 0 and j == 0, "contra_abnormal": False})
        if s % 3 == 0:
            rows.append({"key": f"t{s:03d}-f", "split": "test", "study_id": f"s{s:03d}", "sampling": "finding",
                         "ipsi_abnormal": True, "contra_abnormal": False})
    rows += [{"key": f"r{i}", "split": "training", "study_id": f"r{i}", "sampling": "grid",
              "ipsi_abnormal": i % 2 == 0, "contra_abnormal": False} for i in range(8)]
    table = pd.DataFrame(rows)
    rng = np.random.default_rng(99)  # the pixel baselines: the same for every evaluation
    lesion = table["ipsi_abnormal"].to_numpy()
    return table.assign(pixel_l2=rng.normal(size=len(table)) + 1.5 * lesion,
                        mean_intensity_diff=rng.normal(size=len(table)))


def _write_eval(root, method, seed, signal):
    """An evaluation whose scores carry `signal` (lesion shift in noise sds) and whose summary is computed
    from those scores, as `train evaluate` does."""
    out = root / "evals" / method / f"seed{seed}"
    out.mkdir(parents=True)
    table = _test_pairs()
    rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}".encode()))
    lesion = table["ipsi_abnormal"].to_numpy()
    for column in ("distance", "probe_abnormal", "knn_abnormal"):
        table[column] = rng.normal(size=len(table)) + signal * lesion
    test = (table["split"] == "test").to_numpy()
    table.loc[~test, ["probe_abnormal", "knn_abnormal"]] = np.nan
    grid = test & (table["sampling"] == "grid").to_numpy()
    table.to_parquet(out / "scores.parquet", index=False)
    summary = {
        "detection_auc_grid": auc(lesion[grid], table["distance"][grid]),
        "detection_auc_grid_pixel_l2": auc(lesion[grid], table["pixel_l2"][grid]),
        "detection_auc_grid_mean_intensity_diff": auc(lesion[grid], table["mean_intensity_diff"][grid]),
        "probe_auc_100%": auc(lesion[test], table["probe_abnormal"][test]),
    }
    metrics = {
        "summary": summary,
        "summary_counts": {"detection_auc_grid": {"lesion_studies": N_LESION_STUDIES, "lesion_pairs": N_LESION_STUDIES}},
        "run": {"method": method, "seed": seed, "steps": 50, "batch_size": 16, "backbone": "test_resnet", "crop_px": 16},
        "data": {"source": "shards/x"},
        "config": {"test_split": "test"},
        "counts": {"test": {"pairs": 390, "ipsi_abnormal": 60, "lesion_pairs": 60, "finding_sampled": 30}},
    }
    (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def study_dir(tmp_path):
    # siamese-soft finds lesions, random does not, simclr is as good as siamese-soft
    for seed in range(3):
        _write_eval(tmp_path, "siamese-soft", seed, signal=2.0)
        _write_eval(tmp_path, "random", seed, signal=0.0)
        _write_eval(tmp_path, "simclr", seed, signal=2.0)
    return tmp_path


def _lines(md: str, prefix: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(prefix)]


def test_t_interval_by_hand():
    stat = t_interval([0.6, 0.7, 0.8])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2) from a table
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.7) and stat["sd"] == pytest.approx(0.1)
    assert stat["ci"] == pytest.approx([0.7 - half, 0.7 + half], rel=1e-5)
    assert t_interval([0.7])["ci"] is None


def test_table_with_intervals_baselines_and_counts(study_dir, tmp_path):
    result = compare_evaluations([study_dir], tmp_path / "cmp", BOOT)
    assert result["n_evaluations"] == 9
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"detection AUC, grid (backbone distance) ({N_LESION_STUDIES} lesion studies / {N_LESION_STUDIES} pairs)" in md
    assert "(n=3)" in _lines(md, "| siamese-soft |")[0]
    assert _lines(md, "| baseline: raw-pixel L2 |") and _lines(md, "| baseline: mean-intensity difference |")
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    det = next(r for r in rows if r["method"] == "random" and r["metric"] == "detection_auc_grid")
    values = [json.loads((study_dir / "evals" / "random" / f"seed{k}" / "metrics.json").read_text())["summary"]
              ["detection_auc_grid"] for k in range(3)]
    assert int(det["n"]) == 3 and det["seeds"] == "0 1 2"
    assert [float(det["ci_low"]), float(det["ci_high"])] == pytest.approx(t_interval(values)["ci"])
    assert "steps: 50 for every run" in md and "seeds: random: [0, 1, 2]" in md


def test_paired_verdicts_are_holm_corrected_over_seeds_and_studies(study_dir, tmp_path):
    result = compare_evaluations([study_dir], tmp_path / "cmp", BOOT)
    tests = result["tests"]
    # 3 method pairs x 3 paired metrics (detection, probe, kNN) + 3 methods x 2 pixel baselines on detection
    assert len(tests) == 9 + 6
    assert all(t.p_holm >= t.result["p"] and len(t.seeds) == 3 for t in tests)
    assert f"Holm-corrected over all {len(tests)} tests" in (tmp_path / "cmp" / "compare.md").read_text()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    [vs_random] = _lines(md, "- **siamese-soft vs random**")
    assert "(3 seeds, seeds and test studies): siamese-soft better on detection AUC, grid" in vs_random
    [vs_simclr] = _lines(md, "- **siamese-soft vs simclr**")
    # as good on average, but 30 lesion studies cannot bound the difference within +-0.02: no claim either way
    assert "inconclusive on" in vs_simclr and "better" not in vs_simclr and "equivalent" not in vs_simclr
    assert not any("equal" in line.replace("equivalent", "") for line in _lines(md, "- **"))
    [random_vs_pixel] = _lines(md, "- **random vs baseline: raw-pixel L2**")
    assert "baseline: raw-pixel L2 better on detection AUC, grid" in random_vs_pixel  # no signal: raw pixels beat it
    paired = list(csv.DictReader((tmp_path / "cmp" / "paired.csv").open()))
    assert len(paired) == len(tests) and {r["scope"] for r in paired} == {"seeds and studies"}


def test_a_near_copy_is_called_equivalent_by_the_tost_and_nothing_else_is(study_dir, tmp_path):
    # "tuned": siamese-soft's scores with a nudge far below the noise, so its AUCs differ by ~0.001
    for seed in range(3):
        src, dst = study_dir / "evals" / "siamese-soft" / f"seed{seed}", study_dir / "evals" / "tuned" / f"seed{seed}"
        dst.mkdir(parents=True)
        table = pd.read_parquet(src / "scores.parquet")
        nudge = np.random.default_rng(seed).normal(scale=0.02, size=len(table))
        table[["distance", "probe_abnormal", "knn_abnormal"]] += nudge[:, None]
        table.to_parquet(dst / "scores.parquet", index=False)
        metrics = json.loads((src / "metrics.json").read_text())
        metrics["run"]["method"] = "tuned"
        (dst / "metrics.json").write_text(json.dumps(metrics))
    result = compare_evaluations([study_dir], tmp_path / "cmp", BOOT, margin=0.02)
    near = [t for t in result["tests"] if {t.a, t.b} == {"siamese-soft", "tuned"}]
    assert {t.verdict for t in near} == {"equivalent"}
    for t in near:
        low, high = t.equivalence["ci"]
        assert -0.02 < low <= t.result["delta"] <= high < 0.02 and t.equivalence["p"] < 0.05
    md = (tmp_path / "cmp" / "compare.md").read_text()
    [line] = _lines(md, "- **siamese-soft vs tuned**")
    assert "equivalent within ±0.02 on detection AUC, grid" in line
    assert all(t.verdict != "equivalent" for t in result["tests"] if "random" in (t.a, t.b))
    paired = list(csv.DictReader((tmp_path / "cmp" / "paired.csv").open()))
    assert {r["verdict"] for r in paired} <= {"a better", "b better", "equivalent", "inconclusive"}
    # a margin too narrow for the same data: the same pairs become inconclusive, never "equivalent"
    narrow = compare_evaluations([study_dir], tmp_path / "cmp2", BOOT, margin=1e-4)
    assert all(t.verdict != "equivalent" for t in narrow["tests"])


def test_one_seed_says_no_test_across_seeds_is_possible(tmp_path):
    for method, signal in (("siamese-soft", 2.0), ("random", 0.0), ("simclr", 2.0)):
        _write_eval(tmp_path, method, 0, signal)
    compare_evaluations([tmp_path / "evals"], tmp_path / "cmp", BOOT)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    verdicts = _lines(md, "- **siamese-soft vs")
    assert len(verdicts) == 4  # random, simclr, two pixel baselines
    for line in verdicts:
        assert "no test across seeds is possible (one seed)" in line and "seed 0's test studies only" in line
        assert "inconclusive on" in line or "better on" in line or "equivalent within" in line
    assert "one seed only, so no claim across seeds is made" in md
    paired = list(csv.DictReader((tmp_path / "cmp" / "paired.csv").open()))
    assert {r["scope"] for r in paired} == {"studies (one seed)"}


def test_paired_tests_read_only_the_test_grid_pairs(study_dir):
    tests, notes = paired_tests(find_evaluations([study_dir]), BOOT)
    det = next(t for t in tests if t.metric == "detection_auc_grid")
    assert det.result["n_pos"] == N_LESION_STUDIES and det.result["n_neg"] == 4 * N_STUDIES - N_LESION_STUDIES
    assert det.result["n_pos_studies"] == N_LESION_STUDIES and not notes
    probe = next(t for t in tests if t.metric == "probe_auc_100%")
    assert probe.result["n_pos"] == N_LESION_STUDIES  # the probe is compared on the test grid pairs only


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
    assert "- **siamese-soft vs random** (3 seeds, seeds and test studies)" in md
    assert "| baseline: raw-pixel L2 |" in md

    again = run_study(study(tmp_path / "a"), say=lambda _: None)
    assert again["pretrained"] == 0 and again["evaluated"] == 0 and again["skipped"] == 6

    run_study(study(tmp_path / "b"), say=lambda _: None)
    assert (tmp_path / "b" / "compare" / "compare.csv").read_text() == table
    assert (tmp_path / "b" / "compare" / "compare.md").read_text() == md.replace(str(tmp_path / "a"), str(tmp_path / "b"))
