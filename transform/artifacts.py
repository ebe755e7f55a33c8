"""What one stage hands the next: the folders, files and names every reader and writer shares.

This module owns each contract between stages; nothing else spells these names. It sits in
``transform`` because every package may import ``transform`` and ``transform`` imports none of
them, so the writer of an artifact and each of its readers agree by construction.

- **Datagen output** (written by ``pipeline.datagen``; read by the trainer, the release gate,
  the run and the tools)::

      transform_fn/  transformed_metadata/  metadata/   the tf.Transform output (graph, schemas)
      train/part-*.tfrecord.gz  eval/part-*.tfrecord.gz transformed tf.Examples
      eval_raw/part-*.tfrecord.gz                       the eval split's raw tf.Examples
      config.yaml  summary.json  summary.txt            the config used and what the run saw
      statistics.json                                   statistics of the input's raw columns
      anomalies.json  anomalies.png                     what data validation found, and a
                                                        plot of the columns that moved

- **Model output** (written by ``trainer.train``; read by the release gate, warm start and the
  run): ``config.yaml``, ``metrics.json``, ``warm_start.json``, ``run.json`` (the training
  run's state), ``checkpoints/``, ``vocabularies/``, ``model_spec.json``, ``export/`` (the
  SavedModel) and, once the release gate has judged it, ``verdict.json`` with its
  human-readable forms ``analysis.md`` (slices and calibration) and ``analysis.png``.
- **The SavedModel** (written by ``trainer.export``; read by the servers, the clients and the
  release gate): its signature, input and output names, and its warmup requests in
  ``assets.extra/tf_serving_warmup_requests``, the file TF Serving replays at load.
- **The serving base path** (written by ``serving.release.deploy``; read by the model servers
  and the release gate): ``<models dir>/<model name>/<version>/``, TF Serving's layout.
- **Request logs** (written by the built-in model server, :mod:`serving.request_log`; read by
  ``widedeep validate --request-log``): uncompressed TFRecord files of TF Serving's
  ``PredictionLog``, ``<prefix>-<UTC start>-<host>-<pid>-<sequence>.tfrecord``; the file being
  written is hidden as ``.<that name>.tmp`` beside it and renamed when finished.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transform.errors import ArtifactError

# --------------------------------------------------------------------------------------------
# Datagen output

TRAIN_DIR = "train"
EVAL_DIR = "eval"
EVAL_RAW_DIR = "eval_raw"
"""The eval split's raw tf.Examples (label included): scored by every model the gate compares,
each with its own vocabularies, and replayed as warmup requests."""
SHARD_PREFIX = "part"
SHARD_SUFFIX = ".tfrecord.gz"
SHARD_PATTERN = f"{SHARD_PREFIX}-*"
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
STATISTICS_JSON = "statistics.json"
"""Statistics of every raw column the config reads, over all rows of the input."""
ANOMALIES_JSON = "anomalies.json"
"""What data validation found: each anomaly with its column, kind, severity and measure."""
ANOMALIES_PNG = "anomalies.png"
"""The reference's and this input's distributions of the columns that moved."""
CONFIG_YAML = "config.yaml"
"""The config a stage ran with, saved in its output (datagen output and model output alike)."""
TRANSFORM_DIRS = ("transform_fn", "transformed_metadata")
"""What ``tft.TFTransformOutput`` reads (tf.Transform's own names)."""
RAW_METADATA_DIR = "metadata"
"""The raw schema (``tft.TFTransformOutput.RAW_METADATA_DIR``): tf.Transform's
``WriteTransformFn`` does not write it, datagen does."""


def shards(data_dir: str | Path, split: str) -> list[str]:
    """The TFRecord shards of one split (``train``, ``eval`` or ``eval_raw``), sorted."""
    return sorted(str(p) for p in (Path(data_dir) / split).glob(SHARD_PATTERN))


def read_summary(data_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a datagen output.

    Raises:
      ArtifactError: the folder has none, or it is not valid JSON.
    """
    path = Path(data_dir) / SUMMARY_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{data_dir}: not a datagen output (no {SUMMARY_JSON})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def read_statistics(path: str | Path) -> dict[str, Any]:
    """The statistics of a datagen input: ``statistics.json`` in a datagen output folder, or
    the path of such a file.

    Raises:
      ArtifactError: there is none, or it is not valid JSON.
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATISTICS_JSON
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: no such statistics file (a datagen output's {STATISTICS_JSON})"
        ) from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("columns"), dict):
        raise ArtifactError(f"{path}: not a {STATISTICS_JSON} (no 'columns')")
    return stats


def quantile_boundaries(summary: dict[str, Any]) -> dict[str, list[float] | None]:
    """Each numeric feature's quantile boundaries, from a datagen summary."""
    return {name: q.get("boundaries") for name, q in summary.get("quantiles", {}).items()}


def transformed_batches(
    data_dir: str | Path, split: str, feature_spec: dict[str, Any], batch_size: int = 8192
) -> Any:
    """A ``tf.data.Dataset`` of one split's transformed examples, parsed with
    ``feature_spec`` (a part of ``TFTransformOutput.transformed_feature_spec()``), in batches
    in file order."""
    import tensorflow as tf

    records = tf.data.TFRecordDataset(shards(data_dir, split), compression_type="GZIP")
    return records.batch(batch_size).map(lambda batch: tf.io.parse_example(batch, feature_spec))


def read_raw_eval_examples(
    data_dir: str | Path, limit: int | None = None, drop: str | None = None
) -> list[bytes]:
    """Up to ``limit`` serialized raw eval tf.Examples of a datagen output, in file order.

    ``drop`` names a feature removed from each (the label, for warmup requests that look like
    live traffic). An empty list when the output has no raw eval examples.
    """
    import tensorflow as tf

    files = shards(data_dir, EVAL_RAW_DIR)
    if not files:
        return []
    records = tf.data.TFRecordDataset(files, compression_type="GZIP")
    if limit is not None:
        records = records.take(limit)
    out = []
    for record in records.as_numpy_iterator():
        if drop is not None:
            example = tf.train.Example.FromString(record)
            if drop in example.features.feature:
                del example.features.feature[drop]
            record = example.SerializeToString()
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Model output

EXPORT_DIR = "export"
METRICS_FILE = "metrics.json"
VERDICT_FILE = "verdict.json"
ANALYSIS_MD = "analysis.md"
"""The release gate's model analysis beside the verdict: the slice table and calibration."""
ANALYSIS_PNG = "analysis.png"
"""Each slice's AUC change with its interval, and the reliability diagram."""
WARM_START_FILE = "warm_start.json"
TRAINING_STATE_FILE = "run.json"
"""The training run's state (``status``: training, stopped or complete). A ``widedeep run``
folder's own state file has the same name and other contents (``pipeline.run`` owns it); the
two never share a folder."""
MODEL_SPEC_FILE = "model_spec.json"
VOCABULARIES_DIR = "vocabularies"
CHECKPOINTS_DIR = "checkpoints"
STATUS_TRAINING = "training"
STATUS_STOPPED = "stopped"
STATUS_COMPLETE = "complete"


def read_vocabulary(path: str | Path) -> list[bytes]:
    """The tokens of a vocabulary file, as ``tft.TFTransformOutput.vocabulary_by_name`` reads
    them (one a line, in id order; a blank line is the empty token, not skipped).

    For the copies a model keeps in ``vocabularies/``; a datagen output's own vocabularies are
    read through ``TFTransformOutput.vocabulary_by_name``.
    """
    import tensorflow as tf

    with tf.io.gfile.GFile(str(path), "rb") as f:
        return [line.rstrip(b"\n") for line in f]


def export_dir(model_dir: str | Path) -> Path:
    """The SavedModel of a model output folder (``<dir>/export``), or the folder itself.

    Raises:
      ArtifactError: neither holds a ``saved_model.pb``.
    """
    path = Path(model_dir)
    if (path / SAVED_MODEL_FILE).exists():
        return path
    if (path / EXPORT_DIR / SAVED_MODEL_FILE).exists():
        return path / EXPORT_DIR
    raise ArtifactError(
        f"{path}: no SavedModel ({SAVED_MODEL_FILE}) in it or in its {EXPORT_DIR}/ folder"
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON artifact, or None when the file does not exist or is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def training_complete(model_dir: str | Path) -> bool:
    """Whether the training run in ``model_dir`` finished (its state says ``complete``)."""
    state = read_json(Path(model_dir) / TRAINING_STATE_FILE)
    return bool(state) and state.get("status") == STATUS_COMPLETE


def read_metrics(model_dir: str | Path) -> dict[str, Any]:
    """The offline metrics a training run wrote (``metrics.json``).

    Raises:
      ArtifactError: the folder holds none (training has not finished).
    """
    metrics = read_json(Path(model_dir) / METRICS_FILE)
    if metrics is None:
        raise ArtifactError(f"{model_dir}: no {METRICS_FILE}; has training finished?")
    return metrics


def saved_config_path(model_dir: str | Path) -> Path | None:
    """The config a model was trained with: ``config.yaml`` in its folder, or in the folder
    above (for a path to the SavedModel itself); None when there is none."""
    for candidate in (Path(model_dir) / CONFIG_YAML, Path(model_dir).parent / CONFIG_YAML):
        if candidate.exists():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# The SavedModel

SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"
"""Serialized raw tf.Examples in (:data:`EXAMPLES_INPUT`), probabilities out."""
CLASSIFY_SIGNATURE = "classification"
"""TF Serving's Classify: :data:`CLASSIFY_INPUT` in, :data:`CLASSES_OUTPUT` and
:data:`SCORES_OUTPUT` out."""
RAW_SIGNATURE = "raw_features"
"""One named input per raw column, probabilities out."""
EXPLAIN_SIGNATURE = "explain"
"""Serialized raw tf.Examples in (:data:`EXAMPLES_INPUT`), each one's score split into its
parts out: :data:`BIAS_OUTPUT`, :data:`WIDE_LOGIT_OUTPUT` and :data:`DEEP_LOGIT_OUTPUT` sum to
:data:`LOGIT_OUTPUT`, whose sigmoid is :data:`PROBABILITY_OUTPUT` (all float [B]); for each
input of the wide tower, the ids that fired and their weights (:func:`fired_ids_output`,
:func:`fired_weights_output`: int64 and float [B, n], ids padded with -1)."""
BIAS_OUTPUT = "bias"
WIDE_LOGIT_OUTPUT = "wide_logit"
DEEP_LOGIT_OUTPUT = "deep_logit"
LOGIT_OUTPUT = "logit"
PROBABILITY_OUTPUT = "probability"
FIRED_IDS_PREFIX = "wide_ids__"
FIRED_WEIGHTS_PREFIX = "wide_weights__"


def fired_ids_output(feature: str) -> str:
    """The :data:`EXPLAIN_SIGNATURE` output of the wide ids of ``feature`` that fired."""
    return FIRED_IDS_PREFIX + feature


def fired_weights_output(feature: str) -> str:
    """The :data:`EXPLAIN_SIGNATURE` output of the weights of those ids."""
    return FIRED_WEIGHTS_PREFIX + feature


EXAMPLES_INPUT = "examples"
CLASSIFY_INPUT = "inputs"
PROBABILITIES_OUTPUT = "probabilities"
CLASSES_OUTPUT = "classes"
SCORES_OUTPUT = "scores"
POSITIVE_CLASS = "1"
CLASS_LABELS = ("0", POSITIVE_CLASS)
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
"""TF Serving's own name: the warmup records it replays at load (at most 1000)."""


def warmup_path(saved_model_dir: str | Path) -> Path:
    """Where a SavedModel keeps its warmup requests."""
    return Path(saved_model_dir) / WARMUP_DIR / WARMUP_FILE


def predict_request(
    model_name: str,
    examples: Sequence[bytes],
    *,
    signature_name: str = SERVING_SIGNATURE,
    version: int | None = None,
) -> Any:
    """A ``PredictRequest`` scoring serialized raw tf.Examples with the tf.Example signature."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    # What tf.make_tensor_proto writes for a list of bytes, without its per-value checks.
    tensor = request.inputs[EXAMPLES_INPUT]
    tensor.dtype = types_pb2.DT_STRING
    tensor.tensor_shape.dim.add(size=len(examples))
    tensor.string_val.extend(examples)
    return request


def read_warmup_requests(path: str | Path) -> list[Any]:
    """The PredictRequests of a warmup file (other kinds of log records are skipped)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.WhichOneof("log_type") == "predict_log":
            requests.append(log.predict_log.request)
    return requests


# --------------------------------------------------------------------------------------------
# The serving base path

TENSORFLOW_PLATFORM = "tensorflow"


def version_dir(models_dir: str | Path, model_name: str, version: int) -> Path:
    """``<models dir>/<model name>/<version>/``: where a served version lives."""
    return Path(models_dir) / model_name / str(version)


def versions(models_dir: str | Path, model_name: str) -> list[int]:
    """The version numbers under ``<models dir>/<model name>/``, ascending."""
    folder = Path(models_dir) / model_name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def check_models_dir(models_dir: str | Path, model_name: str) -> None:
    """Refuses, as the folder of every model, the folder of one model's versions.

    ``validate --models-dir`` and ``deploy --models-dir`` take the parent of every model
    (``DIR/<model name>/<version>/``); TF Serving's ``--model_base_path`` is one model's folder.
    Given the latter, validate would find no baseline and deploy would write
    ``DIR/<model name>/<model name>/1/``, which the server reading ``DIR`` never sees.

    Raises:
      ArtifactError: ``models_dir`` holds numbered SavedModel folders and no ``model_name``.
    """
    folder = Path(models_dir)
    if not folder.is_dir() or (folder / model_name).is_dir():
        return
    held = sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.name.isdigit() and (p / SAVED_MODEL_FILE).is_file()
    )
    if held:
        parent = (
            folder.parent if folder.name == model_name else f"the folder that holds {folder.name}/"
        )
        raise ArtifactError(
            f"{folder}: holds version{'s' if len(held) > 1 else ''} "
            f"{', '.join(map(str, held[-3:]))} of a model, i.e. it is one "
            f"model's folder (serve --model-base-path); --models-dir is the folder that holds "
            f"every model as <models dir>/{model_name}/<version>/: pass {parent}"
        )


def model_server_config(model_name: str, base_path: str, num_versions: int | None = None) -> Any:
    """The ``ModelServerConfig`` serving one model from its base path.

    This is what TF Serving builds from ``--model_name`` and ``--model_base_path``; with
    ``num_versions``, the latest that many versions are served instead of the newest one.
    """
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = base_path
    model.model_platform = TENSORFLOW_PLATFORM
    if num_versions is not None:
        model.model_version_policy.latest.num_versions = num_versions
    return config


# --------------------------------------------------------------------------------------------
# Request logs

REQUEST_LOG_SUFFIX = ".tfrecord"
REQUEST_LOG_TEMP_SUFFIX = ".tmp"
REQUEST_LOG_DEFAULT_NAME = "requests"
"""The file name prefix of a ``filename_prefix`` that names only a folder (ends with '/')."""


def request_log_name(
    filename_prefix: str, started: Any, host: str, pid: int, sequence: int
) -> Path:
    """The finished name of a request log file (``started`` a UTC ``datetime``)."""
    folder, _, base = filename_prefix.rpartition("/")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    name = f"{base or REQUEST_LOG_DEFAULT_NAME}-{stamp}-{host}-{pid}-{sequence:05d}"
    return Path(folder or ".") / f"{name}{REQUEST_LOG_SUFFIX}"


def request_log_temp_name(final: Path) -> Path:
    """The hidden name a request log file has while it is written."""
    return final.with_name(f".{final.name}{REQUEST_LOG_TEMP_SUFFIX}")


def request_log_final_name(temp: Path) -> Path:
    """The finished name of a request log file written under ``temp``."""
    return temp.with_name(temp.name[1 : -len(REQUEST_LOG_TEMP_SUFFIX)])


def request_log_temp_files(folder: str | Path, base: str) -> list[Path]:
    """The request log files being written (or left by a killed server) in ``folder`` whose
    names start with ``base``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{base}-*{REQUEST_LOG_SUFFIX}{REQUEST_LOG_TEMP_SUFFIX}"
    return sorted(folder.glob(pattern))


def request_log_files(path: str | Path, *, include_unfinished: bool = True) -> list[Path]:
    """The request log files of ``path``: the file itself, or every one under the folder
    (sub-folders included), finished ones and, with ``include_unfinished``, those being
    written or left by a killed server (read up to their last whole record)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    found = [p for p in path.rglob(f"*{REQUEST_LOG_SUFFIX}") if not p.name.startswith(".")]
    if include_unfinished:
        found += path.rglob(f".*{REQUEST_LOG_SUFFIX}{REQUEST_LOG_TEMP_SUFFIX}")
    return sorted(found)
