"""Offline metrics on the eval split: AUC (paper Table 1), log loss, and the ROC curve."""

from __future__ import annotations

from pathlib import Path
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
    """Area under the ROC curve (ties count one half)."""
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


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


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> None:
    """Writes the ROC curve as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global state (and any display) alone.
    from matplotlib.figure import Figure

    fpr, tpr = roc_curve(labels, scores)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"model (AUC {np.trapezoid(tpr, fpr):.4f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def plot_learning_curve(
    curve: list[dict[str, Any]], path: Path, title: str, best_step: int | None
) -> None:
    """Writes the training loss and the eval split's AUC and log loss by epoch as a PNG."""
    from matplotlib.figure import Figure

    epochs = [e["epoch"] for e in curve]
    fig = Figure(figsize=(8, 4), dpi=100)
    loss_ax, auc_ax = fig.subplots(1, 2)
    trained = [(e["epoch"], e["train_loss"]) for e in curve if e.get("train_loss") is not None]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), marker="o", label="training loss")
    loss_ax.plot(epochs, [e["log_loss"] for e in curve], marker="o", label="eval log loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("log loss")
    loss_ax.legend()
    aucs = [(e["epoch"], e["auc"]) for e in curve if e["auc"] is not None]
    if aucs:
        auc_ax.plot(*zip(*aucs, strict=True), marker="o", color="tab:green", label="eval AUC")
    best = [e for e in curve if e["step"] == best_step]
    for ax, key in ((loss_ax, "log_loss"), (auc_ax, "auc")):
        if best and best[0][key] is not None:
            ax.scatter(
                [best[0]["epoch"]],
                [best[0][key]],
                s=120,
                facecolors="none",
                edgecolors="red",
                zorder=3,
                label="exported" if key == "auc" else None,
            )
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("AUC")
    auc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
