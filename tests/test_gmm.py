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


# ---------------------------------------------------------------- mixture modes (issue 19): free | anchored | map

N_MODES = 5000
CROSS_STUDY = (1.2, 0.1)  # mean, sd of the shuffled-pair (another woman's) distances in these samples


def _lesion_free_samples():
    """Right-skewed, single-peaked aligned-pair distances without any outlier (the free EM splits these)."""
    g = torch.Generator().manual_seed(11)
    gamma6 = torch.distributions.Gamma(torch.tensor(6.0, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64))
    torch.manual_seed(11)  # Gamma.sample draws from the global RNG
    return {
        "gamma6": gamma6.sample((N_MODES,)),  # mean 0.3
        "lognormal0.35": 0.3 * torch.exp(0.35 * torch.randn(N_MODES, generator=g, dtype=torch.float64)),
    }


def _cross_study(n, seed):
    g = torch.Generator().manual_seed(seed)
    return CROSS_STUDY[0] + CROSS_STUDY[1] * torch.randn(n, generator=g, dtype=torch.float64)


def _fitted(mode, aligned, negatives, refits=30):
    """The issue's protocol: a bank of the sample, 30 warm-started refits of 10 EM iterations each."""
    lab = SoftLabeler(N_MODES, "bank", DEFAULTS.gmm_refit_every, 10, DEFAULTS.gmm_var_floor, DEFAULTS.gmm_min_sep,
                      min_fill=4, mode=mode, prior_prevalence=DEFAULTS.gmm_prior_prevalence)  # fmt: skip
    lab.observe(aligned, negatives)
    for _ in range(refits):
        lab.maybe_refit(step=0, force=True)
    return lab


@pytest.mark.parametrize("sample", ["gamma6", "lognormal0.35"])
def test_without_outliers_anchored_and_map_keep_the_weight_where_free_splits_the_bulk(sample):
    aligned = _lesion_free_samples()[sample]
    negatives = _cross_study(N_MODES, seed=12)
    weight = {}
    for mode in ("free", "anchored", "map"):
        lab = _fitted(mode, aligned, negatives if mode == "anchored" else None)
        weight[mode] = lab.mixture.weights[1].item()
        assert lab.stats("g_")["g_w1"].item() == weight[mode]  # the logged dissimilar weight is the fit's
    prior = DEFAULTS.gmm_prior_prevalence
    assert weight["anchored"] < 0.05
    assert abs(weight["map"] - prior) < 0.05
    assert weight["free"] > max(weight["anchored"], weight["map"]) + 0.15  # the free EM takes a share of the bulk


