"""`train evaluate`: metrics are computed from the data (not hard-coded), probes never train on the test
split, every sample is read once, and the command writes metrics, report and figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from shard_fixture import write_split_fixture
from train.cli import app
from train.data import select
from train.embed import EVAL_COLUMNS, embed_pairs, iter_samples, manifest_labels
from train.evaluate import EvalConfig, compute_metrics, summary
from train.probes import stratified_fraction

FAST = EvalConfig(n_boot=200, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split_fixture(tmp_path_factory.mktemp("eval_fixture"))


class BlobFeatures(nn.Module):
    """Features that carry the label honestly: mean of the patch centre (where fixture lesions sit),
    mean of the whole patch, a constant."""

    def forward(self, x):
        h, w = x.shape[-2:]
        centre = x[..., h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean(dim=(1, 2, 3))
        return torch.stack([centre, x.mean(dim=(1, 2, 3)), torch.ones_like(centre)], dim=1)


class NoiseFeatures(nn.Module):
    """Features that ignore the image: seeded Gaussian noise."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        return torch.randn(x.shape[0], 16, generator=self.gen)


def _embed(model, data):
    selection = select(shards=str(data["shards"]), manifest=str(data["manifest"]), include_finding=True)
    samples = iter_samples(selection.urls, selection.keys, manifest_labels(data["manifest"]))
    return embed_pairs(model, samples, batch_size=32)


@pytest.fixture(scope="module")
def blob(data):
    emb = _embed(BlobFeatures(), data)
    return emb, compute_metrics(emb, FAST)


def test_every_sample_is_read_exactly_once_with_its_manifest_labels(data, blob):
    emb, _ = blob
    keys = emb.table["key"].tolist()
    assert len(keys) == len(set(keys)) == len(data["table"])
    merged = emb.table.merge(data["table"], on="key", suffixes=("", "_manifest"))
    assert (merged["split"] == merged["split_manifest"]).all()
    assert (merged["ipsi_abnormal"] == merged["ipsi_abnormal_manifest"]).all()
    assert set(emb.table.columns) <= set(EVAL_COLUMNS)  # allow-listed fields only


def test_label_carrying_features_score_near_one(blob):
    _, result = blob
    m = result.metrics
    test = m["counts"]["test"]
    assert test["lesion_pairs"] == 24 and test["grid_lesion_pairs"] == 12 and test["grid_lesion_studies"] == 12
    assert m["counts"]["training"]["ipsi_abnormal"] == 24
    grid = m["detection"]["backbone"]["grid"]
    assert grid["auc"] > 0.95 and grid["n_pos"] == 12 and grid["n_neg"] == 24 and grid["n_pos_studies"] == 12
    assert m["detection"]["backbone"]["finding"]["n_pos"] == 12  # the finding-centred positives, kept apart
    assert m["probe_abnormal"]["100%"]["auc"] > 0.95
    lo, hi = m["probe_abnormal"]["100%"]["auc_ci"]
    assert lo <= m["probe_abnormal"]["100%"]["auc"] <= hi
    assert m["probe_abnormal"]["100%"]["balanced_accuracy"] > 0.9
    assert m["knn"]["abnormal"]["auc"] > 0.9
    assert "balanced_accuracy" not in m["knn"]["abnormal"]  # a majority vote at low prevalence says nothing
    assert "skipped" in m["probe_abnormal"]["1%"]  # 1 % of 36 grid rows cannot hold 2 positives
    assert any("1%" in n and "skipped" in n for n in result.notes)


def test_random_features_score_near_chance(data):
    m = compute_metrics(_embed(NoiseFeatures(), data), FAST).metrics
    for auc in (m["detection"]["backbone"]["grid"], m["probe_abnormal"]["100%"], m["knn"]["abnormal"]):
        assert abs(auc["auc"] - 0.5) < 0.25
        assert auc["auc_ci"][0] < 0.5 < auc["auc_ci"][1]


def _coefs(result):
    return {name: model[-1].coef_.copy() for name, model in result.probes.items()}


def test_probes_never_train_on_the_test_split(blob):
    emb, result = blob
    before = _coefs(result)
    assert set(before) >= {"abnormal@100%", "birads@100%", "density@100%"}

    shuffled = emb.table.copy()
    test = (shuffled["split"] == "test").to_numpy()
    rng = np.random.default_rng(1)
    for column in ("ipsi_abnormal", "breast_birads_ipsi", "density"):
        shuffled.loc[test, column] = rng.permutation(shuffled.loc[test, column].to_numpy())
    emb.table = shuffled
    permuted = compute_metrics(emb, FAST)
    for name, coef in _coefs(permuted).items():
        np.testing.assert_array_equal(coef, before[name])
    # ...while the test labels do drive the scores
    assert permuted.metrics["probe_abnormal"]["100%"]["auc"] < result.metrics["probe_abnormal"]["100%"]["auc"] - 0.2

    relabelled = shuffled.copy()
    train_rows = np.flatnonzero(~test)[:8]
    relabelled.loc[train_rows, "ipsi_abnormal"] = ~relabelled.loc[train_rows, "ipsi_abnormal"].astype(bool)
    emb.table = relabelled
    changed = _coefs(compute_metrics(emb, FAST))
    assert not np.array_equal(changed["abnormal@100%"], before["abnormal@100%"])


