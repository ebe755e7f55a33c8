"""Request logging in the built-in server, and the skew check of ``validate --request-log``.

One server (in this process) serves the session's movies model under three names from a TF
Serving model config file: two with their own ``logging_config`` (every request, and half of
them), one logged through ``--request_log_dir``. Requests go through the standard TF Serving
client over gRPC and through REST; the log files are read back with TensorFlow's own TFRecord
reader and TF Serving's ``PredictionLog``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    classification_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from pipeline.anomalies import COLUMN_MISSING, NUMERIC_DRIFT
from pipeline.cli import main
from serving.errors import ServingError
from serving.release.skew import RequestLogError, request_statistics, skew_report
from serving.release.validate import validate
from serving.request_log import (
    RequestLogger,
    RequestLogOptions,
    default_logging_config,
    host_name,
)
from serving.server import ModelServer, settings_from_args
from transform import artifacts
from transform.artifacts import CLASSIFY_SIGNATURE, export_dir, predict_request
from transform.config import Kind, Severity
from transform.features import recorded_raw_spec, serving_feature_spec
from transform.records import frame_record

HALF_RATE_REQUESTS = 200
DEADLINE = 30.0


@pytest.fixture(scope="module")
def examples(movies_data: Path, movies_small_config) -> list[bytes]:
    """Raw eval examples as clients send them: without the label, and with every column the
    model cannot do without (the log misses some)."""
    spec = serving_feature_spec(movies_small_config, recorded_raw_spec(movies_data))
    required = [
        column
        for column, entry in spec.items()
        if isinstance(entry, tf.io.FixedLenFeature) and entry.default_value is None
    ]
    found = []
    for serialized in artifacts.read_raw_eval_examples(movies_data, drop=movies_small_config.label):
        features = tf.train.Example.FromString(serialized).features.feature
        if all(_values(features, column) == 1 for column in required):
            found.append(serialized)
    assert len(found) >= 200
    return found


def _values(features: Any, column: str) -> int:
    """How many values a tf.Example's feature holds (0 when it has none)."""
    if column not in features:
        return 0
    kind = features[column].WhichOneof("kind")
    return len(getattr(features[column], kind).value) if kind else 0


def _nonempty(example: tf.train.Example) -> tf.train.Example:
    """The example without its features that hold no value."""
    out = tf.train.Example()
    for name, feature in example.features.feature.items():
        if _values(example.features.feature, name):
            out.features.feature[name].CopyFrom(feature)
    return out


def _skew_columns(config: Any) -> tuple[str, str]:
    """A column to leave out of requests (one the model can do without: it has a default) and
    a numeric column whose values are multiplied by 10."""
    dropped = next(f.column for f in config.features if f.default is not None)
    scaled = next(
        f.column for f in config.features if f.kind is Kind.NUMERIC and f.column != dropped
    )
    return dropped, scaled


def _skewed(config: Any, examples: list[bytes]) -> list[bytes]:
    """The examples with the columns of :func:`_skew_columns` left out and scaled."""
    dropped, scaled = _skew_columns(config)
    out = []
    for serialized in examples:
        example = tf.train.Example.FromString(serialized)
        features = example.features.feature
        del features[dropped]
        values = features[scaled]
        kind = values.WhichOneof("kind")
        numbers = getattr(values, kind).value
        numbers[:] = [v * 10 for v in numbers]
        out.append(example.SerializeToString())
    return out


@pytest.fixture(scope="module")
def server(
    movies_model: Path, movies_small_config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ModelServer, Path, str]]:
    """The built-in server with request logging; yields it, the log folder and its target."""
    root = tmp_path_factory.mktemp("request_log")
    base = root / "base"
    base.mkdir()
    (base / "1").symlink_to(export_dir(movies_model).absolute())
    logs = root / "logs"
    name = movies_small_config.model_name
    config = model_server_config_pb2.ModelServerConfig()
    for model, rate in ((name, 1.0), (f"{name}_half", 0.5), (f"{name}_skewed", None)):
        entry = config.model_config_list.config.add(
            name=model, base_path=str(base), model_platform="tensorflow"
        )
        if rate is not None:
            # TF Serving's own way: a logging_config in the model's entry.
            entry.logging_config.log_collector_config.filename_prefix = str(logs / model / "log")
            entry.logging_config.sampling_config.sampling_rate = rate
    config_file = root / "models.config"
    config_file.write_text(text_format.MessageToString(config))
    settings = settings_from_args(
        [
            "--port=0",
            f"--model_config_file={config_file}",
            "--file_system_poll_wait_seconds=0",
            # Models without a logging_config: the convenience flags.
            f"--request_log_dir={logs / 'flags'}",
            "--request_log_sampling_rate=1",
            "--request_log_max_file_records=25",
        ]
    )
    # REST on a free port (--rest_api_port=0 would serve no REST, as in TF Serving).
    settings = dataclasses.replace(settings, rest_api_port=0)
    with ModelServer(settings) as started:
        for model in (name, f"{name}_half", f"{name}_skewed"):
            assert started.wait_until_available(model, 1, timeout=120)
        yield started, logs, f"127.0.0.1:{started.grpc_port}"


