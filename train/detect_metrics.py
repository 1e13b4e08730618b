"""Detection metrics as pure functions over arrays: exam-level AUC, lateralisation, localisation, FROC.

Every interval resamples studies (the exam is the unit a screening reader decides on), through the same
study-level draws as `train.metrics`: a resample draws studies with replacement and weights every row of a
study -- an exam, a lesion, a false mark, an image -- by its study's draw count.

Geometry: a mark is a point (x, y) and a finding a box (xmin, ymin, xmax, ymax), both in one image's frame; a
mark *hits* a finding when it lies inside the box or within `radius` of it (half a patch: the mark is the
centre of the patch that scored, and that patch overlaps the box).
"""

from __future__ import annotations

import numpy as np

from train.metrics import Bootstrap, auc_with_ci, percentile_ci, resample_weights

FP_RATES = (0.5, 1.0, 2.0)  # false marks per image at which FROC sensitivity is reported


def study_resamples(studies: np.ndarray, boot: Bootstrap):
    """(codes, chunks): each row's study code, and chunks of (<= CHUNK, n_studies) study draw counts -- the
    draws `train.metrics.resample_weights` makes for one row per study, so every table of the same studies
    (exams, lesions, marks, images) is resampled by the same draws."""
    studies = np.asarray(studies).astype(str)
    distinct = np.unique(studies)
    codes = np.searchsorted(distinct, studies)
    return codes, resample_weights(distinct, len(distinct), boot.n_boot, boot.seed)


def distinct_studies(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(a).astype(str) for a in arrays]))


def codes_in(studies: np.ndarray, distinct: np.ndarray) -> np.ndarray:
    return np.searchsorted(distinct, np.asarray(studies).astype(str))


def mean_ci(values: np.ndarray, studies: np.ndarray, boot: Bootstrap) -> list[float] | None:
    """Percentile CI of the mean of per-row values (an accuracy, a hit rate) over study-level resamples."""
    values = np.asarray(values, float)
    codes, chunks = study_resamples(studies, boot)
    resampled = []
    for counts in chunks:
        w = counts[:, codes]
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled.append((w * values).sum(1) / w.sum(1))
    return percentile_ci(np.concatenate(resampled), boot.level) if resampled else None


# ---------------------------------------------------------------- geometry


def point_box_distance(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, M) Euclidean distance from each point (x, y) to each box (xmin, ymin, xmax, ymax); 0 inside."""
    p = np.asarray(points, np.float64).reshape(-1, 1, 2)
    b = np.asarray(boxes, np.float64).reshape(1, -1, 4)
    dx = np.maximum(np.maximum(b[..., 0] - p[..., 0], p[..., 0] - b[..., 2]), 0.0)
    dy = np.maximum(np.maximum(b[..., 1] - p[..., 1], p[..., 1] - b[..., 3]), 0.0)
    return np.hypot(dx, dy)


def hits(points: np.ndarray, boxes: np.ndarray, radius: float) -> np.ndarray:
    """(N, M) bool: point n lies in box m or within `radius` of it."""
    if len(np.asarray(points).reshape(-1, 2)) == 0 or len(np.asarray(boxes).reshape(-1, 4)) == 0:
        return np.zeros((len(np.asarray(points).reshape(-1, 2)), len(np.asarray(boxes).reshape(-1, 4))), bool)
    return point_box_distance(points, boxes) <= radius


# ---------------------------------------------------------------- exam level and lateralisation


def exam_auc(has_finding: np.ndarray, score: np.ndarray, studies: np.ndarray, boot: Bootstrap) -> dict:
    """Exam with any finding vs exam with none, one row per exam; study-level CI."""
    return auc_with_ci(has_finding, score, studies, boot)


def lateralisation(lesion_left: np.ndarray, score_left: np.ndarray, score_right: np.ndarray, studies: np.ndarray,
                   boot: Bootstrap) -> dict:
    """Which breast holds the finding, over exams with a finding in exactly one breast.

    accuracy: the higher-scoring breast is the lesion breast (a tie counts half); auc: ROC AUC of
    score_left - score_right for 'the lesion is left'. Both with study-level CIs."""
    y = np.asarray(lesion_left, bool)
    diff = np.asarray(score_left, float) - np.asarray(score_right, float)
    if len(y) == 0:
        return {"skipped": "no exam with a finding in one breast only", "n_exams": 0}
    correct = np.where(diff == 0, 0.5, ((diff > 0) == y).astype(float))
    out = {"accuracy": float(correct.mean()), "accuracy_ci": mean_ci(correct, studies, boot),
           "n_exams": int(len(y)), "n_left": int(y.sum())}
    auc = auc_with_ci(y, diff, studies, boot)
    return {**out, **({"auc": auc["auc"], "auc_ci": auc["auc_ci"]} if "auc" in auc else {"auc_skipped": auc["skipped"]})}


# ---------------------------------------------------------------- localisation


def localisation(hit: np.ndarray, studies: np.ndarray, boot: Bootstrap) -> dict:
    """Share of located findings whose image's top mark hits them, with a study-level CI."""
    hit = np.asarray(hit, float)
    if len(hit) == 0:
        return {"skipped": "no finding with a box", "n_findings": 0}
    return {"hit_rate": float(hit.mean()), "hit_rate_ci": mean_ci(hit, studies, boot),
            "n_findings": int(len(hit)), "n_studies": int(len(np.unique(np.asarray(studies).astype(str))))}


