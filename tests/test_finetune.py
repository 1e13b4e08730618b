"""`train finetune` on fixture shards (32-px patches, 24 studies: odd ones the test split; a tiny timm backbone):
the study-level split, the label fraction, resume, the report against its own saved scores, multi-class,
freezing, and scoring patches with a finished run (the contrast-detail benchmark's supervised ceiling)."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from shard_fixture import write_split_fixture
from train.cli import app
from train.checkpoint import CheckpointError
from train.config import ConfigError, PretrainConfig
from train.data import shard_urls
from train.embed import iter_samples
from train.finetune import FinetuneConfig, finetune, score_patches
from train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(init="random", backbone="test_resnet", crop_px=24, num_workers=0, steps=6, batch_size=8, ckpt_every=3,
           log_every=3, n_boot=100, deterministic=True, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_split_fixture(tmp_path_factory.mktemp("finetune_fixture"))


@pytest.fixture(scope="module")
def make_cfg(fixture):
    def make(out, **kw) -> FinetuneConfig:
        return FinetuneConfig(manifest=str(fixture["manifest"]), shards=str(fixture["shards"]), out=str(out), **{**RUN, **kw})

    return make


@pytest.fixture(scope="module")
def runs(make_cfg, tmp_path_factory):
    """One run at 1 % and one at 100 % of the labelled training studies."""
    return {f: finetune(make_cfg(tmp_path_factory.mktemp(f"ft{f}"), label_fraction=f)) for f in (0.01, 1.0)}


@pytest.mark.parametrize("fraction", [0.01, 1.0])
def test_split_by_study_and_label_fraction(runs, fixture, fraction):
    run = runs[fraction]
    result = json.loads((run / "finetune.json").read_text())
    split = pd.read_parquet(run / "split.parquet")
    roles_per_study = split.groupby("study_id")["role"].nunique()
    assert (roles_per_study == 1).all()  # no study in two of train / val / test
    table = fixture["table"]
    test_studies = set(table.loc[table["split"] == "test", "study_id"])
    assert set(split.loc[split["role"] == "test", "study_id"]) == test_studies
    assert not set(split.loc[split["role"] != "test", "study_id"]) & test_studies
    # 12 training studies, all holding a lesion pair: 2 (20 %) held out for validation, the label fraction of the 10 left
    train_studies = split.loc[split["role"] == "train", "study_id"].nunique()
    assert result["counts"]["training_studies"] == 10 and split.loc[split["role"] == "val", "study_id"].nunique() == 2
    assert train_studies == {0.01: 1, 1.0: 10}[fraction] == result["counts"]["train"]["studies"]
    assert result["counts"]["train"]["samples"] == 4 * train_studies


@pytest.mark.parametrize("fraction", [0.01, 1.0])
def test_report_auc_equals_the_saved_test_scores(runs, fixture, fraction):
    run = runs[fraction]
    result = json.loads((run / "finetune.json").read_text())
    scores = pd.read_parquet(run / "test_scores.parquet")
    manifest = fixture["table"].set_index("key")
    # labels travel with their key: each saved label is the manifest's for that key
    assert (scores["label"].to_numpy() == manifest.loc[scores["key"], "ipsi_abnormal"].to_numpy()).all()
    assert len(scores) == (manifest["split"] == "test").sum()
    recomputed = roc_auc_score(scores["label"].astype(int), scores["score"])
    assert result["test"]["auc"] == pytest.approx(recomputed, abs=1e-12)
    assert result["primary"] == result["test"]["auc"]
    low, high = result["test"]["auc_ci"]
    assert low <= result["test"]["auc"] <= high
    assert f"{result['test']['auc']:.3f}" in (run / "report.md").read_text()


def test_stop_and_rerun_gives_the_same_result(runs, make_cfg, tmp_path):
    straight = runs[1.0]
    cfg = make_cfg(tmp_path / "resumed", label_fraction=1.0, stop_at=4)  # mid data epoch (ckpt-every 3)
    finetune(cfg)
    assert not (tmp_path / "resumed" / "finetune.json").exists()
    stopped = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert stopped["step"] == 4
    # a checkpoint that does not fit (here one without the model's weights) is refused with the fix, not a raw error
    foreign = tmp_path / "foreign.pt"
    torch.save({k: v for k, v in stopped.items() if k != "model"}, foreign)
    with pytest.raises(CheckpointError, match="incompatible_checkpoint.*--resume never"):
        finetune(dataclasses.replace(cfg, out=str(tmp_path / "other"), resume=str(foreign), force=True))
    finetune(dataclasses.replace(cfg, stop_at=None))
    a = pd.read_parquet(straight / "test_scores.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "test_scores.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    ra, rb = (json.loads((p / "finetune.json").read_text()) for p in (straight, tmp_path / "resumed"))
    assert ra["run"]["selected_step"] == rb["run"]["selected_step"] and ra["test"]["auc"] == pytest.approx(rb["test"]["auc"])


def test_multiclass_frozen_stages_from_an_encoder_via_cli_and_score_patches(fixture, tmp_path, tiny_trainer):
    encoder = tmp_path / "encoder"
    pretrain(PretrainConfig(shards=str(fixture["shards"]), out=str(encoder), **tiny_trainer.config(method="random")))
    out = tmp_path / "density"
    flags = ["--encoder", str(encoder), "--manifest", str(fixture["manifest"]), "--shards", str(fixture["shards"]),
             "--task", "density", "--freeze", "stages:1", "--no-balance", "--out", str(out), "--crop-px", "24",
             "--num-workers", "0", "--steps", "4", "--batch-size", "8", "--ckpt-every", "2", "--n-boot", "50",
             "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, ["finetune", *flags])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["kind"] == "multiclass" and summary["classes"] == ["A", "B", "C", "D"]
    scores = pd.read_parquet(out / "test_scores.parquet")
    probs = scores[[f"score_{c}" for c in "ABCD"]].to_numpy()
    assert summary["test"]["macro_auc"] == pytest.approx(roc_auc_score(scores["target"], probs, multi_class="ovr"))
    # the stem and the first stage keep the encoder's weights; later stages and the head train
    before, after = load_file(encoder / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    for name, tensor in before.items():
        same = torch.equal(tensor, after[name])
        if name.startswith(("conv1", "layer1.")):
            assert same, name
    assert not all(torch.equal(before[n], after[n]) for n in before if n.startswith("layer2.") and n.endswith("weight"))
    # the public scorer gives the saved test scores from the same uint16 patches (joined by key)
    table = fixture["table"]
    test = table[table["split"] == "test"]
    samples = {s.key: s.ipsi for s in iter_samples(shard_urls(test, fixture["manifest"], fixture["shards"]), frozenset(test["key"]))}
    patches = np.stack([samples[k] for k in scores["key"]])
    np.testing.assert_allclose(score_patches(out, patches), probs, atol=1e-5)


def test_help_lists_every_knob_and_bad_options_are_refused(make_cfg, tmp_path):
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for f in dataclasses.fields(FinetuneConfig):
        assert "--" + f.name.replace("_", "-") in result.output, f.name
    for bad, flag in ((dict(freeze="layers"), "--freeze"), (dict(init="encoder"), "--encoder"),
                      (dict(label_fraction=0.0), "--label-fraction")):  # fmt: skip
        with pytest.raises(ConfigError, match=flag):
            make_cfg(tmp_path, **bad).validate()


def _write_finetune(root, method, fraction, seed, signal):
    """A fine-tuning result in `train finetune`'s layout whose test scores carry `signal` (lesion shift in noise sds)."""
    out = root / method / f"seed{seed}" / f"frac{fraction:g}"
    out.mkdir(parents=True)
    studies = np.repeat([f"s{i:03d}" for i in range(60)], 2)
    label = np.tile([True, False], 60) & (np.arange(120) % 6 < 3)  # a positive in every third study
    rng = np.random.default_rng(zlib.crc32(f"{method}/{fraction}/{seed}".encode()))
    score = rng.normal(size=120) + signal * label
    scores = pd.DataFrame({"key": [f"k{i:03d}" for i in range(120)], "study_id": studies, "label": label,
                           "target": label.astype(int), "score": score})  # fmt: skip
    scores.to_parquet(out / "test_scores.parquet", index=False)
    result = {"task": "ipsi_abnormal", "kind": "binary", "primary": roc_auc_score(label, score), "test": {},
              "run": {"method": method, "seed": seed, "label_fraction": fraction}}  # fmt: skip
    (out / "finetune.json").write_text(json.dumps(result))
    return result["primary"]


