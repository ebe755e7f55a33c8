"""Model analysis in the quality gate: slices of the eval rows and calibration.

A model that is as good as the baseline on the whole eval split may still be worse for some
users or items (a country, a device, items it has no embedding for). The gate therefore also
cuts the eval rows into slices (``validation.slices``) and, for each slice with enough rows,
compares the new model with the baseline: count, label rate, AUC, log loss and mean
prediction / label rate, with a 95% bootstrap interval of the AUC difference. Since the
serving bids or ranks on the predicted probabilities, it also checks their calibration: the
expected calibration error (ECE) and the ratio of the mean prediction to the label rate.

Every interval comes from one set of Poisson bootstrap weights (each row is drawn a
Poisson(1) number of times, independently: the usual bootstrap for large samples, and one
draw serves the whole split and every slice of it) with a fixed seed, so the same models on
the same data give the same verdict. The AUC of a weighted resample is computed from the
scores sorted once per model: ranks with ties counting one half, vectorised over resamples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transform.config import Config, Kind, SliceKind, SliceSpec
from transform.metrics import auc, offline_metrics

BOOTSTRAP_SEED = 0
CALIBRATION_BINS = 10
"""Bins of equal rows (by predicted probability) of the ECE and the reliability diagram."""
INTERVAL = (2.5, 97.5)
"""Percentiles of the bootstrap distribution bounding the reported 95% intervals."""
OTHER = "other"
IN_VOCABULARY = "in vocabulary"
OUT_OF_VOCABULARY = "not in vocabulary"
_CHUNK_CELLS = 2_000_000
"""Resamples x rows processed at once (bounds the memory of the bootstrap: ~16 MB a chunk)."""


@dataclass
class Slice:
    """Rows of the eval split sharing one value (or bucket) of a slice column."""

    column: str
    kind: SliceKind
    value: str
    rows: np.ndarray
    """Boolean mask over the eval rows."""
    tolerance: float
    min_rows: int

    @property
    def name(self) -> str:
        """``column=value``, or ``all`` for the whole split."""
        return "all" if self.column == "" else f"{self.column}={self.value}"


# --------------------------------------------------------------------------------------------
# Cutting the eval rows into slices


def slice_columns(
    config: Config, examples: Sequence[bytes], data_dir: str | Path
) -> dict[str, np.ndarray]:
    """The raw values of each slice column, parsed as the log typed them.

    A list column gives the length of each row's list (the only thing its slices read).
    """
    import tensorflow as tf

    from transform.features import recorded_raw_spec, serving_feature_spec

    columns = {config.slice_feature(s.column).column for s in config.validation.slices}
    if not columns:
        return {}
    full = serving_feature_spec(config, recorded_raw_spec(data_dir))
    parsed = tf.io.parse_example(tf.constant(list(examples)), {c: full[c] for c in columns})
    out = {}
    for column, value in parsed.items():
        if isinstance(value, tf.SparseTensor):
            rows = value.indices.numpy()[:, 0]
            out[column] = np.bincount(rows, minlength=len(examples))
        else:
            out[column] = value.numpy()
    return out


def vocabulary_tokens(data_dir: str | Path, vocabulary: str) -> set[bytes]:
    """The tokens of one of a datagen output's vocabularies (what the model trained on)."""
    import tensorflow_transform as tft

    return set(tft.TFTransformOutput(str(data_dir)).vocabulary_by_name(vocabulary))


def as_tokens(values: np.ndarray) -> list[bytes]:
    """Raw categorical values as vocabulary tokens (integer ids become their decimal text)."""
    if values.dtype == object:
        return list(values)
    return [str(int(v)).encode() for v in values]


def make_slices(config: Config, values: dict[str, np.ndarray], data_dir: str | Path) -> list[Slice]:
    """The slices of ``validation.slices``, in config order, each column's in value order."""
    v = config.validation
    out: list[Slice] = []
    for spec in v.slices:
        feature = config.slice_feature(spec.column)
        kind = config.slice_kind(spec)
        raw = values[feature.column]
        tolerance = v.slice_auc_tolerance if spec.tolerance is None else spec.tolerance
        min_rows = v.slice_min_rows if spec.min_rows is None else spec.min_rows
        for label, mask in _cut(spec, kind, feature.kind, raw, feature.vocabulary, data_dir):
            out.append(Slice(spec.column, kind, label, mask, tolerance, min_rows))
    return out


