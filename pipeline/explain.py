"""What a model learned, and why it scored a query's candidates as it did (``widedeep explain``).

- **The wide tower's largest weights** (by absolute value), each mapped back to the raw value
  it stands for: a vocabulary id to its token, a numeric feature's quantile bucket to its range
  of values (the boundaries data generation computed), a hashed cross id to the raw value
  tuples that produce it. Hashing cannot be undone, so the crosses are found by one pass over
  the raw log (:func:`map_crosses`): each row's cross products are hashed with the very
  ``tf.sparse.cross_hashed`` inputs the transform graph hashes
  (:func:`transform.features.cross_inputs`) and, for the buckets of interest, spelled out by
  ``tf.sparse.cross``; it also counts how many distinct tuples share each bucket (collisions).
- **The deep tower's neighbours** of a token: the tokens whose embeddings are closest by cosine.
- **One query's candidates**, each score split into the bias, the wide tower's and the deep
  tower's log-odds (they sum to the served logit), with the wide weights that fired: the
  SavedModel's ``explain`` signature, called in process or through a model server's gRPC API.

Everything is read from the model folder (or the SavedModel itself): its config, model spec,
vocabularies and weights; the raw log and the quantile boundaries from the datagen output its
metrics name, unless given.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transform import artifacts
from transform.config import Config, Cross, DType, Kind, load_config
from transform.errors import ArtifactError, UsageError

DEFAULT_TOP = 20
"""Wide weights shown."""
DEFAULT_SAMPLE_ROWS = 1_000_000
"""Rows of the raw log the cross pass reads at most (a day of 1M rows in well under a minute)."""
DEFAULT_TUPLES = 3
"""Raw value tuples shown for each cross bucket, most frequent first."""
DEFAULT_NEIGHBOURS = 10
UNKNOWN_TOKEN = "<unknown>"
"""What an out-of-vocabulary id stands for: every token seen too rarely, or never."""
CROSS_SEPARATOR = "\x1f"
"""Joins a product's values in ``tf.sparse.cross`` (the ASCII unit separator: not in ids)."""
_BATCH_ROWS = 100_000


class ExplainError(UsageError):
    """What ``widedeep explain`` was given cannot be explained; the message says why."""


# --------------------------------------------------------------------------------------------
# The model, as explain reads it


@dataclass
class LoadedModel:
    """A trained model's parts, read from its folder (or its SavedModel alone)."""

    path: Path
    export: Path
    config: Config
    spec: Any  # trainer.spec.ModelSpec
    wide: dict[str, np.ndarray]
    """Each wide input's weights, one per id."""
    embeddings: dict[str, np.ndarray]
    """Each deep embedding table (one per vocabulary), one row per id."""
    bias: float
    vocabularies: dict[str, list[str]]
    boundaries: dict[str, list[float]]
    data_dir: Path | None
    summary: dict[str, Any] | None

    def token(self, vocabulary: str, index: int) -> str:
        """The token of a vocabulary id (:data:`UNKNOWN_TOKEN` for the out-of-vocabulary id)."""
        tokens = self.vocabularies[vocabulary]
        return tokens[index] if 0 <= index < len(tokens) else UNKNOWN_TOKEN


