"""Tests of the built-in model server through real gRPC and HTTP on loopback.

The server is driven with the standard `tensorflow-serving-api` stubs and `urllib`, as a client
of TensorFlow Serving would drive it. The models are tiny SavedModels built here: p = sigmoid(w*x)
for a float feature `x` of a serialized tf.Example, with w = 2 in version 1 and w = -1 in version 2.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import ServingError
from serving.models import (
    LOADING_SWITCH_INTERVAL_S,
    State,
    aspired_versions,
    load_isolated,
    validate_config,
)
from serving.server import ModelServer, ServerSettings, settings_from_args

MODEL = "toy"
WEIGHTS = {1: 2.0, 2: -1.0}
MAX_MESSAGE = 1 << 20
DEADLINE = 30.0
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Models


class _Toy(tf.Module):
    """p = sigmoid(w * x), with predict, classification and regression signatures."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = tf.Variable(weight, dtype=tf.float32)

    def _probability(self, serialized: tf.Tensor) -> tf.Tensor:
        spec = {"x": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])}
        return tf.sigmoid(self.weight * tf.io.parse_example(serialized, spec)["x"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": self._probability(examples)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        probability = self._probability(inputs)
        labels = tf.tile(tf.constant([["0", "1"]]), [tf.shape(probability)[0], 1])
        return {"classes": labels, "scores": tf.concat([1 - probability, probability], axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": self._probability(inputs)}


def _example(x: float, **features: bytes) -> tf.train.Example:
    feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[x]))}
    for name, value in features.items():
        feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _serialized(xs: list[float]) -> list[bytes]:
    return [_example(x).SerializeToString() for x in xs]


def _probability(version: int, x: float) -> float:
    return 1.0 / (1.0 + math.exp(-WEIGHTS[version] * x))


def _predict_request(
    xs: list[float], *, model: str = MODEL, version: int | None = None, label: str = ""
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(_serialized(xs)))
    return request


def _classify_request(xs: list[float], signature: str = "classification"):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for x in xs:
        request.input.example_list.examples.add().CopyFrom(_example(x))
    return request


def _write_warmup(version_dir: Path, logs: list[prediction_log_pb2.PredictionLog]) -> None:
    folder = version_dir / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(folder / "tf_serving_warmup_requests")) as writer:
        for entry in logs:
            writer.write(entry.SerializeToString())


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version folders to deploy: v1 (with warmup), v2, a corrupt one, one with bad warmup."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for version, weight in WEIGHTS.items():
        module = _Toy(weight)
        folder = root / f"v{version}"
        signatures = {
            "serving_default": module.serve,
            "classification": module.classify,
            "regression": module.regress,
        }
        tf.saved_model.save(module, str(folder), signatures=signatures)
        folders[f"v{version}"] = folder
    predict_log = prediction_log_pb2.PredictionLog()
    predict_log.predict_log.request.CopyFrom(_predict_request([0.5, 1.0]))
    classify_log = prediction_log_pb2.PredictionLog()
    classify_log.classify_log.request.CopyFrom(_classify_request([0.25]))
    _write_warmup(folders["v1"], [predict_log, classify_log])

    broken = root / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    folders["broken"] = broken

    bad_warmup = root / "bad_warmup"
    shutil.copytree(folders["v2"], bad_warmup)
    wrong_input = prediction_log_pb2.PredictionLog()
    wrong_input.predict_log.request.CopyFrom(_predict_request([1.0]))
    wrong_input.predict_log.request.inputs["not_an_input"].CopyFrom(tf.make_tensor_proto([1.0]))
    _write_warmup(bad_warmup, [wrong_input])
    folders["bad_warmup"] = bad_warmup
    return folders


def _deploy(source: Path, base: Path, version: int) -> None:
    """Copy a version in as a deploy does: write aside, then rename into place atomically."""
    staging = base / f".staging-{version}"
    shutil.copytree(source, staging)
    os.rename(staging, base / str(version))


def _base(tmp_path: Path, exported: dict[str, Path], versions: dict[int, str]) -> Path:
    base = tmp_path / MODEL
    base.mkdir(parents=True)
    for version, name in versions.items():
        _deploy(exported[name], base, version)
    return base