def _rest(server: ModelServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_api_port}{path}", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, timeout=DEADLINE) as response:
        return json.loads(response.read())


def _json_example(serialized: bytes) -> dict[str, Any]:
    """A tf.Example as TF Serving's REST classify API takes it."""
    out: dict[str, Any] = {}
    for name, feature in tf.train.Example.FromString(serialized).features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        if kind == "bytes_list":
            values = [{"b64": base64.b64encode(v).decode()} for v in values]
        out[name] = values
    return out


def _logged(folder: Path) -> list[prediction_log_pb2.PredictionLog]:
    """The PredictionLogs of a folder's finished files, read by TensorFlow's own reader."""
    files = sorted(str(p) for p in folder.rglob(f"*{artifacts.REQUEST_LOG_SUFFIX}"))
    return [
        prediction_log_pb2.PredictionLog.FromString(record)
        for record in tf.data.TFRecordDataset(files).as_numpy_iterator()
    ]


@pytest.fixture(scope="module")
def traffic(server, examples: list[bytes], movies_small_config) -> dict[str, Any]:
    """Requests to each model, then the server stopped (its files finished)."""
    started, logs, target = server
    name = movies_small_config.model_name
    sent: dict[str, Any] = {"predict": [], "classify": [], "rest_predict": [], "rest_classify": []}
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for start in range(0, len(examples), 20):
            batch = examples[start : start + 20]
            request = predict_request(name, batch)
            stub.Predict(request, timeout=DEADLINE)
            sent["predict"].append(request)
            skewed = _skewed(movies_small_config, batch)
            stub.Predict(predict_request(f"{name}_skewed", skewed), timeout=DEADLINE)
        for start in range(0, 60, 6):
            request = classification_pb2.ClassificationRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = CLASSIFY_SIGNATURE
            for serialized in examples[start : start + 6]:
                request.input.example_list.examples.add().ParseFromString(serialized)
            stub.Classify(request, timeout=DEADLINE)
            sent["classify"].append(request)
        for i in range(HALF_RATE_REQUESTS):
            request = predict_request(f"{name}_half", examples[i : i + 1])
            stub.Predict(request, timeout=DEADLINE)
    for start in range(0, 30, 3):
        batch = examples[start : start + 3]
        instances = [{"b64": base64.b64encode(e).decode()} for e in batch]
        _rest(started, f"/v1/models/{name}:predict", {"instances": instances})
        sent["rest_predict"].append(batch)
        _rest(
            started,
            f"/v1/models/{name}:classify",
            {"signature_name": CLASSIFY_SIGNATURE, "examples": [_json_example(e) for e in batch]},
        )
        sent["rest_classify"].append(batch)
    # Stopped: what was sampled is written, every file finished.
    started.stop()
    metrics = started.metrics.render()
    counts = {
        model: started.metrics.request_log_count(model, "logged")
        for model in (name, f"{name}_half", f"{name}_skewed")
    }
    return {"sent": sent, "logs": logs, "metrics": metrics, "counts": counts, "name": name}