@pytest.mark.parametrize("mode", ["free", "anchored", "map"])
def test_outliers_at_the_cross_study_distance_are_labelled_dissimilar_in_every_mode(mode):
    bulk = _lesion_free_samples()["gamma6"]
    planted = _cross_study(N_MODES * 3 // 100, seed=13)  # 3 % of the aligned pairs as far apart as two different women
    aligned = torch.cat([bulk[: N_MODES - planted.numel()], planted])
    lab = _fitted(mode, aligned, _cross_study(N_MODES, seed=12) if mode == "anchored" else None)
    assert lab.labels(planted).max().item() < 0.5
    assert (lab.labels(bulk) < 0.5).double().mean().item() < 0.05  # and the bulk stays similar
    assert lab.stats("g_")["g_bank_s_below_half"].item() == pytest.approx(
        (lab.labels(aligned) < 0.5).double().mean().item())


def test_anchored_weight_grows_only_with_aligned_pairs_at_cross_study_distances():
    bulk = _lesion_free_samples()["lognormal0.35"]
    negatives = _cross_study(N_MODES, seed=12)
    weights = []
    for share in (0.0, 0.1, 0.3):
        k = int(share * N_MODES)
        aligned = torch.cat([bulk[k:], _cross_study(k, seed=14)])
        weights.append(_fitted("anchored", aligned, negatives).mixture.weights[1].item())
    assert weights[0] < 0.01
    assert weights[1] == pytest.approx(0.1, abs=0.02) and weights[2] == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("mode", ["anchored", "map"])
def test_posterior_of_the_new_modes_is_non_increasing_in_d(mode):
    # negatives with two modes, one below the aligned bulk's far tail: the raw anchored posterior is not monotone
    g = torch.Generator().manual_seed(15)
    negatives = torch.cat([0.9 + 0.03 * torch.randn(2000, generator=g), 1.4 + 0.1 * torch.randn(8000, generator=g)])
    aligned = torch.cat([0.3 + 0.1 * torch.randn(9500, generator=g), 1.0 + 0.1 * torch.randn(500, generator=g)])
    lab = _fitted(mode, aligned.double(), negatives.double() if mode == "anchored" else None, refits=3)
    d = torch.linspace(0.0, 4.0, 4001, dtype=torch.float64)
    s = lab.labels(d)
    assert bool((s[1:] <= s[:-1]).all()) and s[0].item() > 0.99 and s[-1].item() < 0.01


def test_map_weight_moves_from_the_prior_towards_the_data_with_the_strength():
    bulk = _lesion_free_samples()["gamma6"]
    k = int(0.2 * N_MODES)  # a real 20 % of far pairs
    aligned = torch.cat([bulk[k:], _cross_study(k, seed=16)])
    weights = []
    for strength in (0.0, N_MODES, 100 * N_MODES):
        lab = SoftLabeler(N_MODES, "bank", 10, 10, 1e-4, 1e-2, 4, mode="map", prior_prevalence=0.03,
                          prior_strength=strength)  # fmt: skip
        lab.observe(aligned)
        for _ in range(30):
            lab.maybe_refit(step=0, force=True)
        weights.append(lab.mixture.weights[1].item())
        assert lab.mixture.variances[0].item() == lab.mixture.variances[1].item()  # tied
    assert weights[0] == pytest.approx(0.2, abs=0.01)  # no prior: the data's share
    assert weights[1] == pytest.approx((0.2 + 0.03) / 2, abs=0.01)  # strength = bank: halfway
    assert weights[2] == pytest.approx(0.03, abs=0.01)


def test_anchored_labeller_checkpoint_round_trip_and_scope():
    g = torch.Generator().manual_seed(17)
    lab = SoftLabeler(64, "bank", 10, 10, 1e-4, 1e-2, 8, mode="anchored")
    for _ in range(5):  # the rings wrap
        lab.observe(0.3 + 0.05 * torch.randn(20, generator=g), 1.2 + 0.1 * torch.randn(20, generator=g))
    assert lab.maybe_refit(step=0, force=True)
    twin = SoftLabeler(64, "bank", 10, 10, 1e-4, 1e-2, 8, mode="anchored")
    twin.load_state_dict(lab.state_dict())
    d = torch.linspace(0, 2, 101, dtype=torch.float64)
    assert torch.equal(twin.labels(d), lab.labels(d))
    assert torch.equal(twin.neg_bank.in_push_order(), lab.neg_bank.in_push_order())
    more = (0.3 + 0.05 * torch.randn(20, generator=g), 1.2 + 0.1 * torch.randn(20, generator=g))
    for labeler in (lab, twin):  # the restored labeller continues exactly like the original
        labeler.observe(*more)
        labeler.maybe_refit(step=0, force=True)
    assert torch.equal(twin.mixture.as_tensor(), lab.mixture.as_tensor()) and torch.equal(twin.labels(d), lab.labels(d))
    smaller = SoftLabeler(16, "bank", 10, 10, 1e-4, 1e-2, 8, mode="anchored")
    smaller.load_state_dict(lab.state_dict())  # a forced resume with a smaller bank keeps the newest negatives
    assert torch.equal(smaller.neg_bank.in_push_order(), lab.neg_bank.in_push_order()[-16:])
    with pytest.raises(ValueError, match="another --gmm-mode"):
        twin.load_state_dict(_labeler(64).state_dict())
    with pytest.raises(ValueError, match="shuffled-pair distances"):
        lab.observe(torch.rand(4))
    batch = SoftLabeler(64, "batch", 10, 10, 1e-4, 1e-2, 8, mode="anchored")
    batch.observe(torch.rand(8), torch.full((8,), 5.0))
    batch.observe(torch.rand(8), torch.full((8,), 1.0))
    assert batch.neg_bank.contents().max().item() == 1.0  # the negative bank follows the scope
