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
from train.config import PretrainConfig
from train.data import to_model_input
from train.gmm import Mixture
from train.losses import pair_distance, soft_contrastive
from train.loop import pretrain
from train.methods.siamese import SiameseSoft
from train.models import load_encoder

# this module's runs on top of the tiny trainer (conftest): the 200 steps straight vs 100 + 100 at
# batch 16; 100 is mid data-epoch (ckpt-every 40), so the resume also rebuilds the epoch's stream and skips
# its consumed batches.
RUN = dict(embed_dim=32, head_hidden=64, batch_size=16, log_every=10, ckpt_every=40, deterministic=True,
           aug_gamma=1.25, aug_noise=0.02)  # fmt: skip
STEPS = 200


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
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS // 10 and losses[-1] < 0.7 * losses[0]
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
    assert logged == list(range(10, STEPS + 1, 10))  # one history across the stop
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)["method"]
    reference = torch.load(straight[1] / "last.pt", weights_only=True)["method"]
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_weights_do_not_depend_on_label_fields(cfg, tmp_path):
    weights = []
    for label_seed in (1, 2):
        data = write_shards(tmp_path / f"labels{label_seed}", n_shards=2, per_shard=16, label_seed=label_seed)
        pretrain(cfg(data["shards"], tmp_path / f"run{label_seed}", steps=6, num_workers=0))
        weights.append(load_file(tmp_path / f"run{label_seed}" / "encoder.safetensors"))
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


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
    mixtures = [Mixture(*(torch.tensor(v, dtype=torch.float64) for v in p)) for p in
                (([0.1, 0.3], [0.01, 0.01], [0.5, 0.5]), ([0.2, 0.4], [0.02, 0.02], [0.7, 0.3]))]  # fmt: skip
    for labeler, mix in zip(method.labelers, mixtures):
        labeler.mixture = mix
        labeler.maybe_refit = lambda step, force=False: False  # keep the known mixtures
    ipsi, contra = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    loss, _ = method.training_step(ipsi, contra, step=1)
    with torch.no_grad():
        d = []
        for net in method.nets:
            z = net(to_model_input((torch.cat([ipsi, contra]) * 65535).round().to(torch.int32).to(torch.uint16)))
            d.append(pair_distance(z[:4], z[4:]))
        s = [lab.labels(di) for lab, di in zip(method.labelers, d)]
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
