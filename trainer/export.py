"""The exported SavedModel: raw serialized tf.Example in, the transform graph inside.

Signatures (both take a batch of serialized tf.Examples with RAW features, parsed with
``raw_feature_spec(config, with_label=False, with_defaults=True)``):

- ``serving_default``: input ``examples`` (string [B]) -> ``probabilities`` (float [B, 1]).
- ``classification``: input ``inputs`` (string [B]) -> ``classes`` (string [B, 2], "0" and
  "1") and ``scores`` (float [B, 2]), what TF Serving's Classify API expects. (tf.saved_model
  always records the method name ``tensorflow/serving/predict``; TF Serving does not check
  method names by default.)

``assets.extra/tf_serving_warmup_requests`` holds a few PredictRequests that TF Serving replays
at load. Data generation keeps no raw rows, so their examples are synthesised from the model's
own vocabularies and the quantile boundaries of the datagen summary: valid requests that
exercise every lookup table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from transform.config import Config, DType, Kind
from transform.features import raw_feature_spec

SERVING_SIGNATURE = "serving_default"
CLASSIFY_SIGNATURE = "classification"
WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_RECORDS = 10
CLASS_LABELS = ("0", "1")


class ServingModule(tf.Module):
    """What the SavedModel holds: the transform layer, the inference model, two signatures."""

    def __init__(self, model: Any, tft_layer: Any, raw_spec: Mapping[str, Any]):
        super().__init__(name="widedeep_serving")
        self.model = model
        # Attached so its vocabulary files and tables are exported as the model's own assets.
        self.tft_layer = tft_layer
        self._raw_spec = dict(raw_spec)

    def _probabilities(self, serialized: tf.Tensor) -> tf.Tensor:
        raw = tf.io.parse_example(serialized, self._raw_spec)
        transformed = self.tft_layer(raw)
        return tf.sigmoid(self.model(transformed, training=False))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        """P(Y = 1 | x) of each serialized raw tf.Example."""
        return {"probabilities": self._probabilities(examples)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        """Classify API output: both classes and their scores for each example."""
        p = self._probabilities(inputs)
        scores = tf.concat([1.0 - p, p], axis=1)
        classes = tf.tile(tf.constant([list(CLASS_LABELS)]), [tf.shape(p)[0], 1])
        return {"classes": classes, "scores": scores}


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
    module = ServingModule(
        model,
        tft_output.transform_features_layer(),
        raw_feature_spec(config, with_label=False, with_defaults=True),
    )
    partial = export_dir.with_name(export_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    signatures = {
        SERVING_SIGNATURE: module.serve.get_concrete_function(),
        CLASSIFY_SIGNATURE: module.classify.get_concrete_function(),
    }
    tf.saved_model.save(module, str(partial), signatures=signatures)
    extra = partial / "assets.extra"
    extra.mkdir(exist_ok=True)
    # One request of the candidates a query scores, and one of the client's batch size.
    sizes = sorted({config.validation.num_candidates, config.serving.batch_size})
    write_warmup_requests(extra / WARMUP_FILE, config.model_name, warmup_examples, sizes)
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


def write_warmup_requests(
    path: Path, model_name: str, examples: Sequence[bytes], batch_sizes: Sequence[int] = ()
) -> None:
    """Writes TF Serving warmup records (PredictionLogs of PredictRequests).

    One request per example, then one request of each of ``batch_sizes`` examples (cycling
    through them): the batch sizes live traffic sends, so their kernels are ready too.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    batches = [[e] for e in examples]
    if examples:
        batches += [[examples[i % len(examples)] for i in range(n)] for n in batch_sizes]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in batches:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = SERVING_SIGNATURE
            request.inputs["examples"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_requests(path: Path) -> list[Any]:
    """The PredictRequests of a warmup file."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        requests.append(log.predict_log.request)
    return requests


def eval_examples(data_dir: Path, label: str, count: int = WARMUP_RECORDS) -> list[bytes]:
    """Up to ``count`` raw tf.Examples of a datagen output's eval split, label removed.

    Real traffic warms every table the way live requests will; an empty list when the output
    has no raw eval examples.
    """
    files = sorted(str(p) for p in (Path(data_dir) / "eval_raw").glob("*.tfrecord.gz"))
    if not files:
        return []
    examples = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP").take(count):
        example = tf.train.Example.FromString(record.numpy())
        if label in example.features.feature:
            del example.features.feature[label]
        examples.append(example.SerializeToString())
    return examples


def synthetic_examples(
    config: Config,
    vocabularies: Mapping[str, Path],
    quantile_boundaries: Mapping[str, Sequence[float] | None],
    count: int = WARMUP_RECORDS,
    seed: int = 0,
) -> list[bytes]:
    """Serialized raw tf.Examples built from vocabulary tokens and quantile boundaries.

    Each categorical column takes a token of its vocabulary (lists take zero to three), each
    numeric column a value between two of its quantile boundaries, so the examples look like
    real traffic to every table of the model.
    """
    rng = np.random.default_rng(seed)
    tokens = {name: _read_tokens(path) for name, path in vocabularies.items()}
    examples = []
    for _ in range(count):
        feature: dict[str, tf.train.Feature] = {}
        for f in config.features:
            if f.column in feature:
                continue
            if f.kind is Kind.NUMERIC:
                bounds = list(quantile_boundaries.get(f.name) or [0.0])
                lo, hi = sorted(rng.choice(bounds, size=2))
                value = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
                feature[f.column] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                continue
            vocab = tokens.get(f.vocabulary) or ["0" if f.dtype is DType.INT else "unknown"]
            n = int(rng.integers(0, 4)) if f.kind is Kind.CATEGORICAL_LIST else 1
            picked = [vocab[int(i)] for i in rng.integers(0, len(vocab), n)]
            if f.dtype is DType.INT:
                ints = [int(t) for t in picked if _is_int(t)]
                if f.kind is Kind.CATEGORICAL and not ints:
                    ints = [0]  # a scalar column needs a value; 0 is then out of vocabulary
                feature[f.column] = tf.train.Feature(int64_list=tf.train.Int64List(value=ints))
            else:
                values = [t.encode() for t in picked]
                feature[f.column] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        examples.append(example.SerializeToString())
    return examples


def _read_tokens(path: Path) -> list[str]:
    return [t for t in Path(path).read_text().split("\n") if t]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def load_quantile_boundaries(summary_path: Path) -> dict[str, list[float] | None]:
    """Each numeric feature's quantile boundaries from a datagen ``summary.json``."""
    summary = json.loads(summary_path.read_text())
    return {name: q.get("boundaries") for name, q in summary.get("quantiles", {}).items()}