def load_model(model_dir: str | Path, data_dir: str | Path | None = None) -> LoadedModel:
    """Reads a model folder written by ``widedeep train`` (or the SavedModel in it).

    Args:
      model_dir: The model folder, or an exported SavedModel (a served version folder).
      data_dir: The datagen output the model was trained on (default: the one its metrics
        name), for the quantile boundaries and the raw log.

    Raises:
      ArtifactError: there is no SavedModel, or it lacks the config or model spec.
    """
    import tensorflow as tf

    from trainer.export import read_exported_weights
    from trainer.model import WideDeepModel
    from trainer.spec import ModelSpec

    path = Path(model_dir)
    if not path.exists():
        raise ArtifactError(f"--model {path}: no such folder")
    export = artifacts.export_dir(path)
    extra = export / artifacts.WARMUP_DIR

    def find(name: str) -> Path:
        for candidate in (path / name, extra / name):
            if candidate.exists():
                return candidate
        raise ArtifactError(f"--model {path}: no {name} beside the model or in {extra}")

    config = load_config(find(artifacts.CONFIG_YAML))
    spec = ModelSpec.load(find(artifacts.MODEL_SPEC_FILE))
    # The exported weights, in the order the model creates its variables (export saves
    # model.variables as they are): build the model to know which is which.
    model = WideDeepModel(spec)
    try:
        values = read_exported_weights(export)
    except (tf.errors.OpError, ValueError) as e:
        raise ArtifactError(f"{export}: cannot read its weights ({e})") from None
    if len(values) != len(model.variables):
        raise ArtifactError(
            f"{export}: {len(values)} weights, the model spec says {len(model.variables)}"
        )
    for variable, value in zip(model.variables, values, strict=True):
        if tuple(value.shape) != tuple(variable.shape):
            raise ArtifactError(
                f"{export}: weight {variable.name} has shape {value.shape}, the model spec says "
                f"{tuple(variable.shape)}"
            )
    by_id = {id(v): x for v, x in zip(model.variables, values, strict=True)}
    wide = (
        {name: by_id[id(t)].reshape(-1) for name, t in model.wide.tables.items()}
        if model.wide is not None
        else {}
    )
    embeddings = (
        {name: by_id[id(t)] for name, t in model.deep.embeddings.items()}
        if model.deep is not None
        else {}
    )
    bias = float(by_id[id(model.bias)].reshape(-1)[0])
    vocabularies = {}
    for vocab in config.vocabularies:
        for candidate in (
            path / artifacts.VOCABULARIES_DIR / vocab,
            export / tf.saved_model.ASSETS_DIRECTORY / vocab,
        ):
            if candidate.exists():
                tokens = artifacts.read_vocabulary(candidate)
                vocabularies[vocab] = [t.decode("utf-8", "replace") for t in tokens]
                break
        else:
            raise ArtifactError(f"--model {path}: no copy of the vocabulary {vocab!r}")
    if data_dir is None:
        metrics = artifacts.read_json(path / artifacts.METRICS_FILE) or artifacts.read_json(
            extra / artifacts.METRICS_FILE
        )
        recorded = (metrics or {}).get("data_dir")
        data_dir = Path(recorded) if recorded and Path(recorded).is_dir() else None
    else:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ArtifactError(f"--data {data_dir}: no such folder")
    summary = artifacts.read_summary(data_dir) if data_dir is not None else None
    boundaries = {
        name: list(b) for name, b in artifacts.quantile_boundaries(summary or {}).items() if b
    }
    return LoadedModel(
        path, export, config, spec, wide, embeddings, bias, vocabularies, boundaries,
        data_dir, summary,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The wide tower's weights


@dataclass
class CrossTuple:
    """One tuple of raw values that hashes into a cross bucket, and how often it occurred."""

    values: tuple[str, ...]
    count: int
    positives: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {"values": list(self.values), "count": self.count, "positives": self.positives}


@dataclass
class WideWeight:
    """One weight of the wide tower and the raw value it stands for."""

    feature: str
    role: str
    index: int
    weight: float
    value: str
    """The raw value, as text: a token, a range, or a cross's most frequent tuple."""
    fields: tuple[str, ...] = ()
    """A cross's features, in the order of its tuples' values."""
    tuples: list[CrossTuple] = field(default_factory=list)
    """A cross bucket's most frequent raw tuples in the log read (empty: none seen)."""
    distinct: int = 0
    """A cross bucket's distinct tuples in the log read (above 1: a hash collision)."""
    occurrences: int = 0
    """A cross bucket's occurrences in the log read."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        out: dict[str, Any] = {
            "feature": self.feature,
            "kind": self.role,
            "id": self.index,
            "weight": self.weight,
            "value": self.value,
        }
        if self.role == "cross":
            out.update(
                features=list(self.fields),
                tuples=[t.to_dict() for t in self.tuples],
                distinct_tuples=self.distinct,
                occurrences=self.occurrences,
            )
        return out


def top_wide_weights(model: LoadedModel, top: int) -> list[tuple[str, int, float]]:
    """The ``top`` wide weights by absolute value, largest first: (input, id, weight)."""
    if not model.wide:
        return []
    names = list(model.wide)
    sizes = [len(model.wide[n]) for n in names]
    flat = np.concatenate([model.wide[n] for n in names])
    k = min(top, len(flat))
    if k <= 0:
        return []
    best = np.argpartition(-np.abs(flat), k - 1)[:k]
    best = best[np.lexsort((best, -np.abs(flat[best])))]
    starts = np.cumsum([0, *sizes])
    out = []
    for i in best:
        which = int(np.searchsorted(starts, i, side="right") - 1)
        out.append((names[which], int(i - starts[which]), float(flat[i])))
    return out


def bucket_range(boundaries: Sequence[float] | None, bucket: int, quantiles: int) -> str:
    """The values a numeric feature's quantile bucket holds, as text (``[lo, hi)``).

    Bucket i holds the values from boundary i - 1 (included) to boundary i (excluded), as
    ``tft.apply_buckets`` assigns them; without boundaries, only its position is known.
    """
    if not boundaries:
        return f"quantile {bucket + 1} of {quantiles}"
    lo = f"{boundaries[bucket - 1]:.6g}" if bucket >= 1 else "-inf"
    hi = f"{boundaries[bucket]:.6g}" if bucket < len(boundaries) else "+inf"
    return f"[{lo}, {hi})"


def describe_wide(
    model: LoadedModel, name: str, index: int, weight: float, cross_tuples: Mapping[str, Any]
) -> WideWeight:
    """A wide weight with the raw value it stands for."""
    from trainer.spec import Role

    spec = model.spec.input(name)
    if spec.role is Role.CROSS:
        cross = _cross(model.config, name)
        found = cross_tuples.get(name, {}).get(index)
        tuples, distinct, occurrences = found if found else ([], 0, 0)
        value = (
            " & ".join(f"{f}={v}" for f, v in zip(cross.features, tuples[0].values, strict=True))
            if tuples
            else "(not seen in the log read)"
        )
        return WideWeight(
            name, spec.role.value, index, weight, value, tuple(cross.features), tuples,
            distinct, occurrences,
        )  # fmt: skip
    if spec.role is Role.NUMERIC:
        value = bucket_range(model.boundaries.get(name), index, spec.size)
        return WideWeight(name, spec.role.value, index, weight, value)
    return WideWeight(name, spec.role.value, index, weight, model.token(spec.vocabulary, index))


def _cross(config: Config, name: str) -> Cross:
    return next(c for c in config.crosses if c.name == name)


# --------------------------------------------------------------------------------------------
# The pass over the raw log that maps hashed cross ids back to raw values


@dataclass
class CrossStats:
    """What the pass saw of one cross."""

    rows_read: int = 0
    pairs: int = 0
    """Cross products (one per combination of a row's values)."""
    buckets_used: int = 0
    distinct_tuples: int = 0
    colliding_buckets: int = 0
    """Buckets that more than one distinct tuple hashes into."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        share = self.colliding_buckets / self.buckets_used if self.buckets_used else 0.0
        return {
            "rows_read": self.rows_read,
            "pairs": self.pairs,
            "buckets_used": self.buckets_used,
            "distinct_tuples": self.distinct_tuples,
            "colliding_buckets": self.colliding_buckets,
            "colliding_share": share,
        }


def raw_batches(
    config: Config,
    columns: Sequence[str],
    input_patterns: str | Sequence[str],
    int_columns: Sequence[str] = (),
    max_rows: int | None = None,
    batch_rows: int = _BATCH_ROWS,
) -> Iterator[dict[str, Any]]:
    """The raw log's ``columns`` in batches of tensors, typed as the transform graph takes them
    (a list column a SparseTensor, others a vector), up to ``max_rows`` rows."""
    import tensorflow as tf

    from pipeline import sources
    from transform.features import raw_feature_spec, split_joined_lists

    files = sources.resolve_input(input_patterns)
    left = max_rows if max_rows is not None else math.inf
    if files.format is sources.InputFormat.TFRECORD:
        # Missing values take their defaults, as data generation fills them in.
        for path in files.paths:
            # A label of 0.0 and 1.0 is parsed as the file holds it, then cast.
            float_label = config.label in columns and sources.tfrecord_types(config, path)[1]
            full = raw_feature_spec(
                config, with_defaults=True, int_columns=int_columns, float_label=float_label
            )
            file_spec = {c: full[c] for c in columns}
            compression = "GZIP" if path.endswith((".gz", ".gzip")) else ""
            records = tf.data.TFRecordDataset(path, compression_type=compression)
            for batch in records.batch(batch_rows):
                if left <= 0:
                    return
                batch = batch[: int(min(left, batch_rows))]
                left -= int(batch.shape[0])
                # Lists as data generation read them: joined values split.
                parsed = split_joined_lists(config, tf.io.parse_example(batch, file_spec))
                if float_label:
                    parsed[config.label] = tf.cast(parsed[config.label], tf.int64)
                yield parsed
        return
    plan = sources.column_plan(config)
    for path in files.paths:
        if files.format is sources.InputFormat.PARQUET:
            batches = sources.iter_parquet(config, path, batch_rows, columns=columns)
        else:
            batches = sources.iter_csv(config, path, batch_rows, int_columns, columns=columns)
        for batch in batches:
            if left <= 0:
                return
            if batch.num_rows > left:
                batch = batch.slice(0, int(left))
            left -= batch.num_rows
            batch = sources.to_tfxio_batch(config, batch, path, int_columns, columns=columns)
            out = {}
            for column in columns:
                arr = batch.column(batch.schema.get_field_index(column))
                values = arr.flatten().to_numpy(zero_copy_only=False)
                feature = plan.get(column)
                if feature is not None and feature.kind is Kind.CATEGORICAL_LIST:
                    splits = (arr.offsets.to_numpy() - arr.offsets[0].as_py()).astype(np.int64)
                    flat = tf.constant(values, dtype=tf.string if values.dtype == object else None)
                    out[column] = tf.RaggedTensor.from_row_splits(
                        flat, splits, validate=False
                    ).to_sparse()
                    continue
                if values.dtype == object:
                    # Strings (an empty batch would otherwise have no type to go by).
                    out[column] = tf.constant(values, dtype=tf.string)
                else:
                    out[column] = tf.constant(values)
            yield out


def map_crosses(
    config: Config,
    wanted: Mapping[str, Sequence[int]],
    input_patterns: str | Sequence[str],
    *,
    int_columns: Sequence[str] = (),
    max_rows: int | None = DEFAULT_SAMPLE_ROWS,
    tuples: int = DEFAULT_TUPLES,
) -> tuple[dict[str, dict[int, tuple[list[CrossTuple], int, int]]], dict[str, CrossStats]]:
    """The raw tuples behind hashed cross ids, found by one pass over the raw log.

    Args:
      config: The config the model was trained with.
      wanted: Cross name -> the ids to map back.
      input_patterns: The raw log (what ``widedeep datagen --input`` takes).
      int_columns: Columns the log holds as integers (the datagen summary's ``int_columns``).
      max_rows: Rows read at most (the first ones); None reads the whole log.
      tuples: Tuples kept per id, most frequent first.

    Returns:
      (cross -> id -> (its most frequent tuples, distinct tuples, occurrences), cross -> what
      the pass saw of it).
    """
    import tensorflow as tf

    from transform.features import as_config_types, cross_inputs, cross_value_order

    crosses = [c for c in config.crosses if c.name in wanted]
    if not crosses:
        return {}, {}
    columns = list(dict.fromkeys([config.feature(n).column for c in crosses for n in c.features]))
    columns_with_label = [*columns, config.label]
    wanted_ids = {c.name: np.asarray(sorted(set(wanted[c.name])), np.int64) for c in crosses}
    stats = {c.name: CrossStats() for c in crosses}
    # Per cross: the fingerprints of the distinct tuples seen (and their buckets), and counts of
    # (bucket, tuple text) for the wanted buckets only.
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {
        c.name: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for c in crosses
    }
    counts: dict[str, dict[tuple[int, bytes], list[int]]] = {c.name: {} for c in crosses}
    order: dict[str, list[int]] = {}
    for raw in raw_batches(config, columns_with_label, input_patterns, int_columns, max_rows):
        labels = raw.pop(config.label).numpy().reshape(-1)
        inputs = as_config_types(config, raw)
        for cross in crosses:
            parts = cross_inputs(config, cross, inputs)
            ids = tf.sparse.cross_hashed(parts, num_buckets=cross.hash_buckets)
            # Unbucketed hashes tell distinct tuples apart (63 bits: collisions negligible).
            prints = tf.sparse.cross_hashed(parts, num_buckets=0).values.numpy()
            buckets = ids.values.numpy()
            s = stats[cross.name]
            s.rows_read += int(labels.shape[0])
            s.pairs += int(buckets.shape[0])
            known_prints, known_buckets = seen[cross.name]
            merged_prints, first = np.unique(
                np.concatenate([known_prints, prints]), return_index=True
            )
            seen[cross.name] = (merged_prints, np.concatenate([known_buckets, buckets])[first])
            keep = np.isin(buckets, wanted_ids[cross.name])
            if not keep.any():
                continue
            order[cross.name] = cross_value_order(parts)
            texts = tf.sparse.cross(parts, separator=CROSS_SEPARATOR).values.numpy()[keep]
            rows = ids.indices.numpy()[keep, 0]
            table = counts[cross.name]
            for bucket, text, label in zip(buckets[keep], texts, labels[rows], strict=True):
                entry = table.setdefault((int(bucket), bytes(text)), [0, 0])
                entry[0] += 1
                entry[1] += int(label)
    found: dict[str, dict[int, tuple[list[CrossTuple], int, int]]] = {}
    for cross in crosses:
        s = stats[cross.name]
        prints, buckets = seen[cross.name]
        per_bucket = np.bincount(buckets, minlength=cross.hash_buckets) if buckets.size else None
        s.distinct_tuples = int(prints.size)
        s.buckets_used = int(np.count_nonzero(per_bucket)) if per_bucket is not None else 0
        s.colliding_buckets = int((per_bucket > 1).sum()) if per_bucket is not None else 0
        by_bucket: dict[int, list[CrossTuple]] = {}
        for (bucket, text), (count, positives) in counts[cross.name].items():
            values = _in_config_order(
                [v.decode("utf-8", "replace") for v in text.split(CROSS_SEPARATOR.encode())],
                order[cross.name],
            )
            by_bucket.setdefault(bucket, []).append(CrossTuple(values, count, positives))
        found[cross.name] = {}
        for bucket, items in by_bucket.items():
            items.sort(key=lambda t: (-t.count, t.values))
            found[cross.name][bucket] = (
                items[:tuples],
                len(items),
                sum(t.count for t in items),
            )
    return found, stats


def _in_config_order(values: Sequence[str], order: Sequence[int]) -> tuple[str, ...]:
    """A product's values (in the cross ops' order, see ``cross_value_order``) in the order
    the config lists the cross's features."""
    out = [""] * len(order)
    for value, position in zip(values, order, strict=True):
        out[position] = value
    return tuple(out)


def log_of(model: LoadedModel, input_patterns: str | None) -> tuple[list[str] | str, list[str]]:
    """The raw log to read (given, or the datagen input the model's data recorded) and the
    columns it holds as integers.

    Raises:
      ExplainError: none was given and the model's datagen output is unknown or its log gone.
    """
    summary = model.summary or {}
    int_columns = list(summary.get("int_columns", []))
    if input_patterns:
        return input_patterns, int_columns
    recorded = list(summary.get("input", {}).get("paths", []))
    present = [p for p in recorded if Path(p).exists()]
    if not present:
        where = (
            f"the datagen output {model.data_dir} names none that exists"
            if model.data_dir is not None
            else "the model's datagen output is unknown (give it with --data)"
        )
        raise ExplainError(
            f"--input: needed to map hashed cross ids back to raw values, and {where}; give "
            "the raw log the model was trained on (what datagen --input took), or --no-crosses"
        )
    return present, int_columns


# --------------------------------------------------------------------------------------------
# The deep tower's neighbours


def parse_neighbours(specs: Sequence[str], model: LoadedModel) -> list[tuple[str, str]]:
    """``FEATURE=TOKEN`` arguments, checked against the model's deep tower.

    Raises:
      ExplainError: malformed, an unknown feature, one without a deep embedding, or a token
        the vocabulary does not hold.
    """
    out = []
    deep = {i.name: i for i in model.spec.deep_inputs if i.vocabulary}
    for text in specs:
        name, sep, token = text.partition("=")
        if not sep or not name:
            raise ExplainError(f"--neighbours {text!r}: expected FEATURE=TOKEN")
        if name not in deep:
            known = ", ".join(sorted(deep)) or "none"
            what = "is not a feature of the model" if not _has_feature(model, name) else (
                "has no embedding in the deep tower"
            )  # fmt: skip
            raise ExplainError(
                f"--neighbours {text!r}: {name!r} {what}; features with embeddings: {known}"
            )
        vocab = deep[name].vocabulary
        if token not in model.vocabularies[vocab]:
            raise ExplainError(
                f"--neighbours {text!r}: {token!r} is not in the vocabulary of {name!r} "
                f"({len(model.vocabularies[vocab]):,} tokens; a value seen fewer than "
                "min_count times in training has no embedding of its own)"
            )
        out.append((name, token))
    return out


def _has_feature(model: LoadedModel, name: str) -> bool:
    return any(f.name == name for f in model.config.features)


def neighbours(
    model: LoadedModel, feature: str, token: str, count: int = DEFAULT_NEIGHBOURS
) -> list[tuple[str, float]]:
    """The ``count`` tokens whose deep embeddings are closest to ``token``'s, by cosine."""
    vocab = model.spec.input(feature).vocabulary
    table = model.embeddings[vocab].astype(np.float64)
    tokens = model.vocabularies[vocab]
    rows = table[: len(tokens)]  # without the out-of-vocabulary row
    index = tokens.index(token)
    norms = np.linalg.norm(rows, axis=1)
    norms[norms == 0] = 1.0
    cosine = rows @ rows[index] / (norms * norms[index])
    cosine[index] = -np.inf
    k = min(count, len(tokens) - 1)
    if k <= 0:
        return []
    best = np.argpartition(-cosine, k - 1)[:k]
    best = best[np.argsort(-cosine[best], kind="stable")]
    return [(tokens[i], float(cosine[i])) for i in best]


# --------------------------------------------------------------------------------------------
# One query's candidates


@dataclass
class CandidateExplanation:
    """One candidate's score split into its parts, and the wide weights that fired."""

    index: int
    candidate: Mapping[str, Any]
    probability: float
    """The score the model serves (``serving_default``)."""
    logit: float
    bias: float
    wide: float
    deep: float
    fired: list[WideWeight]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "candidate": dict(self.candidate),
            "probability": self.probability,
            "logit": self.logit,
            "bias": self.bias,
            "wide_logit": self.wide,
            "deep_logit": self.deep,
            "wide_weights": [w.to_dict() for w in self.fired],
        }


def _split_parts(outputs: Mapping[str, np.ndarray], served: np.ndarray) -> list[dict[str, Any]]:
    """The explain signature's outputs by candidate, checked against the served scores."""
    n = served.size
    logit = np.asarray(outputs[artifacts.LOGIT_OUTPUT], np.float64).reshape(-1)
    parts = [
        np.asarray(outputs[k], np.float64).reshape(-1)
        for k in (artifacts.BIAS_OUTPUT, artifacts.WIDE_LOGIT_OUTPUT, artifacts.DEEP_LOGIT_OUTPUT)
    ]
    if logit.size != n or any(p.size != n for p in parts):
        raise ExplainError(f"the explain signature answered {logit.size} rows for {n} candidates")
    return [
        {"logit": logit[i], "bias": parts[0][i], "wide": parts[1][i], "deep": parts[2][i]}
        for i in range(n)
    ]


def explain_query(
    model: LoadedModel,
    query: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    *,
    server: str | None = None,
    model_name: str | None = None,
    version: int | None = None,
    timeout_s: float = 30.0,
) -> list[CandidateExplanation]:
    """Each candidate's score split into bias, wide and deep log-odds, best first.

    With ``server`` (``host:port`` of a model server's gRPC API), the served model's
    ``explain`` signature and its served scores (``serving_default``) are asked for; else both
    signatures of the SavedModel are called in process.

    Raises:
      ExplainError: the model has no ``explain`` signature (exported before it existed).
    """
    from serving.client import kinds_of_inputs, saved_model_input_types
    from transform.examples import ExampleEncoder

    if not candidates:
        raise ExplainError("--query: no candidates to explain")
    if server is None:
        from serving.servable import read_meta_graph

        signatures = read_meta_graph(model.export, ("serve",)).signature_def
        if artifacts.EXPLAIN_SIGNATURE not in signatures:
            raise _no_signature(str(model.export))
        encoder = ExampleEncoder(model.config, saved_model_input_types(model.export))
        examples = encoder.encode_query(query, candidates)
        outputs, served = _explain_in_process(model.export, examples)
    else:
        from serving.client import ClientSettings, RankingClient

        name = model_name or model.config.model_name
        settings = ClientSettings(timeout_s=timeout_s, retries=1)
        with RankingClient(server, name, settings, config=model.config, version=version) as c:
            if c.endpoint.api != "grpc":
                raise ExplainError(f"--server {server}: explain speaks gRPC (HOST:PORT)")
            inputs = c.model_inputs()
            types = kinds_of_inputs(inputs) if inputs is not None else None
            examples = ExampleEncoder(model.config, types).encode_query(query, candidates)
            served = c.score_examples(examples)
            outputs = _explain_remote(c.endpoint.target, name, version, examples, timeout_s)
    splits = _split_parts(outputs, np.asarray(served, np.float64).reshape(-1))
    texts = _fired_cross_texts(model, query, candidates)
    out = []
    for i, (candidate, split) in enumerate(zip(candidates, splits, strict=True)):
        fired = []
        for spec in model.spec.wide_inputs:
            ids = np.asarray(outputs[artifacts.fired_ids_output(spec.name)]).reshape(
                len(candidates), -1
            )[i]
            weights = np.asarray(outputs[artifacts.fired_weights_output(spec.name)]).reshape(
                len(candidates), -1
            )[i]
            for index, weight in zip(ids, weights, strict=True):
                if index < 0:
                    continue
                w = describe_wide(model, spec.name, int(index), float(weight), {})
                cross_text = texts.get(spec.name, [{}] * len(candidates))[i].get(int(index))
                if cross_text is not None:
                    w.value = cross_text
                fired.append(w)
        fired.sort(key=lambda w: -abs(w.weight))
        out.append(
            CandidateExplanation(
                i,
                candidate,
                float(served[i]),
                split["logit"],
                split["bias"],
                split["wide"],
                split["deep"],
                fired,
            )
        )
    out.sort(key=lambda e: (-e.probability, e.index))
    return out


def _no_signature(where: str) -> ExplainError:
    return ExplainError(
        f"{where}: the model has no {artifacts.EXPLAIN_SIGNATURE!r} signature (it was exported "
        "before models had one); train or export it again"
    )


def _explain_in_process(export: Path, examples: list[bytes]) -> tuple[dict[str, Any], Any]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export))
    batch = tf.constant(examples)
    outputs = {
        k: v.numpy()
        for k, v in loaded.signatures[artifacts.EXPLAIN_SIGNATURE](
            **{artifacts.EXAMPLES_INPUT: batch}
        ).items()
    }
    served = loaded.signatures[artifacts.SERVING_SIGNATURE](**{artifacts.EXAMPLES_INPUT: batch})
    return outputs, served[artifacts.PROBABILITIES_OUTPUT].numpy().reshape(-1)


