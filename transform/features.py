"""What the features are and how they are transformed, derived from one :class:`Config`.

- :func:`raw_feature_spec` is how a raw impression is parsed (in data generation and, without
  the label, in the serving signatures). A column is typed as the config says, except a column
  the log holds as integers (``int_columns``): a numeric column of whole numbers, or string ids
  stored as integers. Those are parsed as int64, as the log typed them, and converted to the
  config's type inside the transform graph, so examples built from the log's own rows parse;
  :func:`serving_feature_spec` reads which columns those are from the raw schema data
  generation recorded;
- :func:`make_preprocessing_fn` builds the tf.Transform function: vocabularies of
  categorical features seen at least ``min_count`` times, quantile normalisation of numeric
  features to (i - 1) / (n_q - 1) (paper section 4.1), and the hashed cross-product
  transformations of the wide tower (section 3.1).

Transformed features keep their config names: a categorical feature becomes its vocabulary id
(``vocabulary_size`` is the out-of-vocabulary id), a list feature a sparse list of ids, a
numeric feature its normalised value in [0, 1], and a cross a sparse list of hashed ids.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_transform as tft

from transform.config import Config, Cross, DType, Feature, Kind

NUM_OOV_BUCKETS = 1
"""Ids a vocabulary reserves past its last token for values it has not seen often enough."""

QUANTILE_EPSILON = 0.001
"""Error bound of the quantile sketch, as a fraction of the rows (tft.quantiles' epsilon)."""


def raw_dtype(feature: Feature, *, as_int: bool = False) -> tf.dtypes.DType:
    """The TF dtype of a feature's raw values (int64 when the log holds them as integers)."""
    if as_int:
        return tf.int64
    if feature.kind is Kind.NUMERIC:
        return tf.float32
    return tf.string if feature.dtype is DType.STRING else tf.int64


def can_be_int(feature: Feature) -> bool:
    """Whether a log may hold the feature's column as integers that the model converts.

    A numeric column of whole numbers (its default, if any, whole too), and a scalar string id
    column without a default (ids stored as integers are read as their decimal text). An int
    categorical column is int64 anyway; a list column keeps the config's type.
    """
    if feature.kind is Kind.NUMERIC:
        return feature.default is None or float(feature.default).is_integer()
    return (
        feature.kind is Kind.CATEGORICAL
        and feature.dtype is DType.STRING
        and feature.default is None
    )


def raw_feature_spec(
    config: Config,
    *,
    with_label: bool = True,
    with_defaults: bool = False,
    int_columns: Collection[str] = (),
    float_label: bool = False,
) -> dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature]:
    """Parsing spec of a raw impression, keyed by raw column name.

    Args:
      config: The pipeline config.
      with_label: Include the label (data generation); serving requests carry no label.
      with_defaults: Give columns that have a configured ``default`` that default value, so a
        request that omits them still parses (the serving signature).
      int_columns: Columns the log holds as integers (see :func:`can_be_int`): parsed as int64.
      float_label: The log holds the label as a float (a TFRecord log's float_list of 0.0 and
        1.0): parsed as float32, for the reader to check and cast to int64.
    """
    spec: dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature] = {}
    if with_label:
        spec[config.label] = tf.io.FixedLenFeature([], tf.float32 if float_label else tf.int64)
    for f in config.features:
        if f.column in spec:
            continue  # two features may read one column
        as_int = f.column in int_columns and can_be_int(f)
        if f.kind is Kind.CATEGORICAL_LIST:
            spec[f.column] = tf.io.VarLenFeature(raw_dtype(f, as_int=as_int))
        else:
            default = f.default if with_defaults else None
            if as_int and default is not None:
                default = int(default)
            spec[f.column] = tf.io.FixedLenFeature(
                [], raw_dtype(f, as_int=as_int), default_value=default
            )
    return spec


