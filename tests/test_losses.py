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