def _explain_remote(
    target: str, name: str, version: int | None, examples: list[bytes], timeout_s: float
) -> dict[str, np.ndarray]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = artifacts.predict_request(
        name, examples, signature_name=artifacts.EXPLAIN_SIGNATURE, version=version
    )
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout_s)
        except grpc.RpcError as e:
            details = e.details() or ""
            if artifacts.EXPLAIN_SIGNATURE in details and "not found" in details:
                raise _no_signature(f"{target} ({name})") from None
            raise ExplainError(f"{target}: {e.code().name}: {details}") from None
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _fired_cross_texts(
    model: LoadedModel, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
) -> dict[str, list[dict[int, str]]]:
    """Each candidate's cross ids and the raw tuple behind each (crossed in TF as data
    generation crosses them, from the candidate's own values)."""
    import tensorflow as tf

    from transform.features import cross_inputs, cross_value_order

    config = model.config
    wide = {i.name for i in model.spec.wide_inputs}
    crosses = [c for c in config.crosses if c.name in wide]
    if not crosses:
        return {}
    columns = {config.feature(n).column: config.feature(n) for c in crosses for n in c.features}
    inputs = {}
    for column, feature in columns.items():
        rows = []
        for candidate in candidates:
            value = candidate.get(column, query.get(column))
            if value is None:
                value = feature.default
            values = [] if value is None else list(value) if isinstance(value, list) else [value]
            if feature.dtype is DType.INT:
                rows.append([int(v) for v in values])
            else:
                rows.append([str(v) for v in values])
        dtype = tf.int64 if feature.dtype is DType.INT else tf.string
        if feature.kind is Kind.CATEGORICAL_LIST:
            inputs[column] = tf.ragged.constant(rows, dtype=dtype, ragged_rank=1).to_sparse()
        else:
            # A scalar column is dense, as the transform graph gets it (a missing value, which
            # the model refuses anyway, stands in as a placeholder).
            blank = 0 if feature.dtype is DType.INT else ""
            inputs[column] = tf.constant([r[0] if r else blank for r in rows], dtype=dtype)
    out = {}
    for cross in crosses:
        parts = cross_inputs(config, cross, inputs)
        ids = tf.sparse.cross_hashed(parts, num_buckets=cross.hash_buckets)
        texts = tf.sparse.cross(parts, separator=CROSS_SEPARATOR)
        order = cross_value_order(parts)
        per: list[dict[int, str]] = [{} for _ in candidates]
        for (row, _), index, text in zip(
            ids.indices.numpy(), ids.values.numpy(), texts.values.numpy(), strict=True
        ):
            values = _in_config_order(text.decode("utf-8", "replace").split(CROSS_SEPARATOR), order)
            per[int(row)][int(index)] = " & ".join(
                f"{f}={v}" for f, v in zip(cross.features, values, strict=True)
            )
        out[cross.name] = per
    return out


