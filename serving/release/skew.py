"""Training/serving skew: the features of logged requests against the training statistics.

The model server's request log (:mod:`serving.request_log`, TF Serving's ``PredictionLog``
TFRecords) holds what clients really sent. The raw features are taken out of each logged
request: the serialized tf.Examples of a Predict request's ``examples`` (or ``inputs``) tensor,
the examples of a Classify or Regress request (its context merged in, as the server does), or
one tensor per column of the ``raw_features`` signature. Their statistics are computed with
datagen's own functions (:mod:`pipeline.statistics`) and compared with the training data's
``statistics.json`` by data validation's checks (:mod:`pipeline.anomalies`): a column the
requests lack, a rise of its missing values, a change of its top tokens' shares (L-infinity),
of its numbers' distribution over the training deciles (Jensen-Shannon), tokens training never
saw. The label is not compared (requests have none), nor the number of rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from pipeline import anomalies as data_validation
from pipeline.statistics import LABEL, batch_statistics, finalize, merge
from transform import artifacts
from transform.artifacts import CLASSIFY_INPUT, EXAMPLES_INPUT
from transform.config import Config, Kind
from transform.errors import WidedeepError
from transform.features import recorded_raw_spec, serving_feature_spec
from transform.records import read_records

BATCH_ROWS = 4096
"""Examples decoded and summarised at a time."""
IGNORED_KINDS = (data_validation.TOO_FEW_ROWS, data_validation.LABEL_RATE)
"""Data validation's checks that do not apply to requests (how many; the label)."""


class RequestLogError(WidedeepError, ValueError):
    """The request log cannot be read or holds nothing to compare."""


def read_prediction_logs(path: str | Path) -> Iterator[prediction_log_pb2.PredictionLog]:
    """The PredictionLogs of a request log file or folder (files being written included, up
    to their last whole record).

    Raises:
      RequestLogError: there is no request log file, or a record is not a PredictionLog.
    """
    files = artifacts.request_log_files(path)
    if not files:
        raise RequestLogError(
            f"{path}: no request log files (*{artifacts.REQUEST_LOG_SUFFIX}); is it the folder "
            "given to widedeep serve --request_log_dir, or a logging_config's filename_prefix "
            "folder?"
        )
    for file in files:
        for record in read_records(file):
            try:
                yield prediction_log_pb2.PredictionLog.FromString(record)
            except Exception as error:
                raise RequestLogError(
                    f"{file}: a record is not a PredictionLog ({error})"
                ) from None


def _examples_of_input(request_input: Any) -> list[bytes]:
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in request_input.example_list.examples]
    if kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        context = with_context.context.SerializeToString()
        # Concatenated serialized messages merge: the example's own values win, as served.
        return [context + e.SerializeToString() for e in with_context.examples]
    return []


def logged_inputs(
    record: prediction_log_pb2.PredictionLog,
) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """The raw features of one logged request: serialized tf.Examples, or (a request to the
    ``raw_features`` signature) one array per column."""
    kind = record.WhichOneof("log_type")
    if kind == "classify_log":
        return _examples_of_input(record.classify_log.request.input), {}
    if kind == "regress_log":
        return _examples_of_input(record.regress_log.request.input), {}
    if kind != "predict_log":
        return [], {}
    inputs = record.predict_log.request.inputs
    for name in (EXAMPLES_INPUT, CLASSIFY_INPUT):
        if name in inputs and inputs[name].dtype == tf.string.as_datatype_enum:
            return list(tf.make_ndarray(inputs[name]).reshape(-1)), {}
    return [], {name: tf.make_ndarray(proto).reshape(-1) for name, proto in inputs.items()}


def _columns_batch(
    config: Config, columns: Mapping[str, np.ndarray], spec: Mapping[str, Any]
) -> pa.RecordBatch:
    """One ``raw_features`` request as a batch the way a log holds it: missing values null,
    lists split on ``data.list_delimiter`` and typed as the model parses them."""
    rows = max((len(v) for v in columns.values()), default=0)
    list_columns = {f.column for f in config.features if f.kind is Kind.CATEGORICAL_LIST}
    arrays, names = [], []
    for column, values in columns.items():
        if len(values) == 1 and rows > 1:
            values = np.repeat(values, rows)  # a value given once is every candidate's
        if column in list_columns:
            entry = spec.get(column)
            as_int = entry is not None and entry.dtype == tf.int64
            delimiter = config.data.list_delimiter.encode()
            lists = []
            for v in values:
                items = v.split(delimiter) if v else []
                lists.append([int(i) for i in items] if as_int else items)
            arrays.append(pa.array(lists, pa.list_(pa.int64() if as_int else pa.binary())))
        elif values.dtype == object:
            arrays.append(pa.array([v if v else None for v in values], pa.binary()))
        else:
            arrays.append(pa.array(values))
        names.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=names)


