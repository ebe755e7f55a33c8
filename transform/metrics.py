"""Offline metrics of a model's scores: AUC (paper Table 1), log loss, and the ROC curve.

One place for the numbers every stage judges a model by: the trainer's evaluation and
``metrics.json``, the release gate's quality check, and the tools' experiments. Pure NumPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LOG_LOSS_EPSILON = 1e-7


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold, from (0, 0) to (1, 1).

    Raises:
      ValueError: ``labels`` holds only one class (the curve is undefined).
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = labels.sum()
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("the ROC curve needs both positive and negative labels")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # One point per distinct score: tied examples move the curve together.
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half).

    Raises:
      ValueError: ``labels`` holds only one class.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0 or y.min() == y.max():
        raise ValueError("the ROC curve needs both positive and negative labels")
    return query_auc(np.zeros(y.size, dtype=np.int64), y, scores)


def query_auc(query: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over queries of the AUC among a query's own impressions (ties count one half).

    Only the order of a query's candidates decides what it shows, so this is the offline
    number closest to an online test; queries without both a positive and a negative are
    left out (NaN when none has both). With one query it is the AUC of all the scores.
    """
    query = np.asarray(query).ravel()
    y = np.asarray(labels, np.float64).ravel()
    s = np.asarray(scores, np.float64).ravel()
    order = np.lexsort((s, query))
    q, y, s = query[order], y[order], s[order]
    n = len(q)
    if n == 0:
        return math.nan
    neg = 1.0 - y
    before = np.concatenate(([0.0], np.cumsum(neg)))  # negatives before each position
    new_query = np.r_[True, q[1:] != q[:-1]]
    new_tie = new_query | np.r_[True, s[1:] != s[:-1]]
    query_start = np.maximum.accumulate(np.where(new_query, np.arange(n), 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, np.arange(n), 0))
    tie_end = np.r_[np.flatnonzero(new_tie)[1:], n]
    tie_end = tie_end[np.cumsum(new_tie) - 1]
    below = before[tie_start] - before[query_start]
    tied = before[tie_end] - before[tie_start]
    credit = y * (below + 0.5 * tied)
    ids = np.cumsum(new_query) - 1
    pos = np.bincount(ids, weights=y)
    negs = np.bincount(ids, weights=neg)
    wins = np.bincount(ids, weights=credit)
    both = (pos > 0) & (negs > 0)
    if not both.any():
        return math.nan
    return float(np.mean(wins[both] / (pos[both] * negs[both])))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean logistic loss of predicted probabilities."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(
        np.asarray(probabilities, dtype=np.float64).ravel(), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON
    )
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def offline_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """AUC, log loss, label rate, mean prediction and example count of one split."""
    y = np.asarray(labels).ravel()
    p = np.asarray(probabilities).ravel()
    if y.size == 0:
        raise ValueError("no examples to compute metrics on")
    try:
        area: float | None = auc(y, p)
    except ValueError:
        area = None
    return {
        "auc": area,
        "log_loss": log_loss(y, p),
        "label_rate": float(y.mean()),
        "mean_prediction": float(p.mean()),
        "examples": int(y.size),
    }