class _Client:
    """The standard TF Serving stubs on one channel."""

    def __init__(self, server: ModelServer) -> None:
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{server.grpc_port}",
            options=[("grpc.max_send_message_length", 64 << 20)],
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.rest = f"http://127.0.0.1:{server.rest_api_port}"

    def close(self) -> None:
        self.channel.close()

    def status(self, model: str = MODEL) -> list[tuple[int, int, int, str]]:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        response = self.models.GetModelStatus(request, timeout=DEADLINE)
        return [
            (s.version, s.state, s.status.error_code, s.status.error_message)
            for s in response.model_version_status
        ]

    def http(self, path: str, body: object | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.rest + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=DEADLINE) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def _settings(base: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model_name": MODEL,
        "model_base_path": str(base),
        "port": 0,
        "rest_api_port": 0,
        # Polls are triggered by the tests; a fast interval would race with them.
        "file_system_poll_wait_seconds": 0,
        "max_num_load_retries": 0,
        "max_receive_message_length": MAX_MESSAGE,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_server(tmp_path: Path, exported: dict[str, Path]) -> Iterator:
    """Start servers on fresh base paths; every one is stopped at the end of the test."""
    started: list[tuple[ModelServer, _Client]] = []

    def make(versions: dict[int, str], **overrides: object) -> tuple[ModelServer, _Client, Path]:
        base = _base(tmp_path / f"server{len(started)}", exported, versions)
        server = ModelServer(_settings(base, **overrides))
        server.start()
        started.append((server, _Client(server)))
        return server, started[-1][1], base

    yield make
    for server, client in started:
        client.close()
        server.stop(grace=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, exported: dict[str, Path]) -> Iterator:
    """One server on version 1 shared by the read-only tests."""
    base = _base(tmp_path_factory.mktemp("shared"), exported, {1: "v1"})
    server = ModelServer(_settings(base))
    server.start()
    client = _Client(server)
    yield server, client
    client.close()
    server.stop(grace=1)


def _rpc_error(call, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=DEADLINE)
    return caught.value


# --------------------------------------------------------------------------------------------
# PredictionService


def test_predict_scores_each_example_and_names_the_version(served) -> None:
    _, client = served
    xs = [i / 50 for i in range(-100, 100)]
    response = client.prediction.Predict(_predict_request(xs), timeout=DEADLINE)
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    output = response.outputs["probabilities"]
    assert [d.size for d in output.tensor_shape.dim] == [200, 1]
    # Values come in float_val, as TF Serving's AsProtoField writes them.
    assert len(output.float_val) == 200
    np.testing.assert_allclose(
        tf.make_ndarray(output).ravel(), [_probability(1, x) for x in xs], rtol=1e-5
    )


def test_predict_output_filter_and_unknown_output(served) -> None:
    _, client = served
    request = _predict_request([1.0])
    request.output_filter.append("probabilities")
    assert list(client.prediction.Predict(request, timeout=DEADLINE).outputs) == ["probabilities"]
    request.output_filter.append("logits")
    error = _rpc_error(client.prediction.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output tensor alias not found in signature: logits" in error.details()


def test_classify_uses_the_named_signature_and_merges_context(served) -> None:
    _, client = served
    response = client.prediction.Classify(_classify_request([0.0, 1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "classification"
    second = response.result.classifications[1].classes
    assert [c.label for c in second] == ["0", "1"]
    assert second[1].score == pytest.approx(_probability(1, 1.0), rel=1e-5)

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classification"
    with_context = request.input.example_list_with_context
    with_context.context.CopyFrom(_example(3.0))
    with_context.examples.add().CopyFrom(_example(0.5, other=b"a"))  # its own x wins
    with_context.examples.add().CopyFrom(tf.train.Example())  # takes x from the context
    scores = [
        c.classes[1].score
        for c in client.prediction.Classify(request, timeout=DEADLINE).result.classifications
    ]
    assert scores == pytest.approx([_probability(1, 0.5), _probability(1, 3.0)], rel=1e-5)


def test_classify_defaults_to_serving_default_as_tf_serving_does(served) -> None:
    _, client = served
    error = _rpc_error(client.prediction.Classify, _classify_request([1.0], signature=""))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("No classification inputs found in SignatureDef")


def test_regress_needs_a_regression_signature(served) -> None:
    _, client = served
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "regression"
    request.input.example_list.examples.add().CopyFrom(_example(1.0))
    response = client.prediction.Regress(request, timeout=DEADLINE)
    assert response.result.regressions[0].value == pytest.approx(_probability(1, 1.0), rel=1e-5)
    request.model_spec.signature_name = ""
    error = _rpc_error(client.prediction.Regress, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "No regression inputs found in SignatureDef" in error.details()


def test_get_model_metadata_packs_the_signature_def_map(served) -> None:
    _, client = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = client.prediction.GetModelMetadata(request, timeout=DEADLINE)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    serving_default = signatures.signature_def["serving_default"]
    assert serving_default.inputs["examples"].dtype == tf.string.as_datatype_enum
    assert list(serving_default.outputs) == ["probabilities"]
    assert set(signatures.signature_def["classification"].outputs) == {"classes", "scores"}

    del request.metadata_field[:]
    error = _rpc_error(client.prediction.GetModelMetadata, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def _raw_request(signature: str = "", **inputs: object) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return request


# Each bad Predict request, the code TF Serving answers it with and a part of its message.
BAD_PREDICTS = {
    "unknown model": (
        lambda: _predict_request([1.0], model="nope"),
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest(nope)",
    ),
    "unknown version": (
        lambda: _predict_request([1.0], version=9),
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Specific(toy, 9)",
    ),
    "unknown label": (
        lambda: _predict_request([1.0], label="nope"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: nope",
    ),
    "wrong input name": (
        lambda: _raw_request(example=_serialized([1.0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input tensor alias not found in signature: example. "
        "Inputs expected to be in the set {examples}.",
    ),
    "missing input": (
        lambda: _raw_request(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input size does not match signature: 0!=1 len({}) != len({examples}). "
        "Sent extra: {}. Missing but required: {examples}.",
    ),
    "wrong dtype": (
        lambda: _raw_request(examples=[1.0, 2.0]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be string but float is provided",
    ),
    "not an example": (
        lambda: _raw_request(examples=[b"not an example"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "Could not parse example input",
    ),
    "binary garbage": (
        lambda: _raw_request(examples=[b"\xff\xfe"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
    ),
    "unknown signature": (
        lambda: _raw_request("nope", examples=_serialized([1.0])),
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "nope" not found.',
    ),
    "no model spec": (
        predict_pb2.PredictRequest,
        grpc.StatusCode.INVALID_ARGUMENT,
        "Missing ModelSpec",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTS))
def test_bad_predict_requests_get_tf_serving_errors(served, case: str) -> None:
    _, client = served
    make_request, code, message = BAD_PREDICTS[case]
    error = _rpc_error(client.prediction.Predict, make_request())
    assert error.code() == code
    assert message in error.details()
    # The server answers the next request as if nothing happened.
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


def test_classify_of_no_examples_is_refused(served) -> None:
    _, client = served
    error = _rpc_error(client.prediction.Classify, _classify_request([]))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")


def test_oversized_requests_are_refused_with_resource_exhausted(served) -> None:
    _, client = served
    request = _predict_request([1.0])
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto([b"x" * (MAX_MESSAGE + 10)]))
    assert _rpc_error(client.prediction.Predict, request).code() == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    status, body = client.http(f"/v1/models/{MODEL}:predict", {"instances": ["x" * MAX_MESSAGE]})
    assert status == 429, body
    assert "larger than the maximum" in body["error"]
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


# --------------------------------------------------------------------------------------------
# ModelService and REST status/metadata


def test_get_model_status_as_tf_serving(served) -> None:
    _, client = served
    assert client.status() == [(1, State.AVAILABLE, 0, "")]
    error = _rpc_error(
        client.models.GetModelStatus,
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}),
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find any versions of model nope",
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    request.model_spec.version.value = 7
    error = _rpc_error(client.models.GetModelStatus, request)
    assert error.details() == "Could not find version 7 of model toy"


def test_rest_status_and_metadata_json(served) -> None:
    _, client = served
    status, body = client.http(f"/v1/models/{MODEL}")
    assert status == 200
    assert body == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert client.http(f"/v1/models/{MODEL}/versions/1")[0] == 200
    status, body = client.http(f"/v1/models/{MODEL}/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    serving_default = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert serving_default["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert serving_default["method_name"] == "tensorflow/serving/predict"
    assert client.http("/v1/models/nope") == (
        404,
        {"error": "Could not find any versions of model nope"},
    )
    assert client.http(f"/v1/models/{MODEL}/versions/3/metadata") == (
        404,
        {"error": "Servable not found for request: Specific(toy, 3)"},
    )
    assert client.http("/v1/modelz")[0] == 400


def test_rest_predict_row_and_columnar_formats(served) -> None:
    _, client = served
    encoded = [{"b64": base64.b64encode(e).decode()} for e in _serialized([0.0, 1.0])]
    status, body = client.http(f"/v1/models/{MODEL}:predict", {"instances": encoded})
    assert status == 200
    assert body["predictions"][0] == [0.5]
    assert body["predictions"][1][0] == pytest.approx(_probability(1, 1.0), rel=1e-6)
    # Float32 results are written in their shortest form, as TF Serving writes them.
    assert str(body["predictions"][1][0]) == str(np.float32(_probability(1, 1.0)))

    status, body = client.http(f"/v1/models/{MODEL}/versions/1:predict", {"inputs": encoded})
    assert status == 200 and len(body["outputs"]) == 2

    status, body = client.http(f"/v1/models/{MODEL}:predict", {"instances": [1.0]})
    assert status == 400
    assert "is not of expected type: string" in body["error"]
    status, body = client.http(f"/v1/models/{MODEL}:predict", {"rows": []})
    assert (status, body) == (400, {"error": "Missing 'inputs' or 'instances' key"})


def test_rest_keeps_connections_alive_and_reads_chunked_bodies(served) -> None:
    server, _ = served
    encoded = [{"b64": base64.b64encode(e).decode()} for e in _serialized([0.0, 1.0])]
    body = json.dumps({"instances": encoded}).encode()
    path = f"/v1/models/{MODEL}:predict"
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=DEADLINE)
    try:
        answers = []
        for _ in range(2):
            connection.request("POST", path, body=body)
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
            assert response.version == 11 and not response.will_close
        first_socket = connection.sock
        # The same body sent in chunks (Transfer-Encoding: chunked), on the same connection.
        pieces = [body[:7], body[7:50], body[50:]]
        connection.request("POST", path, body=iter(pieces), encode_chunked=True)
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))
        assert connection.sock is first_socket is not None
        assert answers[0][0] == 200 and answers[1:] == [answers[0]] * 2
        # A refused body is not read to the end: the answer closes the connection.
        too_big = json.dumps({"instances": ["x" * MAX_MESSAGE]}).encode()
        connection.request("POST", path, body=too_big)
        response = connection.getresponse()
        assert response.status == 429 and response.will_close
        assert "larger than the maximum" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_rest_instances_must_agree_in_shape(served) -> None:
    _, client = served
    scalar, listed = ({"b64": base64.b64encode(e).decode()} for e in _serialized([0.0, 1.0]))
    status, body = client.http(f"/v1/models/{MODEL}:predict", {"instances": [scalar, [listed]]})
    assert status == 400
    assert "Failed to process element: 1 of 'instances' list" in body["error"]
    assert "Expecting shape [] but got: [1]" in body["error"]


def test_rest_classify_with_context(served) -> None:
    _, client = served
    payload = {
        "signature_name": "classification",
        "context": {"x": 3.0},
        "examples": [{"x": 0.5}, {"other": "a"}],
    }
    status, body = client.http(f"/v1/models/{MODEL}:classify", payload)
    assert status == 200
    (first, second) = body["results"]
    assert [label for label, _ in first] == ["0", "1"]
    assert first[1][1] == pytest.approx(_probability(1, 0.5), rel=1e-6)
    assert second[1][1] == pytest.approx(_probability(1, 3.0), rel=1e-6)
    status, body = client.http(f"/v1/models/{MODEL}:classify", {"examples": [{"x": 1.0}]})
    assert status == 400 and body["error"].startswith("No classification inputs found")
    status, body = client.http(
        f"/v1/models/{MODEL}:regress", {"signature_name": "regression", "examples": [{"x": 1.0}]}
    )
    assert status == 200 and body["results"][0] == pytest.approx(_probability(1, 1.0), rel=1e-6)


def test_warmup_requests_are_replayed_at_load(served) -> None:
    server, _ = served
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = MODEL
    assert server.manager.servable(spec).warmup_records == 2


def test_metrics_count_requests_errors_and_latency(served) -> None:
    _, client = served
    client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    _rpc_error(client.prediction.Predict, _predict_request([1.0], version=9))
    with urllib.request.urlopen(client.rest + "/monitoring/prometheus/metrics") as response:
        text = response.read().decode()

    def value(pattern: str) -> float:
        match = re.search(pattern + r" (\S+)$", text, re.MULTILINE)
        assert match, pattern
        return float(match.group(1))

    labels = 'model_name="toy",version="1",API="Predict",entrypoint="GRPC"'
    assert value(rf':tensorflow:serving:request_count\{{{labels},status="OK"\}}') >= 1
    missing = 'model_name="toy",version="",API="Predict",entrypoint="GRPC",status="NOT_FOUND"'
    assert value(rf":tensorflow:serving:request_error_count\{{{missing}\}}") >= 1
    assert value(rf':tensorflow:serving:request_latency_bucket\{{{labels},le="\+Inf"\}}') >= 1
    assert value(rf":tensorflow:serving:request_latency_count\{{{labels}\}}") >= 1
    assert (
        value(
            r':tensorflow:serving:model_load_count\{model_name="toy",version="1",'
            r'status="OK"\}'
        )
        == 1
    )


# --------------------------------------------------------------------------------------------
# Versions


def test_new_version_is_found_by_the_watch_and_switched_to(make_server, exported) -> None:
    server, client, base = make_server({1: "v1"}, file_system_poll_wait_seconds=0.05)
    _deploy(exported["v2"], base, 2)
    assert server.wait_until_available(MODEL, 2, timeout=DEADLINE)
    response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 2
    assert tf.make_ndarray(response.outputs["probabilities"])[0, 0] == pytest.approx(
        _probability(2, 1.0), rel=1e-5
    )
    # Version 1 was unloaded only after 2 became available; TF Serving keeps reporting it.
    assert client.status() == [(2, State.AVAILABLE, 0, ""), (1, State.END, 0, "")]


def test_removing_the_newest_version_rolls_back(make_server, exported) -> None:
    server, client, base = make_server({1: "v1", 2: "v2"})
    assert (
        client.prediction.Predict(
            _predict_request([1.0]), timeout=DEADLINE
        ).model_spec.version.value
        == 2
    )
    shutil.rmtree(base / "2")
    server.poll_now()
    assert server.wait_until_available(MODEL, 1, timeout=DEADLINE)
    assert (
        client.prediction.Predict(
            _predict_request([1.0]), timeout=DEADLINE
        ).model_spec.version.value
        == 1
    )
    assert [s[:2] for s in client.status()] == [(2, State.END), (1, State.AVAILABLE)]


def test_broken_version_is_reported_and_the_old_one_keeps_serving(make_server, exported) -> None:
    server, client, base = make_server({1: "v1"})
    _deploy(exported["broken"], base, 3)
    server.poll_now()
    assert not server.wait_until_available(MODEL, 3, timeout=DEADLINE)
    (v3, v1) = client.status()
    assert v3[:3] == (3, State.END, grpc.StatusCode.DATA_LOSS.value[0])
    assert "saved_model.pb" in v3[3]
    assert v1 == (1, State.AVAILABLE, 0, "")
    response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 1
    _, body = client.http(f"/v1/models/{MODEL}/versions/3")
    assert body["model_version_status"][0]["status"]["error_code"] == "DATA_LOSS"

    # A good version after the broken one is picked up as usual.
    _deploy(exported["v2"], base, 4)
    server.poll_now()
    assert server.wait_until_available(MODEL, 4, timeout=DEADLINE)


def test_version_whose_warmup_fails_is_not_served(make_server, exported) -> None:
    server, client, base = make_server({1: "v1"})
    _deploy(exported["bad_warmup"], base, 2)
    server.poll_now()
    assert not server.wait_until_available(MODEL, 2, timeout=DEADLINE)
    (v2, _) = client.status()
    assert v2[:3] == (2, State.END, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "Warmup request 1" in v2[3] and "not_an_input" in v2[3]
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


@pytest.mark.parametrize("background", [True, False], ids=["isolated_load", "plain_load"])
def test_predict_under_load_while_a_new_version_is_deployed(
    make_server, exported, background: bool
) -> None:
    server, client, base = make_server({1: "v1"}, background_model_load=background)
    xs = [i / 100 for i in range(-50, 50)]
    expected = {v: np.array([_probability(v, x) for x in xs]) for v in WEIGHTS}
    started = threading.Barrier(5)
    failures: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]

    def send(index: int) -> None:
        request = _predict_request(xs)
        try:
            deadline = time.monotonic() + DEADLINE
            for count in range(3000):
                if count == 5:
                    started.wait(DEADLINE)
                assert time.monotonic() < deadline, "version 2 was never served"
                response = client.prediction.Predict(request, timeout=DEADLINE)
                version = response.model_spec.version.value
                scores = tf.make_ndarray(response.outputs["probabilities"]).ravel()
                np.testing.assert_allclose(scores, expected[version], rtol=1e-5)
                seen[index].append(version)
                if count >= 30 and seen[index][-10:] == [2] * 10:
                    break
        except BaseException as error:
            failures.append(error)
            started.abort()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    started.wait(DEADLINE)
    _deploy(exported["v2"], base, 2)
    server.poll_now()
    assert server.wait_until_available(MODEL, 2, timeout=DEADLINE)
    for thread in threads:
        thread.join(DEADLINE)
    assert not failures
    for versions in seen:
        assert versions[0] == 1 and versions[-1] == 2
        assert versions == sorted(versions)  # never back to the old version


def test_versions_load_in_threads_of_lower_priority_than_requests(
    tmp_path: Path, exported: dict[str, Path]
) -> None:
    """Loading threads are niced below the server's threads; plain loads are not."""
    from serving.models import ManagerSettings, ModelManager
    from serving.servable import Servable, ServableOptions

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for background in (True, False):
        base = _base(tmp_path / str(background), exported, {1: "v1"})
        seen: list[int] = []
        options = ServableOptions(warmup_pause_ratio=1.0 if background else 0.0)

        def load(name: str, version: int, path: Path, options=options, seen=seen) -> Servable:
            seen.append(priority())
            return Servable.load(name, version, path, options)

        manager = ModelManager(
            ManagerSettings(file_system_poll_wait_seconds=0, background_load=background),
            loader=load,
        )
        try:
            manager.reload_config(_config((MODEL, base)), wait=True, atomic=False)
            assert manager.wait_until_available(MODEL, 1, timeout=DEADLINE)
        finally:
            manager.stop()
        assert seen and (seen[0] > priority() if background else seen[0] == priority())


def test_background_model_load_is_a_flag_the_real_server_is_not_given() -> None:
    from serving import tfserving

    assert settings_from_args(["--model_base_path=/m"]).background_model_load
    assert not settings_from_args(
        ["--model_base_path=/m", "--background_model_load=false"]
    ).background_model_load
    argv = tfserving.binary_argv("tms", ["--model_config_file=/c", "--background_model_load=0"])
    assert argv == ["tms", "--model_config_file=/c"]


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("policy", "served_versions"),
    [
        ("", [3]),
        ("model_version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("model_version_policy { all {} }", [1, 2, 3]),
        ("model_version_policy { specific { versions: 1 versions: 3 versions: 7 } }", [1, 3]),
    ],
)
def test_version_policy_picks_the_aspired_versions(
    tmp_path: Path, policy: str, served_versions: list[int]
) -> None:
    for name in ("1", "2", "3", "tmp-4", ".staging-5"):
        (tmp_path / name).mkdir()
    (tmp_path / "6").write_text("a file, not a version")
    config = _config((MODEL, tmp_path), **{MODEL: policy}).model_config_list.config[0]
    assert sorted(aspired_versions(config)) == served_versions


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('name: "m" base_path: "relative" model_platform: "tensorflow"',
         "Expected model m to have an absolute path or URI; got base_path()=relative"),
        ('name: "m" base_path: "/m"', "Illegal setting neither ModelServerConfig::model_type"),
        ('name: "m" base_path: "/m" model_platform: "onnx"',
         "Model m requests unsupported platform onnx"),
    ],
)  # fmt: skip
def test_invalid_model_configs_are_refused(fields: str, message: str) -> None:
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(fields, config.model_config_list.config.add())
    with pytest.raises(ServingError, match=re.escape(message)):
        validate_config(config)


def _config(*models: tuple[str, Path], **fields: str) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    for name, base in models:
        text_format.Parse(
            f'name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
            + fields.get(name, ""),
            config.model_config_list.config.add(),
        )
    return config


def _reload(client: _Client, config: model_server_config_pb2.ModelServerConfig):
    request = model_management_pb2.ReloadConfigRequest(config=config)
    return client.models.HandleReloadConfigRequest(request, timeout=DEADLINE)


def test_reload_config_adds_and_removes_models_and_changes_policies(
    make_server, exported, tmp_path
) -> None:
    server, client, base = make_server({1: "v1", 2: "v2"}, allow_reload_config=True)
    assert [s[:2] for s in client.status()] == [(2, State.AVAILABLE)]
    other = tmp_path / "other"
    other.mkdir()
    _deploy(exported["v1"], other, 5)

    response = _reload(client, _config((MODEL, base), ("other", other)))
    assert response.status.error_code == 0
    assert (
        client.prediction.Predict(
            _predict_request([1.0], model="other"), timeout=DEADLINE
        ).model_spec.version.value
        == 5
    )

    # Serve every version, then label them; labels name versions in requests and REST paths.
    _reload(client, _config((MODEL, base), **{MODEL: "model_version_policy { all {} }"}))
    assert server.wait_until_available(MODEL, 1, timeout=DEADLINE)
    error = _rpc_error(client.prediction.Predict, _predict_request([1.0], model="other"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    labels = 'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 }'
    _reload(client, _config((MODEL, base), **{MODEL: "model_version_policy { all {} } " + labels}))
    for label, version in (("stable", 1), ("canary", 2)):
        response = client.prediction.Predict(_predict_request([1.0], label=label), timeout=DEADLINE)
        assert response.model_spec.version.value == version
    status, body = client.http(f"/v1/models/{MODEL}/labels/canary/metadata")
    assert (status, body["model_spec"]["version"]) == (200, "2")

    # Back to one version: the specific policy unloads the other.
    _reload(
        client,
        _config((MODEL, base), **{MODEL: "model_version_policy { specific { versions: 1 } }"}),
    )
    server.poll_now()
    assert [s[:2] for s in client.status()] == [(2, State.END), (1, State.AVAILABLE)]


def test_reload_config_moves_a_model_to_a_new_base_path(make_server, exported, tmp_path) -> None:
    server, client, _ = make_server({1: "v1"}, allow_reload_config=True)
    moved = tmp_path / "moved"
    moved.mkdir()
    _deploy(exported["v2"], moved, 7)
    _reload(client, _config((MODEL, moved)))
    assert server.wait_until_available(MODEL, 7, timeout=DEADLINE)
    response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 7
    assert [s[:2] for s in client.status()] == [(7, State.AVAILABLE), (1, State.END)]


def test_reload_config_refuses_invalid_configs(make_server, tmp_path) -> None:
    _, client, base = make_server({1: "v1"}, allow_reload_config=True)
    error = _rpc_error(
        client.models.HandleReloadConfigRequest,
        model_management_pb2.ReloadConfigRequest(config=_config((MODEL, base), (MODEL, base))),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Illegal to list model toy multiple times" in error.details()
    labelled = _config((MODEL, base), **{MODEL: 'version_labels { key: "next" value: 2 }'})
    error = _rpc_error(
        client.models.HandleReloadConfigRequest,
        model_management_pb2.ReloadConfigRequest(config=labelled),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not currently available for inference" in error.details()
    missing = _config((MODEL, base), ("ghost", tmp_path / "ghost"))
    error = _rpc_error(
        client.models.HandleReloadConfigRequest,
        model_management_pb2.ReloadConfigRequest(config=missing),
    )
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "Could not find base path" in error.details()
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


def test_model_config_file_with_labels(tmp_path, exported) -> None:
    base = _base(tmp_path, exported, {1: "v1", 2: "v2"})
    config_file = tmp_path / "models.config"
    config_file.write_text(
        text_format.MessageToString(
            _config(
                (MODEL, base),
                **{
                    MODEL: "model_version_policy { all {} } "
                    'version_labels { key: "stable" value: 1 }'
                },
            )
        )
    )
    args = ["--port=0", f"--model_config_file={config_file}", "--file_system_poll_wait_seconds=0"]
    # As tensorflow_model_server: labels in the first config need versions already loaded...
    with pytest.raises(ServingError, match="not currently available for inference"):
        ModelServer(settings_from_args(args)).start()
    # ...unless labels may name versions that are still loading.
    lenient = settings_from_args([*args, "--allow_version_labels_for_unavailable_models"])
    with ModelServer(lenient) as server:
        client = _Client(server)
        response = client.prediction.Predict(
            _predict_request([1.0], label="stable"), timeout=DEADLINE
        )
        assert response.model_spec.version.value == 1
        client.close()


def test_command_line_serves_until_sigterm(tmp_path, exported) -> None:
    base = _base(tmp_path, exported, {1: "v1"})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.server",
            "--port=0",
            "--model_name=toy",
            f"--model_base_path={base}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            match = re.match(r"Running gRPC ModelServer at 127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(_predict_request([1.0]), timeout=DEADLINE)
            assert response.model_spec.version.value == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_model_config_file_is_reread_when_it_changes(tmp_path, exported) -> None:
    base = _base(tmp_path, exported, {1: "v1"})
    other = tmp_path / "other"
    other.mkdir()
    _deploy(exported["v2"], other, 1)
    config_file = tmp_path / "models.config"
    config_file.write_text(text_format.MessageToString(_config((MODEL, base))))
    settings = ServerSettings(
        model_config_file=str(config_file),
        port=0,
        file_system_poll_wait_seconds=0,
        model_config_file_poll_wait_seconds=0.05,
    )
    with ModelServer(settings) as server:
        both = _config((MODEL, base), ("other", other))
        config_file.write_text(text_format.MessageToString(both))
        assert server.wait_until_available("other", timeout=DEADLINE)
        assert server.manager.model_names == ["other", MODEL]


def test_server_started_on_an_empty_base_path_serves_the_first_deployed_version(
    make_server, exported
) -> None:
    server, client, base = make_server({})
    error = _rpc_error(client.prediction.Predict, _predict_request([1.0]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    _deploy(exported["v1"], base, 1)
    server.poll_now()
    assert server.wait_until_available(MODEL, timeout=DEADLINE)
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


def test_stop_finishes_requests_in_flight(make_server) -> None:
    server, client, _ = make_server({1: "v1"})
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = MODEL
    servable = server.manager.servable(spec)
    entered, release = threading.Event(), threading.Event()
    real_predict = servable.predict

    def held_predict(request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not entered.is_set():  # only the first request is held
            entered.set()
            assert release.wait(DEADLINE)
        return real_predict(request)

    servable.predict = held_predict  # type: ignore[method-assign]
    in_flight = client.prediction.Predict.future(_predict_request([1.0]), timeout=DEADLINE)
    assert entered.wait(DEADLINE)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": DEADLINE})
    stopper.start()
    # New requests are refused once the stop has begun; the held one is still running. (A
    # request caught mid-way by the stop is held by gRPC until the grace ends: a short deadline.)
    refused = {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    for _ in range(10_000):
        try:
            client.prediction.Predict(_predict_request([1.0]), timeout=2)
        except grpc.RpcError as error:
            assert error.code() in refused
            break
    else:
        pytest.fail("requests were still accepted after stop()")
    assert not in_flight.done()
    release.set()
    assert in_flight.result(timeout=DEADLINE).model_spec.version.value == 1
    stopper.join(DEADLINE)
    assert not stopper.is_alive()


def test_stop_closes_idle_keep_alive_connections(make_server) -> None:
    server, _, _ = make_server({1: "v1"})
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=DEADLINE)
    connection.request("GET", f"/v1/models/{MODEL}")
    response = connection.getresponse()
    assert response.status == 200 and not response.will_close
    response.read()
    # The connection's thread waits for a next request; the stop must not wait for it to
    # time out (30 s) but close the connection.
    stopper = threading.Thread(target=server.stop, kwargs={"grace": DEADLINE})
    stopper.start()
    stopper.join(DEADLINE / 3)
    assert not stopper.is_alive()
    assert connection.sock is not None and connection.sock.recv(1) == b""
    connection.close()


def test_command_line_flags_follow_tensorflow_model_server() -> None:
    settings = settings_from_args(
        [
            "--port=9000",
            "--rest_api_port=9001",
            "--model_name=ranker",
            "--model_base_path=/models/ranker",
            "--file_system_poll_wait_seconds=5",
            "--enable_model_warmup=false",
            "--grpc_channel_arguments=grpc.max_receive_message_length=1024,grpc.foo=bar",
            "--tensorflow_intra_op_parallelism=1",
            "--tensorflow_inter_op_parallelism=2",
        ]
    )
    assert settings.tensorflow_intra_op_parallelism == 1
    assert settings.tensorflow_inter_op_parallelism == 2
    assert (settings.port, settings.rest_api_port, settings.model_name) == (9000, 9001, "ranker")
    assert settings.model_base_path == "/models/ranker"
    assert settings.file_system_poll_wait_seconds == 5.0
    assert not settings.enable_model_warmup
    assert settings.max_receive_message_length == 1024
    assert ("grpc.foo", "bar") in settings.grpc_channel_arguments
    assert settings_from_args(["--model_base_path=/m"]).rest_api_port is None
    with pytest.raises(ValueError, match="are empty"):
        settings_from_args(["--port=9000"])


# --------------------------------------------------------------------------------------------
# Memory: what a request may take, alone and with others


def _huge_fill_request(dims: int) -> predict_pb2.PredictRequest:
    """A few hundred bytes that declare `dims` examples, filled by repeating the one sent."""
    request = _predict_request([])
    tensor = request.inputs["examples"]
    tensor.Clear()
    tensor.dtype = tf.string.as_datatype_enum
    tensor.tensor_shape.dim.add(size=dims)
    tensor.string_val.append(_example(1.0, padding=b"p" * 320).SerializeToString())
    return request


@pytest.mark.timeout(120)
def test_a_small_request_declaring_a_huge_tensor_is_refused_before_it_is_expanded(
    served,
) -> None:
    server, client = served
    request = _huge_fill_request(10**8)
    assert request.ByteSize() < 500
    error = _rpc_error(client.prediction.Predict, request)
    # Expanding it would take ~40 GB: the refusal names the bytes and the limit, and the
    # server never allocates them (it would be killed for it).
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "--max_request_tensor_bytes" in error.details()
    assert re.search(r"would take [\d,]{14,} bytes", error.details()), error.details()
    numeric = _raw_request()
    numeric.inputs["examples"].CopyFrom(tf.make_tensor_proto(1.0, shape=[10**8]))
    assert _rpc_error(client.prediction.Predict, numeric).code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert server.api.budget.used == 0
    # A fill within the limits is still what TensorFlow makes of it: the value repeated.
    response = client.prediction.Predict(_huge_fill_request(3), timeout=DEADLINE)
    scores = tf.make_ndarray(response.outputs["probabilities"]).ravel()
    np.testing.assert_allclose(scores, [_probability(1, 1.0)] * 3, rtol=1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda t: (t.tensor_shape.dim[0].__setattr__("size", 3), t.string_val.pop()),
            "has 3 elements but 2 values were sent",
        ),
        (
            lambda t: (t.Clear(), t.MergeFrom(tf.make_tensor_proto(np.zeros(4, np.float32))),
                       t.tensor_shape.dim[0].__setattr__("size", 5)),
            "takes 20 bytes but tensor_content holds 16",
        ),
        (
            lambda t: t.tensor_shape.dim[0].__setattr__("size", -1),
            "has a negative dimension",
        ),
        (
            lambda t: t.tensor_shape.__setattr__("unknown_rank", True),
            "unknown rank",
        ),
    ],
)  # fmt: skip
def test_tensors_whose_values_do_not_match_their_shape_are_refused(served, build, message) -> None:
    _, client = served
    request = _predict_request([1.0, 2.0, 3.0])
    build(request.inputs["examples"])
    error = _rpc_error(client.prediction.Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


@pytest.mark.timeout(120)
def test_a_classify_context_merged_into_every_example_is_bounded(make_server) -> None:
    _, client, _ = make_server({1: "v1"}, max_request_tensor_bytes=8 << 20)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classification"
    with_context = request.input.example_list_with_context
    with_context.context.CopyFrom(_example(0.0, padding=b"c" * 100_000))
    for _ in range(2000):
        with_context.examples.add().CopyFrom(_example(1.0))
    assert request.ByteSize() < MAX_MESSAGE
    error = _rpc_error(client.prediction.Classify, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the 2,000 examples of this request would take" in error.details()
    del with_context.examples[10:]
    assert len(client.prediction.Classify(request, timeout=DEADLINE).result.classifications) == 10


def _cost(request: predict_pb2.PredictRequest) -> int:
    """What a Predict request holds of the in-flight budget."""
    from serving.limits import RequestLimits

    return request.ByteSize() + RequestLimits().predict_bytes(request.inputs)


def _hold_first_predict(server: ModelServer) -> tuple[threading.Event, threading.Event]:
    """Make the served version hold the first Predict until `release` is set."""
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = MODEL
    servable = server.manager.servable(spec)
    entered, release = threading.Event(), threading.Event()
    real_predict = servable.predict

    def held_predict(request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not entered.is_set():
            entered.set()
            assert release.wait(DEADLINE)
        return real_predict(request)

    servable.predict = held_predict  # type: ignore[method-assign]
    return entered, release


@pytest.mark.timeout(120)
def test_requests_beyond_the_in_flight_budget_are_refused_then_served(make_server) -> None:
    request = _predict_request([0.5] * 20)
    cost = _cost(request)
    server, client, _ = make_server(
        {1: "v1"}, max_in_flight_bytes=cost * 3 // 2, in_flight_wait_seconds=0
    )
    entered, release = _hold_first_predict(server)
    held = client.prediction.Predict.future(request, timeout=DEADLINE)
    assert entered.wait(DEADLINE)
    assert server.api.budget.used == cost
    error = _rpc_error(client.prediction.Predict, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the server is busy" in error.details() and "--max_in_flight_bytes" in error.details()
    instances = [{"b64": base64.b64encode(x).decode()} for x in _serialized([0.5] * 5)]
    status, body = client.http(f"/v1/models/{MODEL}:predict", {"instances": instances})
    assert status == 429 and "busy" in body["error"], body
    # One request larger than the whole budget would never fit: refused at once.
    big = _predict_request([0.5] * 40)
    assert "more than the server allows" in _rpc_error(client.prediction.Predict, big).details()
    release.set()
    assert held.result(timeout=DEADLINE).outputs
    assert server.api.budget.used == 0
    assert client.prediction.Predict(request, timeout=DEADLINE).outputs


@pytest.mark.timeout(120)
def test_a_request_waits_for_room_in_the_budget(make_server) -> None:
    request = _predict_request([0.5] * 20)
    cost = _cost(request)
    server, client, _ = make_server(
        {1: "v1"}, max_in_flight_bytes=cost * 3 // 2, in_flight_wait_seconds=DEADLINE
    )
    entered, release = _hold_first_predict(server)
    held = client.prediction.Predict.future(request, timeout=DEADLINE)
    assert entered.wait(DEADLINE)
    waiting = client.prediction.Predict.future(_predict_request([1.0] * 20), timeout=DEADLINE)
    budget = server.api.budget
    with budget.changed:
        assert budget.changed.wait_for(lambda: budget.waiting == 1, DEADLINE)
    assert not waiting.done()
    release.set()
    assert held.result(timeout=DEADLINE).outputs
    scores = tf.make_ndarray(waiting.result(timeout=DEADLINE).outputs["probabilities"])
    np.testing.assert_allclose(scores.ravel(), [_probability(1, 1.0)] * 20, rtol=1e-5)


@pytest.mark.timeout(120)
def test_rest_answers_beyond_its_workers_are_refused(make_server) -> None:
    server, client, _ = make_server({1: "v1"}, rest_api_num_threads=1, in_flight_wait_seconds=0)
    entered, release = _hold_first_predict(server)
    body = {"instances": [{"b64": base64.b64encode(_serialized([1.0])[0]).decode()}]}
    first: queue.Queue[tuple[int, dict]] = queue.Queue()
    thread = threading.Thread(
        target=lambda: first.put(client.http(f"/v1/models/{MODEL}:predict", body))
    )
    thread.start()
    assert entered.wait(DEADLINE)
    status, answer = client.http(f"/v1/models/{MODEL}:predict", body)
    assert status == 429 and "--rest_api_num_threads" in answer["error"], answer
    release.set()
    thread.join(DEADLINE)
    assert first.get(timeout=DEADLINE)[0] == 200


def _post_raw(port: int, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.timeout(120)
def test_rest_client_over_the_size_limit_receives_the_refusal(served) -> None:
    server, client = served
    path = f"/v1/models/{MODEL}:predict"
    # Larger than the server reads whole by far, and than it used to drain (64 MiB): the
    # client sends it all and must still read the answer, not a reset connection.
    body = b" " * (80 << 20)
    status, text = _post_raw(server.rest_api_port, path, {"Content-Type": "application/json"}, body)
    assert status == 429 and "larger than the maximum" in text
    # Sent in chunks, the size is known only while reading: refused all the same.
    chunks = iter([b"x" * (MAX_MESSAGE // 2)] * 4)
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=DEADLINE)
    connection.request("POST", path, body=chunks, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 429 and b"at least" in response.read()
    connection.close()
    # A client that asks first (Expect: 100-continue) is refused before it sends the body.
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=DEADLINE)
    connection.putrequest("POST", path)
    connection.putheader("Content-Length", str(10 * MAX_MESSAGE))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 429 and b"larger than the maximum" in response.read()
    connection.close()
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


@pytest.mark.timeout(120)
def test_rest_listen_backlog_holds_a_burst_of_connections(served) -> None:
    from serving.rest import RestApi, RestServer

    server, _ = served
    # A server that accepts nothing yet: every connection waits in the kernel's backlog, and
    # past the backlog a connection attempt would wait for TCP's retransmission instead.
    idle = RestServer("127.0.0.1", 0, RestApi(server.api))
    sockets = []
    try:
        for _ in range(200):
            sockets.append(socket.create_connection(("127.0.0.1", idle.port), timeout=DEADLINE))
        assert len(sockets) == 200
    finally:
        for connection in sockets:
            connection.close()
        idle.server_close()


def test_default_request_limits_are_bounded() -> None:
    settings = settings_from_args(["--model_base_path=/m"])
    assert settings.max_receive_message_length == 64 << 20
    assert settings.max_request_tensor_bytes == 256 << 20
    assert settings.max_in_flight_bytes == 1 << 30
    assert not settings.allow_reload_config
    tuned = settings_from_args(
        [
            "--model_base_path=/m",
            "--max_request_tensor_bytes=1000",
            "--max_in_flight_bytes=5000",
            "--in_flight_wait_in_ms=250",
            "--rest_api_num_threads=3",
            "--rest_api_timeout_in_ms=2000",
            "--allow_reload_config",
            "--model_base_path_roots=/models,/srv/models",
        ]
    )
    assert (tuned.max_request_tensor_bytes, tuned.max_in_flight_bytes) == (1000, 5000)
    assert tuned.in_flight_wait_seconds == 0.25
    assert (tuned.rest_api_num_threads, tuned.rest_api_timeout_in_ms) == (3, 2000)
    assert tuned.allow_reload_config
    assert tuned.model_base_path_roots == ("/models", "/srv/models")
    with pytest.raises(ValueError, match="--max_in_flight_bytes"):
        settings_from_args(["--model_base_path=/m", "--max_in_flight_bytes=0"])


# --------------------------------------------------------------------------------------------
# Model management: reloads are allowed, checked whole and applied all or nothing


@pytest.mark.timeout(120)
def test_reload_config_is_refused_unless_the_server_allows_it(make_server, tmp_path) -> None:
    _, client, _ = make_server({1: "v1"})
    error = _rpc_error(
        client.models.HandleReloadConfigRequest,
        model_management_pb2.ReloadConfigRequest(config=_config(("other", tmp_path))),
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--allow_reload_config" in error.details()
    assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs


@pytest.mark.timeout(120)
def test_a_reload_that_fails_changes_nothing(make_server, exported, tmp_path) -> None:
    server, client, base = make_server({1: "v1"}, allow_reload_config=True)
    before = client.status()
    not_models = tmp_path / "etc"
    not_models.mkdir()
    (not_models / "passwd").write_text("root:x:0:0")
    broken = tmp_path / "broken"
    broken.mkdir()
    _deploy(exported["broken"], broken, 1)
    attempts = {
        # The served model left out, and a folder without versions added.
        "no versions": (_config(("other", not_models)), "no versions found under"),
        # A new model whose only version cannot be loaded.
        "fails to load": (_config((MODEL, base), ("other", broken)), "did not become available"),
        # The served model moved to a broken version.
        "moved to a broken version": (_config((MODEL, broken)), "did not become available"),
    }
    for case, (config, message) in attempts.items():
        error = _rpc_error(
            client.models.HandleReloadConfigRequest,
            model_management_pb2.ReloadConfigRequest(config=config),
        )
        assert error.code() == grpc.StatusCode.UNKNOWN, case
        assert message in error.details(), (case, error.details())
        assert server.manager.model_names == [MODEL], case
        response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
        assert response.model_spec.version.value == 1, case
        assert client.status() == before, case
        assert _rpc_error(
            client.prediction.Predict, _predict_request([1.0], model="other")
        ).code() == (grpc.StatusCode.NOT_FOUND), case
    # A reload that succeeds still replaces the models.
    good = tmp_path / "good"
    good.mkdir()
    _deploy(exported["v2"], good, 3)
    _reload(client, _config(("other", good)))
    assert server.manager.model_names == ["other"]
    assert _rpc_error(client.prediction.Predict, _predict_request([1.0])).code() == (
        grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.timeout(120)
def test_reload_moving_a_model_replaces_a_version_of_the_same_number(
    make_server, exported, tmp_path
) -> None:
    _, client, _ = make_server({1: "v1"}, allow_reload_config=True)
    moved = _base(tmp_path / "moved", exported, {1: "v2"})
    _reload(client, _config((MODEL, moved)))
    response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 1
    score = tf.make_ndarray(response.outputs["probabilities"])[0, 0]
    assert score == pytest.approx(_probability(2, 1.0), rel=1e-5)


@pytest.mark.timeout(120)
def test_reload_without_a_client_deadline(make_server, exported, tmp_path) -> None:
    server, client, base = make_server({1: "v1"}, allow_reload_config=True)
    other = tmp_path / "other"
    other.mkdir()
    _deploy(exported["v2"], other, 1)
    # The stock stub call, with no deadline: the server must not try to wait until year 2500.
    request = model_management_pb2.ReloadConfigRequest(
        config=_config((MODEL, base), ("other", other))
    )
    response = client.models.HandleReloadConfigRequest(request)
    assert response.status.error_code == 0, response.status.error_message
    assert server.wait_until_available("other", timeout=DEADLINE)


@pytest.mark.timeout(120)
def test_base_paths_are_confined_to_the_allowed_roots(exported, tmp_path) -> None:
    root = tmp_path / "models"
    outside = tmp_path / "elsewhere"
    inside = _base(root, exported, {1: "v1"})
    _base(outside, exported, {1: "v1"})
    (root / "escape").symlink_to(outside / MODEL)
    settings = _settings(inside, allow_reload_config=True, model_base_path_roots=(str(root),))
    with ModelServer(settings) as server:
        client = _Client(server)
        for path in (outside / MODEL, root / "escape", root / ".." / "elsewhere" / MODEL, "/proc"):
            error = _rpc_error(
                client.models.HandleReloadConfigRequest,
                model_management_pb2.ReloadConfigRequest(config=_config((MODEL, path))),
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, path
            assert "outside the allowed roots" in error.details()
        assert client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE).outputs
        client.close()
    with pytest.raises(ServingError, match="outside the allowed roots"):
        ModelServer(_settings(outside / MODEL, model_base_path_roots=(str(root),))).start()


@pytest.mark.timeout(120)
def test_a_broken_version_does_not_hold_back_a_newer_one(make_server, exported) -> None:
    # Retries an hour apart: a newer version must not wait for them.
    server, client, base = make_server(
        {1: "v1"}, max_num_load_retries=5, load_retry_interval_seconds=3600
    )
    _deploy(exported["broken"], base, 3)
    server.poll_now()
    _deploy(exported["v2"], base, 4)
    server.poll_now()
    assert server.wait_until_available(MODEL, 4, timeout=DEADLINE)
    response = client.prediction.Predict(_predict_request([1.0]), timeout=DEADLINE)
    assert response.model_spec.version.value == 4
    statuses = {s[0]: s for s in client.status()}
    assert statuses[3][1:3] == (State.END, grpc.StatusCode.DATA_LOSS.value[0])


def test_a_background_load_switches_threads_more_often_until_the_last_load_ends() -> None:
    import gc

    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="load failed"), load_isolated():
        assert sys.getswitchinterval() == pytest.approx(LOADING_SWITCH_INTERVAL_S)
        assert not gc.isenabled()
        with load_isolated():  # a second version loading at the same time
            pass
        assert sys.getswitchinterval() == pytest.approx(LOADING_SWITCH_INTERVAL_S)
        assert not gc.isenabled()
        raise RuntimeError("load failed")
    assert sys.getswitchinterval() == before
    assert gc.isenabled()
    with load_isolated(False):  # --background_model_load=false: nothing changes
        assert sys.getswitchinterval() == before
        assert gc.isenabled()