def _cut(
    spec: SliceSpec,
    kind: SliceKind,
    feature_kind: Kind,
    raw: np.ndarray,
    vocabulary: str,
    data_dir: str | Path,
) -> list[tuple[str, np.ndarray]]:
    if kind is SliceKind.IN_VOCABULARY:
        known = vocabulary_tokens(data_dir, vocabulary)
        inside = np.fromiter((t in known for t in as_tokens(raw)), bool, len(raw))
        return [(IN_VOCABULARY, inside), (OUT_OF_VOCABULARY, ~inside)]
    if kind is SliceKind.LENGTH or feature_kind is Kind.NUMERIC:
        return _buckets(raw.astype(np.float64), spec.buckets)
    uniques, inverse, counts = np.unique(raw, return_inverse=True, return_counts=True)
    top = np.argsort(-counts, kind="stable")[: spec.buckets]
    labels = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in uniques]
    out = [(labels[i], inverse == i) for i in top]
    rest = ~np.isin(inverse, top)
    if rest.any():
        out.append((OTHER, rest))
    return out


def _buckets(x: np.ndarray, buckets: int) -> list[tuple[str, np.ndarray]]:
    """Quantile buckets of numbers, labelled by the smallest and largest value in each."""
    cuts = np.unique(np.quantile(x, np.arange(1, buckets) / buckets))
    cuts = cuts[cuts > x.min()]
    ids = np.searchsorted(cuts, x, side="right")
    out = []
    for b in range(len(cuts) + 1):
        mask = ids == b
        if mask.any():
            lo, hi = x[mask].min(), x[mask].max()
            out.append((f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}", mask))
    return out


# --------------------------------------------------------------------------------------------
# Fast AUC of weighted resamples


_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(12)])[:-1]
"""P(X <= k) of Poisson(1) for k = 0..10: a weight is the number of these a uniform exceeds
(draws above 11, with probability 1e-9, count 11)."""


