"""Malformed requests, generated from a seed, against the built-in server over real sockets.

Every request here is wrong by construction (an unknown name, a shape its values do not fill, a
tensor declared far too large, bytes that are not a message, JSON that is not a request, an
impossible HTTP frame, ...). The server must answer each one with an error, and afterwards
still answer good requests on both APIs with nothing left held in its memory budget.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
)

from serving.server import ModelServer
from tests import test_server as served_toy

SEED = 20261201
GRPC_REQUESTS = 300
REST_REQUESTS = 200
MAX_MESSAGE = 256 << 10
DEADLINE = 30.0
MODEL = served_toy.MODEL
# Not a tf.Example, nor any message: field 31 with wire type 7, which does not exist.
NOT_A_MESSAGE = b"\xff\xff\xff"

exported = served_toy.exported

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exported) -> Iterator[ModelServer]:
    base = served_toy._base(tmp_path_factory.mktemp("fuzz"), exported, {1: "v1"})
    settings = served_toy._settings(
        base,
        max_receive_message_length=MAX_MESSAGE,
        max_request_tensor_bytes=4 << 20,
        max_in_flight_bytes=64 << 20,
        in_flight_wait_seconds=1.0,
    )
    with ModelServer(settings) as model_server:
        yield model_server


# --------------------------------------------------------------------------------------------
# gRPC


def _good_predict() -> predict_pb2.PredictRequest:
    return served_toy._predict_request([0.25, 0.5, 1.0])


def _examples_tensor(request: predict_pb2.PredictRequest) -> Any:
    return request.inputs["examples"]


def _unknown_model(rng: random.Random) -> Any:
    request = _good_predict()
    request.model_spec.name = "m" + "".join(
        rng.choices("abcdefghij_0123456789", k=rng.randint(1, 40))
    )
    return request


def _no_model_spec(rng: random.Random) -> Any:
    request = _good_predict()
    request.ClearField("model_spec")
    return request


def _unknown_version(rng: random.Random) -> Any:
    request = _good_predict()
    request.model_spec.version.value = rng.randint(2, 2**62)
    return request


def _unknown_label(rng: random.Random) -> Any:
    request = _good_predict()
    request.model_spec.version_label = "".join(rng.choices("xyz-", k=rng.randint(1, 12)))
    return request


def _unknown_signature(rng: random.Random) -> Any:
    request = _good_predict()
    request.model_spec.signature_name = "sig_" + str(rng.randint(0, 10**9))
    return request


def _unknown_output(rng: random.Random) -> Any:
    request = _good_predict()
    request.output_filter.append("out_" + str(rng.randint(0, 10**6)))
    return request


def _unknown_input(rng: random.Random) -> Any:
    request = _good_predict()
    request.inputs["in_" + str(rng.randint(0, 10**6))].CopyFrom(tf.make_tensor_proto([1.0]))
    return request


def _shape_not_filled(rng: random.Random) -> Any:
    request = _good_predict()
    tensor = _examples_tensor(request)
    values = rng.randint(2, 3)
    del tensor.string_val[values:]
    tensor.tensor_shape.dim[0].size = rng.randint(values + 1, 10**6)
    return request


def _huge_declared_shape(rng: random.Random) -> Any:
    request = _good_predict()
    tensor = _examples_tensor(request)
    del tensor.string_val[1:]
    tensor.tensor_shape.ClearField("dim")
    for _ in range(rng.randint(1, 4)):
        tensor.tensor_shape.dim.add(size=rng.randint(10**4, 10**9))
    return request


def _negative_dimension(rng: random.Random) -> Any:
    request = _good_predict()
    _examples_tensor(request).tensor_shape.dim[0].size = -rng.randint(1, 10**9)
    return request


def _wrong_dtype(rng: random.Random) -> Any:
    request = _good_predict()
    dtype = rng.choice([np.float32, np.float64, np.int32, np.int64, np.bool_, np.uint8])
    array = np.zeros(rng.randint(1, 50), dtype=dtype)
    _examples_tensor(request).CopyFrom(tf.make_tensor_proto(array))
    return request


def _unknown_dtype(rng: random.Random) -> Any:
    request = _good_predict()
    _examples_tensor(request).dtype = rng.choice(
        [types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, rng.randint(200, 10**6)]
    )
    return request


def _content_of_wrong_size(rng: random.Random) -> Any:
    request = _good_predict()
    tensor = _examples_tensor(request)
    tensor.Clear()
    tensor.dtype = types_pb2.DT_STRING if rng.random() < 0.5 else types_pb2.DT_FLOAT
    tensor.tensor_shape.dim.add(size=rng.randint(1, 1000))
    tensor.tensor_content = rng.randbytes(rng.randint(1, 3999))
    if tensor.dtype == types_pb2.DT_FLOAT and len(tensor.tensor_content) % 4 == 0:
        tensor.tensor_content += b"\x00"
    return request


def _not_examples(rng: random.Random) -> Any:
    request = _good_predict()
    tensor = _examples_tensor(request)
    count = rng.randint(1, 20)
    del tensor.string_val[:]
    tensor.string_val.extend(
        NOT_A_MESSAGE + rng.randbytes(rng.randint(0, 64)) for _ in range(count)
    )
    tensor.tensor_shape.dim[0].size = count
    return request


def _classify_bytes(rng: random.Random) -> bytes:
    """A ClassificationRequest whose examples are not tf.Examples (built as raw bytes)."""
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classification"
    head = request.SerializeToString()
    examples = b"".join(
        _length_delimited(1, NOT_A_MESSAGE + rng.randbytes(rng.randint(0, 32)))
        for _ in range(rng.randint(1, 20))
    )
    # input (2) { example_list (1) { examples (1): ... } }
    return head + _length_delimited(2, _length_delimited(1, examples))


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _classify_empty(rng: random.Random) -> Any:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = rng.choice(["classification", "regression", "nope"])
    return request


def _classify_context_everywhere(rng: random.Random) -> Any:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classification"
    with_context = request.input.example_list_with_context
    with_context.context.CopyFrom(served_toy._example(0.0, pad=b"c" * rng.randint(50_000, 200_000)))
    for _ in range(rng.randint(100, 400)):
        with_context.examples.add().CopyFrom(served_toy._example(1.0))
    return request


def _oversized(rng: random.Random) -> Any:
    request = _good_predict()
    tensor = _examples_tensor(request)
    del tensor.string_val[1:]
    tensor.string_val[0] = b"x" * rng.randint(MAX_MESSAGE + 1, 2 * MAX_MESSAGE)
    tensor.tensor_shape.dim[0].size = 1
    return request


def _metadata_without_fields(rng: random.Random) -> Any:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.extend(rng.choice([[], ["nope"], ["signature_def", "x"]]))
    return request


def _status_of_unknown_model(rng: random.Random) -> Any:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ghost" + str(rng.randint(0, 10**6))
    return request


def _reload_config(rng: random.Random) -> Any:
    # The server was started without --allow_reload_config.
    request = model_management_pb2.ReloadConfigRequest()
    model = request.config.model_config_list.config.add()
    model.name = MODEL
    model.base_path = rng.choice(["/proc", "/etc", "/", "/tmp"])
    model.model_platform = "tensorflow"
    return request


PREDICT = "/tensorflow.serving.PredictionService/Predict"
CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
RELOAD = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
METHODS = [
    PREDICT,
    CLASSIFY,
    "/tensorflow.serving.PredictionService/Regress",
    METADATA,
    STATUS,
    RELOAD,
]

GRPC_CASES: list[tuple[str, Callable[[random.Random], Any]]] = [
    (PREDICT, _unknown_model),
    (PREDICT, _no_model_spec),
    (PREDICT, _unknown_version),
    (PREDICT, _unknown_label),
    (PREDICT, _unknown_signature),
    (PREDICT, _unknown_output),
    (PREDICT, _unknown_input),
    (PREDICT, _shape_not_filled),
    (PREDICT, _huge_declared_shape),
    (PREDICT, _negative_dimension),
    (PREDICT, _wrong_dtype),
    (PREDICT, _unknown_dtype),
    (PREDICT, _content_of_wrong_size),
    (PREDICT, _not_examples),
    (PREDICT, _oversized),
    (CLASSIFY, _classify_bytes),
    (CLASSIFY, _classify_empty),
    (CLASSIFY, _classify_context_everywhere),
    (METADATA, _metadata_without_fields),
    (STATUS, _status_of_unknown_model),
    (RELOAD, _reload_config),
]


def _random_bytes_case(rng: random.Random) -> tuple[str, bytes]:
    """Bytes that are not a valid message of any method (they start with a bad tag)."""
    return rng.choice(METHODS), NOT_A_MESSAGE + rng.randbytes(rng.randint(0, 300))


def test_malformed_grpc_requests_all_get_errors_and_the_server_keeps_serving(server) -> None:
    rng = random.Random(SEED)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}",
        options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)],
    )
    codes: dict[str, int] = {}
    try:
        for index in range(GRPC_REQUESTS):
            if rng.random() < 0.2:
                method, data = _random_bytes_case(rng)
                case = "random bytes"
            else:
                method, build = rng.choice(GRPC_CASES)
                message = build(rng)
                data = message if isinstance(message, bytes) else message.SerializeToString()
                case = build.__name__
            call = channel.unary_unary(method)  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as caught:
                call(data, timeout=DEADLINE)
            code = caught.value.code()
            assert code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), (
                index,
                case,
            )
            assert code != grpc.StatusCode.UNAVAILABLE, (index, case, caught.value.details())
            codes[code.name] = codes.get(code.name, 0) + 1
        assert sum(codes.values()) == GRPC_REQUESTS
        assert {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"} <= set(codes), codes
        _assert_still_serving(server, channel)
    finally:
        channel.close()


# --------------------------------------------------------------------------------------------
# REST


def _json_case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    """A POST whose body is not a valid request for the model."""
    path = f"/v1/models/{MODEL}:predict"
    bad_example = {"b64": base64.b64encode(NOT_A_MESSAGE + rng.randbytes(8)).decode()}
    nested: Any = 1.0
    for _ in range(rng.randint(40, 60)):
        nested = [nested]
    documents: list[Any] = [
        {"instances": "not a list"},
        {"instances": []},
        {"inputs": {"nope": [1]}},
        {"instances": [1.0], "inputs": [1.0]},
        {"nothing": True},
        {"instances": [bad_example] * rng.randint(1, 10)},
        {"instances": [{"b64": "!!not base64!!"}]},
        {"instances": [{"examples": bad_example, "extra": 1}]},
        {"instances": nested},
        {"signature_name": rng.randint(0, 9), "instances": [bad_example]},
        {"signature_name": "nope", "instances": [bad_example]},
        [1, 2, 3],
        "just a string",
    ]
    body = json.dumps(rng.choice(documents)).encode()
    if rng.random() < 0.3:
        body = body[: rng.randint(0, max(0, len(body) - 1))]  # cut short: not JSON
    if rng.random() < 0.15:
        path = rng.choice(
            [
                f"/v1/models/{MODEL}:classify",
                f"/v1/models/{MODEL}:regress",
                f"/v1/models/ghost{rng.randint(0, 99)}:predict",
                f"/v1/models/{MODEL}/versions/{rng.randint(2, 10**6)}:predict",
            ]
        )
        if "classify" in path or "regress" in path:
            body = json.dumps({"examples": [{"x": [1.0, "a"]}]}).encode()
    return "POST", path, {"Content-Type": "application/json"}, body


def _path_case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    junk = "".join(rng.choices("abc/:%._-0123456789", k=rng.randint(0, 40)))
    method, path = rng.choice(
        [
            ("GET", f"/v1/models/{MODEL}:predict"),
            ("GET", f"/v1/models/ghost{rng.randint(0, 99)}"),
            ("GET", f"/v1/models/{MODEL}/versions/{rng.randint(2, 10**6)}"),
            ("GET", "/v2/" + junk),
            ("GET", "/v1/models"),
            ("PUT", f"/v1/models/{MODEL}:predict"),
            ("DELETE", f"/v1/models/{MODEL}"),
            ("PATCH", "/v1/" + junk),
            ("POST", f"/v1/models/{MODEL}:explode"),
            ("POST", "/monitoring/prometheus/metrics"),
        ]
    )
    return method, path, {}, b""


def _frame_case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    """HTTP framing the server cannot read a body from, or a body over the size limit."""
    path = f"/v1/models/{MODEL}:predict"
    choice = rng.randrange(3)
    if choice == 0:
        return "POST", path, {"Content-Length": rng.choice(["abc", "-5", "1e3"])}, b""
    if choice == 1:
        return "POST", path, {"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n"
    return "POST", path, {}, b" " * rng.randint(MAX_MESSAGE + 1, 3 * MAX_MESSAGE)


def _send(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers = {**headers, "Content-Length": str(len(body))}
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_malformed_rest_requests_all_get_errors_and_the_server_keeps_serving(server) -> None:
    rng = random.Random(SEED + 1)
    statuses: dict[int, int] = {}
    for index in range(REST_REQUESTS):
        kind = rng.choices([_json_case, _path_case, _frame_case], weights=[6, 3, 1])[0]
        method, path, headers, body = kind(rng)
        status, answer = _send(server.rest_api_port, method, path, headers, body)
        assert status >= 400, (index, method, path, body[:200], answer[:200])
        assert "error" in json.loads(answer), (index, answer[:200])
        statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == REST_REQUESTS
    assert {400, 404, 429} <= set(statuses), statuses
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        _assert_still_serving(server, channel)


def _assert_still_serving(server: ModelServer, channel: grpc.Channel) -> None:
    """A good request on each API is answered, and no request holds any memory budget."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(served_toy._predict_request([1.0]), timeout=DEADLINE)
    scores = tf.make_ndarray(response.outputs["probabilities"]).ravel()
    np.testing.assert_allclose(scores, [served_toy._probability(1, 1.0)], rtol=1e-5)
    example = base64.b64encode(served_toy._serialized([1.0])[0]).decode()
    body = json.dumps({"instances": [{"b64": example}]}).encode()
    status, answer = _send(
        server.rest_api_port,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"Content-Type": "application/json"},
        body,
    )
    assert status == 200, answer
    assert json.loads(answer)["predictions"][0][0] == pytest.approx(
        served_toy._probability(1, 1.0), rel=1e-5
    )
    assert server.api.budget.used == 0
