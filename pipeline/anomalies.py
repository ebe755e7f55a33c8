"""Data validation: the anomalies of a datagen input's statistics, against a reference.

The reference is the statistics of an earlier input (in ``widedeep run``, the last day that was
accepted). Without one, only the checks that need none run: a column with no value, a label
rate of 0 or 1, too few rows. Thresholds and severities come from the config's
``data_validation`` section; what each kind measures is in :class:`AnomalySeverity`'s fields
(:mod:`transform.config`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.statistics import LABEL
from transform.config import Config, DataValidationConfig, Kind, Severity

COLUMN_MISSING = "column_missing"
COLUMN_RETYPED = "column_retyped"
ALL_MISSING = "all_missing"
MISSING_RATE = "missing_rate"
LABEL_RATE = "label_rate"
TOO_FEW_ROWS = "too_few_rows"
CATEGORICAL_DRIFT = "categorical_drift"
NUMERIC_DRIFT = "numeric_drift"
UNKNOWN_TOKENS = "unknown_tokens"
DRIFT_KINDS = (CATEGORICAL_DRIFT, NUMERIC_DRIFT, UNKNOWN_TOKENS, MISSING_RATE, ALL_MISSING)
"""Kinds whose columns the anomaly plot shows (their distributions moved)."""
_EPSILON = 1e-6


@dataclass(frozen=True)
class Anomaly:
    """One thing wrong with the data.

    Attributes:
      column: The raw column (empty for the whole input, e.g. too few rows).
      features: The features that read the column (empty for the label and the input).
      kind: One of the kinds of :class:`transform.config.AnomalySeverity`.
      severity: ``warn`` or ``block``, from the config.
      description: One line for a person.
      value: What was measured (a rate, a distance), when there is one.
      threshold: The limit it passed.
    """

    column: str
    features: tuple[str, ...]
    kind: str
    severity: Severity
    description: str
    value: float | None = None
    threshold: float | None = None

    @property
    def blocks(self) -> bool:
        return self.severity is Severity.BLOCK

    @property
    def subject(self) -> str:
        """What the anomaly is about, as the day line names it."""
        if not self.column:
            return "the input"
        if self.features and self.features != (self.column,):
            return f"column {self.column!r} (feature {', '.join(self.features)})"
        return f"feature {self.column!r}" if self.features else f"label {self.column!r}"

    def line(self) -> str:
        return f"{self.severity.value.upper()} {self.kind}: {self.description}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        d["features"] = list(self.features)
        return d


def blocking(anomalies: Sequence[Anomaly]) -> list[Anomaly]:
    """The anomalies that stop a day's training."""
    return [a for a in anomalies if a.blocks]


def column_error_anomaly(config: Config, kind: str, column: str, message: str) -> Anomaly:
    """The anomaly of an input whose column is missing or of an unusable type: the input
    cannot be read at all, so it has no statistics, only this."""
    features = tuple(f.name for f in config.features if f.column == column)
    return Anomaly(column, features, kind, getattr(config.data_validation.severity, kind), message)


def find_anomalies(
    config: Config, stats: dict[str, Any], reference: dict[str, Any] | None = None
) -> list[Anomaly]:
    """The anomalies of ``stats`` (a ``statistics.json``), against ``reference`` if given."""
    dv = config.data_validation
    found = _Found(dv)
    rows = stats["rows"]
    if rows < dv.min_rows:
        found.add("", (), TOO_FEW_ROWS, f"{rows:,} rows, fewer than min_rows {dv.min_rows:,}",
                  rows, dv.min_rows)  # fmt: skip
    if reference is not None and rows < dv.min_rows_ratio * reference["rows"]:
        found.add(
            "", (), TOO_FEW_ROWS,
            f"{rows:,} rows, fewer than {dv.min_rows_ratio:.0%} of the reference's "
            f"{reference['rows']:,}", rows / max(reference["rows"], 1), dv.min_rows_ratio,
        )  # fmt: skip
    ref_columns = reference["columns"] if reference is not None else {}
    for column, s in stats["columns"].items():
        features = tuple(s.get("features", ()))
        ref = ref_columns.get(column)
        if ref is not None and ref.get("kind") != s["kind"]:
            ref = None  # the config reads it otherwise now: nothing to compare with
        _check_column(found, column, features, s, ref, rows)
    return found.anomalies