def bootstrap_weights(rows: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Poisson(1) weights of each row in each resample (rows x resamples, float32: the counts
    are small integers, and their sums stay exact below 2**24).

    Drawn by inverting the CDF of uniforms, a few times faster than ``Generator.poisson``.
    """
    uniform = np.random.default_rng(seed).random((rows, resamples), dtype=np.float32)
    weights = np.zeros((rows, resamples), dtype=np.float32)
    for p in _POISSON_CDF.astype(np.float32):
        weights += uniform > p
    return weights


def weighted_aucs(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, order: np.ndarray | None = None
) -> np.ndarray:
    """The AUC of each weighted resample (ties count one half; NaN without both classes).

    Each positive wins over the weight of the negatives scored below it and half of those
    tied with it: with the negatives' weights accumulated in score order, that is the mean of
    the running sums just before and just after its score, found by a binary search.

    Args:
      labels: 0/1 labels of the rows.
      scores: the model's scores of the rows.
      weights: rows x resamples weights (each row's count in each resample).
      order: the rows to use (a slice), by ascending score; None: every row. A slice's order
        is the whole split's filtered (``order[mask[order]]``): sorted once per model.
    """
    if order is None:
        order = np.argsort(scores, kind="stable")
    positive = np.asarray(labels)[order] > 0
    pos, neg = order[positive], order[~positive]
    s_pos, s_neg = scores[pos], scores[neg]
    below = np.searchsorted(s_neg, s_pos, side="left")
    up_to = np.searchsorted(s_neg, s_pos, side="right")
    out = np.empty(weights.shape[1])
    step = max(1, _CHUNK_CELLS // max(1, len(order)))
    for begin in range(0, weights.shape[1], step):
        w = weights[:, begin : begin + step]
        w_neg = w[neg]
        running = np.zeros((len(neg) + 1, w.shape[1]), dtype=np.float32)
        np.cumsum(w_neg, axis=0, out=running[1:])
        w_pos = w[pos]
        wins = (w_pos * (running[below] + running[up_to])).sum(axis=0, dtype=np.float64) / 2
        total = w_pos.sum(axis=0, dtype=np.float64) * running[-1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[begin : begin + step] = np.where(total > 0, wins / total, np.nan)
    return out


def interval(samples: np.ndarray) -> list[float] | None:
    """The 95% interval of bootstrap samples (NaN ones left out); None when all are NaN."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    return [float(x) for x in np.percentile(samples, INTERVAL)]


# --------------------------------------------------------------------------------------------
# Metrics


def model_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC (None with one class), log loss, mean prediction and mean prediction / label rate."""
    m = offline_metrics(labels, scores)
    rate = m["label_rate"]
    return {
        "auc": m["auc"],
        "log_loss": m["log_loss"],
        "mean_prediction": m["mean_prediction"],
        "calibration": m["mean_prediction"] / rate if rate > 0 else None,
    }


def calibration(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, config: Config
) -> dict[str, Any]:
    """ECE and mean prediction / label rate with their 95% bootstrap intervals, the reliability
    diagram's bins, and the problems found (the checks of ``validation.calibration_*``)."""
    v = config.validation
    n = len(labels)
    order = np.argsort(scores, kind="stable")
    bins = np.empty(n, dtype=np.int64)
    bins[order] = np.arange(n) * CALIBRATION_BINS // n  # bins of equal rows
    count = np.bincount(bins, minlength=CALIBRATION_BINS).astype(np.float64)
    predicted = np.bincount(bins, weights=scores, minlength=CALIBRATION_BINS)
    observed = np.bincount(bins, weights=labels, minlength=CALIBRATION_BINS)
    ece = float(np.abs(predicted - observed).sum() / n)
    # Each resample's per-bin sums of prediction - label: in score order a bin is a run of
    # rows, summed by one reduceat (a matrix product here would be mostly zeros).
    in_order = bins[order]
    starts = np.flatnonzero(np.r_[True, in_order[1:] != in_order[:-1]])
    gap = (scores - labels)[order].astype(np.float32)
    per_bin = np.add.reduceat(weights[order] * gap[:, None], starts, axis=0)
    total = weights.sum(axis=0, dtype=np.float64)
    eces = np.abs(per_bin).sum(axis=0) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = (scores.astype(np.float32) @ weights) / (labels.astype(np.float32) @ weights)
    rate = float(labels.mean())
    ratio = float(scores.mean()) / rate if rate > 0 else None
    # Resampling adds noise of its own to the bins' gaps, so resampled ECEs sit above the
    # estimate: the interval is the basic bootstrap's (reflected about the estimate), which
    # corrects that bias instead of carrying it into the check.
    spread = interval(eces)
    ece_interval = None if spread is None else [max(0.0, 2 * ece - spread[1]), 2 * ece - spread[0]]
    result: dict[str, Any] = {
        "ece": ece,
        "ece_interval": ece_interval,
        "ece_tolerance": v.calibration_error_tolerance,
        "ratio": ratio,
        "ratio_interval": interval(ratios),
        "ratio_tolerance": v.calibration_ratio_tolerance,
        "bins": [
            {
                "rows": int(count[b]),
                "mean_prediction": float(predicted[b] / count[b]),
                "label_rate": float(observed[b] / count[b]),
            }
            for b in range(CALIBRATION_BINS)
            if count[b]
        ],
        "problems": [],
    }
    low = result["ece_interval"][0] if result["ece_interval"] else ece
    if low > v.calibration_error_tolerance:
        result["problems"].append(
            f"expected calibration error {ece:.4f} (95% interval "
            f"{_span(result['ece_interval'])}) is above the tolerance "
            f"{v.calibration_error_tolerance}"
        )
    t = v.calibration_ratio_tolerance
    span = result["ratio_interval"]
    if ratio is not None and span is not None and (span[1] < 1 - t or span[0] > 1 + t):
        result["problems"].append(
            f"mean prediction / label rate {ratio:.3f} (95% interval {_span(span, 3)}) is "
            f"outside 1 ± {t}: the probabilities are biased "
            + ("upwards" if ratio > 1 else "downwards")
        )
    return result


def _span(span: list[float] | None, digits: int = 4) -> str:
    return "n/a" if span is None else f"{span[0]:.{digits}f} to {span[1]:.{digits}f}"


def slice_table(
    slices: Sequence[Slice],
    labels: np.ndarray,
    scores: np.ndarray,
    weights: np.ndarray,
    base_scores: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per slice: its metrics for the model and the baseline, the AUC difference with
    its 95% bootstrap interval, and whether the slice passes (see :func:`judge`)."""
    order = np.argsort(scores, kind="stable")
    base_order = None if base_scores is None else np.argsort(base_scores, kind="stable")
    rows = []
    for s in slices:
        mask = s.rows
        y = labels[mask]
        row: dict[str, Any] = {
            "slice": s.name,
            "column": s.column or None,
            "kind": s.kind.value if s.column else None,
            "value": s.value,
            "rows": int(mask.sum()),
            "label_rate": float(y.mean()) if mask.any() else None,
            "model": None,
            "baseline": None,
            "popularity_auc": None,
            "auc_interval": None,
            "auc_difference": None,
            "auc_difference_interval": None,
            "tolerance": s.tolerance,
            "min_rows": s.min_rows,
            "judged": False,
            "passed": True,
        }
        rows.append(row)
        if not mask.any():
            continue
        row["model"] = model_metrics(y, scores[mask])
        if popularity is not None and row["model"]["auc"] is not None:
            row["popularity_auc"] = auc(y, popularity[mask])
        if row["rows"] < s.min_rows or row["model"]["auc"] is None:
            continue
        # The slice's rows in the model's score order, without sorting again.
        aucs = weighted_aucs(labels, scores, weights, order[mask[order]])
        row["auc_interval"] = interval(aucs)
        if base_scores is None:
            continue
        row["baseline"] = model_metrics(y, base_scores[mask])
        base_aucs = weighted_aucs(labels, base_scores, weights, base_order[mask[base_order]])
        row["auc_difference"] = row["model"]["auc"] - row["baseline"]["auc"]
        row["auc_difference_interval"] = interval(aucs - base_aucs)
        row["judged"] = True
    return rows


def judge(row: dict[str, Any]) -> str | None:
    """Why a judged slice fails, or None when it passes.

    A slice fails when its AUC is below the baseline's by more than its tolerance and the
    whole 95% interval of the difference is below zero: a drop that large which the
    resampling of a small slice does not explain.
    """
    if not row["judged"] or row["slice"] == "all":
        return None
    diff, span = row["auc_difference"], row["auc_difference_interval"]
    if diff >= -row["tolerance"] or span is None or span[1] >= 0:
        return None
    return (
        f"slice {row['slice']} ({row['rows']:,} rows): AUC {row['model']['auc']:.4f} vs the "
        f"baseline's {row['baseline']['auc']:.4f}, a drop of {-diff:.4f} (95% interval "
        f"{-span[1]:.4f} to {-span[0]:.4f}) beyond its tolerance {row['tolerance']}"
    )


def analyse(
    config: Config,
    data_dir: str | Path,
    examples: Sequence[bytes],
    labels: np.ndarray,
    scores: np.ndarray,
    base_scores: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
) -> dict[str, Any]:
    """Slices and calibration of the model on the eval rows: the numbers, and the problems
    that fail the gate (``problems``)."""
    v = config.validation
    weights = bootstrap_weights(len(labels), v.bootstrap_resamples)
    whole = Slice("", SliceKind.VALUE, "all", np.ones(len(labels), bool), v.auc_tolerance, 1)
    slices = [whole, *make_slices(config, slice_columns(config, examples, data_dir), data_dir)]
    table = slice_table(slices, labels, scores, weights, base_scores, popularity)
    problems = []
    for row in table:
        reason = judge(row)
        row["passed"] = reason is None
        if reason:
            problems.append(reason)
    judged = [r for r in table[1:] if r["judged"]]
    worst = min(judged, key=lambda r: r["auc_difference"], default=None)
    cal = calibration(labels, scores, weights, config)
    base_cal = None
    if base_scores is not None:
        base_cal = calibration(labels, base_scores, weights, config)
        base_cal.pop("problems")
    problems.extend(cal["problems"])
    return {
        "bootstrap_resamples": v.bootstrap_resamples,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "slices": table,
        "worst_slice": None
        if worst is None
        else {"slice": worst["slice"], "auc_difference": worst["auc_difference"]},
        "calibration": cal,
        "baseline_calibration": base_cal,
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------
# Markdown and plot


def format_number(x: float | None, digits: int = 4) -> str:
    """A number with ``digits`` decimals, or "-" for none."""
    return "-" if x is None else f"{x:.{digits}f}"


def _m(row: dict[str, Any], who: str, key: str, digits: int = 4) -> str:
    return format_number((row[who] or {}).get(key), digits)


def markdown(verdict: Any, analysis: dict[str, Any]) -> str:
    """The analysis as a Markdown report (slices table and calibration)."""
    base = verdict.baseline is not None
    lines = [
        f"# Model analysis: {'PASSED' if verdict.passed else 'FAILED'}",
        "",
        f"- model: `{verdict.model}`",
        f"- baseline: `{verdict.baseline}`" if base else "- baseline: none",
        f"- eval rows: {verdict.quality['examples']:,}; 95% intervals from "
        f"{analysis['bootstrap_resamples']} Poisson bootstrap resamples (seed "
        f"{analysis['bootstrap_seed']})",
        "",
        "## Slices",
        "",
    ]
    if base:
        lines += [
            "| slice | rows | label rate | AUC | baseline AUC | AUC change (95% interval) | "
            "log loss | baseline log loss | mean pred / label rate | baseline's | gate |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
    else:
        lines += [
            "| slice | rows | label rate | AUC (95% interval) | popularity AUC | log loss | "
            "mean pred / label rate |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
    for r in analysis["slices"]:
        name = r["slice"].replace("|", "\\|")
        if base:
            span = r["auc_difference_interval"]
            change = (
                "-"
                if r["auc_difference"] is None
                else f"{r['auc_difference']:+.4f} ({span[0]:+.4f} to {span[1]:+.4f})"
            )
            gate = (
                ("pass" if r["passed"] else f"**FAIL** (tolerance {r['tolerance']})")
                if r["judged"]
                else f"not judged (< {r['min_rows']} rows or one class)"
            )
            if r["slice"] == "all":
                gate = f"overall tolerance {r['tolerance']}"
            lines.append(
                f"| {name} | {r['rows']:,} | {format_number(r['label_rate'])} | {_m(r, 'model', 'auc')} | "
                f"{_m(r, 'baseline', 'auc')} | {change} | {_m(r, 'model', 'log_loss')} | "
                f"{_m(r, 'baseline', 'log_loss')} | {_m(r, 'model', 'calibration', 3)} | "
                f"{_m(r, 'baseline', 'calibration', 3)} | {gate} |"
            )
        else:
            span = r["auc_interval"]
            area = _m(r, "model", "auc") + (
                f" ({span[0]:.4f} to {span[1]:.4f})" if span is not None else ""
            )
            lines.append(
                f"| {name} | {r['rows']:,} | {format_number(r['label_rate'])} | {area} | "
                f"{format_number(r['popularity_auc'])} | {_m(r, 'model', 'log_loss')} | "
                f"{_m(r, 'model', 'calibration', 3)} |"
            )
    c = analysis["calibration"]
    lines += [
        "",
        "## Calibration",
        "",
        "| | value | 95% interval | tolerance |",
        "|---|---:|---|---|",
        f"| expected calibration error ({CALIBRATION_BINS} bins of equal rows) | {c['ece']:.4f} "
        f"| {_span(c['ece_interval'])} | at most {c['ece_tolerance']} |",
        f"| mean prediction / label rate | {format_number(c['ratio'], 3)} | {_span(c['ratio_interval'], 3)} "
        f"| 1 ± {c['ratio_tolerance']} |",
    ]
    if analysis["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in analysis["problems"]]
    return "\n".join(lines) + "\n"


def plot(analysis: dict[str, Any], path: str | Path, baseline: bool) -> None:
    """Writes a PNG: each slice's AUC change against the baseline with its 95% interval (the
    model's AUC without a baseline), and the reliability diagram."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows = [r for r in analysis["slices"] if r["auc_interval"] is not None]
    fig = Figure(figsize=(12, max(3.5, 0.3 * len(rows) + 1.5)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    y = np.arange(len(rows))[::-1]
    if baseline:
        mid = np.array([r["auc_difference"] for r in rows], dtype=float)
        span = np.array([r["auc_difference_interval"] for r in rows], dtype=float).reshape(-1, 2)
        colors = ["tab:red" if not r["passed"] else "tab:blue" for r in rows]
        left.axvline(0.0, color="grey", lw=1)
        left.set_xlabel("AUC change against the baseline (95% interval)")
    else:
        mid = np.array([r["model"]["auc"] for r in rows], dtype=float)
        span = np.array([r["auc_interval"] for r in rows], dtype=float).reshape(-1, 2)
        colors = ["tab:blue"] * len(rows)
        left.set_xlabel("AUC (95% interval)")
    if rows:
        left.hlines(y, span[:, 0], span[:, 1], colors=colors)
        left.scatter(mid, y, c=colors, zorder=3)
    left.set_yticks(y, [f"{r['slice'][:40]} ({r['rows']:,})" for r in rows], fontsize=7)
    left.set_title("AUC by slice", fontsize=10)
    right.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    curves = [("model", analysis["calibration"])]
    if analysis.get("baseline_calibration"):
        curves.append(("baseline", analysis["baseline_calibration"]))
    top = 0.0
    for name, cal in curves:
        p = [b["mean_prediction"] for b in cal["bins"]]
        q = [b["label_rate"] for b in cal["bins"]]
        top = max(top, *p, *q)
        right.plot(p, q, marker="o", label=f"{name}: ECE {cal['ece']:.4f}")
    lim = min(1.0, top * 1.1 + 0.01)
    right.set_xlim(0, lim)
    right.set_ylim(0, lim)
    right.set_xlabel("mean prediction (bins of equal rows)")
    right.set_ylabel("label rate")
    right.set_title("Reliability diagram", fontsize=10)
    right.legend(fontsize=8)
    fig.savefig(path, dpi=80)