def test_request_logging_writes_readable_prediction_logs_at_the_set_rate(traffic) -> None:
    logs, name, sent = traffic["logs"], traffic["name"], traffic["sent"]
    folder = logs / name
    # Every file finished (renamed from its hidden temporary name), none empty.
    assert not list(folder.rglob(f".*{artifacts.REQUEST_LOG_TEMP_SUFFIX}"))
    records = _logged(folder)
    total = sum(len(v) for v in sent.values())
    assert len(records) == total == traffic["counts"][name]
    assert (
        f'request_log_count{{model_name="{name}",outcome="logged"}} {total}' in (traffic["metrics"])
    )
    # Files are rotated at the set number of records (25), each a valid TFRecord file.
    files = sorted(folder.glob(f"log-*{artifacts.REQUEST_LOG_SUFFIX}"))
    assert len(files) == math.ceil(total / 25)
    for record in records:
        metadata = record.log_metadata
        assert metadata.model_spec.name == name and metadata.model_spec.version.value == 1
        assert metadata.sampling_config.sampling_rate == 1.0 and metadata.timestamp_secs > 0
    by_kind: dict[str, list[Any]] = {"predict_log": [], "classify_log": []}
    for record in records:
        by_kind[record.WhichOneof("log_type")].append(record)
    predicts, classifies = by_kind["predict_log"], by_kind["classify_log"]
    assert len(predicts) == len(sent["predict"]) + len(sent["rest_predict"])
    assert len(classifies) == len(sent["classify"]) + len(sent["rest_classify"])
    # gRPC requests are logged as sent, with the answers given.
    grpc_predicts = [r.predict_log for r in predicts[: len(sent["predict"])]]
    assert [log.request for log in grpc_predicts] == sent["predict"]
    assert all(log.response.outputs["probabilities"].float_val for log in grpc_predicts)
    grpc_classifies = [r.classify_log for r in classifies[: len(sent["classify"])]]
    assert [log.request for log in grpc_classifies] == sent["classify"]
    assert all(len(log.response.result.classifications) == 6 for log in grpc_classifies)
    # REST requests are logged as the protos they are answered with, the same tensors and
    # examples.
    rest_predicts = predicts[len(sent["predict"]) :]
    for record, batch in zip(rest_predicts, sent["rest_predict"], strict=True):
        assert list(record.predict_log.request.inputs["examples"].string_val) == batch
    rest_classifies = classifies[len(sent["classify"]) :]
    for record, batch in zip(rest_classifies, sent["rest_classify"], strict=True):
        logged = record.classify_log.request.input.example_list.examples
        # (An empty list has no type in JSON: compared without empty features.)
        assert [_nonempty(e) for e in logged] == [
            _nonempty(tf.train.Example.FromString(e)) for e in batch
        ]


def test_half_rate_logs_about_half_the_requests(traffic) -> None:
    half = f"{traffic['name']}_half"
    records = _logged(traffic["logs"] / half)
    n, p = HALF_RATE_REQUESTS, 0.5
    # Binomial(200, 0.5): 100 +- 4.5 standard deviations (about 1 in 150,000 falls outside).
    band = 4.5 * math.sqrt(n * p * (1 - p))
    assert abs(len(records) - n * p) <= band, len(records)
    assert len(records) == traffic["counts"][half]
    assert all(r.log_metadata.sampling_config.sampling_rate == 0.5 for r in records)


def test_validate_reports_skew_by_column(
    traffic, movies_data: Path, movies_model: Path, movies_small_config, tmp_path: Path, capsys
) -> None:
    config, logs, name = movies_small_config, traffic["logs"], traffic["name"]
    # Requests like the training data: no skew.
    section, found = skew_report(config, logs / name, movies_data)
    assert found == [] and section["anomalies"] == []
    assert section["rows"] > 500 and section["requests"] == sum(
        len(v) for v in traffic["sent"].values()
    )
    # A column dropped and another one scaled: both named, as warnings by default.
    dropped, scaled = _skew_columns(config)
    flags_folder = logs / "flags"
    section, found = skew_report(config, flags_folder, movies_data)
    kinds = {(a.column, a.kind) for a in found}
    assert (dropped, COLUMN_MISSING) in kinds and (scaled, NUMERIC_DRIFT) in kinds, kinds
    assert all(a.severity.value == "warn" for a in found) and not section["blocking"]
    # The command: the verdict holds the skew section and the printed verdict names them.
    model = tmp_path / "model"
    shutil.copytree(movies_model, model, symlinks=True)
    argv = ["validate", "--model", str(model), "--data", str(movies_data), "--skip-dry-run"]
    assert main([*argv, "--request-log", str(flags_folder)]) == 0
    out = capsys.readouterr().out
    assert "skew" in out and dropped in out and scaled in out
    verdict = json.loads((model / artifacts.VERDICT_FILE).read_text())
    assert verdict["passed"] and {dropped, scaled} <= set(verdict["skew"]["columns"])
    # Set to block, skew fails the model, naming the columns.
    strict = dataclasses.replace(
        config, validation=dataclasses.replace(config.validation, skew_severity=Severity.BLOCK)
    )
    failed = validate(model, movies_data, strict, skip_dry_run=True, request_log=flags_folder)
    assert not failed.passed and failed.skew["blocking"]
    skew_reasons = [r for r in failed.reasons if r.startswith("training/serving skew")]
    assert any(dropped in r for r in skew_reasons) and any(scaled in r for r in skew_reasons)
    # A folder without request logs is a clear error.
    with pytest.raises(RequestLogError, match="no request log files"):
        skew_report(config, tmp_path, movies_data)