def test_compare_tabulates_label_efficiency_with_paired_holm_tests(tmp_path):
    aucs = {}
    for method, signal in (("siamese-soft", 2.5), ("random-init", 0.0)):
        for fraction in (0.01, 1.0):
            for seed in (0, 1, 2):
                aucs[method, fraction, seed] = _write_finetune(tmp_path / "ft", method, fraction, seed, signal)
    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "ft"), "--out", str(out), "--n-boot", "200"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "finetune.csv")
    assert len(table) == 4 and (table["n"] == 3).all()
    row = table[(table["method"] == "siamese-soft") & (table["label_fraction"] == 1.0)].iloc[0]
    assert row["mean"] == pytest.approx(np.mean([aucs["siamese-soft", 1.0, s] for s in range(3)]))
    paired = pd.read_csv(out / "finetune_paired.csv")
    assert len(paired) == 2 and set(paired["metric"]) == {"ipsi_abnormal@0.01", "ipsi_abnormal@1"}
    assert (paired["verdict"] == "a better").all() and (paired["p_holm"] >= paired["p"]).all()
    md = (out / "compare.md").read_text()
    assert "## Fine-tuning: label efficiency" in md and "| random-init |" in md and (out / "finetune_curves.png").is_file()


def test_study_finetunes_every_run_at_each_fraction(fixture, tmp_path):
    from pipelines.study import StudyConfig, run_study

    cfg = StudyConfig(shards=str(fixture["shards"]), manifests=str(fixture["manifest"]), out=str(tmp_path / "study"),
                      seeds=(0,), methods=("random",), steps=4, batch_size=8, backbone="test_resnet", crop_px=24,
                      num_workers=0, device="cpu", n_boot=50, detection_only=True, finetune_fractions=(0.5, 1.0))  # fmt: skip
    summary = run_study(cfg, say=lambda line: None)
    assert summary["finetuned"] == 2
    for fraction in ("0.5", "1"):
        run = tmp_path / "study" / "finetunes" / "random" / "seed0" / f"frac{fraction}"
        result = json.loads((run / "finetune.json").read_text())
        assert result["run"]["method"] == "random" and result["run"]["steps"] == 4
        # a finished fine-tuning keeps its result and classifier, not the training state only resuming needs
        assert (run / "classifier.safetensors").is_file() and not list(run.glob("*.pt"))
    md = (tmp_path / "study" / "compare" / "compare.md").read_text()
    assert "## Fine-tuning: label efficiency" in md and "50% labels" in md
    assert run_study(cfg, say=lambda line: None)["finetuned"] == 0  # finished fine-tunings are skipped
