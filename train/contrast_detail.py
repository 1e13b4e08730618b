"""Contrast-detail statistics: pure functions over a table of matched trial scores (no I/O, no models).

A *trial* is one lesion of a given kind, diameter and contrast placed on a background study, scored twice by a
method: `score_on`, the pair distance of the lesion-on ipsi patch against the contralateral patch, and
`score_off`, the same pair cut at the same canonical place from the lesion-off twin (the same study without the
lesion). A cell (kind, diameter, contrast) has many trials; its detection AUC is the Mann-Whitney statistic of
the cell's `score_on` values (positives) against its `score_off` values (negatives), so position in the breast,
anatomy and exposure are the same on both sides of the comparison. Chance is 0.5: the AUC is the 2-AFC
proportion correct, the analogue of a CDMAM reading (docs/CONTRAST_DETAIL.md).

Intervals resample the *background studies* (a twin study serves several trials, across cells): one set of
`n_boot` draws, applied to every cell and every method, so cells and methods are resampled jointly and
differences between methods are paired.

Per (method, kind, diameter) a psychometric curve AUC(c) = 0.5 + 0.5 / (1 + exp(-k (ln c - ln c75))) is fitted to
the cell AUCs; c75, where it crosses 0.75, is the threshold contrast. The fit is a binomial logistic regression of
the above-chance fraction p = 2 AUC - 1 (clipped to [0, 1]) on ln c, with the cell's trial count as its weight
and a Jeffreys-like half pseudo-count on each side (so a curve that jumps from chance to 1 has a finite slope).
A threshold outside the tested contrasts is censored: reported as "> max tested" or "< min tested" and held at
that bound in every resample (as a CDMAM analysis gives unreached thresholds the phantom's limit), so a
difference of log thresholds between two censored methods is 0, never invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import numpy as np
import pandas as pd

from train.metrics import holm, paired_delta_test, percentile_ci, resample_weights, weighted_aucs

CELL = ("kind", "diameter_mm", "contrast")
CURVE = ("method", "kind", "diameter_mm")
TARGET_AUC = 0.75
BELOW, INSIDE, ABOVE = -1, 0, 1  # censoring of a threshold: < min tested, within the range, > max tested


@dataclass(frozen=True)
class CDConfig:
    """How the statistics are drawn: `n_boot` background-study resamples from `seed`, `level` coverage."""

    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95
    pseudo_count: float = 0.5  # added to the hits and to the misses of every cell in the fit


# ---------------------------------------------------------------- resampling


def study_draws(studies: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, counts): each trial's study code (sorted distinct studies) and (n_boot, n_studies) draw counts,
    drawn once so every cell and method is resampled with the same studies."""
    names, codes = np.unique(np.asarray(studies).astype(str), return_inverse=True)
    chunks = list(resample_weights(names, len(names), n_boot, seed))
    counts = np.concatenate(chunks) if chunks else np.zeros((0, len(names)))
    return codes.reshape(-1), counts