def test_a_killed_writers_file_is_finished_by_the_next_server(tmp_path: Path) -> None:
    # A process that has ended: its pid names no live writer.
    ended = subprocess.Popen(["true"])
    ended.wait()
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    final = artifacts.request_log_name(str(tmp_path / "m"), started, host_name(), ended.pid, 7)
    temp = artifacts.request_log_temp_name(final)
    records = [predict_request("m", [bytes([i])]) for i in range(3)]
    logs = [
        prediction_log_pb2.PredictionLog(predict_log={"request": r}).SerializeToString()
        for r in records
    ]
    # Killed in the middle of its fourth record.
    temp.write_bytes(b"".join(frame_record(r) for r in logs) + frame_record(logs[0])[:-3])
    logger = RequestLogger(default_logging_config(str(tmp_path), 1.0, "m"))
    logger.close()
    assert not temp.exists() and final.exists()
    read = [
        prediction_log_pb2.PredictionLog.FromString(r)
        for r in tf.data.TFRecordDataset(str(final)).as_numpy_iterator()
    ]
    assert [r.predict_log.request for r in read] == records


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    from serving.metrics import Metrics

    metrics = Metrics()
    # Room for 1,000 bytes of requests waiting: a larger one never fits.
    options = RequestLogOptions(queue_bytes=1000)
    logger = RequestLogger(default_logging_config(str(tmp_path), 1.0, "m"), options, metrics)
    small, large = predict_request("m", [b"x" * 10]), predict_request("m", [b"x" * 2000])
    response = predict_pb2.PredictResponse()
    accepted = [
        logger.offer("Predict", request, response, "m", 1)
        for request in (small, large, small, large, large)
    ]
    assert accepted == [True, False, True, False, False]
    logger.close()
    assert (logger.logged, logger.dropped) == (2, 3)
    assert metrics.request_log_count("m", "dropped") == 3
    assert metrics.request_log_count("m", "logged") == 2
    (written,) = tmp_path.glob(f"m-*{artifacts.REQUEST_LOG_SUFFIX}")
    assert sum(1 for _ in tf.data.TFRecordDataset(str(written))) == 2


def test_raw_features_requests_are_read_column_by_column(
    examples: list[bytes], movies_data: Path, movies_small_config, tmp_path: Path
) -> None:
    from trainer.export import raw_inputs_of

    config = movies_small_config
    spec = serving_feature_spec(config, recorded_raw_spec(movies_data))
    logs = {"examples": tmp_path / "examples", "raw": tmp_path / "raw"}
    writers = {
        kind: RequestLogger(default_logging_config(str(folder), 1.0, config.model_name))
        for kind, folder in logs.items()
    }
    response = predict_pb2.PredictResponse()
    for start in range(0, len(examples), 50):
        batch = examples[start : start + 50]
        request = predict_request(config.model_name, batch)
        writers["examples"].offer("Predict", request, response, config.model_name, 1)
        raw = predict_pb2.PredictRequest()
        raw.model_spec.name = config.model_name
        raw.model_spec.signature_name = artifacts.RAW_SIGNATURE
        for column, values in raw_inputs_of(batch, spec, config.data.list_delimiter).items():
            raw.inputs[column].CopyFrom(tf.make_tensor_proto(values))
        writers["raw"].offer("Predict", raw, response, config.model_name, 1)
    for writer in writers.values():
        writer.close()
    stats = {kind: request_statistics(config, folder, movies_data) for kind, folder in logs.items()}
    assert stats["raw"].rows == stats["examples"].rows == len(examples)
    # The same values, whichever way they were sent (lists split, typed as the model reads
    # them; a value missing from an example is its default in the raw inputs).
    for column, s in stats["examples"].statistics["columns"].items():
        raw = stats["raw"].statistics["columns"][column]
        assert raw["type"] == s["type"], column
        if s["kind"] == Kind.CATEGORICAL_LIST.value:
            assert raw["tokens"] == s["tokens"] and raw["length"] == s["length"], column
    section, found = skew_report(config, logs["raw"], movies_data)
    assert found == [] and section["requests"] == len(range(0, len(examples), 50))