class _Found:
    def __init__(self, dv: DataValidationConfig):
        self.dv = dv
        self.anomalies: list[Anomaly] = []

    def add(
        self,
        column: str,
        features: tuple[str, ...],
        kind: str,
        description: str,
        value: float | None = None,
        threshold: float | None = None,
    ) -> None:
        severity = getattr(self.dv.severity, kind)
        self.anomalies.append(
            Anomaly(column, features, kind, severity, description, value, threshold)
        )

    def threshold(self, key: str, features: tuple[str, ...]) -> float:
        for f in features:
            for override in self.dv.features:
                if override.name == f and getattr(override, key) is not None:
                    return getattr(override, key)
        return getattr(self.dv, key)


def _check_column(
    found: _Found,
    column: str,
    features: tuple[str, ...],
    s: dict[str, Any],
    ref: dict[str, Any] | None,
    rows: int,
) -> None:
    what = f"{column!r}" + (f" (feature {', '.join(features)})" if features != (column,) else "")
    if features == ():
        what = f"label {column!r}"
    if rows > 0 and s["rows"] == 0:
        found.add(column, features, COLUMN_MISSING, f"{what}: not in the input")
        return
    # Statistics of earlier versions typed a boolean column "bool"; booleans are now "int".
    types = tuple(
        None if t is None else t.replace("bool", "int")
        for t in (ref.get("type") if ref is not None else None, s.get("type"))
    )
    if None not in types and "null" not in types and types[0] != types[1]:
        found.add(column, features, COLUMN_RETYPED,
                  f"{what}: holds {s['type']}, the reference {ref['type']}")  # fmt: skip
    kind = s["kind"]
    empty_lists = kind == Kind.CATEGORICAL_LIST.value and s["rows"] and not s.get("values")
    if s["rows"] and (s["missing"] == s["rows"] or empty_lists):
        found.add(column, features, ALL_MISSING,
                  f"{what}: all {s['rows']:,} values are missing", 1.0, None)  # fmt: skip
        return
    if ref is not None and ref.get("missing_rate") is not None and s["missing_rate"] is not None:
        limit = found.threshold("missing_rate_increase", features)
        rise = s["missing_rate"] - ref["missing_rate"]
        if rise > limit:
            found.add(
                column, features, MISSING_RATE,
                f"{what}: {s['missing_rate']:.1%} missing, the reference {ref['missing_rate']:.1%} "
                f"(rise {rise:.1%} > {limit:.1%})", rise, limit,
            )  # fmt: skip
    if kind == LABEL:
        _check_label(found, column, s, ref)
    elif kind == Kind.NUMERIC.value:
        if ref is not None:
            _check_numbers(found, column, features, what, s, ref)
    elif ref is not None:
        _check_tokens(found, column, features, what, s, ref)


def _check_label(found: _Found, column: str, s: dict[str, Any], ref: dict[str, Any] | None):
    rate = s.get("label_rate")
    if rate is None:
        return
    if rate in (0.0, 1.0):
        found.add(column, (), LABEL_RATE,
                  f"label {column!r}: every row is labelled {int(rate)}", rate)  # fmt: skip
        return
    ref_rate = ref.get("label_rate") if ref is not None else None
    if not ref_rate:
        return
    change = found.dv.label_rate_change
    low, high = ref_rate * (1 - change), ref_rate * (1 + change)
    if not low <= rate <= high:
        found.add(
            column, (), LABEL_RATE,
            f"label {column!r}: rate {rate:.4f}, outside {low:.4f} to {high:.4f} (the "
            f"reference's {ref_rate:.4f} +- {change:.0%})", rate, ref_rate,
        )  # fmt: skip


