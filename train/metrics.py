"""Evaluation metrics as small pure functions over arrays (NumPy / SciPy; no I/O, no models).

Every interval here resamples *groups* (studies), not rows: the pairs cut from one study share its
lesion, its anatomy and its acquisition, so rows of a study are not independent draws. A resample
draws studies with replacement and weights each row by its study's draw count; one-row-per-group
(`groups=None`) is the ordinary row bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy import stats

CHUNK = 128  # resamples materialised at once: bounds memory at CHUNK x rows weights


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `n_boot` study-level resamples from `seed`, `level` coverage."""

    n_boot: int = 2000  # 2.5 % tails of 50 resamples each at 95 %
    seed: int = 0
    level: float = 0.95


# ---------------------------------------------------------------- resampling


def group_codes(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Integer code per row, in the sorted order of the distinct groups (each row its own group when None)."""
    if groups is None:
        return np.arange(n)
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].reshape(-1)


def resample_weights(groups: np.ndarray | None, n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row weights of `n_boot` group-level resamples, in chunks of (<= CHUNK, n): a row's weight is how
    often its group was drawn. Rows of the same groups in the same order get the same draws for a seed."""
    codes = group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    if n_groups == 0 or n_boot == 0:
        return
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    for start in range(0, n_boot, CHUNK):
        yield counts[start : start + CHUNK][:, codes].astype(np.float64)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of resampled statistics (NaNs dropped); None with < 20 usable resamples."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 20:
        return None
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


# ---------------------------------------------------------------- AUC


def weighted_aucs(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row-weight vector `weights[b]` (B, n): the weighted Mann-Whitney statistic,
    ties counted half as in `roc_auc_score` (which equals it on rows repeated `weights` times).
    NaN where a weighting leaves one class empty."""
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=float)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    order = np.argsort(score, kind="stable")
    s, yy, w = score[order], y[order], weights[:, order]
    if len(s) == 0:
        return np.full(len(w), np.nan)
    tie_starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(w * yy, tie_starts, axis=1)
    neg = np.add.reduceat(w * ~yy, tie_starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (neg_below + 0.5 * neg)).sum(1)
    denominator = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (NaN with one class only)."""
    return float(weighted_aucs(y, score, np.ones((1, len(y))))[0])


def auc_ci(y, score, groups, boot: Bootstrap) -> list[float] | None:
    """Percentile CI of the AUC over group-level resamples."""
    values = [weighted_aucs(y, score, w) for w in resample_weights(groups, len(y), boot.n_boot, boot.seed)]
    return percentile_ci(np.concatenate(values), boot.level) if values else None


def counts_beside(y: np.ndarray, groups: np.ndarray | None) -> dict:
    """Positives, negatives and how many distinct groups (studies) hold them: the size an AUC rests on."""
    y = np.asarray(y, dtype=bool)
    codes = group_codes(groups, len(y))
    return {
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
        "n_pos_studies": int(len(np.unique(codes[y]))),
        "n_studies": int(len(np.unique(codes))),
    }


def auc_with_ci(y, score, groups, boot: Bootstrap) -> dict:
    """{auc, auc_ci, n_pos, n_neg, n_pos_studies, n_studies}, or {skipped, counts} without both classes."""
    y = np.asarray(y, dtype=bool)
    counts = counts_beside(y, groups)
    if counts["n_pos"] == 0 or counts["n_neg"] == 0:
        return {"skipped": f"needs both classes (positives {counts['n_pos']}, negatives {counts['n_neg']})", **counts}
    return {"auc": auc(y, score), "auc_ci": auc_ci(y, score, groups, boot), **counts}


def macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over the classes that have positives and negatives in `y`."""
    y = np.asarray(y, dtype=object)
    aucs = [auc(y == c, proba[:, j]) for j, c in enumerate(classes) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


# ---------------------------------------------------------------- balanced accuracy


def weighted_balanced_accuracies(y: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean per-class recall under each row-weight vector (classes absent from a resample are left out; a
    resample holding one class only is NaN): a classifier that always answers the majority class scores 0.5
    on two classes."""
    y, pred = np.asarray(y, dtype=object), np.asarray(pred, dtype=object)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    recalls = []
    for c in np.unique(y):
        in_class = y == c
        total = weights[:, in_class].sum(1)
        hit = weights[:, in_class & (pred == c)].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(total > 0, hit / total, np.nan))
    if not recalls:
        return np.full(len(weights), np.nan)
    recalls = np.stack(recalls)
    present = np.isfinite(recalls).sum(0)
    with np.errstate(invalid="ignore"):
        # one class alone says nothing about balance (its recall would pass for the balanced accuracy)
        return np.where(present >= min(2, len(recalls)), np.nanmean(recalls, axis=0), np.nan)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(weighted_balanced_accuracies(y, pred, np.ones((1, len(y))))[0])


def balanced_accuracy_with_ci(y, pred, groups, boot: Bootstrap) -> dict:
    """{balanced_accuracy, balanced_accuracy_ci}: the CI over group-level resamples."""
    values = [weighted_balanced_accuracies(y, pred, w) for w in resample_weights(groups, len(y), boot.n_boot, boot.seed)]
    return {
        "balanced_accuracy": balanced_accuracy(y, pred),
        "balanced_accuracy_ci": percentile_ci(np.concatenate(values), boot.level) if values else None,
    }


# ---------------------------------------------------------------- label-free pixel baselines


def pixel_scores(ipsi: np.ndarray, contra: np.ndarray) -> dict[str, np.ndarray]:
    """Pair scores from raw pixels, no model: the RMS pixel difference (the L2 distance scaled by the patch
    size, same ranking) and the absolute difference of mean intensities. Inputs (N, H, W), any dtype;
    intensities are taken as fractions of the uint16 range. A learned distance must beat both to show it
    found more than brightness."""
    a = np.asarray(ipsi, dtype=np.float64).reshape(len(ipsi), -1) / 65535.0
    b = np.asarray(contra, dtype=np.float64).reshape(len(contra), -1) / 65535.0
    return {
        "pixel_l2": np.sqrt(((a - b) ** 2).mean(1)),
        "mean_intensity_diff": np.abs(a.mean(1) - b.mean(1)),
    }


# ---------------------------------------------------------------- paired comparisons and multiplicity


def paired_auc_test(y, scores_a: list[np.ndarray], scores_b: list[np.ndarray], groups, boot: Bootstrap) -> dict:
    """Difference of AUC(a) - AUC(b) on the same rows, over seeds and test studies.

    `scores_a[s]`, `scores_b[s]` are the two methods' scores of seed s on the same rows (y, groups).
    The statistic is the mean over seeds of the per-seed difference. Its variance has two parts: the
    test-study part, from study-level resamples applied jointly to every seed and both methods (so shared
    studies cancel), and the training part, the spread of the per-seed differences / n_seeds. The test is
    a t-test on their sum with Welch-Satterthwaite degrees of freedom (normal where the training part is
    0). With one seed there is no training part to estimate: the result is the study-level paired
    bootstrap of that seed alone, and `scope` says so. The CI is per test (not adjusted for multiplicity).
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("paired_auc_test needs the same number (>= 1) of seeds for both methods")
    y = np.asarray(y, dtype=bool)
    per_seed = np.array([auc(y, a) - auc(y, b) for a, b in zip(scores_a, scores_b)])
    resampled = []
    for w in resample_weights(groups, len(y), boot.n_boot, boot.seed):
        diffs = [weighted_aucs(y, a, w) - weighted_aucs(y, b, w) for a, b in zip(scores_a, scores_b)]
        resampled.append(np.mean(diffs, axis=0))
    boot_delta = np.concatenate(resampled) if resampled else np.array([])
    return {**paired_delta_test(per_seed, boot_delta[np.isfinite(boot_delta)], boot.level), **counts_beside(y, groups)}


def paired_delta_test(per_seed: np.ndarray, boot_delta: np.ndarray, level: float = 0.95) -> dict:
    """The test behind `paired_auc_test`, for any paired statistic: `per_seed` the per-seed differences,
    `boot_delta` their mean over seeds under each shared study-level resample. Variance = the resamples'
    (test sampling) + the spread over seeds / n_seeds (training); Welch-Satterthwaite t (normal with one seed)."""
    per_seed = np.asarray(per_seed, dtype=float)
    delta = float(per_seed.mean())
    n_seeds = len(per_seed)
    out = {"delta": delta, "per_seed": per_seed.tolist(), "n_seeds": n_seeds}
    scope = "seeds and studies" if n_seeds > 1 else "studies (one seed)"
    if len(boot_delta) < 20:
        return {**out, "scope": scope, "ci": None, "p": None, "df": None}
    var_test = float(boot_delta.var(ddof=1))
    var_seed = float(per_seed.var(ddof=1) / n_seeds) if n_seeds > 1 else 0.0
    var = var_test + var_seed
    if var == 0:
        return {**out, "scope": scope, "ci": [delta, delta], "p": 1.0 if delta == 0 else 0.0, "df": None,
                "sd_test": 0.0, "sd_seed": 0.0}
    df = float("inf") if var_seed == 0 else (n_seeds - 1) * (var / var_seed) ** 2
    half = float(stats.t.ppf(0.5 + level / 2, df) * np.sqrt(var))
    p = float(2 * stats.t.sf(abs(delta) / np.sqrt(var), df))
    return {**out, "scope": scope, "ci": [delta - half, delta + half], "p": p, "df": df,
            "sd_test": float(np.sqrt(var_test)), "sd_seed": float(np.sqrt(var_seed))}


def equivalence_test(result: dict, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided tests (TOST) on a `paired_auc_test` result: is |Δ| < `margin`?

    Uses the same variance (study resamples plus the spread over seeds) and degrees of freedom as the
    difference test. Equivalence at level alpha <=> the (1 - 2 alpha) interval of Δ (90 % at alpha 0.05)
    lies inside (-margin, +margin); `p` is the larger one-sided p-value. Without a variance (too few
    usable resamples) nothing is claimed (`equivalent` None)."""
    delta, ci = result["delta"], result.get("ci")
    if ci is None:
        return {"margin": margin, "ci": None, "level": 1 - 2 * alpha, "p": None, "equivalent": None}
    sd, df = math.hypot(result.get("sd_test", 0.0), result.get("sd_seed", 0.0)), result.get("df")
    df = float("inf") if df is None else df
    if sd == 0:
        inside = abs(delta) < margin
        return {"margin": margin, "ci": [delta, delta], "level": 1 - 2 * alpha, "p": 0.0 if inside else 1.0,
                "equivalent": inside}
    half = float(stats.t.ppf(1 - alpha, df) * sd)
    p = max(float(stats.t.sf((delta + margin) / sd, df)), float(stats.t.cdf((delta - margin) / sd, df)))
    low, high = delta - half, delta + half
    return {"margin": margin, "ci": [low, high], "level": 1 - 2 * alpha, "p": p,
            "equivalent": bool(-margin < low and high < margin)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control over all the tests given), in input order."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


# ---------------------------------------------------------------- detection populations


def detection_aucs(lesion: np.ndarray, score: np.ndarray, sampling: np.ndarray, groups, boot: Bootstrap) -> dict:
    """Label-free detection AUCs of one pair score, with the populations kept apart.

    `grid`: grid samples only, lesion pairs vs normal pairs -- both drawn by the same tissue-checked grid,
    so the score can only separate them by what is in the patches. `finding`: finding-centred lesion pairs
    vs the same grid normals; reported separately because finding-centred samples skip the tissue check
    and sit on the lesion's centre, which alone can move a score."""
    lesion = np.asarray(lesion, dtype=bool)
    sampling = np.asarray(sampling).astype(str)
    groups = None if groups is None else np.asarray(groups)
    grid = sampling == "grid"
    finding_pos = (sampling == "finding") & lesion
    finding_set = finding_pos | (grid & ~lesion)

    def sub(rows):
        return auc_with_ci(lesion[rows], np.asarray(score)[rows], None if groups is None else groups[rows], boot)

    return {"grid": sub(grid), "finding": sub(finding_set)}