# ---------------------------------------------------------------- FROC


def lesion_scores(mark_scores: np.ndarray, mark_hits: np.ndarray) -> np.ndarray:
    """Per finding, the highest score of a mark that hits it (-inf: no mark does): the threshold at which
    the finding counts as detected. `mark_hits` (n_marks, n_findings)."""
    s = np.where(np.asarray(mark_hits, bool), np.asarray(mark_scores, float)[:, None], -np.inf)
    return s.max(0) if s.shape[0] else np.full(s.shape[1], -np.inf)


def false_mark_scores(mark_scores: np.ndarray, mark_hits: np.ndarray) -> np.ndarray:
    """Scores of the marks that hit no finding (a second mark on a found finding is not a false one)."""
    return np.asarray(mark_scores, float)[~np.asarray(mark_hits, bool).any(1)]


def weighted_froc(lesion_score: np.ndarray, lesion_w: np.ndarray, fp_score: np.ndarray, fp_w: np.ndarray,
                  image_w: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """(B, len(rates)) FROC sensitivity at each rate of false marks per image, under B weightings.

    One threshold t keeps every mark scoring >= t: sensitivity = weight of findings with lesion_score >= t
    over all findings' weight; false marks per image = weight of false marks scoring >= t over the images'
    weight. The reported sensitivity at rate r is that of the lowest threshold whose false-mark rate is <= r
    (both fall as t rises; tied false marks enter together). NaN where a weighting has no finding."""
    lesion_score, fp_score = np.asarray(lesion_score, float), np.asarray(fp_score, float)
    lesion_w, fp_w, image_w = (np.atleast_2d(np.asarray(w, float)) for w in (lesion_w, fp_w, image_w))
    n_b = lesion_w.shape[0]
    levels = np.unique(fp_score)[::-1]  # distinct false-mark scores, highest first
    if len(levels):
        level_of = np.searchsorted(-levels, -fp_score)  # index into levels
        per_level = np.zeros((n_b, len(levels)))
        for j in range(len(levels)):
            per_level[:, j] = fp_w[:, level_of == j].sum(1)
        cum = np.cumsum(per_level, axis=1)  # false-mark weight kept when the threshold is levels[j]
    n_images = image_w.sum(1)
    total = lesion_w.sum(1)
    out = np.full((n_b, len(rates)), np.nan)
    for i, rate in enumerate(rates):
        for b in range(n_b):
            if total[b] <= 0 or n_images[b] <= 0:
                continue
            allowed = 0 if not len(levels) else int((cum[b] / n_images[b] <= rate + 1e-12).sum())
            # keep every false-mark level before `allowed`; the next level's score is the bound to stay above
            bound = levels[allowed] if allowed < len(levels) else -np.inf
            found = lesion_score > bound if np.isfinite(bound) else np.isfinite(lesion_score)
            out[b, i] = (lesion_w[b] * found).sum() / total[b]
    return out


def froc_curve(lesion_score: np.ndarray, fp_score: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(false marks per image, sensitivity) at every distinct threshold, for plotting."""
    lesion_score, fp_score = np.asarray(lesion_score, float), np.asarray(fp_score, float)
    thresholds = np.unique(np.concatenate([lesion_score[np.isfinite(lesion_score)], fp_score]))[::-1]
    if len(lesion_score) == 0 or n_images == 0:
        return np.zeros(0), np.zeros(0)
    fp = np.array([(fp_score >= t).sum() / n_images for t in thresholds])
    sens = np.array([(lesion_score >= t).sum() / len(lesion_score) for t in thresholds])
    return np.r_[0.0, fp], np.r_[0.0, sens]


def froc(lesion_score: np.ndarray, lesion_study: np.ndarray, fp_score: np.ndarray, fp_study: np.ndarray,
         image_study: np.ndarray, boot: Bootstrap, rates=FP_RATES) -> dict:
    """FROC sensitivity at `rates` false marks per image, with study-level CIs."""
    if len(lesion_score) == 0:
        return {"skipped": "no finding with a box", "n_findings": 0}
    distinct = distinct_studies(lesion_study, fp_study, image_study)
    codes = [codes_in(s, distinct) for s in (lesion_study, fp_study, image_study)]
    ones = [np.ones(len(c)) for c in codes]
    point = weighted_froc(lesion_score, ones[0], fp_score, ones[1], ones[2], rates)[0]
    resampled = []
    for counts in resample_weights(distinct, len(distinct), boot.n_boot, boot.seed):
        resampled.append(weighted_froc(lesion_score, counts[:, codes[0]], fp_score, counts[:, codes[1]],
                                       counts[:, codes[2]], rates))
    stack = np.concatenate(resampled) if resampled else np.zeros((0, len(rates)))
    out = {"n_findings": int(len(lesion_score)), "n_images": int(len(image_study)),
           "n_false_marks": int(len(fp_score))}
    for i, rate in enumerate(rates):
        out[f"sensitivity@{rate:g}"] = float(point[i])
        out[f"sensitivity@{rate:g}_ci"] = percentile_ci(stack[:, i], boot.level) if len(stack) else None
    return out


def paired_froc_deltas(items_a: list[dict], items_b: list[dict], boot: Bootstrap, rate: float = 1.0):
    """(per-seed deltas, resampled mean deltas) of sensitivity@rate between two detectors on the same studies.

    Each item holds lesion_score, lesion_study, fp_score, fp_study, image_study of one seed; the study draws
    are shared by every seed and both detectors, so shared studies cancel (as in `paired_auc_test`)."""
    distinct = distinct_studies(*[x[k] for x in items_a + items_b for k in ("lesion_study", "fp_study", "image_study")])

    def sens(item, weights):
        c = [codes_in(item[k], distinct) for k in ("lesion_study", "fp_study", "image_study")]
        return weighted_froc(item["lesion_score"], weights[:, c[0]], item["fp_score"], weights[:, c[1]],
                             weights[:, c[2]], (rate,))[:, 0]

    ones = np.ones((1, len(distinct)))
    per_seed = np.array([sens(a, ones)[0] - sens(b, ones)[0] for a, b in zip(items_a, items_b)])
    resampled = [np.mean([sens(a, w) - sens(b, w) for a, b in zip(items_a, items_b)], axis=0)
                 for w in resample_weights(distinct, len(distinct), boot.n_boot, boot.seed)]
    boot_delta = np.concatenate(resampled) if resampled else np.zeros(0)
    return per_seed, boot_delta[np.isfinite(boot_delta)]