def test_label_fraction_subsample_is_stratified_and_seeded():
    y = np.array([True] * 20 + [False] * 180)
    a = stratified_fraction(y, 0.1, seed=0)
    assert len(a) == 20 and y[a].sum() == 2
    np.testing.assert_array_equal(a, stratified_fraction(y, 0.1, seed=0))
    assert not np.array_equal(a, stratified_fraction(y, 0.1, seed=1))
    assert len(stratified_fraction(y, 1.0, seed=0)) == 200


def test_summary_flattens_headline_numbers(blob):
    m = blob[1].metrics
    s = summary(m)
    assert s["detection_auc_grid"] == m["detection"]["backbone"]["grid"]["auc"]
    assert s["detection_auc_finding"] == m["detection"]["backbone"]["finding"]["auc"]
    # the pixel baselines sit in every table: bright blobs are found by raw pixels too
    assert s["detection_auc_grid_pixel_l2"] > 0.95 and s["detection_auc_grid_mean_intensity_diff"] > 0.95
    assert s["probe_auc_1%"] is None and s["probe_auc_100%"] > 0.95
    assert s["knn_auc_abnormal"] == m["knn"]["abnormal"]["auc"]


@pytest.mark.slow
def test_evaluate_command_on_a_trained_run(data, tiny_trainer, tmp_path):
    from train.config import PretrainConfig
    from train.loop import pretrain

    run = tmp_path / "run"
    pretrain(PretrainConfig(shards=str(data["shards"]), out=str(run), method="siamese-soft",
                            **tiny_trainer.config(batch_size=8, steps=3, deterministic=True, seed=0)))
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "--encoder", str(run), "--manifest", str(data["manifest"]), "--shards", str(data["shards"]),
        "--out", str(out), "--n-boot", "100", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["n_samples"] == 96 and metrics["run"]["method"] == "siamese-soft"
    assert metrics["run"]["seed"] == 0 and metrics["run"]["steps"] == 3 and metrics["run"]["crop_px"] == 16
    assert "auc" in metrics["detection"]["head"]["grid"]  # siamese-soft has a projection head
    assert 0.0 <= metrics["summary"]["detection_auc_grid"] <= 1.0
    assert metrics["summary_counts"]["detection_auc_grid"] == {"lesion_studies": 12, "lesion_pairs": 12}
    assert metrics["distance_mixture"]["scope"] == "test" and len(metrics["distance_mixture"]["means"]) == 2
    for png in ("roc.png", "distances.png", "top_pairs.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"]({png})" in (out / "report.md").read_text()
    scores = pd.read_parquet(out / "scores.parquet")
    assert set(scores.columns) <= set(EVAL_COLUMNS) | {"distance", "head_distance", "pixel_l2", "mean_intensity_diff",
                                                       "probe_abnormal", "knn_abnormal"}
    assert len(scores) == 96 and np.isfinite(scores["head_distance"]).all()
    test = scores["split"] == "test"
    assert scores.loc[test, "probe_abnormal"].notna().all() and scores.loc[~test, "probe_abnormal"].isna().all()
    report = (out / "report.md").read_text()
    assert "raw-pixel L2 (baseline)" in report and "lesion studies / pairs / normals" in report


def test_evaluate_command_reports_a_missing_encoder(data, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--encoder", str(tmp_path / "nothing"), "--shards",
                                      str(data["shards"]), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 1
    assert "no_encoder" in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_whole_breast_heatmap_from_the_archive(synth_archive, tmp_path):
    from train.heatmap import study_heatmap
    from train.report import plot_heatmap

    meta = {"mm_per_px": 0.8, "patch_px": 32}
    heatmap, note = study_heatmap(BlobFeatures(), synth_archive, meta, n_patches=64, batch_size=64)
    assert heatmap is not None, note
    inside = np.isfinite(heatmap.distance_map)
    assert inside.sum() > 0.2 * heatmap.image.size and heatmap.n_patches > 10
    assert heatmap.boxes  # the picked study has a finding on the mapped side
    assert plot_heatmap(heatmap, tmp_path / "heatmap.png", "test").stat().st_size > 10_000


def test_every_evaluate_option_comes_from_the_config_and_is_checked(tmp_path):
    import dataclasses

    from train.evaluate_config import EvaluateConfig

    help_text = CliRunner().invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"}).output
    for f in dataclasses.fields(EvaluateConfig):
        assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in help_text
    assert "Default: 2000." in help_text and "Default: 0.01 0.1 1.0." in help_text
    base = ["evaluate", "--encoder", str(tmp_path), "--out", str(tmp_path / "eval")]
    no_data = CliRunner().invoke(app, base)
    assert no_data.exit_code == 2 and "no_data" in no_data.output
    bad = CliRunner().invoke(app, [*base, "--shards", str(tmp_path), "--label-fraction", "1.5"])
    assert bad.exit_code == 2 and "--label-fraction must be <= 1.0" in bad.output
    assert not (tmp_path / "eval").exists()
