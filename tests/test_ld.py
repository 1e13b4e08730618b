"""Local Discrimination baseline: every loss term on hand-computed tiny cases, then the method itself."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from train.methods import ld


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------- loss terms


def test_grid_cells_average_pools_then_normalises():
    # 1 image, 2 channels, 2x2 pixels -> grid 1: mean (1, 3) / 2 -> normalised (1, 3)/sqrt(10)
    emb = _t([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]])
    cells = ld.grid_cells(emb, 1)
    assert cells.shape == (1, 1, 2)
    torch.testing.assert_close(cells[0, 0], _t([1.0, 3.0]) / math.sqrt(10.0))


def test_patch_discrimination_matching_cells_give_the_softmax_floor():
    # Two orthogonal cells, view b identical: logits diag 1/0.1 = 10, off-diagonal 0.
    cells = _t([[[1.0, 0.0], [0.0, 1.0]]])
    loss = ld.patch_discrimination_loss(cells, cells, temperature=0.1)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-10.0)), abs=1e-6)


def test_patch_discrimination_swapped_cells_are_penalised():
    # Positives orthogonal, negatives identical: -log(e^0 / (e^0 + e^10)) = log(1 + e^10).
    a = _t([[[1.0, 0.0], [0.0, 1.0]]])
    b = _t([[[0.0, 1.0], [1.0, 0.0]]])
    loss = ld.patch_discrimination_loss(a, b, temperature=0.1)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(10.0)), rel=1e-5)


def test_patch_discrimination_negatives_come_from_every_image_in_the_batch():
    # Two images with one cell each: cell of image 0 vs cell of image 1 is a negative.
    a = _t([[[1.0, 0.0]], [[0.6, 0.8]]])
    loss = ld.patch_discrimination_loss(a, a, temperature=0.5)
    # row 0: logits (2, 1.2); row 1: (1.2, 2); the symmetric matrix gives the same for columns.
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mixup_targets_are_the_normalised_mix_and_detached():
    a = _t([[[1.0, 0.0]]]).requires_grad_()
    b = _t([[[0.0, 1.0]]])
    target = ld.mixup_targets(a, b, _t([0.75]))
    torch.testing.assert_close(target[0, 0], _t([3.0, 1.0]) / math.sqrt(10.0))
    assert not target.requires_grad


def test_mixup_loss_hand_computed():
    targets = _t([[[1.0, 0.0], [0.0, 1.0]]])
    mixed = _t([[[1.0, 0.0], [1.0, 0.0]]])  # second cell matches the wrong target
    loss = ld.mixup_loss(mixed, targets, temperature=0.1)
    row0 = math.log(1.0 + math.exp(-10.0))
    row1 = math.log(1.0 + math.exp(10.0))
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-5)


def test_region_features_weight_pixels_by_assignment():
    emb = _t([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, C=2, 1, 2): pixel 0 = (1,0), pixel 1 = (0,1)
    assign = _t([[[[0.75, 0.0]], [[0.25, 1.0]]]])  # (1, K=2, 1, 2)
    r = ld.region_features(emb, assign)
    torch.testing.assert_close(r[0, 0], _t([1.0, 0.0]))
    torch.testing.assert_close(r[0, 1], _t([0.25, 1.0]) / math.sqrt(0.25**2 + 1.0))


def test_region_centre_loss_consistent_regions():
    # Both images put region k on axis k: centres = axes, logits 5 on the diagonal, 0 elsewhere.
    regions = _t([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    loss = ld.region_centre_loss(regions, temperature=0.2)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-5.0)), abs=1e-6)


def test_region_centre_loss_inconsistent_regions_cannot_tell_centres_apart():
    # Image 1 swaps its regions: both centres become (1,1)/sqrt2, every logit is equal -> log K.
    regions = _t([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    loss = ld.region_centre_loss(regions, temperature=0.2)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-5)


def test_assignment_entropy_uniform_and_one_hot():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[:, 2] = 1.0
    assert ld.assignment_entropy(uniform).item() == pytest.approx(math.log(4.0), rel=1e-5)
    assert ld.assignment_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_assignments_sigmoid_then_l1():
    logits = _t([[[[0.0]], [[math.log(3.0)]]]])  # sigmoid -> 0.5, 0.75 -> /1.25 -> 0.4, 0.6
    a = ld.soft_assignments(logits)
    torch.testing.assert_close(a[0, :, 0, 0], _t([0.4, 0.6]))


def test_total_weights_and_warmup():
    terms = {"pd": _t(1.0), "mixup": _t(2.0), "region": _t(3.0), "entropy": _t(4.0)}
    assert ld.ld_total(terms, warm=True, region_weight=10, entropy_weight=0.1).item() == pytest.approx(3.0)
    assert ld.ld_total(terms, warm=False, region_weight=10, entropy_weight=0.1).item() == pytest.approx(33.4)


def test_undoing_the_flip_restores_cell_correspondence():
    # A position-dependent embedding map: flipped view 2 matches view 1 only after un-flipping.
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1)
    flip = torch.tensor([True, True])
    view2 = emb.flip(-1)
    aligned = ld.patch_discrimination_loss(
        ld.grid_cells(emb, 4), ld.grid_cells(ld.LocalDiscrimination._unflip(view2, flip), 4), 0.1
    )
    misaligned = ld.patch_discrimination_loss(ld.grid_cells(emb, 4), ld.grid_cells(view2, 4), 0.1)
    assert aligned.item() < misaligned.item()


# ---------------------------------------------------------------- the method


def _cfg(**kw):
    base = dict(backbone="test_resnet", steps=10, seed=0, crop_px=32)
    base.update(kw)
    return SimpleNamespace(**base)


def test_ld_warmup_then_all_terms_and_gradients_reach_the_backbone():
    torch.manual_seed(0)
    method = ld.LocalDiscrimination(_cfg())
    x = torch.rand(4, 1, 32, 32)
    loss_warm, logs_warm = method.training_step(x, None, step=0)
    assert logs_warm["ld_warmup"] == 1.0
    assert loss_warm.item() == pytest.approx(logs_warm["loss_pd"] + logs_warm["loss_mixup"], rel=1e-4)
    loss, logs = method.training_step(x, None, step=2)  # 20 % of 10 steps
    assert logs["ld_warmup"] == 0.0
    expected = logs["loss_pd"] + logs["loss_mixup"] + 10 * logs["loss_region"] + 0.1 * logs["loss_entropy"]
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    grads = [p.grad for p in method.net.features.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_ld_encoder_is_the_trained_timm_backbone():
    method = ld.LocalDiscrimination(_cfg())
    with torch.no_grad():
        for p in method.net.features.parameters():
            p.add_(0.01)
    encoder = method.encoder()
    feats = method.net.features.state_dict()
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, feats[name])
    assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, encoder.num_features)
    assert method.uses_pairs is False and method.name == "ld"


def test_ld_learns_on_a_tiny_batch():
    torch.manual_seed(0)
    method = ld.LocalDiscrimination(_cfg(steps=100))
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    x = torch.rand(4, 1, 32, 32)
    first = None
    for step in range(8):
        loss, logs = method.training_step(x, None, step=0)  # warm-up objective throughout
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


def test_ld_trains_through_the_shared_loop_and_exports_a_timm_encoder(tmp_path, tiny_trainer):
    from shard_fixture import write_shards
    from train.config import PretrainConfig
    from train.loop import pretrain
    from train.models import load_encoder

    fx = write_shards(tmp_path / "fx", n_shards=2, per_shard=8, patch_px=32)
    summary = pretrain(PretrainConfig(shards=str(fx["shards"]), out=str(tmp_path / "run"), method="ld",
                                      **tiny_trainer.config(batch_size=4, steps=3)))
    assert summary["step"] == 3 and summary["stopped"] == "completed"
    encoder, meta = load_encoder(tmp_path / "run")
    assert meta["method"] == "ld" and meta["timm_name"] == "test_resnet"
    assert encoder(torch.zeros(2, 1, 16, 16)).shape == (2, meta["num_features"])


def test_ld_options_given_on_the_command_line_reach_the_method_and_the_checkpoint(tmp_path, tiny_trainer):
    """Non-default `--ld-*` values are recorded (config.json, checkpoint hash) and shape the trained network."""
    from typer.testing import CliRunner

    from shard_fixture import write_shards
    from train.checkpoint import load_checkpoint
    from train.cli import app

    fx = write_shards(tmp_path / "fx", n_shards=2, per_shard=8, patch_px=32)
    run = tmp_path / "run"
    base = ["pretrain", "--shards", str(fx["shards"]), "--out", str(run), "--method", "ld",
            *tiny_trainer.flags(batch_size=4, steps=2)]
    chosen = {"ld_grid": 2, "ld_embed_dim": 8, "ld_clusters": 3, "ld_region_weight": 2.5, "ld_mix_high": 0.7}
    flags = [a for k, v in chosen.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    runner = CliRunner()
    result = runner.invoke(app, [*base, *flags])
    assert result.exit_code == 0, result.output

    saved = json.loads((run / "config.json").read_text())["config"]
    assert {k: saved[k] for k in chosen} == chosen
    assert saved["ld_pd_temperature"] == ld.LD_DEFAULTS["ld_pd_temperature"] == 0.1  # the rest keep the paper's
    ckpt = load_checkpoint(run / "last.pt", map_location="cpu")
    assert {k: json.loads(ckpt["config_json"])[k] for k in chosen} == chosen
    assert ckpt["method"]["net.embed.weight"].shape[0] == 8 and ckpt["method"]["net.cluster.weight"].shape[0] == 3
    # part of the resume hash: the same run under the default grid is refused
    changed = runner.invoke(app, [*base, *flags[2:]])  # no --ld-grid: back to the default 4
    assert changed.exit_code == 2 and "config_changed" in changed.output and "ld_grid" in changed.output