def int_columns_of(config: Config, recorded: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The columns a recorded raw spec (the datagen's raw schema) types int64 where the config
    would not: the columns the log held as integers."""
    if not recorded:
        return ()
    out = []
    for f in config.features:
        entry = recorded.get(f.column)
        if (
            f.column not in out
            and entry is not None
            and entry.dtype == tf.int64
            and raw_dtype(f) != tf.int64
            and can_be_int(f)
        ):
            out.append(f.column)
    return tuple(out)


def serving_feature_spec(
    config: Config, recorded: Mapping[str, Any] | None = None
) -> dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature]:
    """How the serving signatures parse a raw tf.Example: no label, defaults filled in, and
    every column typed as the log typed it (``recorded``: ``TFTransformOutput.raw_feature_spec()``
    of the data the model was trained on; None types every column as the config says)."""
    return raw_feature_spec(
        config, with_label=False, with_defaults=True, int_columns=int_columns_of(config, recorded)
    )


def recorded_raw_spec(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The raw feature spec data generation recorded in ``data_dir`` (None when it has none)."""
    try:
        return dict(tft.TFTransformOutput(str(data_dir)).raw_feature_spec())
    except (OSError, tf.errors.NotFoundError):
        return None


def retype_example(
    serialized: bytes, spec: Mapping[str, Any], *, round_floats: bool = False
) -> bytes:
    """A serialized raw tf.Example with each feature stored as ``spec`` parses it.

    Numbers move between int64_list and float_list (a float becomes an int only when it is a
    whole number, or rounded with ``round_floats``) and integers become their decimal text in a
    bytes_list; anything else is left as it is, for the parser to refuse with its own message.
    Used where examples typed one way meet a model that parses another (warmup examples, a
    model trained on another log).
    """
    example = tf.train.Example.FromString(serialized)
    changed = False
    for name, feature in example.features.feature.items():
        entry = spec.get(name)
        if entry is None:
            continue
        kind = feature.WhichOneof("kind")
        want = {tf.int64: "int64_list", tf.float32: "float_list", tf.string: "bytes_list"}[
            entry.dtype
        ]
        if kind is None or kind == want:
            continue
        values = list(getattr(feature, kind).value)
        if want == "int64_list" and kind == "float_list":
            if not all(math.isfinite(v) for v in values):
                continue
            if not round_floats and not all(float(v).is_integer() for v in values):
                continue
            feature.CopyFrom(
                tf.train.Feature(int64_list=tf.train.Int64List(value=[round(v) for v in values]))
            )
        elif want == "float_list" and kind == "int64_list":
            feature.CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=values)))
        elif want == "bytes_list" and kind == "int64_list":
            text = [str(v).encode() for v in values]
            feature.CopyFrom(tf.train.Feature(bytes_list=tf.train.BytesList(value=text)))
        else:
            continue
        changed = True
    return example.SerializeToString() if changed else serialized


def retype_examples(
    examples: Sequence[bytes], spec: Mapping[str, Any], *, round_floats: bool = False
) -> list[bytes]:
    """:func:`retype_example` of each example."""
    return [retype_example(e, spec, round_floats=round_floats) for e in examples]