def matched_aucs(score_on: np.ndarray, score_off: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of the lesion-on scores against the twin scores under each row of `weights` (B, n_trials): a trial's
    weight applies to both of its scores."""
    on, off = np.asarray(score_on, float), np.asarray(score_off, float)
    y = np.r_[np.ones(len(on), bool), np.zeros(len(off), bool)]
    w = np.atleast_2d(np.asarray(weights, float))
    return weighted_aucs(y, np.r_[on, off], np.concatenate([w, w], axis=1))


# ---------------------------------------------------------------- the psychometric fit


def fit_psychometric(log_c: np.ndarray, auc: np.ndarray, n: np.ndarray, pseudo_count: float = 0.5,
                     iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(ln_c75, slope k) of AUC(c) = 0.5 + 0.5 sigmoid(k (ln c - ln c75)) for every curve (row) at once.

    `log_c`, `auc`, `n` are (curves, points); NaN AUCs (or n = 0) are left out of their curve. Newton steps on
    the binomial log-likelihood of p = clip(2 AUC - 1, 0, 1) with weights n and `pseudo_count` hits and misses
    added per point (convex: the steps converge from a flat start). A curve without slope (k <= 0) gets
    ln_c75 = +inf when it lies below 0.75, -inf when above.
    """
    x = np.asarray(log_c, float)
    a_obs = np.asarray(auc, float)
    w = np.where(np.isfinite(a_obs), np.asarray(n, float), 0.0)
    p = np.clip(2 * np.nan_to_num(a_obs, nan=0.5) - 1, 0, 1)
    p = (p * w + pseudo_count) / (w + 2 * pseudo_count)
    w = np.where(w > 0, w + 2 * pseudo_count, 0.0)
    centre = (w * x).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    xc = x - centre
    level = np.clip((w * p).sum(1) / np.maximum(w.sum(1), 1e-12), 1e-6, 1 - 1e-6)
    beta = np.stack([np.zeros(len(x)), np.log(level / (1 - level))], axis=1)  # slope, intercept
    design = np.stack([xc, np.ones_like(xc)], axis=2)  # (curves, points, 2)
    for _ in range(iterations):
        eta = beta[:, :1] * xc + beta[:, 1:]
        mu = 1 / (1 + np.exp(-eta))
        grad = np.einsum("cp,cpk->ck", w * (p - mu), design)
        hess = np.einsum("cp,cpk,cpl->ckl", w * mu * (1 - mu), design, design) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        beta = beta + np.clip(step, -5, 5)
    slope, intercept = beta[:, 0], beta[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ln_c75 = np.where(slope > 1e-9, centre[:, 0] - intercept / slope, np.where(intercept > 0, -np.inf, np.inf))
    return ln_c75, slope


def censor(ln_c75: np.ndarray, auc: np.ndarray, log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ln_c75 held inside the tested range, censoring BELOW / INSIDE / ABOVE) per curve.

    A curve whose measured AUCs never reach 0.75 is ABOVE whatever the fit says, one whose AUCs are all at or
    above 0.75 is BELOW; otherwise the fitted threshold is censored when it falls outside the tested contrasts."""
    auc = np.asarray(auc, float)
    finite = np.isfinite(auc)
    lo = np.where(finite, log_c, np.inf).min(1)
    hi = np.where(finite, log_c, -np.inf).max(1)
    reached = np.where(finite, auc >= TARGET_AUC, False)
    flag = np.where(ln_c75 > hi, ABOVE, np.where(ln_c75 < lo, BELOW, INSIDE))
    flag = np.where(~reached.any(1), ABOVE, np.where(reached.sum(1) == finite.sum(1), BELOW, flag))
    held = np.where(flag == ABOVE, hi, np.where(flag == BELOW, lo, ln_c75))
    return held, flag


# ---------------------------------------------------------------- the whole analysis


@dataclass
class CDResult:
    cells: pd.DataFrame  # method, kind, diameter_mm, contrast, contrast_x, n_trials, n_studies, auc, auc_lo, auc_hi
    thresholds: pd.DataFrame  # method, kind, diameter_mm, c75, c75_lo, c75_hi, censored, lo_censored, hi_censored, slope
    deltas: pd.DataFrame  # a, b, kind, diameter_mm ("all" = mean over diameters), delta_ln_c75, CI, sd, p, family, p_holm
    cell_size: dict
    n_studies: int
    n_boot: int
    # ln c75 as held (censored at the tested range) of every curve under the data (draw 0) and every resample:
    # {"methods", "kinds", "diameters": axis labels, "ln_c75": (methods, kinds, diameters, 1 + n_boot)}
    draws: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        def records(frame):
            return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                    for row in frame.to_dict("records")]

        return {"n_studies": self.n_studies, "n_boot": self.n_boot, "cell_size": self.cell_size,
                "cells": records(self.cells), "thresholds": records(self.thresholds), "deltas": records(self.deltas)}


def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """The score table with every method scoring the same trials (one row per trial x method)."""
    need = {"trial_id", "study", "method", "score_on", "score_off", *CELL}
    missing = sorted(need - set(table.columns))
    if missing:
        raise ValueError(f"score table lacks columns {missing}")
    if table.duplicated(["trial_id", "method"]).any():
        raise ValueError("score table has more than one row per (trial_id, method)")
    per_method = table.groupby("method")["trial_id"].apply(frozenset)
    if per_method.nunique() != 1:
        raise ValueError("every method must score the same trials (the comparison is paired)")
    if not np.isfinite(table[["score_on", "score_off"]].to_numpy(float)).all():
        raise ValueError("score table holds non-finite scores")
    return table


def analyse(table: pd.DataFrame, cfg: CDConfig = CDConfig(),
            comparisons: list[tuple[str, str]] | None = None) -> CDResult:
    """Cell AUCs with CIs, thresholds with CIs and paired differences of ln c75 for a score table.

    `table` columns: trial_id, study (the background / twin study: the resampling unit), kind, diameter_mm,
    contrast (the cell's requested contrast), method, score_on, score_off, and optionally contrast_measured
    (then each curve is fitted against the cell's median measured contrast). `comparisons`: (a, b) method
    pairs for Δ ln c75 = ln c75(a) - ln c75(b), per diameter and as the mean over a kind's diameters (the
    headline rows, one Holm family; the per-diameter rows are another).
    """
    table = check_table(table)
    methods = sorted(table["method"].unique())
    trials, codes, counts, weights = trial_draws(table, cfg)
    scores = {m: g.set_index("trial_id").loc[trials["trial_id"]] for m, g in table.groupby("method")}
    x_column = "contrast_measured" if "contrast_measured" in trials.columns else "contrast"

    kinds = sorted(trials["kind"].unique())
    diameters = sorted(trials["diameter_mm"].unique())
    contrasts = sorted(trials["contrast"].unique())
    shape = (len(methods), len(kinds), len(diameters), len(contrasts))
    aucs = np.full(shape + (len(weights),), np.nan)
    n_eff = np.zeros((len(kinds), len(diameters), len(contrasts), len(weights)))
    log_x = np.full((len(kinds), len(diameters), len(contrasts)), np.nan)
    cell_rows = []
    for (ki, kind), (di, diameter), (ci, contrast) in product(enumerate(kinds), enumerate(diameters), enumerate(contrasts)):
        rows = np.flatnonzero((trials["kind"] == kind).to_numpy() & (trials["diameter_mm"] == diameter).to_numpy()
                              & (trials["contrast"] == contrast).to_numpy())
        if not len(rows):
            continue
        cell_x = float(np.median(trials[x_column].to_numpy(float)[rows]))
        log_x[ki, di, ci] = np.log(cell_x if cell_x > 0 else contrast)
        n_eff[ki, di, ci] = weights[:, rows].sum(1)
        for mi, method in enumerate(methods):
            on = scores[method]["score_on"].to_numpy(float)[rows]
            off = scores[method]["score_off"].to_numpy(float)[rows]
            aucs[mi, ki, di, ci] = matched_aucs(on, off, weights[:, rows])
            interval = percentile_ci(aucs[mi, ki, di, ci, 1:], cfg.level) or [np.nan, np.nan]
            cell_rows.append({"method": method, "kind": kind, "diameter_mm": float(diameter), "contrast": float(contrast),
                              "contrast_x": cell_x, "n_trials": len(rows),
                              "n_studies": int(len(np.unique(codes[rows]))), "auc": float(aucs[mi, ki, di, ci, 0]),
                              "auc_lo": interval[0], "auc_hi": interval[1]})
    cells = pd.DataFrame(cell_rows)

    # every curve x every resample in one vectorised fit: (methods, kinds, diameters, draws, contrasts)
    curve_auc = np.moveaxis(aucs, 3, 4)
    curve_x = np.broadcast_to(log_x[None, :, :, None, :], curve_auc.shape)
    curve_n = np.broadcast_to(np.moveaxis(n_eff, 2, 3)[None], curve_auc.shape)
    usable = np.isfinite(curve_x)
    flat_auc = np.where(usable, curve_auc, np.nan).reshape(-1, len(contrasts))
    flat_x = np.where(usable, curve_x, 0.0).reshape(-1, len(contrasts))
    ln_c75, slope = fit_psychometric(flat_x, flat_auc, curve_n.reshape(-1, len(contrasts)), cfg.pseudo_count)
    held, flag = censor(ln_c75, flat_auc, np.where(usable.reshape(flat_x.shape), flat_x, np.nan))
    held = held.reshape(curve_auc.shape[:4])
    flag = flag.reshape(curve_auc.shape[:4])
    slope = slope.reshape(curve_auc.shape[:4])

    threshold_rows = []
    for (mi, method), (ki, kind), (di, diameter) in product(enumerate(methods), enumerate(kinds), enumerate(diameters)):
        if not np.isfinite(log_x[ki, di]).any():
            continue
        boot = held[mi, ki, di, 1:]
        interval = percentile_ci(boot, cfg.level) or [np.nan, np.nan]
        tested = log_x[ki, di][np.isfinite(log_x[ki, di])]
        lo_cens = bool(np.isclose(interval[0], tested.min())) and bool((flag[mi, ki, di, 1:] == BELOW).any())
        hi_cens = bool(np.isclose(interval[1], tested.max())) and bool((flag[mi, ki, di, 1:] == ABOVE).any())
        threshold_rows.append({
            "method": method, "kind": kind, "diameter_mm": float(diameter),
            "c75": float(np.exp(held[mi, ki, di, 0])), "c75_lo": float(np.exp(interval[0])),
            "c75_hi": float(np.exp(interval[1])), "censored": {BELOW: "<min", INSIDE: "", ABOVE: ">max"}[int(flag[mi, ki, di, 0])],
            "lo_censored": lo_cens, "hi_censored": hi_cens, "slope": float(slope[mi, ki, di, 0]),
            "c_min_tested": float(np.exp(tested.min())), "c_max_tested": float(np.exp(tested.max())),
        })  # fmt: skip
    thresholds = pd.DataFrame(threshold_rows)

    deltas = paired_deltas(held, methods, kinds, diameters, comparisons or [], cfg)
    return CDResult(cells, thresholds, deltas, cell_size(cells, cfg), n_studies=counts.shape[1], n_boot=len(weights) - 1,
                    draws={"methods": methods, "kinds": kinds, "diameters": diameters, "ln_c75": held})


def trial_draws(table: pd.DataFrame, cfg: CDConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """(trials in trial_id order, their study codes, draw counts, weights (1 + n_boot, n_trials) with row 0 the data
    as drawn): the one set of background-study resamples every statistic of a table uses."""
    trials = table[table["method"] == table["method"].min()].sort_values("trial_id").reset_index(drop=True)
    codes, counts = study_draws(trials["study"].to_numpy(), cfg.n_boot, cfg.seed)
    return trials, codes, counts, np.concatenate([np.ones((1, len(trials))), counts[:, codes]])


def pooled_aucs(table: pd.DataFrame, cfg: CDConfig = CDConfig()) -> dict[str, np.ndarray]:
    """Per method: the AUC of every lesion-on score against every twin score, all cells pooled, under the data
    (element 0) and under the same background-study resamples as `analyse` (elements 1..n_boot)."""
    table = check_table(table)
    trials, _codes, _counts, weights = trial_draws(table, cfg)
    out = {}
    for method, group in table.groupby("method"):
        rows = group.set_index("trial_id").loc[trials["trial_id"]]
        out[method] = matched_aucs(rows["score_on"].to_numpy(float), rows["score_off"].to_numpy(float), weights)
    return out


def mean_ln_c75(result: CDResult, method: str) -> np.ndarray:
    """Mean over a method's (kind, diameter) curves of ln c75 as held, under the data (element 0) and every
    resample: one number per draw for the whole contrast-detail diagram (lower: detects at lower contrast)."""
    held = result.draws["ln_c75"][result.draws["methods"].index(method)]
    return np.nanmean(held.reshape(-1, held.shape[-1]), axis=0)


def paired_over_seeds(values: dict[str, np.ndarray], pairs: list[tuple[str, str]], level: float = 0.95) -> dict:
    """`train.metrics.paired_delta_test` of a statistic given per method under the data and the shared
    resamples (`pooled_aucs`, `mean_ln_c75`): `pairs` are (a, b) of the same seed; Δ = mean over seeds of
    a - b, its variance the resamples' (studies, paired: the same draws for every method) plus the spread over
    seeds."""
    if not pairs:
        raise ValueError("paired_over_seeds needs at least one (a, b) pair")
    per_seed = np.array([values[a][0] - values[b][0] for a, b in pairs])
    boot = np.mean([values[a][1:] - values[b][1:] for a, b in pairs], axis=0)
    return paired_delta_test(per_seed, boot[np.isfinite(boot)], level)


def paired_deltas(held: np.ndarray, methods, kinds, diameters, comparisons, cfg: CDConfig) -> pd.DataFrame:
    """Δ ln c75 = ln c75(a) - ln c75(b) on the same resamples, per diameter and averaged over a kind's diameters
    (negative: a detects at lower contrast). CI: percentile; p: two-sided, normal reference with the bootstrap
    SD (as `train.metrics.paired_auc_test`; no resolution floor of 1 / n_boot). Holm families: the headline rows
    (mean over diameters: one per comparison and kind), and separately all per-diameter rows."""
    from scipy import stats

    index = {m: i for i, m in enumerate(methods)}
    rows = []
    for a, b in comparisons:
        if a not in index or b not in index:
            raise ValueError(f"comparison {a!r} vs {b!r}: both must be methods of the table ({methods})")
        diff = held[index[a]] - held[index[b]]  # (kinds, diameters, draws)
        for ki, kind in enumerate(kinds):
            valid = np.isfinite(diff[ki, :, 0])
            series = [(float(d), diff[ki, di]) for di, d in enumerate(diameters) if valid[di]]
            if valid.any():
                series.append(("all", diff[ki, valid].mean(0)))
            for diameter, values in series:
                boot = values[1:][np.isfinite(values[1:])]
                sd = float(boot.std(ddof=1)) if len(boot) > 1 else np.nan
                if sd > 0:
                    p = float(2 * stats.norm.sf(abs(values[0]) / sd))
                else:
                    p = 1.0 if values[0] == 0 else (0.0 if sd == 0 else np.nan)
                interval = percentile_ci(boot, cfg.level) or [np.nan, np.nan]
                rows.append({"a": a, "b": b, "kind": kind, "diameter_mm": diameter, "delta_ln_c75": float(values[0]),
                             "ratio_c75": float(np.exp(values[0])), "ci_lo": interval[0], "ci_hi": interval[1],
                             "sd": sd, "p": p, "family": "headline" if diameter == "all" else "per diameter"})
    frame = pd.DataFrame(rows, columns=["a", "b", "kind", "diameter_mm", "delta_ln_c75", "ratio_c75", "ci_lo",
                                        "ci_hi", "sd", "p", "family"])
    frame["p_holm"] = np.nan
    for _, members in frame.groupby("family").groups.items():
        frame.loc[members, "p_holm"] = holm(frame.loc[members, "p"].fillna(1.0).tolist())
    return frame


def pooled_auc_summary(table: pd.DataFrame, cfg: CDConfig = CDConfig(),
                       comparisons: list[tuple[str, str]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per method, per comparison) tables of `pooled_aucs`: each method's pooled AUC with its background-study
    bootstrap CI, and for each (a, b) the paired difference AUC(a) - AUC(b) on the same resamples (percentile CI;
    two-sided p from the bootstrap SD, as `paired_deltas`). A pooled AUC depends on the grid's mix of cells: it
    summarises one archive, c75 is the portable number."""
    from scipy import stats

    draws = pooled_aucs(table, cfg)
    n_trials, n_studies = table["trial_id"].nunique(), table["study"].nunique()
    per_method = pd.DataFrame([
        {"method": m, "auc": float(a[0]), **dict(zip(("auc_lo", "auc_hi"), percentile_ci(a[1:], cfg.level) or [np.nan] * 2)),
         "n_trials": n_trials, "n_studies": n_studies}
        for m, a in draws.items()])  # fmt: skip
    rows = []
    for a, b in comparisons or []:
        diff = draws[a] - draws[b]
        boot = diff[1:][np.isfinite(diff[1:])]
        sd = float(boot.std(ddof=1)) if len(boot) > 1 else np.nan
        p = float(2 * stats.norm.sf(abs(diff[0]) / sd)) if sd > 0 else np.nan
        lo, hi = percentile_ci(boot, cfg.level) or [np.nan, np.nan]
        rows.append({"a": a, "b": b, "delta_auc": float(diff[0]), "ci_lo": lo, "ci_hi": hi, "sd": sd, "p": p})
    return per_method, pd.DataFrame(rows, columns=["a", "b", "delta_auc", "ci_lo", "ci_hi", "sd", "p"])


def cell_size(cells: pd.DataFrame, cfg: CDConfig, near: tuple[float, float] = (0.65, 0.85)) -> dict:
    """What the cell size buys, measured from the bootstrap: the median CI width of the cells whose AUC lies
    `near` 0.75 (all cells when none does) and, since a width scales as 1 / sqrt(n), the width other sizes
    would give and the size a target width needs."""
    if cells.empty:
        return {}
    width = cells["auc_hi"] - cells["auc_lo"]
    chosen = cells[(cells["auc"] >= near[0]) & (cells["auc"] <= near[1]) & width.notna()]
    scope = f"cells with AUC in [{near[0]}, {near[1]}]"
    if chosen.empty:
        chosen, scope = cells[width.notna()], "all cells (none near 0.75)"
    if chosen.empty:
        return {}
    n = float(chosen["n_trials"].median())
    w = float((chosen["auc_hi"] - chosen["auc_lo"]).median())
    return {
        "trials_per_cell": n, "ci_width_median": w, "scope": scope, "n_cells": int(len(chosen)), "level": cfg.level,
        "width_at": {str(k): w * np.sqrt(n / k) for k in (15, 30, 45, 90, 180)},
        "trials_for_width": {str(t): int(np.ceil(n * (w / t) ** 2)) for t in (0.2, 0.1, 0.05)},
    }


def psychometric(c: np.ndarray, c75: float, slope: float) -> np.ndarray:
    """The fitted curve AUC(c) (for plots)."""
    return 0.5 + 0.5 / (1 + np.exp(-slope * (np.log(c) - np.log(c75))))