@pytest.mark.parametrize(
    ("logging_config", "message"),
    [
        ('log_collector_config { type: "kafka" filename_prefix: "/tmp/x" }', "type 'kafka'"),
        ('log_collector_config { filename_prefix: "" }', "filename_prefix is empty"),
        (
            'log_collector_config { filename_prefix: "/tmp/x" } sampling_config '
            "{ sampling_rate: 1.5 }",
            "sampling_rate must be in [0, 1]",
        ),
    ],
)
def test_a_logging_config_the_server_cannot_honour_is_refused(
    tmp_path: Path, logging_config: str, message: str
) -> None:
    config_file = tmp_path / "models.config"
    config_file.write_text(
        'model_config_list { config { name: "m" base_path: "/srv/m" model_platform: '
        f'"tensorflow" logging_config {{ {logging_config} }} }} }}'
    )
    server = ModelServer(settings_from_args(["--port=0", f"--model_config_file={config_file}"]))
    with pytest.raises(ServingError, match=re.escape(message)) as error:
        server.start()
    assert "Model m: logging_config" in str(error.value)
    with pytest.raises(ValueError, match="request_log_sampling_rate"):
        settings_from_args(["--model_base_path=/srv/m", "--request_log_sampling_rate=2"])


def test_the_real_binary_gets_no_request_log_flags(tmp_path: Path) -> None:
    from serving import tfserving

    argv = [
        "--port=8500",
        "--model_base_path=/srv/m",
        "--request-log-dir",
        "/srv/logs",
        "--request_log_sampling_rate=0.5",
    ]
    assert tfserving.builtin_only_flags(argv) == [
        "--request_log_dir",
        "--request_log_sampling_rate=0.5",
    ]
    args = tfserving.binary_argv("/usr/bin/tensorflow_model_server", argv)
    assert not [a for a in args if "request_log" in a or a == "/srv/logs"]
    # A model config file with a logging_config: named, so `serve` can warn that the stock
    # binary refuses it.
    config_file = tmp_path / "models.config"
    config_file.write_text(
        'model_config_list { config { name: "a" base_path: "/srv/a" model_platform: '
        '"tensorflow" logging_config { log_collector_config { filename_prefix: "/l/a" } } } '
        'config { name: "b" base_path: "/srv/b" model_platform: "tensorflow" } }'
    )
    assert tfserving.models_with_logging_config([f"--model-config-file={config_file}"]) == ["a"]


def test_a_config_reload_starts_and_stops_logging(
    movies_model: Path, movies_small_config, examples: list[bytes], tmp_path: Path
) -> None:
    name = movies_small_config.model_name
    base = tmp_path / "base"
    base.mkdir()
    (base / "1").symlink_to(export_dir(movies_model).absolute())
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add(
        name=name, base_path=str(base), model_platform="tensorflow"
    )
    settings = settings_from_args([f"--model_base_path={base}", f"--model_name={name}"])
    settings = dataclasses.replace(settings, port=0, file_system_poll_wait_seconds=0)
    logs = tmp_path / "logs"
    with ModelServer(settings) as server:
        assert server.wait_until_available(name, 1, timeout=120)
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_request(name, examples[:3])
            stub.Predict(request, timeout=DEADLINE)  # not logged: no logging_config yet
            entry.logging_config.log_collector_config.filename_prefix = str(logs / "log")
            entry.logging_config.sampling_config.sampling_rate = 1.0
            server.reload_config(config)
            for _ in range(4):
                stub.Predict(request, timeout=DEADLINE)
            # Taken out again: the writer finishes its file, nothing more is logged.
            entry.ClearField("logging_config")
            server.reload_config(config)
            stub.Predict(request, timeout=DEADLINE)
    # Stopped: the dropped logger's file is finished too.
    assert not list(logs.glob(f".*{artifacts.REQUEST_LOG_TEMP_SUFFIX}"))
    records = _logged(logs)
    assert [r.predict_log.request for r in records] == [request] * 4
