"""Contrast-detail statistics on hand-made score tables: cell AUCs against the twin, thresholds, censoring and
paired differences (train/contrast_detail.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from train.contrast_detail import CDConfig, analyse, fit_psychometric, matched_aucs, pooled_auc_summary, psychometric

CONTRASTS = (0.02, 0.04, 0.08, 0.16, 0.32)


def score_table(curves: dict, trials_per_cell: int, seed: int, kinds=("mass",), diameters=(8.0,),
                trials_per_study: int = 3) -> pd.DataFrame:
    """Trials of every cell scored by every method: twin scores ~ N(0, 1), lesion-on scores shifted so the
    cell's AUC is the method's curve (c75, slope) at that contrast (None: chance everywhere; a float: that AUC
    everywhere). Each background study serves `trials_per_study` trials across cells."""
    rng = np.random.default_rng(seed)
    rows, trial = [], 0
    for kind in kinds:
        for diameter in diameters:
            for contrast in CONTRASTS:
                for _ in range(trials_per_cell):
                    for method, curve in curves.items():
                        if isinstance(curve, tuple):
                            target = float(psychometric(np.array(contrast), *curve))
                        else:
                            target = 0.5 if curve is None else curve
                        shift = np.sqrt(2) * norm.ppf(target)
                        rows.append({"trial_id": f"t{trial:05d}", "study": f"s{trial // trials_per_study:05d}",
                                     "kind": kind, "diameter_mm": diameter, "contrast": contrast, "method": method,
                                     "score_on": rng.normal(shift), "score_off": rng.normal()})
                    trial += 1
    return pd.DataFrame(rows)


def test_cell_auc_is_lesion_on_against_the_twin_and_the_interval_covers_it():
    table = score_table({"a": (0.08, 3.0)}, trials_per_cell=40, seed=1)
    result = analyse(table, CDConfig(n_boot=300, seed=0))
    for _, cell in result.cells.iterrows():
        rows = table[table["contrast"] == cell["contrast"]]
        y = np.r_[np.ones(len(rows)), np.zeros(len(rows))]
        expected = roc_auc_score(y, np.r_[rows["score_on"], rows["score_off"]])
        assert cell["auc"] == pytest.approx(expected)
        assert cell["auc_lo"] <= cell["auc"] <= cell["auc_hi"]
        assert cell["n_trials"] == 40 and cell["n_studies"] == 14  # 3 trials per study, studies straddle cells
    faint, bright = result.cells.iloc[0], result.cells.iloc[-1]
    assert faint["auc"] < 0.65 and bright["auc"] > 0.9


def test_a_study_weight_counts_both_scores_of_its_trials():
    on, off = np.array([2.0, 0.0]), np.array([1.0, 3.0])
    assert matched_aucs(on, off, np.ones((1, 2)))[0] == pytest.approx(0.25)  # one of four on > off
    # drawing only the first trial's study twice: its on (2) beats its off (1)
    assert matched_aucs(on, off, np.array([[2.0, 0.0]]))[0] == 1.0


def test_fit_recovers_a_known_threshold():
    log_c = np.log(np.array([CONTRASTS]))
    auc = psychometric(np.array(CONTRASTS), 0.06, 2.5)[None]
    ln_c75, slope = fit_psychometric(log_c, auc, np.full((1, 5), 1000.0))
    assert np.exp(ln_c75[0]) == pytest.approx(0.06, rel=0.03)
    assert slope[0] == pytest.approx(2.5, rel=0.05)


def test_threshold_and_interval_from_noisy_trials_cover_the_truth():
    table = score_table({"a": (0.06, 2.5)}, trials_per_cell=150, seed=2)
    row = analyse(table, CDConfig(n_boot=400, seed=0)).thresholds.iloc[0]
    assert row["censored"] == ""
    assert row["c75"] == pytest.approx(0.06, rel=0.25)
    assert row["c75_lo"] < 0.06 < row["c75_hi"]


def test_thresholds_outside_the_tested_range_are_censored():
    table = score_table({"blind": None, "sharp": 0.97}, trials_per_cell=40, seed=3)
    rows = analyse(table, CDConfig(n_boot=200, seed=0)).thresholds.set_index("method")
    assert rows.loc["blind", "censored"] == ">max" and rows.loc["blind", "c75"] == pytest.approx(0.32)
    assert rows.loc["blind", "hi_censored"]
    assert rows.loc["sharp", "censored"] == "<min" and rows.loc["sharp", "c75"] == pytest.approx(0.02)
    assert rows.loc["sharp", "lo_censored"]


def test_paired_bootstrap_finds_a_planted_difference_and_not_a_null_one():
    curves = {"weak": (0.12, 3.0), "strong": (0.03, 3.0), "weak_again": (0.12, 3.0)}
    table = score_table(curves, trials_per_cell=45, seed=4, diameters=(5.0, 12.0))
    result = analyse(table, CDConfig(n_boot=500, seed=0),
                     comparisons=[("strong", "weak"), ("weak_again", "weak")])
    summary = result.deltas[result.deltas["diameter_mm"] == "all"].set_index("a")
    assert summary.loc["strong", "delta_ln_c75"] == pytest.approx(np.log(0.03 / 0.12), abs=0.5)
    assert summary.loc["strong", "ci_hi"] < 0 and summary.loc["strong", "p_holm"] < 0.05  # the floor: 6 x 2 / 501
    assert summary.loc["weak_again", "ci_lo"] < 0 < summary.loc["weak_again", "ci_hi"]
    assert summary.loc["weak_again", "p_holm"] > 0.05
    assert len(result.deltas) == 2 * 3  # per comparison: two diameters and their mean, one Holm family


def test_analysis_is_deterministic_from_its_seed():
    table = score_table({"a": (0.08, 3.0), "b": (0.05, 2.0)}, trials_per_cell=20, seed=5)
    first = analyse(table, CDConfig(n_boot=200, seed=9), comparisons=[("a", "b")])
    again = analyse(table.sample(frac=1.0, random_state=1), CDConfig(n_boot=200, seed=9), comparisons=[("a", "b")])
    pd.testing.assert_frame_equal(first.thresholds, again.thresholds)
    pd.testing.assert_frame_equal(first.deltas, again.deltas)
    other = analyse(table, CDConfig(n_boot=200, seed=10), comparisons=[("a", "b")])
    assert not first.deltas[["ci_lo", "ci_hi"]].equals(other.deltas[["ci_lo", "ci_hi"]])


def test_cell_size_reports_the_measured_width_and_its_scaling():
    table = score_table({"a": (0.08, 3.0)}, trials_per_cell=45, seed=6)
    size = analyse(table, CDConfig(n_boot=300, seed=0)).cell_size
    assert size["trials_per_cell"] == 45
    assert 0.05 < size["ci_width_median"] < 0.25
    assert size["width_at"]["180"] == pytest.approx(size["ci_width_median"] / 2)


def test_methods_scoring_different_trials_are_refused():
    table = score_table({"a": None, "b": None}, trials_per_cell=5, seed=7)
    with pytest.raises(ValueError, match="same trials"):
        analyse(table.iloc[1:], CDConfig(n_boot=50))


def test_pooled_summary_is_the_pooled_auc_with_a_paired_difference_that_finds_a_planted_gap():
    """The demo's closing screen: each method's AUC over every trial of the grid, and a paired difference."""
    table = score_table({"better": 0.75, "chance": None, "chance_again": None}, trials_per_cell=30, seed=6)
    per_method, paired = pooled_auc_summary(table, CDConfig(n_boot=500, seed=0),
                                            [("better", "chance"), ("chance_again", "chance")])
    per_method = per_method.set_index("method")
    for method, rows in table.groupby("method"):
        pooled = roc_auc_score(np.r_[np.ones(len(rows)), np.zeros(len(rows))], np.r_[rows["score_on"], rows["score_off"]])
        assert per_method.loc[method, "auc"] == pytest.approx(pooled)
        assert per_method.loc[method, "auc_lo"] < pooled < per_method.loc[method, "auc_hi"]
    paired = paired.set_index("a")
    assert paired.loc["better", "ci_lo"] > 0 and paired.loc["better", "p"] < 0.01
    assert paired.loc["chance_again", "ci_lo"] < 0 < paired.loc["chance_again", "ci_hi"]