def make_preprocessing_fn(config: Config) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The tf.Transform ``preprocessing_fn`` of a config.

    The analyzers run once over the training split during data generation; their results
    (vocabularies, quantile boundaries) become constants and files of the transform graph, so
    training and serving transform features the same way.
    """

    def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = as_config_types(config, inputs)
        outputs: dict[str, tf.Tensor] = {config.label: tf.cast(inputs[config.label], tf.int64)}
        # A vocabulary shared by several features is computed over all their values at once.
        vocab_paths = {}
        for vocab, members in config.vocabularies.items():
            values = [_values(inputs[f.column]) for f in members]
            tokens = tf.concat(values, 0) if len(values) > 1 else values[0]
            vocab_paths[vocab] = tft.vocabulary(
                tokens,
                # Unit weights make tf.Transform count tokens batch by batch inside the graph;
                # unweighted, it sends every single token through Beam, which was slower.
                weights=tf.ones_like(tokens, dtype=tf.float32),
                # tft warns that a threshold of 1 is a no-op: say "no threshold" as None.
                frequency_threshold=members[0].min_count if members[0].min_count > 1 else None,
                vocab_filename=vocab,
                name=f"vocabulary_{vocab}",
            )
        for f in config.features:
            x = inputs[f.column]
            if f.kind is Kind.NUMERIC:
                outputs[f.name] = quantile_normalize(x, f.quantiles, name=f.name)
            else:
                outputs[f.name] = tft.apply_vocabulary(
                    x,
                    deferred_vocab_filename_tensor=vocab_paths[f.vocabulary],
                    num_oov_buckets=NUM_OOV_BUCKETS,
                    name=f"apply_vocabulary_{f.name}",
                )
        for cross in config.crosses:
            outputs[cross.name] = tf.sparse.cross_hashed(
                cross_inputs(config, cross, inputs), num_buckets=cross.hash_buckets
            )
        return outputs

    return preprocessing_fn


def cross_inputs(
    config: Config, cross: Cross, inputs: Mapping[str, Any]
) -> list[tf.Tensor | tf.SparseTensor]:
    """The inputs of a cross's ``tf.sparse.cross_hashed``, from raw tensors typed as the
    config types their columns (:func:`as_config_types`).

    Data generation hashes these; ``widedeep explain`` crosses the same inputs (hashed, and as
    text with ``tf.sparse.cross``, which lists a row's products in the same order) to find the
    raw values behind each hashed id.
    """
    return [_as_cross_input(inputs[config.feature(n).column]) for n in cross.features]


def cross_value_order(parts: Sequence[tf.Tensor | tf.SparseTensor]) -> list[int]:
    """Which input each value of a ``tf.sparse.cross`` product comes from, in order.

    The cross ops take their sparse inputs first and their dense ones after (each group in the
    order given), and hash and join the values of a product in that order.
    """
    sparse = [i for i, p in enumerate(parts) if isinstance(p, tf.SparseTensor)]
    return sparse + [i for i, p in enumerate(parts) if not isinstance(p, tf.SparseTensor)]


def as_config_types(config: Config, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Raw tensors converted to the types the config gives their columns.

    A column the log held as integers arrives as int64: a numeric one becomes float32 and a
    string id its decimal text (what data generation made of such columns before it kept the
    log's types, so vocabularies and hashed crosses stay the same).
    """
    out = dict(inputs)
    for f in config.features:
        x = out.get(f.column)
        if x is None or x.dtype == raw_dtype(f):
            continue
        if f.kind is Kind.NUMERIC:
            out[f.column] = tf.cast(x, tf.float32)
        elif isinstance(x, tf.SparseTensor):
            out[f.column] = tf.SparseTensor(
                x.indices, tf.strings.as_string(x.values), x.dense_shape
            )
        else:
            out[f.column] = tf.strings.as_string(x)
    return out


def split_joined_lists(config: Config, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed tf.Examples whose string lists may hold joined values, split as the log was.

    A client that sends a list as a CSV log (or a warehouse's Parquet export) types it, one
    string of values joined by ``data.list_delimiter`` ("Action|Comedy"), is scored on the
    tokens data generation made of that log, as one that sends the values one by one. Each
    value is split on the delimiter and its empty pieces are dropped. Kept out of the transform
    graph: data generation has split the log's lists already and would pay for it again.
    """
    delimiter = config.data.list_delimiter
    out = dict(raw)
    for column in {f.column for f in config.features if f.kind is Kind.CATEGORICAL_LIST}:
        x = out.get(column)
        if isinstance(x, tf.SparseTensor) and x.dtype == tf.string:
            # Splitting costs more than parsing the examples, so it runs only when a value
            # holds the delimiter: looking for one is a join and one regex over the values.
            joined = tf.strings.reduce_join(x.values)
            found = tf.strings.regex_full_match(joined, f"(?s).*{re.escape(delimiter)}.*")
            out[column] = tf.cond(found, lambda x=x: _split_values(x, delimiter), lambda x=x: x)
    return out


def _split_values(x: tf.SparseTensor, delimiter: str) -> tf.SparseTensor:
    """Each value split on ``delimiter``, its empty pieces dropped; a value that is empty
    itself is kept (the value, not its pieces, decides, whatever else the batch holds)."""
    pieces = tf.strings.split(x.values, sep=delimiter)
    empty = tf.repeat(tf.equal(x.values, ""), pieces.row_lengths())
    keep = pieces.with_flat_values(tf.logical_or(tf.not_equal(pieces.flat_values, ""), empty))
    values = tf.ragged.boolean_mask(pieces, keep)
    rows = tf.RaggedTensor.from_sparse(x).with_values(values)
    return rows.merge_dims(1, 2).to_sparse()


def quantile_normalize(x: tf.Tensor, num_quantiles: int, name: str) -> tf.Tensor:
    """Maps a value in the i-th of ``num_quantiles`` quantiles to (i - 1) / (n_q - 1).

    A value equal to a boundary belongs to the quantile that starts at that boundary.
    """
    boundaries = tft.quantiles(
        x, num_buckets=num_quantiles, epsilon=QUANTILE_EPSILON, name=f"quantiles_{name}"
    )
    # Kept under a stable name so the summary can report the boundaries.
    boundaries = tf.identity(boundaries, name=f"{BOUNDARIES_PREFIX}{name}")
    buckets = tft.apply_buckets(x, boundaries)
    return tf.cast(buckets, tf.float32) / float(num_quantiles - 1)


BOUNDARIES_PREFIX = "widedeep_quantile_boundaries__"
"""Op name prefix of each numeric feature's boundaries inside the transform graph."""


def _values(x: tf.Tensor | tf.SparseTensor) -> tf.Tensor:
    return x.values if isinstance(x, tf.SparseTensor) else tf.reshape(x, [-1])


def _as_cross_input(x: tf.Tensor | tf.SparseTensor) -> tf.Tensor | tf.SparseTensor:
    # cross_hashed takes rank-2 inputs: a scalar feature becomes a one-element list.
    return x if isinstance(x, tf.SparseTensor) else tf.expand_dims(x, 1)


def read_quantile_boundaries(transform_output_dir: str) -> dict[str, list[float]]:
    """Each numeric feature's quantile boundaries, read back from the transform graph.

    tf.Transform bakes analyzer results into the graph as captured constants and has no public
    API to list them; each is found by the stable name :func:`quantile_normalize` gives it.
    """
    import numpy as np

    loaded = tf.saved_model.load(os.path.join(transform_output_dir, "transform_fn"))
    fn = loaded.signatures["serving_default"]
    library = {f.signature.name: f for f in fn.graph.as_graph_def().library.function}
    position = {t.name: i for i, t in enumerate(fn.graph.inputs)}
    first_capture = len(fn.graph.inputs) - len(fn.captured_inputs)
    suffix = "_input"
    out: dict[str, list[float]] = {}
    for op in fn.graph.get_operations():
        if op.type not in ("StatefulPartitionedCall", "PartitionedCall"):
            continue
        inner = library.get(op.get_attr("f").name)
        if inner is None:
            continue
        for arg, outer in zip(inner.signature.input_arg, op.inputs, strict=False):
            if not (arg.name.startswith(BOUNDARIES_PREFIX) and arg.name.endswith(suffix)):
                continue
            index = position.get(outer.name, -1)
            if index >= first_capture:
                value = fn.captured_inputs[index - first_capture]
                name = arg.name[len(BOUNDARIES_PREFIX) : -len(suffix)]
                out[name] = [float(v) for v in np.asarray(value).ravel()]
    return out
