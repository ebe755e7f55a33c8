"""Statistics of a datagen input: every raw column the config reads, over all rows read.

Computed inside the datagen Beam job, from the raw Arrow batches before missing values are
filled in: each reader step summarises its batches (:func:`batch_statistics`, vectorised over
Arrow and numpy) and :class:`CombineStatistics` merges the partial summaries into the
``statistics.json`` of :mod:`transform.artifacts`. Nothing here knows a column's name: the
config's columns and kinds drive it, whatever types the log gives them (integer or string ids,
integer or float numbers).

Per column: rows, missing values and their rate, and the type the log holds. Categorical
columns: distinct tokens (exact up to :data:`MAX_COUNTED_TOKENS`, then estimated with a
k-minimum-values sketch), the top tokens with their shares, and the counts of the most frequent
:data:`TOKENS_KEPT` tokens (what later inputs are compared with). List columns: the same over
their elements, and their length distribution. Numeric columns: mean, min, max, deciles and
percentiles (exact up to :data:`SAMPLE_SIZE` values, else from a uniform sample of that size).
The label: its rate. Crosses: how many products their rows make and how many of them are
distinct (the same sketch), against the buckets the config hashes them into.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sources import split_joined_lists
from transform.config import MAX_HASH_BUCKETS, Config, Kind

MAX_COUNTED_TOKENS = 200_000
"""Distinct tokens of a column counted exactly; past it only the most frequent half is kept
(their counts stay exact lower bounds) and the distinct count becomes an estimate."""
TOKENS_KEPT = 20_000
"""Most frequent tokens whose counts ``statistics.json`` keeps for later comparisons."""
TOP_TOKENS = 20
"""Top tokens listed with their shares."""
SAMPLE_SIZE = 10_000
"""Values of a numeric column its quantiles are computed from (a uniform sample past it)."""
_KMV_SIZE = 2048
DECILES = np.linspace(0.0, 1.0, 11)
PERCENTILES = np.linspace(0.0, 1.0, 101)
LABEL = "label"
"""The ``kind`` of the label column in the statistics."""


@dataclass
class ColumnAccumulator:
    """What is summed up about one column; mergeable in any order."""

    rows: int = 0
    missing: int = 0
    types: set[str] = field(default_factory=set)
    positives: int = 0
    # Tokens (categorical columns and list elements).
    counts: dict[str, int] = field(default_factory=dict)
    values: int = 0
    truncated: bool = False
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    # List lengths: length -> rows.
    lengths: dict[int, int] = field(default_factory=dict)
    # Numbers.
    total: float = 0.0
    low: float = np.inf
    high: float = -np.inf
    sample_keys: np.ndarray = field(default_factory=lambda: np.empty(0))
    sample: np.ndarray = field(default_factory=lambda: np.empty(0))

    def merge(self, other: ColumnAccumulator) -> None:
        self.rows += other.rows
        self.missing += other.missing
        self.types |= other.types
        self.positives += other.positives
        if other.counts:
            counts = self.counts
            for token, n in other.counts.items():
                counts[token] = counts.get(token, 0) + n
            self.truncated |= other.truncated
            if len(counts) > MAX_COUNTED_TOKENS:
                keep = sorted(counts.items(), key=lambda kv: -kv[1])[: MAX_COUNTED_TOKENS // 2]
                self.counts = dict(keep)
                self.truncated = True
        self.values += other.values
        if other.hashes.size:
            self.hashes = _smallest_distinct(np.concatenate([self.hashes, other.hashes]))
        for length, n in other.lengths.items():
            self.lengths[length] = self.lengths.get(length, 0) + n
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        if other.sample.size:
            keys = np.concatenate([self.sample_keys, other.sample_keys])
            sample = np.concatenate([self.sample, other.sample])
            if keys.size > SAMPLE_SIZE:
                keep = np.argpartition(keys, SAMPLE_SIZE)[:SAMPLE_SIZE]
                keys, sample = keys[keep], sample[keep]
            self.sample_keys, self.sample = keys, sample


Accumulator = dict[str | tuple[str, str], ColumnAccumulator]
"""Column name -> its accumulator; ``("cross", name)`` -> a cross's (``values`` its products,
``hashes`` their sketch): a tuple key, so no column name can take a cross's place."""


