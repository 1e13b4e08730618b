"""`train pretrain` end to end on fixture shards (64-px patches, a tiny timm backbone, 16-px crops)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from shard_fixture import write_shards
from train.cli import app
from train.config import ConfigError, PretrainConfig
from train.data import to_model_input
from train.gmm import Mixture
from train.losses import pair_distance, soft_contrastive
from train.loop import clip_gradients, pretrain
from train.methods.siamese import SiameseSoft
from train.models import load_encoder

# this module's runs on top of the tiny trainer (conftest): the 200 steps straight vs 100 + 100 at
# batch 16; 100 is mid data-epoch (ckpt-every 40), so the resume also rebuilds the epoch's stream and skips
# its consumed batches.
RUN = dict(embed_dim=32, head_hidden=64, batch_size=16, log_every=10, ckpt_every=40, deterministic=True,
           aug_gamma=1.25, aug_noise=0.02)  # fmt: skip
STEPS = 200
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg(tiny_trainer):
    def make(shards: Path, out: Path, **kw) -> PretrainConfig:
        return PretrainConfig(shards=str(shards), out=str(out), **tiny_trainer.config(**{"steps": STEPS, **RUN, **kw}))

    return make


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("fixture"), n_shards=4, per_shard=24, patch_px=64)


@pytest.fixture(scope="module")
def straight(shards, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return pretrain(cfg(shards["shards"], out)), out


@pytest.mark.slow
def test_loss_falls_and_checkpoint_and_export_load(straight):
    summary, out = straight
    assert summary["step"] == STEPS and summary["stopped"] == "completed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["step"] % 10 == 0]
    assert len(losses) == STEPS // 10 and losses[-1] < 0.7 * losses[0]
    refits = [r for r in records if r.get("gmm_refits", 0) > 0]  # every refit is logged with the mixture
    assert refits and all({"gmm1_mu0", "gmm2_var1", "gmm1_w0", "gmm1_bank_s_below_half"} <= set(r) for r in refits)
    assert records[-1]["soft_labels"] == 1.0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == STEPS and set(ckpt) >= {"method", "optimizer", "scheduler", "scaler", "extra", "rng_by_rank"}
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["timm_name"] == "test_resnet" and meta["mm_per_px"] == 0.4 and meta["patch_px"] == 64
    model = timm.create_model(meta["timm_name"], in_chans=1, num_classes=0, pretrained=False)
    model.load_state_dict(load_file(out / "encoder.safetensors"))
    model.eval()
    x = to_model_input(torch.randint(0, 65535, (2, 1, 16, 16), dtype=torch.int32).to(torch.uint16))
    for source in (out, out / "last.pt", out / "encoder.safetensors"):
        encoder, loaded_meta = load_encoder(source)
        assert not encoder.training and loaded_meta["step"] == STEPS
        torch.testing.assert_close(encoder(x), model(x))
    assert sorted(p.name for p in out.glob("step-*.pt")) == [f"step-{s:08d}.pt" for s in (120, 160, 200)]  # --keep 3
    assert list((out / "tb").iterdir())


@pytest.mark.slow
def test_stop_and_rerun_matches_the_straight_run(shards, straight, cfg, tmp_path):
    first = pretrain(cfg(shards["shards"], tmp_path, stop_at=STEPS // 2))
    assert first["step"] == STEPS // 2 and first["stopped"] == "stop_at"
    second = pretrain(cfg(shards["shards"], tmp_path))  # the same command continues
    assert second["step"] == STEPS
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reference_logged = [json.loads(line)["step"] for line in (straight[1] / "metrics.jsonl").read_text().splitlines()]
    assert logged == reference_logged and set(range(10, STEPS + 1, 10)) <= set(logged)  # one history across the stop
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)["method"]
    reference = torch.load(straight[1] / "last.pt", weights_only=True)["method"]
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_weights_do_not_depend_on_label_fields(cfg, tmp_path):
    """Label fields randomised, the label diagnostic on (it reads them from the manifest): identical weights."""
    weights, diagnostics = [], []
    for label_seed in (1, 2):
        data = write_shards(tmp_path / f"labels{label_seed}", n_shards=2, per_shard=16, label_seed=label_seed)
        run = tmp_path / f"run{label_seed}"
        pretrain(cfg(data["shards"], run, steps=6, num_workers=0, manifest=str(data["manifest"]),
                      val_where="split == 'training'", val_every=3, label_warmup=2, gmm_min_fill=16))  # fmt: skip
        weights.append(load_file(run / "encoder.safetensors"))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        diagnostics.append([r["val_auc_d1"] for r in records if "val_auc_d1" in r])
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert len(diagnostics[0]) == 2 and diagnostics[0] != diagnostics[1]  # the labels reached the diagnostic only


def test_more_steps_on_resume_continue_the_run_and_refusals_are_one_line(shards, tmp_path):
    runner = CliRunner()
    base = ["pretrain", "--shards", str(shards["shards"]), "--out", str(tmp_path), "--backbone", "test_resnet",
            "--crop-px", "16", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--embed-dim", "8",
            "--head-hidden", "16", "--gmm-min-fill", "8", "--log-every", "4"]  # fmt: skip
    # the 40 -> 60 steps, scaled down to 8 -> 12 (the mechanics do not depend on the count)
    first = runner.invoke(app, [*base, "--steps", "8"])
    assert first.exit_code == 0, first.output
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["extra"]["labeler0"]["mixture"] is not None  # soft labels were in use
    assert ckpt["extra"]["labeler0"]["bank"].numel() == 65536  # the bank's size does not follow --steps

    refused = runner.invoke(app, [*base, "--steps", "12"])
    assert refused.exit_code == 2 and "config_changed" in refused.output and "steps: 8 -> 12" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1

    more = runner.invoke(app, [*base, "--steps", "12", "--force"])
    assert more.exit_code == 0, more.output
    assert "resumed" in more.output and "step 12 (completed)" in more.output
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 12

    other_model = runner.invoke(app, [*base, "--steps", "16", "--force", "--embed-dim", "16"])
    assert other_model.exit_code == 2 and "incompatible_checkpoint" in other_model.output
    assert "Traceback" not in other_model.output and len(other_model.output.strip().splitlines()) == 1


def test_invalid_options_are_refused_with_the_flag_to_fix(shards, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--shards", str(shards["shards"]), "--out", str(tmp_path),
                                      "--gmm-scope", "window"])  # fmt: skip
    assert result.exit_code == 2 and "--gmm-scope 'window': choose one of bank|batch|epoch" in result.output
    with pytest.raises(ConfigError, match="--ld-mix-low 0.9 > --ld-mix-high 0.8"):
        PretrainConfig(ld_mix_low=0.9).validate()
    with pytest.raises(ConfigError, match="--label-warmup must be >= 0.0"):
        PretrainConfig(label_warmup=-1).validate()


def test_each_network_of_siamese_soft_is_clipped_on_its_own(tiny_trainer):
    method = SiameseSoft(replace(PretrainConfig(), **tiny_trainer.config(**RUN)))
    for net, scale in zip(method.nets, (100.0, 1e-3)):  # one network's gradient far above the clip, one far below
        for p in net.parameters():
            p.grad = torch.full_like(p, scale)
    small_before = torch.cat([p.grad.flatten() for p in method.nets[1].parameters()]).clone()
    clip_gradients(method.clip_groups(), max_norm=3.0)
    norms = [torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item() for net in method.nets]
    assert norms[0] == pytest.approx(3.0, rel=1e-3)
    assert torch.equal(torch.cat([p.grad.flatten() for p in method.nets[1].parameters()]), small_before)


def test_a_changed_config_is_refused_on_resume(shards, tiny_trainer, tmp_path):
    runner = CliRunner()
    base = ["pretrain", "--shards", str(shards["shards"]), "--out", str(tmp_path),
            *tiny_trainer.flags(batch_size=4, steps=2)]
    assert runner.invoke(app, base).exit_code == 0
    changed = runner.invoke(app, [*base, "--lr", "0.01"])
    assert changed.exit_code == 2 and "config_changed" in changed.output and "lr" in changed.output


def test_smoke_runs_one_step_and_writes_nothing(shards, tiny_trainer, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--shards", str(shards["shards"]), "--out", str(tmp_path / "run"),
                                      *tiny_trainer.flags(batch_size=4), "--smoke"])
    assert result.exit_code == 0, result.output
    assert "(4, 1, 16, 16) torch.uint16" in result.output and "loss" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["siamese-hard", "simclr", "random"])
def test_baselines_train_and_export(shards, cfg, tmp_path, method):
    summary = pretrain(cfg(shards["shards"], tmp_path, method=method, steps=3, batch_size=4))
    encoder, meta = load_encoder(tmp_path)
    assert meta["method"] == method and summary["step"] == (0 if method == "random" else 3)
    assert encoder(torch.zeros(1, 1, 16, 16)).shape == (1, meta["num_features"])


def test_peer_labels_train_each_network_on_the_other_networks_labels(tiny_trainer):
    settings = {**RUN, "aug_gamma": 1.0, "aug_noise": 0.0, "steps": 100, "label_warmup": 0,
                "gmm_refit_every": 1000, "gmm_scope": "batch", "neg_pairs": "none"}
    config = replace(PretrainConfig(), **tiny_trainer.config(**settings))
    torch.manual_seed(0)
    method = SiameseSoft(config).eval()  # eval: BatchNorm gives the same output on the recomputation below
    ipsi, contra = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)

    def distances():
        with torch.no_grad():
            d = []
            for net in method.nets:
                z = net(to_model_input((torch.cat([ipsi, contra]) * 65535).round().to(torch.int32).to(torch.uint16)))
                d.append(pair_distance(z[:4], z[4:]))
            return d

    d = distances()
    for k, (labeler, dk) in enumerate(zip(method.labelers, d)):  # two different mixtures spanning the distances
        lo, hi = dk.min().item() * (0.9 - 0.1 * k), dk.max().item() * (1.1 + 0.2 * k)
        labeler.mixture = Mixture(*(torch.tensor(v, dtype=torch.float64) for v in
                                    ([lo, hi], [(hi - lo) ** 2 / (4 + 4 * k)] * 2, [0.5 + 0.2 * k, 0.5 - 0.2 * k])))  # fmt: skip
        labeler.maybe_refit = lambda step, force=False: False  # keep the known mixtures
    loss, _ = method.training_step(ipsi, contra, step=1)
    s = [lab.labels(di) for lab, di in zip(method.labelers, d)]
    assert all(bool(((si > 0.01) & (si < 0.99)).any()) for si in s)  # soft, not clamped, labels
    expected = soft_contrastive(d[0], s[1]) + soft_contrastive(d[1], s[0])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() != pytest.approx((soft_contrastive(d[0], s[0]) + soft_contrastive(d[1], s[1])).item(), rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run(shards, cfg, tmp_path):
    summary = pretrain(cfg(shards["shards"], tmp_path, steps=10, device="cuda", deterministic=False))
    assert summary["step"] == 10 and "gpu_mem_gb" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_export_command_rewrites_the_encoder_from_a_checkpoint(straight, tmp_path):
    out = straight[1]
    result = CliRunner().invoke(app, ["export", str(out / "step-00000160.pt"), "--out", str(tmp_path / "e160.safetensors")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "e160.json").read_text())
    assert meta["step"] == 160 and meta["timm_name"] == "test_resnet"
    final, at_160 = load_file(out / "encoder.safetensors"), load_file(tmp_path / "e160.safetensors")
    assert not all(torch.equal(final[k], at_160[k]) for k in final)  # a different step, different weights
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "nothing.pt")])
    assert bad.exit_code == 2 and "no_encoder" in bad.output and "does not exist" in bad.output


@pytest.mark.slow
def test_anchored_shared_run_resumes_exactly_and_logs_every_label_diagnostic(cfg, tmp_path):
    """--gmm-mode anchored with --pair-photometric shared and a --pair-margin: the shuffled-pair bank and its
    density live in the checkpoint, a stopped run continues exactly like a straight one, and the label
    diagnostic (on for the straight run only: it may not change training) logs clean and train-mode scores."""
    data = write_shards(tmp_path / "data", n_shards=2, per_shard=16)
    arm = dict(steps=24, ckpt_every=8, log_every=4, num_workers=0, gmm_mode="anchored", pair_photometric="shared",
               pair_margin=0.5, gmm_min_fill=32, gmm_refit_every=4, label_warmup=2)  # fmt: skip
    straight = tmp_path / "straight"
    pretrain(cfg(data["shards"], straight, manifest=str(data["manifest"]), val_where="split == 'training'",
                 val_every=8, **arm))  # fmt: skip
    stopped = tmp_path / "stopped"
    assert pretrain(cfg(data["shards"], stopped, stop_at=12, **arm))["step"] == 12
    assert pretrain(cfg(data["shards"], stopped, **arm))["step"] == 24

    reference, resumed = (torch.load(run / "last.pt", weights_only=True) for run in (straight, stopped))
    for name, tensor in reference["method"].items():
        assert torch.equal(resumed["method"][name], tensor), name
    for k in ("labeler0", "labeler1"):
        saved = reference["extra"][k]
        assert saved["neg_count"] == 24 * 16 and saved["neg_density"] is not None and saved["mixture"] is not None
        for key in ("bank", "neg_bank", "neg_density", "mixture"):
            assert torch.equal(resumed["extra"][k][key], saved[key]), (k, key)

    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    refits = [r for r in records if r.get("gmm_refits", 0) > 0]
    assert refits and all({"gmm1_w1", "gmm2_w1", "gmm1_bank_s_below_half", "d_pos", "d_neg", "d_pos_over_neg"}
                          <= set(r) for r in refits)  # fmt: skip
    diagnostics = [r for r in records if "val_auc_d1" in r]
    assert [r["step"] for r in diagnostics] == [8, 16, 24]
    assert {"val_auc_1ms1", "val_aug_auc_1ms1", "val_aug_auc_d2", "val_aug_s_below_half2"} <= set(diagnostics[-1])
    assert all(0 <= diagnostics[-1][k] <= 1 for k in ("val_aug_auc_d1", "val_aug_auc_1ms2"))


def test_label_probe_scores_augmented_train_mode_distances_and_leaves_the_method_as_it_was(tiny_trainer):
    from train.diagnostics import LabelProbe, ValidationPairs

    g = torch.Generator().manual_seed(4)
    pixels = (torch.rand(2, 40, 1, 16, 16, generator=g) * 65535).to(torch.int32).to(torch.uint16)
    pairs = ValidationPairs(pixels[0], pixels[1], lesion=(torch.arange(40) % 3 == 0).numpy())
    method = SiameseSoft(replace(PretrainConfig(), **tiny_trainer.config(**RUN, pair_photometric="shared")))
    method.train()
    buffers = {k: v.clone() for k, v in method.named_buffers()}
    rng = torch.get_rng_state()
    record = LabelProbe(pairs, torch.device("cpu"), batch=16).run(method)
    assert method.training and torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert all(torch.equal(v, buffers[k]) for k, v in method.named_buffers())  # BatchNorm statistics too
    assert record["val_auc_d1"] != record["val_aug_auc_d1"] and record["val_auc_d2"] != record["val_aug_auc_d2"]
    assert LabelProbe(pairs, torch.device("cpu"), batch=16).run(method) == record  # the same draws every time


def test_new_soft_label_options_have_help_with_their_default_and_are_validated(shards, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    text = " ".join(result.output.split())
    for flag, default in (("--gmm-mode", "free"), ("--pair-photometric", "independent"), ("--pair-margin", "--margin"),
                          ("--gmm-prior-prevalence", "0.03"), ("--gmm-prior-strength", "--gmm-bank")):  # fmt: skip
        assert flag in text and default in text.split(flag, 1)[1][:700], flag
    refused = CliRunner().invoke(app, ["pretrain", "--shards", str(shards["shards"]), "--out", str(tmp_path),
                                       "--gmm-mode", "tight"])  # fmt: skip
    assert refused.exit_code == 2 and "--gmm-mode 'tight': choose one of free|anchored|map" in refused.output
    with pytest.raises(ConfigError, match="--gmm-prior-prevalence must be <= 1"):
        PretrainConfig(gmm_prior_prevalence=1.5).validate()


def test_a_study_arm_sets_the_new_soft_label_options():
    from pipelines.study import Arm, StudyConfig, pretrain_config

    arm = Arm("soft-anchored-shared", "siamese-soft", (("gmm_mode", "anchored"), ("pair_photometric", "shared"),
                                                       ("pair_margin", 0.5)))  # fmt: skip
    config = pretrain_config(StudyConfig(shards="s", manifests="m", out="o"), arm, seed=1)
    assert (config.gmm_mode, config.pair_photometric, config.pair_margin, config.tag) == (
        "anchored", "shared", 0.5, "soft-anchored-shared")
    method = SiameseSoft(config)
    assert all(lab.mode == "anchored" and lab.neg_bank is not None for lab in method.labelers)
