"""Mixture soft labels: posterior, EM recovery, bank, collapse guard, state (PAPER.md section 1, step 3)."""

from __future__ import annotations

import math

import pytest
import torch

from train.config import DEFAULTS
from train.gmm import DistanceBank, Mixture, SoftLabeler, em_fit, initial_mixture, posterior_similar


def _mix(means, variances, weights):
    return Mixture(*(torch.tensor(v, dtype=torch.float64) for v in (means, variances, weights)))


def _labeler(capacity, scope="bank", refit_every=DEFAULTS.gmm_refit_every, min_separation=DEFAULTS.gmm_min_sep,
             min_fill=4):
    return SoftLabeler(capacity, scope, refit_every, DEFAULTS.gmm_em_iters, DEFAULTS.gmm_var_floor, min_separation, min_fill)


def _normal_pdf(x, mu, var):
    return math.exp(-((x - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def test_posterior_of_lower_mean_component_hand_computed():
    mix = _mix([1.0, 0.2], [0.04, 0.01], [0.3, 0.7])  # deliberately unordered
    x = 0.5
    lo, hi = 0.7 * _normal_pdf(x, 0.2, 0.01), 0.3 * _normal_pdf(x, 1.0, 0.04)
    s = posterior_similar(torch.tensor([x, 0.2, 1.2], dtype=torch.float64), mix)
    assert s[0].item() == pytest.approx(lo / (lo + hi), rel=1e-9)
    assert s[1].item() > 0.99 and s[2].item() < 0.01


def test_em_recovers_known_parameters():
    g = torch.Generator().manual_seed(0)
    n_lo, n_hi = 9000, 1000
    x = torch.cat([0.3 + 0.05 * torch.randn(n_lo, generator=g), 0.9 + 0.1 * torch.randn(n_hi, generator=g)])
    fit = em_fit(x, initial_mixture(x, 1e-6), iterations=200, var_floor=1e-6)
    assert fit.means.tolist() == pytest.approx([0.3, 0.9], abs=0.01)
    assert fit.variances.sqrt().tolist() == pytest.approx([0.05, 0.1], abs=0.01)
    assert fit.weights.tolist() == pytest.approx([0.9, 0.1], abs=0.01)


def test_variance_floor_holds_on_a_point_mass():
    x = torch.cat([torch.full((100,), 0.5), torch.linspace(0.8, 1.2, 20)])
    fit = em_fit(x, _mix([0.5, 1.0], [0.01, 0.01], [0.8, 0.2]), iterations=10, var_floor=1e-3)
    assert fit.variances.min().item() >= 1e-3


def test_bank_is_a_fifo_of_the_last_values():
    bank = DistanceBank(5)
    bank.push(torch.arange(3.0))
    assert not bank.full and bank.contents().tolist() == [0, 1, 2]
    bank.push(torch.arange(3.0, 7.0))
    assert bank.full and sorted(bank.contents().tolist()) == [2, 3, 4, 5, 6]


def test_labeler_refits_on_schedule_and_keeps_params_on_collapse():
    lab = _labeler(1000, refit_every=50, min_separation=0.05)
    g = torch.Generator().manual_seed(1)
    lab.observe(torch.cat([0.3 + 0.05 * torch.randn(900, generator=g), 0.9 + 0.05 * torch.randn(100, generator=g)]))
    assert lab.maybe_refit(step=7)  # first fit happens as soon as there is none
    first = lab.mixture.as_tensor().clone()
    lab.observe(torch.full((1000,), 0.5))  # a collapsed distribution: both components on one point
    assert not lab.maybe_refit(step=8)  # not due
    assert not lab.maybe_refit(step=50)  # due, but degenerate -> rejected
    assert lab.rejected_fits == 1 and torch.equal(lab.mixture.as_tensor(), first)


def test_labeler_state_round_trip_gives_identical_labels():
    lab = _labeler(64)
    lab.observe(torch.linspace(0, 1, 64) ** 2)
    lab.maybe_refit(step=0, force=True)
    twin = _labeler(64)
    twin.load_state_dict(lab.state_dict())
    d = torch.linspace(0, 1, 7)
    assert torch.equal(lab.labels(d), twin.labels(d)) and twin.bank.count == lab.bank.count


def test_batch_scope_fits_only_the_current_batch():
    lab = _labeler(100, scope="batch")
    lab.observe(torch.linspace(5, 6, 50))
    lab.observe(torch.linspace(0, 1, 20))
    assert lab.bank.contents().max().item() <= 1.0


def test_posterior_is_monotone_with_unequal_variances():
    # the raw posterior of this mixture gives s(0.0) = 0.17 and s(0.3) = 0.98: near-identical pairs pushed apart
    mix = _mix([0.5, 0.8], [0.01, 0.04], [0.9, 0.1])
    d = torch.linspace(0.0, 2.0, 2001, dtype=torch.float64)
    s = posterior_similar(d, mix)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] <= s[:-1]).all())  # non-increasing in d
    assert posterior_similar(torch.tensor([0.3, 0.5, 0.8, 1.2]), mix).tolist() == [1.0, 1.0, 0.0, 0.0]
    # between the means it is the mixture posterior itself
    x = 0.65
    lo, hi = 0.9 * _normal_pdf(x, 0.5, 0.01), 0.1 * _normal_pdf(x, 0.8, 0.04)
    assert posterior_similar(torch.tensor([x], dtype=torch.float64), mix).item() == pytest.approx(lo / (lo + hi))