# --------------------------------------------------------------------------------------------
# The whole report


@dataclass
class Report:
    """What ``widedeep explain`` prints."""

    model: LoadedModel
    total_weights: int
    nonzero_weights: int
    top: list[WideWeight]
    crosses: dict[str, CrossStats]
    cross_source: str | None
    neighbours: list[tuple[str, str, list[tuple[str, float]]]]
    candidates: list[CandidateExplanation]
    query_source: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        m = self.model
        return {
            "model": str(m.path),
            "model_name": m.config.model_name,
            "towers": m.spec.towers.value,
            "bias": m.bias,
            "wide": {
                "weights": self.total_weights,
                "nonzero": self.nonzero_weights,
                "top": [w.to_dict() for w in self.top],
                "crosses": {k: v.to_dict() for k, v in self.crosses.items()},
                "cross_source": self.cross_source,
            },
            "neighbours": [
                {
                    "feature": f,
                    "token": t,
                    "neighbours": [{"token": n, "cosine": c} for n, c in near],
                }
                for f, t, near in self.neighbours
            ],
            "query": {
                "source": self.query_source,
                "candidates": [c.to_dict() for c in self.candidates],
            },
            "seconds": round(self.seconds, 2),
        }


def explain(
    model_dir: str | Path,
    *,
    top: int = DEFAULT_TOP,
    data_dir: str | Path | None = None,
    input_patterns: str | None = None,
    sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    map_cross_ids: bool = True,
    tuples: int = DEFAULT_TUPLES,
    neighbour_specs: Sequence[str] = (),
    num_neighbours: int = DEFAULT_NEIGHBOURS,
    query: Mapping[str, Any] | None = None,
    query_source: str | None = None,
    server: str | None = None,
    model_name: str | None = None,
    version: int | None = None,
) -> Report:
    """Everything ``widedeep explain`` shows of one model (see the module's docstring)."""
    started = time.monotonic()
    if top < 0:
        raise ExplainError(f"--top: expected 0 or more, got {top}")
    if sample_rows is not None and sample_rows <= 0:
        raise ExplainError(f"--sample-rows: expected a positive number, got {sample_rows}")
    if server is not None and query is None:
        raise ExplainError("--server: explains a query's candidates; give them with --query")
    model = load_model(model_dir, data_dir)
    wanted_neighbours = parse_neighbours(neighbour_specs, model)
    best = top_wide_weights(model, top)
    cross_names = {c.name for c in model.config.crosses}
    wanted: dict[str, list[int]] = {}
    for name, index, _ in best:
        if name in cross_names:
            wanted.setdefault(name, []).append(index)
    found: dict[str, Any] = {}
    stats: dict[str, CrossStats] = {}
    source = None
    if wanted and map_cross_ids:
        log, int_columns = log_of(model, input_patterns)
        source = log if isinstance(log, str) else ",".join(log)
        found, stats = map_crosses(
            model.config, wanted, log, int_columns=int_columns, max_rows=sample_rows, tuples=tuples
        )
    top_weights = [describe_wide(model, n, i, w, found) for n, i, w in best]
    near = [(f, t, neighbours(model, f, t, num_neighbours)) for f, t in wanted_neighbours]
    candidates: list[CandidateExplanation] = []
    if query is not None:
        candidates = explain_query(
            model,
            query.get("query") or {},
            query.get("candidates") or [],
            server=server,
            model_name=model_name,
            version=version,
        )
    total = sum(len(w) for w in model.wide.values())
    nonzero = sum(int(np.count_nonzero(w)) for w in model.wide.values())
    return Report(
        model, total, nonzero, top_weights, stats, source, near, candidates, query_source,
        time.monotonic() - started,
    )  # fmt: skip


