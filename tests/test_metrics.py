"""train.metrics / train.probes alone, on small arrays: study-level intervals, grid-only detection,
balanced accuracy, Holm correction and the paired seed x study test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from train.metrics import (
    Bootstrap, auc, auc_with_ci, balanced_accuracy, balanced_accuracy_with_ci, detection_aucs, holm,
    equivalence_test, paired_auc_test, pixel_scores, resample_weights, weighted_aucs,
)
from train.probes import PROBE_CS, complete_splits, fit_probe, group_folds

BOOT = Bootstrap(n_boot=400, seed=0)


def _studies(n_studies=40, seed=0, effect=1.0):
    """One row per study: a score that is higher for lesion studies, with overlap."""
    rng = np.random.default_rng(seed)
    y = rng.random(n_studies) < 0.3
    y[:2] = [True, False]
    score = rng.normal(size=n_studies) + effect * y
    return y, score, np.array([f"s{i:03d}" for i in range(n_studies)])


def test_weighted_auc_equals_scikit_learn_on_repeated_rows():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    score = np.round(rng.random(60), 1) + 0.2 * y  # rounded: ties must count half, as in roc_auc_score
    groups = rng.integers(0, 15, 60)
    for w in next(resample_weights(groups, 60, 25, seed=3)):
        keep = np.repeat(np.arange(60), w.astype(int))
        expected = roc_auc_score(y[keep], score[keep]) if 0 < y[keep].sum() < len(keep) else np.nan
        np.testing.assert_allclose(weighted_aucs(y, score, w[None])[0], expected)
    assert auc(y, score) == pytest.approx(roc_auc_score(y, score))


def test_study_bootstrap_ignores_copies_of_rows_within_a_study():
    y, score, studies = _studies()
    one_row = auc_with_ci(y, score, studies, BOOT)
    copies = 6  # every study's pair cut six times, as finding-centred samples of one lesion are
    y6, score6, studies6 = np.repeat(y, copies), np.repeat(score, copies), np.repeat(studies, copies)
    by_study = auc_with_ci(y6, score6, studies6, BOOT)
    by_row = auc_with_ci(y6, score6, None, BOOT)

    def width(r):
        return r["auc_ci"][1] - r["auc_ci"][0]

    assert by_study["auc"] == one_row["auc"] == by_row["auc"]
    assert width(by_study) == pytest.approx(width(one_row), abs=1e-12)  # the copies add no information
    assert width(by_row) < 0.6 * width(one_row)  # the row bootstrap believes they do
    assert by_study["n_pos"] == copies * y.sum() and by_study["n_pos_studies"] == y.sum()
    assert by_study["n_studies"] == len(studies)


def test_grid_detection_never_sees_finding_centred_positives():
    rng = np.random.default_rng(1)
    n = 60
    sampling = np.array(["grid"] * 50 + ["finding"] * 10)
    lesion = np.r_[rng.random(50) < 0.2, np.ones(10, bool)]
    studies = np.array([f"s{i % 20}" for i in range(n)])
    score = rng.normal(size=n) + 0.5 * lesion
    before = detection_aucs(lesion, score, sampling, studies, BOOT)
    score_far = score.copy()
    score_far[sampling == "finding"] = 100.0  # finding-centred positives become trivially detectable
    after = detection_aucs(lesion, score_far, sampling, studies, BOOT)
    assert after["grid"] == before["grid"]
    assert before["grid"]["n_pos"] == lesion[:50].sum() and before["grid"]["n_neg"] == (~lesion[:50]).sum()
    assert after["finding"]["auc"] == 1.0 and after["finding"]["n_pos"] == 10
    assert after["finding"]["n_neg"] == before["grid"]["n_neg"]  # the same grid normals


def test_balanced_accuracy_of_the_majority_answer_is_one_half():
    y = np.array([False] * 95 + [True] * 5)
    majority = np.zeros(100, bool)
    assert (majority == y).mean() == 0.95  # plain accuracy flatters it
    assert balanced_accuracy(y, majority) == 0.5
    groups = np.arange(100) // 4
    result = balanced_accuracy_with_ci(y, majority, groups, BOOT)
    assert result["balanced_accuracy"] == 0.5 and result["balanced_accuracy_ci"] == [0.5, 0.5]
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 4, 80).astype(str), rng.integers(0, 4, 80).astype(str)
    assert balanced_accuracy(labels, pred) == pytest.approx(balanced_accuracy_score(labels, pred))


def test_holm_by_hand():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1)
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1 and monotone
    assert holm([]) == []


def test_paired_test_with_one_seed_is_studies_only():
    y, score, studies = _studies(60, effect=2.0)
    rng = np.random.default_rng(5)
    noise = rng.normal(size=len(y))
    result = paired_auc_test(y, [score], [noise], studies, BOOT)
    assert result["scope"] == "studies (one seed)" and result["n_seeds"] == 1
    assert result["delta"] == pytest.approx(auc(y, score) - auc(y, noise))
    assert result["ci"][0] > 0 and result["p"] < 0.05
    same = paired_auc_test(y, [score], [score], studies, BOOT)
    assert same["delta"] == 0 and same["p"] == 1.0


def test_paired_test_over_seeds_counts_the_seed_spread():
    y, score, studies = _studies(60, effect=2.0)
    rng = np.random.default_rng(2)
    steady = [score + 0.05 * rng.normal(size=len(y)) for _ in range(3)]
    # b is as good as a on average, but one seed is much worse and one much better
    erratic = [score + 0.05 * rng.normal(size=len(y)) + k * rng.normal(size=len(y)) for k in (0.0, 3.0, 0.0)]
    result = paired_auc_test(y, steady, erratic, studies, BOOT)
    assert result["scope"] == "seeds and studies" and result["n_seeds"] == 3
    assert result["sd_seed"] > 0 and result["df"] < 100
    studies_only = paired_auc_test(y, steady[:1], erratic[:1], studies, BOOT)
    assert result["ci"][1] - result["ci"][0] > studies_only["ci"][1] - studies_only["ci"][0]
    far = paired_auc_test(y, steady, [rng.normal(size=len(y)) for _ in range(3)], studies, BOOT)
    assert far["p"] < 0.01 and far["ci"][0] > 0


def test_equivalence_test_by_hand():
    # 90 % interval 0.005 +- 1.645 x 0.005 lies inside +-0.02; p = max(P(Z > 5), P(Z < -3))
    tight = equivalence_test({"delta": 0.005, "ci": [0.0, 0.01], "sd_test": 0.005, "sd_seed": 0.0, "df": None}, 0.02)
    assert tight["equivalent"] and tight["ci"] == pytest.approx([0.005 - 0.008224, 0.005 + 0.008224], abs=1e-5)
    assert tight["p"] == pytest.approx(0.0013499, rel=1e-3)
    wide = equivalence_test({"delta": 0.005, "ci": [-0.03, 0.04], "sd_test": 0.012, "sd_seed": 0.016, "df": None}, 0.02)
    assert not wide["equivalent"] and wide["p"] == pytest.approx(0.22663, rel=1e-3)  # sd 0.02: P(Z < -0.75)
    assert equivalence_test({"delta": 0.0, "ci": None}, 0.02)["equivalent"] is None  # no variance, no claim


def test_pixel_baselines_see_a_bright_blob():
    rng = np.random.default_rng(0)
    contra = (rng.random((10, 16, 16)) * 30000).astype(np.uint16)
    ipsi = contra.copy()
    ipsi[5:, 6:10, 6:10] = 65535
    s = pixel_scores(ipsi, contra)
    assert (s["pixel_l2"][:5] == 0).all() and (s["pixel_l2"][5:] > 0).all()
    assert (s["mean_intensity_diff"][5:] > 0).all() and (s["mean_intensity_diff"][:5] == 0).all()


def test_probe_regularisation_is_chosen_across_studies():
    """Rows of a study share its features; labels are per study and carry no signal that transfers to
    another study. Study-grouped CV sees that and regularises hardest; row-level CV, with rows of each
    study on both sides of a fold, rewards memorising studies with a weaker penalty."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    rng = np.random.default_rng(0)
    n_studies, per = 30, 6
    groups = np.repeat(np.arange(n_studies), per)
    y = np.repeat(rng.permutation(np.arange(n_studies) % 2 == 0), per)
    X = (rng.normal(size=(n_studies, 8)) * 3)[groups] + 0.3 * rng.normal(size=(n_studies * per, 8))
    model = fit_probe(X, y, groups, seed=0)
    assert model[-1].C == 0.001 and model[-1].class_weight == "balanced"
    row_level = GridSearchCV(fit_probe(X[:2 * per], y[:2 * per], groups[:2 * per], seed=0),
                             {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]},
                             cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="neg_log_loss").fit(X, y)
    assert row_level.best_params_["logisticregression__C"] > 0.001
    assert group_folds(y, groups, 5) == 5 and group_folds(y[: 3 * per], groups[: 3 * per], 5) == 1


def test_probe_regularisation_ignores_folds_missing_a_class():
    """Studies hold pairs of both classes, so a study-grouped fold can miss one; such a fold scores NaN for
    every C, and a search averaging it in picks the first C whatever the data say. On separable features the
    folds that hold both classes choose the weak penalty, without a warning."""
    rng = np.random.default_rng(60)
    groups = np.repeat(np.arange(int(rng.integers(4, 20))), 4)
    y = rng.random(len(groups)) < rng.uniform(0.05, 0.5)
    folds = group_folds(y, groups, 5)
    assert len(complete_splits(y, groups, folds, seed=0)) == folds - 1  # the case: one fold misses a class
    X = y[:, None] * 3.0 + rng.normal(size=(len(y), 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fit_probe(X, y, groups, seed=0)
    assert model[-1].C == max(PROBE_CS)