def _check_numbers(
    found: _Found, column: str, features: tuple[str, ...], what: str, s: dict, ref: dict
) -> None:
    if not s.get("percentiles") or not ref.get("percentiles"):
        return
    p, q, _ = numeric_buckets(ref, s)
    divergence = js_divergence(p, q)
    limit = found.threshold("js_divergence", features)
    if divergence > limit:
        found.add(
            column, features, NUMERIC_DRIFT,
            f"{what}: Jensen-Shannon divergence {divergence:.3f} > {limit} over the reference's "
            f"deciles (median {ref['quantiles'][5]:.4g} -> {s['quantiles'][5]:.4g}, "
            f"mean {ref['mean']:.4g} -> {s['mean']:.4g})", divergence, limit,
        )  # fmt: skip


def numeric_buckets(ref: dict[str, Any], s: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """The reference's and the input's shares of the reference's decile buckets, and the
    buckets' upper edges (the last bucket is open)."""
    edges = np.unique(np.asarray(ref["quantiles"][:-1], dtype=float))
    return _bucket_shares(ref["percentiles"], edges), _bucket_shares(s["percentiles"], edges), edges


def _bucket_shares(percentiles: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Shares of the buckets (-inf, e1], (e1, e2], ..., (ek, inf) of a distribution known by
    its percentiles."""
    points = np.asarray(percentiles, dtype=float)
    cdf = (np.searchsorted(points, edges, side="right") - 1) / (points.size - 1)
    cdf = np.clip(cdf, 0.0, 1.0)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions over the same buckets, base 2 (0 to 1)."""
    p = (np.asarray(p, float) + _EPSILON) / (np.sum(p) + _EPSILON * len(p))
    q = (np.asarray(q, float) + _EPSILON) / (np.sum(q) + _EPSILON * len(q))
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


def token_shares(s: dict[str, Any]) -> dict[str, float]:
    """Each kept token's share of a column's values."""
    total = s.get("values") or 0
    return {t: n / total for t, n in s.get("tokens", {}).items()} if total else {}


def linf_distance(ref: dict[str, Any], s: dict[str, Any]) -> tuple[float, str | None]:
    """The L-infinity distance between the token shares of two columns, and its token.

    A token missing from a side's kept tokens has a share of 0 when that side kept all its
    tokens, else at most the smallest kept share: the distance counts only what is certain.
    """
    a, b = token_shares(ref), token_shares(s)
    floor_a = 0.0 if ref.get("tokens_complete", True) else min(a.values(), default=0.0)
    floor_b = 0.0 if s.get("tokens_complete", True) else min(b.values(), default=0.0)
    best, token = 0.0, None
    for t in a.keys() | b.keys():
        if t in a and t in b:
            d = abs(a[t] - b[t])
        elif t in a:
            d = max(0.0, a[t] - floor_b)
        else:
            d = max(0.0, b[t] - floor_a)
        if d > best or (d == best and token is not None and t < token):
            best, token = d, t
    return best, token


def _check_tokens(
    found: _Found, column: str, features: tuple[str, ...], what: str, s: dict, ref: dict
) -> None:
    if not s.get("values") or not ref.get("values"):
        return
    distance, token = linf_distance(ref, s)
    limit = found.threshold("linf_distance", features)
    if distance > limit:
        a, b = token_shares(ref).get(token, 0.0), token_shares(s).get(token, 0.0)
        found.add(
            column, features, CATEGORICAL_DRIFT,
            f"{what}: L-infinity distance {distance:.3f} > {limit} (token {token!r}: "
            f"{a:.1%} of values -> {b:.1%})", distance, limit,
        )  # fmt: skip
    known = ref.get("tokens", {})
    unknown = sum(n for t, n in s.get("tokens", {}).items() if t not in known)
    share = unknown / s["values"]
    limit = found.threshold("unknown_token_share", features)
    if share > limit:
        against = "" if ref.get("tokens_complete", True) else " (its most frequent ones)"
        found.add(
            column, features, UNKNOWN_TOKENS,
            f"{what}: {share:.1%} of values are tokens the reference{against} never saw "
            f"(> {limit:.0%})", share, limit,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Reporting


def report(
    anomalies: Sequence[Anomaly], stats: dict[str, Any], reference: str | None
) -> dict[str, Any]:
    """The content of ``anomalies.json``."""
    return {
        "reference": reference,
        "rows": stats.get("rows") if stats else None,
        "blocking": bool(blocking(anomalies)),
        "anomalies": [a.to_dict() for a in anomalies],
    }


def write_report(path: Path, content: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(content, indent=2) + "\n")


def read_anomalies(content: dict[str, Any]) -> list[Anomaly]:
    """The anomalies of an ``anomalies.json``'s content."""
    return [
        Anomaly(
            column=a["column"],
            features=tuple(a["features"]),
            kind=a["kind"],
            severity=Severity(a["severity"]),
            description=a["description"],
            value=a.get("value"),
            threshold=a.get("threshold"),
        )
        for a in content.get("anomalies", [])
    ]


def format_anomalies(anomalies: Sequence[Anomaly], reference: str | None) -> str:
    """The anomalies as the lines datagen prints."""
    against = f"against {reference}" if reference else "no reference: only the checks needing none"
    if not anomalies:
        return f"  data validation ({against}): no anomalies"
    blocks = len(blocking(anomalies))
    lines = [
        f"  data validation ({against}): {len(anomalies)} anomal"
        f"{'y' if len(anomalies) == 1 else 'ies'}, {blocks} blocking"
    ]
    lines += [f"    {a.line()}" for a in anomalies]
    return "\n".join(lines)


def plot_drift(
    path: Path, stats: dict[str, Any], reference: dict[str, Any], anomalies: Sequence[Anomaly]
) -> bool:
    """Writes a PNG comparing the reference's and the input's distributions of the columns that
    moved; False (and nothing written) when none did."""
    columns = []
    for a in anomalies:
        moved = a.kind in DRIFT_KINDS and a.column and a.column not in columns
        if moved and a.column in reference["columns"] and a.column in stats["columns"]:
            columns.append(a.column)
    columns = columns[:8]
    if not columns:
        return False
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 3.2 * len(columns)), layout="constrained")
    axes = fig.subplots(len(columns), 1, squeeze=False)[:, 0]
    for ax, column in zip(axes, columns, strict=True):
        s, ref = stats["columns"][column], reference["columns"][column]
        if s["kind"] == Kind.NUMERIC.value and s.get("percentiles") and ref.get("percentiles"):
            p, q, edges = numeric_buckets(ref, s)
            labels = [f"<={e:.3g}" for e in edges] + [f">{edges[-1]:.3g}"]
            title = f"{column}: share of values in the reference's decile buckets"
        else:
            a, b = token_shares(ref), token_shares(s)
            top = sorted(a, key=lambda t: -a[t])[:10]
            top += [t for t in sorted(b, key=lambda t: -b[t])[:10] if t not in top]
            p = np.array([a.get(t, 0.0) for t in top])
            q = np.array([b.get(t, 0.0) for t in top])
            labels = [t[:14] for t in top]
            title = f"{column}: share of values of the top tokens"
            if s["kind"] == LABEL or not top:
                p = np.array([ref.get("missing_rate") or 0.0])
                q = np.array([s.get("missing_rate") or 0.0])
                labels, title = ["missing"], f"{column}: share of missing values"
        x = np.arange(len(labels))
        ax.bar(x - 0.2, p, width=0.4, label="reference")
        ax.bar(x + 0.2, q, width=0.4, label="this input")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("share")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    return True
