"""Device-side intensity augmentation of aligned pairs: one draw per image or one per pair (--pair-photometric)."""

from __future__ import annotations

from dataclasses import replace

import torch

from train.augment import augment, augment_pair
from train.config import PretrainConfig
from train.normalisation import NORM_MEAN, NORM_STD


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * NORM_STD + NORM_MEAN  # undo the model-input standardisation


def _pair(policy: str, ipsi, contra, gamma=1.25, noise=0.0, seed=0):
    cfg = replace(PretrainConfig(), pair_photometric=policy, aug_gamma=gamma, aug_noise=noise)
    gen = torch.Generator().manual_seed(seed)
    return tuple(_unit(x).double() for x in augment_pair(ipsi, contra, cfg, gen=gen))


def test_shared_gives_both_members_of_a_pair_the_same_gamma_and_independent_does_not():
    n = 64
    ipsi, contra = torch.full((n, 1, 8, 8), 0.5), torch.full((n, 1, 8, 8), 0.25)
    for policy, same in (("shared", True), ("independent", False)):
        a, b = _pair(policy, ipsi, contra)
        gamma_ipsi = torch.log(a[:, 0, 0, 0]) / torch.log(torch.tensor(0.5, dtype=torch.float64))
        gamma_contra = torch.log(b[:, 0, 0, 0]) / torch.log(torch.tensor(0.25, dtype=torch.float64))
        assert gamma_ipsi.std() > 0.05  # gamma does vary from pair to pair
        assert torch.allclose(gamma_ipsi, gamma_contra, atol=1e-4) == same
        assert ((gamma_ipsi - gamma_contra).abs() > 0.01).any() != same


def test_shared_gives_both_members_the_same_noise_field():
    g = torch.Generator().manual_seed(1)
    ipsi = 0.4 + 0.1 * torch.rand((16, 1, 12, 12), generator=g)  # different images, inside [0, 1] after noise
    contra = 0.5 + 0.1 * torch.rand((16, 1, 12, 12), generator=g)
    for policy, same in (("shared", True), ("independent", False)):
        a, b = _pair(policy, ipsi, contra, gamma=1.0, noise=0.02)
        noise_ipsi, noise_contra = a - ipsi.double(), b - contra.double()
        assert noise_ipsi.abs().max() > 1e-3
        assert torch.allclose(noise_ipsi, noise_contra, atol=1e-5) == same
    a, b = _pair("shared", ipsi, ipsi.clone(), gamma=1.25, noise=0.02)  # an identical pair stays identical
    assert torch.equal(a, b)


def test_independent_pairs_draw_exactly_as_per_image_augmentation():
    """The default policy is the earlier behaviour: same draws, same order, so runs and resumes reproduce."""
    g = torch.Generator().manual_seed(2)
    ipsi, contra = torch.rand((4, 1, 8, 8), generator=g), torch.rand((4, 1, 8, 8), generator=g)
    cfg = PretrainConfig()
    assert cfg.pair_photometric == "independent"
    torch.manual_seed(3)
    pair = augment_pair(ipsi, contra, cfg)
    torch.manual_seed(3)
    single = (augment(ipsi, cfg), augment(contra, cfg))
    assert all(torch.equal(p, s) for p, s in zip(pair, single))