def columns(config: Config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each raw column the config reads: its kind (a feature kind, or ``label``) and the
    features that read it."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {config.label: (LABEL, ())}
    for f in config.features:
        kind, names = out.get(f.column, (f.kind.value, ()))
        out[f.column] = (kind, (*names, f.name))
    return out


def log_type(arrow_type: pa.DataType) -> str:
    """How the log types a column: ``int`` (booleans too), ``float`` (decimals too),
    ``string``, or ``list<...>`` of one of them."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list<{log_type(arrow_type.value_type)}>"
    # Booleans are read, served and logged as the integers 0 and 1.
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return "int"
    # A decimal column is read as floats, and served and logged as floats: a request log
    # compared with it must not see a change of type.
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    if pa.types.is_null(arrow_type):
        return "null"
    return "string"


def batch_statistics(
    config: Config, batch: pa.RecordBatch, *, decoded: bool = False
) -> Accumulator:
    """The statistics of one raw batch.

    ``decoded``: the batch is decoded tf.Examples in the TFXIO layout (every column a list;
    an empty list is a missing scalar), else a batch as the log holds it.
    """
    out: Accumulator = {}
    if decoded:
        batch = split_joined_lists(config, batch)
    for column, (kind, _) in columns(config).items():
        arr = _column(batch, column)
        if arr is None:
            continue
        acc = ColumnAccumulator(rows=len(arr))
        if decoded and kind != Kind.CATEGORICAL_LIST.value:
            # One value per record: an empty list is a missing value.
            lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
            present = lengths > 0
            acc.missing = int((~present).sum())
            first = pc.list_element(arr.filter(pa.array(present)), 0) if present.any() else None
            values = first if first is not None else pa.array([], arr.type.value_type)
            acc.types.add(log_type(arr.type.value_type))
        else:
            acc.types.add(log_type(arr.type))
            acc.missing = arr.null_count
            values = arr.drop_null() if arr.null_count else arr
        if kind == LABEL:
            # Counted as ones whatever the log's type (a float label may hold a NaN, which
            # reading the log refuses with its own error).
            acc.positives = int(pc.sum(pc.equal(values.cast(pa.float64()), 1.0)).as_py() or 0)
        elif kind == Kind.NUMERIC.value:
            _add_numbers(acc, values)
        elif kind == Kind.CATEGORICAL_LIST.value:
            if decoded:
                lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
                acc.missing = 0  # a tf.Example without the list holds an empty one
            else:
                lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            uniq, n = np.unique(lengths, return_counts=True)
            acc.lengths = {int(k): int(v) for k, v in zip(uniq, n, strict=True)}
            _add_tokens(acc, pc.list_flatten(arr))
        else:
            _add_tokens(acc, values)
        out[column] = acc
    for cross in config.crosses:
        arrays = [_column(batch, config.feature(name).column) for name in cross.features]
        if any(a is None for a in arrays):
            continue
        products = _product_hashes(arrays, batch.num_rows)
        out[_cross_key(cross.name)] = ColumnAccumulator(
            rows=batch.num_rows,
            values=int(products.size),
            hashes=_smallest_distinct(products),
        )
    return out


def _smallest_distinct(hashes: np.ndarray) -> np.ndarray:
    """The sketch of a set of hashes: its :data:`_KMV_SIZE` smallest distinct values (a sort:
    numpy's hash-based unique is ten times slower on millions of 64-bit values)."""
    s = np.sort(hashes)
    if s.size:
        s = s[np.concatenate([[True], s[1:] != s[:-1]])]
    return s[:_KMV_SIZE]


def _cross_key(name: str) -> tuple[str, str]:
    return ("cross", name)


def _column(batch: pa.RecordBatch, column: str) -> pa.Array | None:
    index = batch.schema.get_field_index(column)
    if index < 0:
        return None
    arr = batch.column(index)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _token_hashes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The row of each present value of a column (a list's elements each) and the 64-bit
    hash of its token text (so an id is one token whether the log holds it as 5 or "5")."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        rows = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(arr)
    else:
        rows, values = np.arange(len(arr)), arr
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if values.null_count:
        present = values.is_valid()
        rows = rows[present.to_numpy(zero_copy_only=False)]
        values = values.filter(present)
    encoded = pc.dictionary_encode(values)
    hashes = pd.util.hash_array(_token_texts(encoded.dictionary)).astype(np.uint64)
    return rows.astype(np.int64), hashes[encoded.indices.to_numpy(zero_copy_only=False)]


def _token_texts(tokens: pa.Array) -> np.ndarray:
    """Tokens as the text :func:`_token` makes of them, vectorised (a batch's distinct values
    of a crossed column: a Python loop over them cost more than the rest of the statistics)."""
    if pa.types.is_boolean(tokens.type):
        tokens = tokens.cast(pa.int8())
    if pa.types.is_binary(tokens.type) or pa.types.is_large_binary(tokens.type):
        return np.array([_token(t) for t in tokens.to_pylist()], dtype=object)
    if not (pa.types.is_string(tokens.type) or pa.types.is_large_string(tokens.type)):
        tokens = tokens.cast(pa.string())
    return tokens.to_numpy(zero_copy_only=False).astype(object)


def _product_hashes(arrays: list[pa.Array], num_rows: int) -> np.ndarray:
    """The hash of every product of a cross: per row, one per combination of its inputs'
    values (a list crossed with a scalar: one per element), as the cross op makes them."""
    rows, hashes = _token_hashes(arrays[0])
    for arr in arrays[1:]:
        other_rows, other = _token_hashes(arr)
        per_row = np.bincount(other_rows, minlength=num_rows)
        first = np.cumsum(per_row) - per_row
        # Each value so far is repeated once per value of the next input in its row.
        repeat = per_row[rows]
        out_rows = np.repeat(rows, repeat)
        run_start = np.repeat(np.cumsum(repeat) - repeat, repeat)
        partner = first[out_rows] + (np.arange(out_rows.size) - run_start)
        hashes = _mix(np.repeat(hashes, repeat) * np.uint64(0x9E3779B97F4A7C15) + other[partner])
        rows = out_rows
    return hashes


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: products' hashes as uniform as their tokens' (the sketch needs
    uniform hashes); arithmetic wraps modulo 2**64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _add_numbers(acc: ColumnAccumulator, values: pa.Array) -> None:
    x = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    nan = np.isnan(x)
    if nan.any():  # a NaN is a missing number
        acc.missing += int(nan.sum())
        x = x[~nan]
    if not x.size:
        return
    acc.total = float(x.sum())
    acc.low, acc.high = float(x.min()), float(x.max())
    # Random keys seeded by the values: the same input gives the same sample on any runner.
    keys = np.random.default_rng(zlib.crc32(x.tobytes())).random(x.size)
    if x.size > SAMPLE_SIZE:
        keep = np.argpartition(keys, SAMPLE_SIZE)[:SAMPLE_SIZE]
        keys, x = keys[keep], x[keep]
    acc.sample_keys, acc.sample = keys, x


def _add_tokens(acc: ColumnAccumulator, values: pa.Array) -> None:
    if values.null_count:
        values = values.drop_null()
    if not len(values):
        return
    counted = pc.value_counts(values)
    tokens = [_token(t) for t in counted.field("values").to_pylist()]
    counts = counted.field("counts").to_pylist()
    acc.counts = dict(zip(tokens, counts, strict=True))
    acc.values = len(values)
    hashes = pd.util.hash_array(np.array(tokens, dtype=object)).astype(np.uint64)
    acc.hashes = _smallest_distinct(hashes)


def _token(value: Any) -> str:
    # Tokens are compared as text: an id the log held as 5 one day and "5" the next is one
    # token (the model reads string ids stored as integers as their decimal text too), and a
    # boolean is the 0 or 1 the model reads and a request sends.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


class CombineStatistics(beam.CombineFn):
    """Merges partial statistics into the JSON text of ``statistics.json``."""

    def __init__(self, config: Config):
        self._config = config

    def create_accumulator(self) -> Accumulator:
        return {}

    def add_input(self, acc: Accumulator, partial: Accumulator) -> Accumulator:
        return merge(acc, partial)

    def merge_accumulators(self, accs: Any) -> Accumulator:
        out: Accumulator = {}
        for acc in accs:
            out = merge(out, acc)
        return out

    def extract_output(self, acc: Accumulator) -> str:
        return json.dumps(finalize(self._config, acc), indent=1)


def merge(acc: Accumulator, partial: Accumulator) -> Accumulator:
    """Adds ``partial`` into ``acc`` (modified) and returns it."""
    for column, part in partial.items():
        if column in acc:
            acc[column].merge(part)
        else:
            acc[column] = part
    return acc


def finalize(config: Config, acc: Accumulator) -> dict[str, Any]:
    """The statistics as plain data (the layout of ``statistics.json``)."""
    out: dict[str, Any] = {}
    rows = 0
    label_rate = None
    for column, (kind, features) in columns(config).items():
        a = acc.get(column, ColumnAccumulator())
        rows = max(rows, a.rows)
        present = a.rows - a.missing
        s: dict[str, Any] = {
            "kind": kind,
            "features": list(features),
            "type": "/".join(sorted(a.types)) or None,
            "rows": a.rows,
            "missing": a.missing,
            "missing_rate": a.missing / a.rows if a.rows else None,
        }
        if kind == LABEL:
            s["positives"] = a.positives
            label_rate = s["label_rate"] = a.positives / present if present else None
        elif kind == Kind.NUMERIC.value:
            s.update(_number_stats(a))
        else:
            if kind == Kind.CATEGORICAL_LIST.value:
                s["length"] = _length_stats(a.lengths)
            s.update(_token_stats(a))
        out[column] = s
    crosses = {}
    for cross in config.crosses:
        a = acc.get(_cross_key(cross.name))
        if a is None:
            continue
        distinct = _kmv_estimate(a.hashes, 0)
        crosses[cross.name] = {
            "features": list(cross.features),
            "hash_buckets": cross.hash_buckets,
            "products": a.values,
            "distinct": distinct,
            "distinct_exact": a.hashes.size < _KMV_SIZE,
            "per_bucket": distinct / cross.hash_buckets,
        }
    return {
        "rows": rows,
        "label": config.label,
        "label_rate": label_rate,
        "columns": out,
        "crosses": crosses,
    }


def _number_stats(a: ColumnAccumulator) -> dict[str, Any]:
    n = a.rows - a.missing
    if n == 0 or not a.sample.size:
        return {"mean": None, "min": None, "max": None, "quantiles": None, "percentiles": None}
    sample = np.sort(a.sample)
    exact = sample.size == n
    deciles = np.quantile(sample, DECILES)
    percentiles = np.quantile(sample, PERCENTILES)
    # The ends are the true minimum and maximum, also when the quantiles come from a sample.
    for q in (deciles, percentiles):
        q[0], q[-1] = a.low, a.high
    return {
        "mean": a.total / n,
        "min": a.low,
        "max": a.high,
        "quantiles": [float(v) for v in deciles],
        "percentiles": [float(v) for v in percentiles],
        "quantiles_exact": exact,
    }


def _length_stats(lengths: dict[int, int]) -> dict[str, Any]:
    if not lengths:
        return {"mean": None, "min": None, "max": None, "quantiles": None}
    keys = np.array(sorted(lengths))
    counts = np.array([lengths[k] for k in keys])
    all_lengths = np.repeat(keys, counts)
    return {
        "mean": float(all_lengths.mean()),
        "min": int(keys[0]),
        "max": int(keys[-1]),
        "quantiles": [float(v) for v in np.quantile(all_lengths, DECILES)],
    }


def _token_stats(a: ColumnAccumulator) -> dict[str, Any]:
    ranked = sorted(a.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if a.truncated:
        distinct, exact = _kmv_estimate(a.hashes, len(a.counts)), False
    else:
        distinct, exact = len(a.counts), True
    total = a.values
    return {
        "values": total,
        "distinct": distinct,
        "distinct_exact": exact,
        "top_tokens": [[t, n / total] for t, n in ranked[:TOP_TOKENS]],
        "tokens": dict(ranked[:TOKENS_KEPT]),
        "tokens_complete": exact and len(ranked) <= TOKENS_KEPT,
    }


def _kmv_estimate(hashes: np.ndarray, at_least: int) -> int:
    """Distinct values from the k smallest of their 64-bit hashes (k-minimum values)."""
    if hashes.size < _KMV_SIZE:
        return max(at_least, int(hashes.size))
    kth = float(hashes[_KMV_SIZE - 1]) / 2.0**64
    return max(at_least, round((_KMV_SIZE - 1) / kth))


def format_statistics(stats: dict[str, Any], limit: int = 3) -> list[str]:
    """A few lines of the statistics for the datagen summary."""
    lines = ["  statistics (statistics.json):"]
    for column, s in stats["columns"].items():
        missing = f"{s['missing_rate']:.1%} missing" if s["missing_rate"] else "none missing"
        if s["kind"] == LABEL:
            rate = "n/a" if s["label_rate"] is None else f"{s['label_rate']:.4f}"
            detail = f"label rate {rate}"
        elif s["kind"] == Kind.NUMERIC.value:
            detail = (
                "no values"
                if s["mean"] is None
                else f"mean {s['mean']:.4g}, min {s['min']:.4g}, "
                f"median {s['quantiles'][5]:.4g}, max {s['max']:.4g}"
            )
        else:
            top = ", ".join(f"{t} {share:.0%}" for t, share in s["top_tokens"][:limit])
            about = "" if s["distinct_exact"] else "~"
            detail = f"{about}{s['distinct']:,} distinct; top {top or '-'}"
            if s["kind"] == Kind.CATEGORICAL_LIST.value and s["length"]["mean"] is not None:
                detail = f"length mean {s['length']['mean']:.2f}, " + detail
        lines.append(f"    {column:<24} {s['type'] or '-':<12} {missing:<14} {detail}")
    for name, c in stats.get("crosses", {}).items():
        lines.append(f"    {name:<24} {'cross':<12} {'':<14} {cross_detail(c)}")
    return lines


def cross_detail(c: dict[str, Any]) -> str:
    """A cross's products against its buckets, and what to do when most share a bucket.

    Products hashed into one bucket share one weight of the wide tower: past one product per
    bucket, most weights mix products that have nothing in common, and a product never seen
    in training lands on weights learned for others.
    """
    about = "" if c["distinct_exact"] else "~"
    detail = (
        f"{about}{c['distinct']:,} distinct products in {c['hash_buckets']:,} hash buckets "
        f"({c['per_bucket']:.2g} per bucket)"
    )
    if c["per_bucket"] > 1:
        detail += (
            f": most products share a weight with others; hash_buckets of at least "
            f"{suggested_buckets(c['distinct']):,} keeps most apart"
        )
    return detail


def suggested_buckets(distinct: int) -> int:
    """Twice the distinct products, rounded up to two significant digits: about 60% of the
    products then have a bucket to themselves (a share of 1 - exp(-0.5) shares one)."""
    want = min(2 * distinct, MAX_HASH_BUCKETS)
    step = 10 ** max(0, len(str(want)) - 2)
    return -(-want // step) * step
