"""The exported SavedModel: raw features in, the transform graph inside.

Signatures:

- ``serving_default``: input ``examples`` (string [B], serialized tf.Examples of raw features)
  -> ``probabilities`` (float [B, 1]).
- ``classification``: input ``inputs`` (string [B], serialized tf.Examples) -> ``classes``
  (string [B, 2], "0" and "1") and ``scores`` (float [B, 2]), what TF Serving's Classify API
  expects. (tf.saved_model always records the method name ``tensorflow/serving/predict``; TF
  Serving does not check method names by default.)
- ``explain``: input ``examples`` -> each example's logit split into ``bias``, ``wide_logit``
  and ``deep_logit`` (float [B], summing to ``logit``), ``probability`` (float [B]) and, for
  each wide input, the ids that fired and their weights (``wide_ids__NAME``, int64 [B, n]
  padded with -1; ``wide_weights__NAME``, float [B, n]): what ``widedeep explain`` shows.
- ``raw_features``: one named input per raw column, so a REST client sends plain JSON values
  (``{"signature_name": "raw_features", "instances": [{"user_id": 3, ...}]}``) ->
  ``probabilities`` (float [B, 1]); see :func:`raw_input_signature`.

The tf.Examples are parsed with :func:`transform.features.serving_feature_spec`: every column
typed as the log typed it (the raw schema data generation recorded), defaults filled in.

``assets.extra/tf_serving_warmup_requests`` holds a few PredictRequests that TF Serving replays
at load: raw eval examples of the datagen output (its ``eval_raw/`` split), or, for an output
that has none (one written before datagen kept them), examples synthesised from the model's own
vocabularies and the quantile boundaries of the datagen summary. They are sent to the
tf.Example signature and to the raw-features one, so every table and both input paths are warm.
The names of the signatures, inputs, outputs and the warmup file are
:mod:`transform.artifacts`'s.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from transform.artifacts import (
    BIAS_OUTPUT,
    CLASS_LABELS,
    CLASSES_OUTPUT,
    CLASSIFY_INPUT,
    CLASSIFY_SIGNATURE,
    DEEP_LOGIT_OUTPUT,
    EXAMPLES_INPUT,
    EXPLAIN_SIGNATURE,
    LOGIT_OUTPUT,
    PROBABILITIES_OUTPUT,
    PROBABILITY_OUTPUT,
    RAW_SIGNATURE,
    SCORES_OUTPUT,
    SERVING_SIGNATURE,
    WIDE_LOGIT_OUTPUT,
    fired_ids_output,
    fired_weights_output,
    predict_request,
    warmup_path,
)
from transform.config import Config, DType, Feature, Kind
from transform.examples import ExampleEncoder
from transform.features import retype_examples, serving_feature_spec, split_joined_lists

WARMUP_RECORDS = 10


def raw_input_signature(config: Config, spec: Mapping[str, Any]) -> dict[str, tf.TensorSpec]:
    """The inputs of the ``raw_features`` signature: one per raw column, named after it.

    Each is a vector of one value per candidate, typed as the tf.Example signatures parse the
    column (the log's type: int64, float or string). A list column is one string per candidate,
    its values joined by the config's ``data.list_delimiter`` ("" is an empty list), the form a
    CSV log gives it: TF Serving's REST API carries a fixed shape per input (row and columnar
    formats alike), so a variable-length list travels as text. An input given one value where
    others give B applies to all B candidates (the query's own features, sent once).
    """
    out = {}
    for column, entry in spec.items():
        dtype = tf.string if isinstance(entry, tf.io.VarLenFeature) else entry.dtype
        out[column] = tf.TensorSpec([None], dtype, name=column)
    return out


class ServingModule(tf.Module):
    """What the SavedModel holds: the transform layer, the model's weights, four signatures."""

    def __init__(self, model: Any, tft_layer: Any, raw_spec: Mapping[str, Any], config: Config):
        super().__init__(name="widedeep_serving")
        # The model's weights are saved, not its Keras layers: saved layers add functions per
        # layer to the SavedModel, which every server load rebuilds as Python objects and every
        # unload frees in one garbage collection that stops the requests being answered (a
        # fifth of a loaded version's objects, and about half of that pause, as measured).
        self._inference = _Unsaved(model)
        self.model_weights = list(model.variables)
        # Attached so its vocabulary files and tables are exported as the model's own assets.
        self.tft_layer = tft_layer
        self._raw_spec = dict(raw_spec)
        features: dict[str, Feature] = {}
        for f in config.features:
            features.setdefault(f.column, f)
        # Assigned whole: tf.Module tracks a dict attribute and refuses one changed later.
        self._features = features
        self._list_delimiter = config.data.list_delimiter
        self._config = _Unsaved(config)
        self.raw_features = tf.function(
            self._raw_features, input_signature=[raw_input_signature(config, self._raw_spec)]
        )

    def _score(self, raw: Mapping[str, Any]) -> tf.Tensor:
        transformed = self.tft_layer(dict(raw))
        return tf.sigmoid(self._inference.value(transformed, training=False))

    def _parse(self, serialized: tf.Tensor) -> dict[str, Any]:
        """Serialized raw tf.Examples as the transform layer takes them; a list sent as one
        joined string is split as data generation split the log's (`split_joined_lists`)."""
        raw = tf.io.parse_example(serialized, self._raw_spec)
        return split_joined_lists(self._config.value, raw)

    def _probabilities(self, serialized: tf.Tensor) -> tf.Tensor:
        return self._score(self._parse(serialized))

    def _raw_features(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """P(Y = 1 | x) of candidates given as one vector of raw values per column."""
        columns = sorted(inputs)
        sizes = tf.stack([tf.size(inputs[c], out_type=tf.int64) for c in columns])
        batch = tf.reduce_max(sizes)
        raw: dict[str, Any] = {}
        for column in columns:
            x = inputs[column]
            size = tf.size(x, out_type=tf.int64)
            check = _assert(
                tf.logical_or(tf.equal(size, 1), tf.equal(size, batch)),
                [
                    f"raw_features: column {column} has",
                    size,
                    "values; expected one per candidate, or one for all of them; candidates:",
                    batch,
                ],
                summarize=1,
            )
            with tf.control_dependencies([check]):
                x = tf.broadcast_to(x, tf.reshape(batch, [1]))
            raw[column] = self._raw_column(column, x)
        return {PROBABILITIES_OUTPUT: self._score(raw)}

    def _raw_column(self, column: str, x: tf.Tensor) -> Any:
        """One column as parse_example would give it: missing values take the default."""
        entry = self._raw_spec[column]
        feature = self._features[column]
        if isinstance(entry, tf.io.VarLenFeature):
            return _split_list(column, x, self._list_delimiter, entry.dtype)
        default = entry.default_value
        if x.dtype == tf.string and default is not None:
            # An empty string is a missing value, as an empty CSV field is.
            return tf.where(tf.equal(x, ""), tf.constant(default, tf.string), x)
        if x.dtype == tf.float32:
            missing = tf.math.is_nan(x)
            if default is not None:
                return tf.where(missing, tf.constant(default, tf.float32), x)
            check = _assert(
                tf.logical_not(tf.reduce_any(missing)),
                [f"raw_features: column {column} ({_kind(feature)}) is NaN (missing) for a "
                 "candidate, and the config gives it no default"],
            )  # fmt: skip
            with tf.control_dependencies([check]):
                return tf.identity(x)
        return x

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        """P(Y = 1 | x) of each serialized raw tf.Example."""
        return {PROBABILITIES_OUTPUT: self._probabilities(examples)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)])
    def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        """Classify API output: both classes and their scores for each example."""
        p = self._probabilities(inputs)
        scores = tf.concat([1.0 - p, p], axis=1)
        classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(p)[0], 1])
        return {CLASSES_OUTPUT: classes, SCORES_OUTPUT: scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def explain(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        """Each example's logit split into bias, wide and deep parts, and the wide weights
        that fired (see :data:`transform.artifacts.EXPLAIN_SIGNATURE`)."""
        parts = self._inference.value.explain(self.tft_layer(self._parse(examples)))
        out = {
            BIAS_OUTPUT: parts["bias"],
            WIDE_LOGIT_OUTPUT: parts["wide_logit"],
            DEEP_LOGIT_OUTPUT: parts["deep_logit"],
            LOGIT_OUTPUT: parts["logit"],
            PROBABILITY_OUTPUT: tf.sigmoid(parts["logit"]),
        }
        for name, (ids, weights) in parts["fired"].items():
            out[fired_ids_output(name)] = ids
            out[fired_weights_output(name)] = weights
        return out


class _Unsaved:
    """Holds an object out of sight of tf.Module's tracking (so out of the SavedModel)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _kind(feature: Feature) -> str:
    return feature.kind.value


def _assert(condition: tf.Tensor, data: list[Any], summarize: int = 3) -> tf.Operation:
    """An Assert op as it is: tf.debugging.Assert wraps one in a cond, two more functions in
    the SavedModel for every check, which every load builds and every unload frees."""
    return tf.raw_ops.Assert(condition=condition, data=data, summarize=summarize)


def _split_list(column: str, x: tf.Tensor, delimiter: str, dtype: tf.DType) -> tf.SparseTensor:
    """Delimiter-joined lists as the SparseTensor parse_example gives a list column."""
    # An empty field is an empty list, not a list holding "" (as data generation reads CSV).
    split = tf.strings.split(x, sep=delimiter)
    present = tf.not_equal(x, "")
    values = tf.boolean_mask(split.values, tf.repeat(present, split.row_lengths()))
    lengths = tf.where(present, split.row_lengths(), tf.zeros_like(split.row_lengths()))
    # Lengths and values agree by construction: no validation ops (and no functions for them).
    ragged = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
    if dtype == tf.int64:
        check = _assert(
            tf.reduce_all(tf.strings.regex_full_match(ragged.flat_values, r"[+-]?[0-9]{1,18}")),
            [f"raw_features: column {column} is a list of integers joined by "
             f"{delimiter!r}; got", x],
            summarize=3,
        )  # fmt: skip
        with tf.control_dependencies([check]):
            ragged = tf.strings.to_number(ragged, tf.int64)
    return ragged.to_sparse()


def export_saved_model(
    model: Any,
    tft_output: Any,
    config: Config,
    export_dir: Path,
    warmup_examples: Sequence[bytes],
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Writes the SavedModel to ``export_dir``, replacing it only once complete.

    Args:
      model: The trained model (a :class:`trainer.model.WideDeepModel` without optimizers).
      tft_output: ``tft.TFTransformOutput`` of the data the model was trained on.
      config: The config used.
      export_dir: Where the SavedModel goes.
      warmup_examples: Serialized raw tf.Examples for the warmup requests.
      extra_files: Files copied into ``assets.extra`` (the config, the metrics), so a model
        deployed on its own still says what it is and how well it did.
    """
    # Columns typed as the log typed them: the raw schema data generation recorded.
    spec = serving_feature_spec(config, _recorded_spec(tft_output))
    module = ServingModule(model, tft_output.transform_features_layer(), spec, config)
    # Warmup examples typed otherwise (synthesised from the config) are made to parse.
    warmup_examples = retype_examples(warmup_examples, spec, round_floats=True)
    partial = export_dir.with_name(export_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    signatures = {
        SERVING_SIGNATURE: module.serve.get_concrete_function(),
        CLASSIFY_SIGNATURE: module.classify.get_concrete_function(),
        RAW_SIGNATURE: module.raw_features.get_concrete_function(),
        EXPLAIN_SIGNATURE: module.explain.get_concrete_function(),
    }
    tf.saved_model.save(module, str(partial), signatures=signatures)
    warmup = warmup_path(partial)
    extra = warmup.parent
    extra.mkdir(exist_ok=True)
    # One request of the candidates a query scores, and one of the client's batch size.
    sizes = sorted({config.validation.num_candidates, config.serving.batch_size})
    raw = raw_inputs_of(warmup_examples, spec, config.data.list_delimiter)
    write_warmup_requests(warmup, config.model_name, warmup_examples, sizes, raw)
    for name, path in (extra_files or {}).items():
        shutil.copyfile(path, extra / name)
    # The previous export is moved aside, not deleted, until the new one is in place.
    previous = export_dir.with_name(export_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if export_dir.exists():
        export_dir.rename(previous)
    partial.rename(export_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return export_dir


def read_exported_weights(saved_model_dir: str | Path) -> list[np.ndarray]:
    """The model's weights as a SavedModel holds them, in the order of ``model.variables``
    (a :class:`trainer.model.WideDeepModel` built from the model's spec lists its variables
    in the same order), read from its variables file without loading its graph."""
    prefix = Path(saved_model_dir) / tf.saved_model.VARIABLES_DIRECTORY
    reader = tf.train.load_checkpoint(str(prefix / tf.saved_model.VARIABLES_FILENAME))
    out = []
    # ServingModule.model_weights, saved as a list: one checkpoint key per element.
    while reader.has_tensor(key := f"model_weights/{len(out)}/.ATTRIBUTES/VARIABLE_VALUE"):
        out.append(reader.get_tensor(key))
    return out


def write_warmup_requests(
    path: Path,
    model_name: str,
    examples: Sequence[bytes],
    batch_sizes: Sequence[int] = (),
    raw: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Writes TF Serving warmup records (PredictionLogs of PredictRequests).

    One request per example, then one request of each of ``batch_sizes`` examples (cycling
    through them): the batch sizes live traffic sends, so their kernels are ready too. With
    ``raw`` (the examples' values by column, see :func:`raw_inputs_of`), the same batches are
    sent to the ``raw_features`` signature too, once with every column given per candidate and
    once with the first candidate's values given once for all (a query sent once).
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    batches = [[e] for e in examples]
    sizes = [len(examples), *batch_sizes] if examples else []
    batches += [[examples[i % len(examples)] for i in range(n)] for n in sizes[1:]]
    requests = [predict_request(model_name, batch) for batch in batches]
    if raw:
        for n in sizes:
            for shared in (False, True):
                request = predict_pb2.PredictRequest()
                request.model_spec.signature_name = RAW_SIGNATURE
                for column, values in raw.items():
                    rows = values[:1] if shared else values[np.arange(n) % len(values)]
                    request.inputs[column].CopyFrom(tf.make_tensor_proto(rows))
                requests.append(request)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            request.model_spec.name = model_name
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def raw_inputs_of(
    examples: Sequence[bytes], spec: Mapping[str, Any], list_delimiter: str
) -> dict[str, np.ndarray]:
    """The values of serialized raw tf.Examples by column, as the ``raw_features`` signature
    takes them: one value per example, lists joined by ``list_delimiter``."""
    if not examples:
        return {}
    parsed = tf.io.parse_example(tf.constant(list(examples)), dict(spec))
    out: dict[str, np.ndarray] = {}
    for column, value in parsed.items():
        if isinstance(value, tf.SparseTensor):
            rows: list[list[Any]] = [[] for _ in examples]
            for (row, _), v in zip(value.indices.numpy(), value.values.numpy(), strict=True):
                rows[row].append(v if isinstance(v, bytes) else str(int(v)).encode())
            joined = np.empty(len(rows), dtype=object)
            joined[:] = [list_delimiter.encode().join(r) for r in rows]
            out[column] = joined
        else:
            out[column] = value.numpy()
    return out


def _recorded_spec(tft_output: Any) -> dict[str, Any] | None:
    """The raw spec data generation recorded (None for an output that has none)."""
    try:
        return dict(tft_output.raw_feature_spec())
    except (OSError, tf.errors.NotFoundError):
        return None


def synthetic_examples(
    config: Config,
    tft_output: Any,
    quantile_boundaries: Mapping[str, Sequence[float] | None],
    count: int = WARMUP_RECORDS,
    seed: int = 0,
) -> list[bytes]:
    """Serialized raw tf.Examples built from vocabulary tokens and quantile boundaries.

    Each categorical column takes a token of its vocabulary (read from ``tft_output``; lists
    take zero to three), each numeric column a value between two of its quantile boundaries,
    so the examples look like real traffic to every table of the model.
    """
    rng = np.random.default_rng(seed)
    encoder = ExampleEncoder(config)
    tokens = {
        name: [t.decode("utf-8", "replace") for t in tft_output.vocabulary_by_name(name)]
        for name in config.vocabularies
    }
    examples = []
    for _ in range(count):
        values: dict[str, Any] = {}
        for f in config.features:
            if f.column in values:
                continue
            if f.kind is Kind.NUMERIC:
                bounds = list(quantile_boundaries.get(f.name) or [0.0])
                lo, hi = sorted(rng.choice(bounds, size=2))
                values[f.column] = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
                continue
            vocab = tokens.get(f.vocabulary) or ["0" if f.dtype is DType.INT else "unknown"]
            n = int(rng.integers(0, 4)) if f.kind is Kind.CATEGORICAL_LIST else 1
            picked = [vocab[int(i)] for i in rng.integers(0, len(vocab), n)]
            if f.dtype is DType.INT:
                picked = [int(t) for t in picked if _is_int(t)]
                if f.kind is Kind.CATEGORICAL and not picked:
                    picked = [0]  # a scalar column needs a value; 0 is then out of vocabulary
            values[f.column] = picked
        examples.append(encoder.encode(values))
    return examples


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
