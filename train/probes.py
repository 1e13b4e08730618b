"""Supervised read-outs of frozen features (scikit-learn): linear probes and a cosine kNN vote.

Every fit sees training rows only; hyper-parameters are chosen by cross-validation whose folds never
split a study (StratifiedGroupKFold), since pairs of one study share a lesion and would leak across
folds. Probes weight classes equally (`class_weight="balanced"`): lesions are a few percent of the
pairs, and an unweighted probe's 0.5 threshold would answer "normal" almost always.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from train.metrics import Bootstrap, auc_with_ci, balanced_accuracy_with_ci, macro_auc

PROBE_CS = (0.001, 0.01, 0.1, 1.0)  # larger C is ~unregularised on 512-d features and costs most of the time


def stratified_fraction(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded, stratified subsample holding `fraction` of the rows (all rows at 1.0)."""
    idx = np.arange(len(y))
    if fraction >= 1.0:
        return idx
    n_keep = max(int(round(fraction * len(y))), len(np.unique(y)))
    kept, _ = train_test_split(idx, train_size=n_keep, stratify=y, random_state=seed)
    return np.sort(kept)


def group_folds(y: np.ndarray, groups: np.ndarray, wanted: int) -> int:
    """How many study-grouped folds the data allows: no more than the studies holding the rarest class
    (each fold must see every class)."""
    y, groups = np.asarray(y, dtype=object), np.asarray(groups).astype(str)
    per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
    return min([wanted, *per_class])


def complete_splits(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Study-grouped, stratified (train, held-out) splits in which both sides hold every class. When studies
    hold pairs of both classes, StratifiedGroupKFold cannot always give every fold every class; such a fold
    scores nothing (log loss needs both classes, a fit needs them too), and GridSearchCV would average its
    NaN into every C and pick the first."""
    y = np.asarray(y)
    n_classes = len(np.unique(y))
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [(train, held) for train, held in splitter.split(np.zeros(len(y)), y, groups)
            if len(np.unique(y[train])) == n_classes and len(np.unique(y[held])) == n_classes]


def fit_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, cv_folds: int = 5):
    """Standardised features -> class-balanced logistic regression (multinomial for > 2 classes). C is
    chosen by study-grouped, stratified cross-validation on (X, y) only -- the caller passes training
    rows, never test rows -- over the folds that hold every class (`complete_splits`); with fewer than 2 such
    folds, C = 1."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    groups = np.asarray(groups).astype(str)
    folds = group_folds(y, groups, cv_folds)
    splits = complete_splits(y, groups, folds, seed) if folds >= 2 else []
    if len(splits) < 2:
        return model.fit(X, y)
    search = GridSearchCV(model, {"logisticregression__C": list(PROBE_CS)}, cv=splits, scoring="neg_log_loss")
    return search.fit(X, y).best_estimator_


def binary_probe(X_train, y_train, g_train, X_test, y_test, g_test, boot: Bootstrap, cv_folds: int = 5,
                 fraction: float = 1.0) -> tuple[dict, object, np.ndarray | None]:
    """Abnormal-vs-normal probe on `fraction` of the training labels: (metrics, fitted model, test scores)."""
    y_train = np.asarray(y_train, dtype=bool)
    y_test = np.asarray(y_test, dtype=bool)
    idx = stratified_fraction(y_train, fraction, boot.seed) if y_train.sum() >= 2 else np.arange(len(y_train))
    n_pos, n_neg = int(y_train[idx].sum()), int((~y_train[idx]).sum())
    if n_pos < 2 or n_neg < 2:
        return {"skipped": f"{n_pos} positive / {n_neg} negative training labels at {fraction:.0%} (< 2)",
                "n_train": int(len(idx))}, None, None
    model = fit_probe(X_train[idx], y_train[idx], np.asarray(g_train)[idx], boot.seed, cv_folds)
    proba = model.predict_proba(X_test)[:, 1]
    pred = proba >= 0.5
    metrics = {
        **auc_with_ci(y_test, proba, g_test, boot),
        **balanced_accuracy_with_ci(y_test, pred, g_test, boot),
        "accuracy": float((pred == y_test).mean()),
        "majority_accuracy": float(max(y_test.mean(), 1 - y_test.mean())),
        "C": float(model[-1].C),
        "n_train": int(len(idx)),
        "n_train_pos": n_pos,
        "n_test": int(len(y_test)),
    }
    return metrics, model, proba


def multiclass_probe(X_train, y_train, g_train, X_test, y_test, g_test, boot: Bootstrap,
                     cv_folds: int = 5) -> tuple[dict, object]:
    """Multinomial logistic regression on string labels; test rows of classes unseen in training are
    dropped (and counted)."""
    y_train, y_test = np.asarray(y_train, dtype=object), np.asarray(y_test, dtype=object)
    classes = np.unique(y_train)
    if len(classes) < 2:
        return {"skipped": f"training split has {len(classes)} class(es)"}, None
    seen = np.isin(y_test, classes)
    if seen.sum() == 0:
        return {"skipped": "no test rows with a class seen in training"}, None
    model = fit_probe(X_train, y_train, g_train, boot.seed, cv_folds)
    X_test, y_test, g_test = X_test[seen], y_test[seen], np.asarray(g_test)[seen]
    proba = model.predict_proba(X_test)
    pred = model.classes_[proba.argmax(1)]
    return {
        **balanced_accuracy_with_ci(y_test, pred, g_test, boot),
        "accuracy": float((pred == y_test).mean()),
        "macro_auc": macro_auc(y_test, proba, model.classes_),
        "classes": [str(c) for c in model.classes_],
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_test_unseen_class": int((~seen).sum()),
    }, model


def knn_vote(X_train, y_train, X_test, y_test, g_test, k: int, boot: Bootstrap) -> tuple[dict, np.ndarray | None]:
    """Cosine kNN (training -> test): the share of the k neighbours voting for a class is the score.
    Binary labels: the AUC of the positive vote share (with its study-level CI) only -- at a screening
    prevalence of a few percent the majority vote of k neighbours answers "normal" for nearly every pair,
    so its balanced accuracy is 0.5 whatever the features; the share ranks pairs without a threshold.
    String labels: balanced accuracy of the vote and macro AUC. Returns (metrics, positive vote share for
    binary labels, else None)."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    k_used = min(k, len(y_train))
    model = KNeighborsClassifier(n_neighbors=k_used, metric="cosine", algorithm="brute").fit(X_train, y_train)
    votes = model.predict_proba(X_test)
    if y_train.dtype == bool:
        share = votes[:, list(model.classes_).index(True)] if True in model.classes_ else np.zeros(len(y_test))
        return {"k": k_used, **auc_with_ci(y_test, share, g_test, boot)}, share
    pred = model.classes_[votes.argmax(1)]
    return {"k": k_used, **balanced_accuracy_with_ci(y_test, pred, g_test, boot),
            "accuracy": float((pred == y_test).mean()), "macro_auc": macro_auc(y_test, votes, model.classes_)}, None