@dataclasses.dataclass
class _Summary:
    """What is summed up about one model's logged requests."""

    requests: int = 0
    rows: int = 0
    acc: dict[str, Any] = dataclasses.field(default_factory=dict)
    pending: list[bytes] = dataclasses.field(default_factory=list)

    def flush(self, config: Config, decoder: Any) -> None:
        """Adds the examples waiting to the statistics."""
        if self.pending:
            batch = decoder.DecodeBatch(self.pending)
            self.acc = merge(self.acc, batch_statistics(config, batch, decoded=True))
            self.pending = []


@dataclasses.dataclass
class RequestStatistics:
    """The statistics of the logged requests (``statistics.json``'s layout) and their counts."""

    statistics: dict[str, Any]
    requests: int
    rows: int
    files: int
    models: dict[str, int]


def request_statistics(
    config: Config,
    request_log: str | Path,
    data_dir: str | Path | None = None,
    model_name: str | None = None,
) -> RequestStatistics:
    """The statistics of the raw features of the logged requests of ``model_name`` (default:
    the config's; when the log holds one other model only, that one: it may be served under
    another name).

    Raises:
      RequestLogError: no request log, or no logged request of the model.
    """
    from tfx_bsl.coders import example_coder

    spec = serving_feature_spec(config, recorded_raw_spec(data_dir) if data_dir else None)
    decoder = example_coder.ExamplesToRecordBatchDecoder()
    # Read once, summarised per model as it goes: a log of any size takes the memory of a
    # few batches and of the statistics.
    summaries: dict[str, _Summary] = {}
    for record in read_prediction_logs(request_log):
        name = record.log_metadata.model_spec.name
        summary = summaries.setdefault(name, _Summary())
        summary.requests += 1
        examples, columns = logged_inputs(record)
        if examples:
            summary.pending.extend(examples)
            summary.rows += len(examples)
            if len(summary.pending) >= BATCH_ROWS:
                summary.flush(config, decoder)
        elif columns:
            batch = _columns_batch(config, columns, spec)
            summary.rows += batch.num_rows
            summary.acc = merge(summary.acc, batch_statistics(config, batch))
    if not summaries:
        raise RequestLogError(f"{request_log}: the request log files hold no PredictionLog")
    wanted = model_name or config.model_name
    if wanted not in summaries and len(summaries) == 1 and model_name is None:
        wanted = next(iter(summaries))
    chosen = summaries.get(wanted)
    if chosen is None:
        found = ", ".join(
            f"{name or '(no name)'} ({s.requests})" for name, s in sorted(summaries.items())
        )
        raise RequestLogError(
            f"{request_log}: no logged request of model {wanted!r}; the log holds " + found
        )
    chosen.flush(config, decoder)
    if chosen.rows == 0:
        raise RequestLogError(
            f"{request_log}: the {chosen.requests} logged requests of {wanted!r} hold no "
            "examples or raw feature inputs"
        )
    acc = chosen.acc
    stats = finalize(config, acc)
    # Requests carry no label: nothing to compare.
    stats["columns"] = {c: s for c, s in stats["columns"].items() if s["kind"] != LABEL}
    stats["label_rate"] = None
    files = len(artifacts.request_log_files(request_log))
    models = {name: summary.requests for name, summary in summaries.items()}
    return RequestStatistics(stats, chosen.requests, chosen.rows, files, models)


def skew_report(
    config: Config,
    request_log: str | Path,
    data_dir: str | Path,
    model_name: str | None = None,
) -> tuple[dict[str, Any], list[data_validation.Anomaly]]:
    """The ``skew`` section of a verdict and the anomalies found (each with the severity of
    ``validation.skew_severity``)."""
    reference = artifacts.read_statistics(data_dir)
    logged = request_statistics(config, request_log, data_dir, model_name)
    severity = config.validation.skew_severity
    found = [
        dataclasses.replace(a, severity=severity)
        for a in data_validation.find_anomalies(config, logged.statistics, reference)
        if a.kind not in IGNORED_KINDS
    ]
    section = {
        "request_log": str(Path(request_log).absolute()),
        "reference": str((Path(data_dir) / artifacts.STATISTICS_JSON).absolute()),
        "files": logged.files,
        "requests": logged.requests,
        "rows": logged.rows,
        "severity": severity.value,
        "blocking": any(a.blocks for a in found),
        "anomalies": [a.to_dict() for a in found],
        "columns": sorted({a.column for a in found if a.column}),
    }
    return section, found


def format_skew(section: Mapping[str, Any]) -> list[str]:
    """The lines of the verdict that report skew."""
    head = (
        f"  skew         {section['requests']:,} logged requests, {section['rows']:,} "
        f"examples ({section['files']} files) vs the training statistics"
    )
    if not section["anomalies"]:
        return [head + ": no skew"]
    lines = [head + f": skew in {', '.join(section['columns']) or 'the input'}"]
    lines += [
        f"    {a['severity'].upper()} {a['kind']}: {a['description']}" for a in section["anomalies"]
    ]
    return lines
