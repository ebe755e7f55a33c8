"""The trainer's plots of its offline metrics: the ROC curve and the learning curve.

The metrics themselves (AUC, log loss, the ROC curve's points) are computed in
:mod:`transform.metrics`, the one place the trainer and the release gate share; they are
re-exported here for the trainer's callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transform.metrics import auc, log_loss, offline_metrics, roc_curve

__all__ = ["auc", "log_loss", "offline_metrics", "plot_learning_curve", "plot_roc", "roc_curve"]


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