def test_bank_of_another_capacity_keeps_the_newest_distances_on_load():
    lab = _labeler(64)
    lab.observe(torch.arange(100, dtype=torch.float64))  # ring wrapped: holds 36..99
    lab.maybe_refit(step=0, force=True)
    smaller, larger = _labeler(16), _labeler(256)
    smaller.load_state_dict(lab.state_dict())
    larger.load_state_dict(lab.state_dict())
    assert sorted(smaller.bank.contents().tolist()) == list(range(84, 100))
    assert sorted(larger.bank.contents().tolist()) == list(range(36, 100))
    assert torch.equal(smaller.mixture.as_tensor(), lab.mixture.as_tensor()) and smaller.seen == 100


def test_labeler_is_ready_only_after_min_fill_distances():
    lab = _labeler(65536, min_fill=100)
    lab.observe(torch.rand(64))
    assert not lab.ready
    lab.observe(torch.rand(64))
    assert lab.ready and not lab.bank.full  # a first fit does not wait for a full 65,536 bank


def test_epoch_scope_fits_each_finished_epoch_and_starts_over():
    lab = _labeler(1000, scope="epoch")
    g = torch.Generator().manual_seed(2)
    epoch1 = torch.cat([0.3 + 0.05 * torch.randn(450, generator=g), 0.9 + 0.05 * torch.randn(50, generator=g)])
    for chunk in epoch1.split(50):
        lab.observe(chunk)
    assert lab.end_epoch(fit=True)  # the refit sees the whole epoch, then the bank is emptied
    assert lab.bank.held == 0 and lab.mixture.means.tolist() == pytest.approx([0.3, 0.9], abs=0.03)
    lab.observe(torch.full((8,), 2.0))
    assert not lab.maybe_refit(step=10)  # within an epoch the labels keep the last epoch's fit
    stats = lab.stats("gmm1_")
    assert {"gmm1_mu0", "gmm1_var1", "gmm1_w0", "gmm1_bank_s_below_half"} <= set(stats)


def test_bounded_dissimilar_weight_holds_and_keeps_the_split():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([0.3 + 0.05 * torch.randn(1800, generator=g), 0.9 + 0.1 * torch.randn(1200, generator=g)])
    free = em_fit(x, initial_mixture(x, 1e-6), iterations=40, var_floor=1e-6)
    bounded = em_fit(x, initial_mixture(x, 1e-6), iterations=40, var_floor=1e-6, max_dissimilar=0.1)
    assert free.weights[1].item() == pytest.approx(0.4, abs=0.02)
    assert bounded.weights[1].item() == pytest.approx(0.1) and bounded.weights.sum().item() == pytest.approx(1.0)
    assert bounded.means[0].item() < 0.5 < bounded.means[1].item()