def read_query(text: str, flag: str = "--query") -> dict[str, Any]:
    """A JSON query as ``widedeep query`` takes it: ``{"query": {...}, "candidates": [...]}``."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExplainError(f"{flag}: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("candidates"), list):
        raise ExplainError(f'{flag}: expected {{"query": {{...}}, "candidates": [{{...}}, ...]}}')
    return payload


# --------------------------------------------------------------------------------------------
# Text output


def format_report(report: Report, id_key: str | None = None, fired: int = 5) -> str:
    """The report as text: the wide weights, the cross pass, neighbours, the query's split."""
    m = report.model
    lines = [
        f"model {m.config.model_name} ({m.spec.towers.value}) from {m.path}",
        f"bias b = {m.bias:+.4f}",
    ]
    if m.spec.towers.has_wide:
        lines += [
            "",
            f"wide tower: the {len(report.top)} largest weights by absolute value "
            f"({report.nonzero_weights:,} of {report.total_weights:,} are non-zero)",
            f"  {'rank':>4}  {'weight':>8}  {'feature':<24}  value",
        ]
        for rank, w in enumerate(report.top, 1):
            note = ""
            if w.role == "cross" and w.tuples:
                share = w.tuples[0].count / w.occurrences if w.occurrences else 0.0
                rate = w.tuples[0].positives / w.tuples[0].count if w.tuples[0].count else 0.0
                rows = f"{w.tuples[0].count:,} row" + ("s" if w.tuples[0].count != 1 else "")
                note = (
                    f"  [{rows}, label rate {rate:.2f}; "
                    f"{share:.0%} of the bucket's {w.occurrences:,}"
                    + (f", {w.distinct} distinct tuples" if w.distinct > 1 else "")
                    + "]"
                )
            lines.append(f"  {rank:>4}  {w.weight:>+8.4f}  {w.feature:<24}  {w.value}{note}")
        for name, s in report.crosses.items():
            d = s.to_dict()
            lines.append(
                f"  cross {name}: {s.rows_read:,} rows read, {s.pairs:,} products, "
                f"{s.distinct_tuples:,} distinct tuples in {s.buckets_used:,} buckets; "
                f"{s.colliding_buckets:,} buckets ({d['colliding_share']:.1%}) hold more than one"
            )
    for feature, token, near in report.neighbours:
        lines += ["", f"deep tower: nearest embeddings to {feature}={token} (cosine)"]
        lines += [f"  {c:+.3f}  {t}" for t, c in near]
    if report.candidates:
        lines += [
            "",
            f"query ({report.query_source or 'stdin'}): {len(report.candidates)} candidates, "
            "log-odds split: logit = bias + wide + deep; probability = sigmoid(logit)",
            f"  {'rank':>4}  {'prob':>6}  {'logit':>8} = {'bias':>8} + {'wide':>8} + "
            f"{'deep':>8}  candidate",
        ]
        for rank, c in enumerate(report.candidates, 1):
            key = id_key or next(iter(c.candidate), None)
            shown = f"{key}={c.candidate.get(key)}" if key is not None else ""
            lines.append(
                f"  {rank:>4}  {c.probability:>6.4f}  {c.logit:>+8.4f} = {c.bias:>+8.4f} + "
                f"{c.wide:>+8.4f} + {c.deep:>+8.4f}  {shown}"
            )
            nonzero = [w for w in c.fired if w.weight != 0]
            for w in nonzero[:fired]:
                lines.append(f"{'':>14}wide {w.weight:+.4f}  {w.feature}: {w.value}")
            if len(nonzero) > fired:
                lines.append(f"{'':>14}... {len(nonzero) - fired} more non-zero wide weights")
    return "\n".join(lines)
