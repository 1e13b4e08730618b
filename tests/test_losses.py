"""Loss formulas on hand-computed values (PAPER.md section 1, steps 4-6; NT-Xent)."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import agreement, nt_xent, pair_distance, soft_contrastive


def test_soft_contrastive_hand_computed():
    d = torch.tensor([0.5, 1.5, 0.2])
    s = torch.tensor([1.0, 0.0, 0.25])
    # 1*0.25 ; 0*2.25 + 1*max(0, 1-1.5)^2 = 0 ; 0.25*0.04 + 0.75*(0.8)^2 = 0.01 + 0.48
    expected = (0.25 + 0.0 + 0.49) / 3
    assert soft_contrastive(d, s, margin=1.0).item() == pytest.approx(expected)


def test_soft_contrastive_scalar_label_and_margin():
    d = torch.tensor([0.3, 2.5])
    assert soft_contrastive(d, 0.0, margin=2.0).item() == pytest.approx((1.7**2 + 0.0) / 2)
    assert soft_contrastive(d, 1.0, margin=2.0).item() == pytest.approx((0.09 + 6.25) / 2)


def test_pair_distance_and_its_gradient_at_zero_are_finite():
    z = torch.tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    d = pair_distance(z, torch.tensor([[0.0, 0.8], [1.0, 0.0]]))
    assert d[0].item() == pytest.approx(0.6) and d[1].item() == pytest.approx(0.0, abs=1e-5)
    d.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_agreement_term():
    assert agreement(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])).item() == pytest.approx((0.25 + 1) / 2)


def test_nt_xent_tiny_example():
    # two images, 1-D "embeddings" on the circle: view pairs identical, the images orthogonal
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = z1.clone()
    t = 0.5
    # anchor 0 (view 1 of image 0): candidates [z1_0 (self, masked), z1_1, z2_0 (pos), z2_1] -> sims 0, 1, 0
    expected = -math.log(math.exp(1 / t) / (math.exp(0) + math.exp(1 / t) + math.exp(0)))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_gathered_negatives_match_a_single_big_batch():
    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    whole = nt_xent(z1, z2, 0.2)
    # two "ranks" of 3 images each, each seeing everyone's views as negatives
    halves = [nt_xent(z1[i : i + 3], z2[i : i + 3], 0.2, z1, z2, offset=i) for i in (0, 3)]
    assert (sum(halves) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


def test_pair_margin_applies_to_aligned_pairs_and_margin_to_cross_study_negatives(tiny_trainer):
    """--pair-margin: an aligned pair labelled dissimilar is pushed to its own margin; the negatives keep --margin."""
    from dataclasses import replace

    from train.config import PretrainConfig
    from train.gmm import Mixture
    from train.methods.siamese import SiameseSoft
    from train.normalisation import standardise

    ipsi, contra = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)).chunk(2)
    ipsi, contra = torch.cat([ipsi, ipsi * 0.5]), torch.cat([contra, contra.flip(-1)])
    settings = tiny_trainer.config(aug_gamma=1.0, aug_noise=0.0, label_warmup=0, gmm_refit_every=1000, single_net=True,
                                   label_source="self")  # fmt: skip
    parts = {}
    for pair_margin in (None, 0.3):
        torch.manual_seed(0)
        method = SiameseSoft(replace(PretrainConfig(), **settings, pair_margin=pair_margin)).eval()
        with torch.no_grad():
            z = method.nets[0](standardise(torch.cat([ipsi, contra])))
        d, d_neg = pair_distance(z[:6], z[6:]), pair_distance(z[:6], torch.roll(z[6:], 1, dims=0))
        lo, hi = d.min().item(), d.max().item()  # a mixture that labels part of these pairs dissimilar
        method.labelers[0].mixture = Mixture(*(torch.tensor(v, dtype=torch.float64)
                                               for v in ([lo, hi], [(hi - lo) ** 2 / 4] * 2, [0.5, 0.5])))  # fmt: skip
        _, logs = method.training_step(ipsi, contra, step=1)
        s = method.labelers[0].labels(d)
        assert bool(((s > 0.01) & (s < 0.99)).any()) and bool((d < 0.3).any())
        margin = 1.0 if pair_margin is None else pair_margin
        assert logs["loss_pairs"].item() == pytest.approx(soft_contrastive(d, s, margin).item(), rel=1e-5)
        assert logs["loss_neg"].item() == pytest.approx(soft_contrastive(d_neg, 0.0, 1.0).item(), rel=1e-5)
        parts[pair_margin] = (logs["loss_pairs"].item(), logs["loss_neg"].item())
    assert parts[0.3][0] < parts[None][0] and parts[0.3][1] == parts[None][1]
