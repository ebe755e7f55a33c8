"""TF Serving's REST API: `/v1/models/<name>[/versions/<v>|/labels/<l>][:predict|:classify|...]`.

Requests are turned into the gRPC API's protos and answered by the same handlers, so both front
ends give the same results and errors. The JSON rules follow TF Serving's `json_tensor.cc`: row
(`instances`) and columnar (`inputs`) predict formats, `{"b64": ...}` for binary strings, string
outputs whose name ends in `_bytes` returned base64-encoded, `{"error": ...}` bodies with the
HTTP status TF Serving maps each error code to.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from serving import wire
from serving.api import REST, ServingApi
from serving.errors import ServingError, invalid_argument
from serving.limits import json_body_bytes
from serving.metrics import PROMETHEUS_PATH
from serving.servable import DEFAULT_SIGNATURE, dtype_name, tensor_proto_from_array

log = logging.getLogger(__name__)

_PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_INT64_MAX = 2**63 - 1
_ERROR_VALUE_CHARS = 2000
# A refused body is read and dropped up to this size, so that its sender gets the answer.
_MAX_DISCARDED_BYTES = 1 << 30
_DISCARD_BYTES_PER_SECOND = 64 << 20
_DISCARD_BLOCK = 1 << 20
_MAX_CHUNK_LINE = 1 << 16
# numpy's limit on dimensions; TensorFlow's is higher, but no model input comes close.
_MAX_RANK = 32

_FLOAT_TYPES = {types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16}
_INT32_TYPES = {types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8}
_FLOAT_MANTISSA_MAX = {types_pb2.DT_FLOAT: 2**24 - 1, types_pb2.DT_DOUBLE: 2**53 - 1}


@dataclass(frozen=True)
class RestResponse:
    """An HTTP answer: status, body and content type."""

    status: int
    body: bytes
    content_type: str = "application/json"


# --------------------------------------------------------------------------------------------
# JSON values <-> tensors


def _dump(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > _ERROR_VALUE_CHARS:
        text = text[:_ERROR_VALUE_CHARS] + "..."
    return text


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _format_error(document: Any, *parts: str) -> ServingError:
    return invalid_argument(f"JSON Value: {_dump(document)} {''.join(parts)}")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64_decode(value: Any) -> bytes:
    if not _is_b64(value):
        raise invalid_argument(
            f"JSON Value: {_dump(value)} not formatted correctly for base64 data"
        )
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid_argument("Unable to base64 decode") from error


def _type_error(value: Any, dtype: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {_dump(value)} Type: {_json_type(value)} is not of expected type: "
        f"{dtype_name(dtype)}"
    )


def _lossy(value: Any, target: str) -> ServingError:
    return invalid_argument(
        f"Cannot convert JSON value: {_dump(value)} to {target} without loss of precision."
    )


def _leaf(value: Any, dtype: int) -> Any:
    if isinstance(value, dict):
        if dtype == types_pb2.DT_STRING:
            return _b64_decode(value)
        raise _type_error(value, dtype)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if dtype in _FLOAT_TYPES:
        if not (is_int or isinstance(value, float)):
            raise _type_error(value, dtype)
        limit = _FLOAT_MANTISSA_MAX.get(dtype)
        if is_int and limit is not None and abs(value) > limit:
            raise _lossy(value, dtype_name(dtype))
        return float(value)
    if dtype in _INT32_TYPES:
        if not is_int or not -(2**31) <= value < 2**31:
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_INT64:
        if not is_int or not -(2**63) <= value <= _INT64_MAX:
            raise _type_error(value, dtype)
        return value
    if dtype in (types_pb2.DT_UINT32, types_pb2.DT_UINT64):
        bits = 32 if dtype == types_pb2.DT_UINT32 else 64
        if not is_int or not 0 <= value < 2**bits:
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode("utf-8")
    raise ServingError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"Conversion of JSON Value: {_dump(value)} to type: {dtype_name(dtype)}",
    )


def _fill(value: Any, level: int, shape: list[int], dtype: int, out: list[Any]) -> None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid_argument(
                f"JSON Value: {_dump(value)} found at incorrect level: {level + 1} in the JSON "
                f"DOM. Expected at level: {rank}"
            )
        out.append(_leaf(value, dtype))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def json_to_array(value: Any, dtype: int) -> np.ndarray:
    """A dense tensor from nested JSON lists, checked as TF Serving checks it."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    if len(shape) > _MAX_RANK:
        raise invalid_argument(
            f"JSON Value nested {len(shape)} lists deep; a tensor has at most {_MAX_RANK} dimensions"
        )
    flat: list[Any] = []
    _fill(value, 0, shape, dtype, flat)
    return _array(flat, dtype, shape)


def _array(flat: list[Any], dtype: int, shape: list[int]) -> np.ndarray:
    """Checked leaf values (see `_leaf`) as an array of the dtype's numpy type."""
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.array(flat, dtype=tf.dtypes.as_dtype(dtype).as_numpy_dtype).reshape(shape)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(size) for size in shape) + "]"


def _instances_to_arrays(
    document: dict[str, Any], instances: Any, infos: dict[str, Any]
) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise _format_error(document, "Excepting 'instances' to be an list/array")
    if not instances:
        raise _format_error(document, "No values in 'instances' array")

    def is_object(value: Any) -> bool:
        return isinstance(value, dict) and not _is_b64(value)

    if not is_object(instances[0]) and len(infos) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    as_objects = is_object(instances[0])
    names = sorted(infos)
    # Per input: each instance's value (a leaf for a scalar, else an array) and the shape of
    # the first, which every other instance must match.
    rows: dict[str, list[Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def add(index: int, name: str, value: Any, key_text: str) -> None:
        try:
            if name not in infos:
                raise invalid_argument(f"JSON object: does not have named input: {name}")
            dtype = infos[name].dtype
            if isinstance(value, list):
                array = json_to_array(value, dtype)
                item, shape, size = array, array.shape, array.size
            else:
                # The common case, one scalar (a serialized tf.Example) per instance: no
                # numpy array per instance.
                item, shape, size = _leaf(value, dtype), (), 1
            first = shapes.setdefault(name, shape)
            if first != shape:
                if math.prod(first) != size:
                    raise invalid_argument(
                        f"Expecting tensor size: {math.prod(first)} but got: {size}"
                    )
                raise invalid_argument(
                    f"Expecting shape {_shape_text(first)} but got: {_shape_text(shape)}"
                )
            rows.setdefault(name, []).append(item)
        except ServingError as error:
            raise invalid_argument(
                f"Failed to process element: {index}{key_text} of 'instances' list. Error: {error}"
            ) from error

    for index, element in enumerate(instances):
        if as_objects:
            if not is_object(element):
                raise invalid_argument(
                    f"Expecting object but got list at item {index} of input list"
                )
            for name, value in element.items():
                add(index, name, value, f" key: {name}")
            if set(element) != set(infos):
                raise invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: "
                    f"{_dump(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if is_object(element):
                raise invalid_argument(
                    f"Expecting value/list but got object at item {index} of input list"
                )
            add(index, names[0], element, "")
    return {
        name: np.stack(items) if shapes[name] else _array(items, infos[name].dtype, [len(items)])
        for name, items in rows.items()
    }


def _columns_to_arrays(inputs: Any, infos: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(infos) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        (name,) = infos
        return {name: json_to_array(inputs, infos[name].dtype)}
    arrays = {}
    for name in sorted(infos):
        if name not in inputs:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = json_to_array(inputs[name], infos[name].dtype)
    return arrays


def _json_values(array: np.ndarray, dtype: int, as_base64: bool) -> Any:
    """Nested lists for JSON, numbers written as TF Serving writes them."""
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        # Shortest decimal that reads back as the same float32: 0.1, not 0.10000000149011612.
        return array.astype(np.float32).astype(str).astype(np.float64).tolist()
    if dtype == types_pb2.DT_STRING:
        if as_base64:
            return _map_nested(
                array.tolist(), lambda b: {"b64": base64.b64encode(b).decode("ascii")}
            )
        return _map_nested(array.tolist(), lambda b: b.decode("utf-8", errors="replace"))
    return array.tolist()


def _map_nested(value: Any, function: Any) -> Any:
    if isinstance(value, list):
        return [_map_nested(item, function) for item in value]
    return function(value)


def _float32_json(value: float) -> float:
    return float(str(np.float32(value)))


# --------------------------------------------------------------------------------------------
# Examples from JSON (classify and regress)


def _feature_kind_error(name: str, kind: str | None) -> ServingError:
    names = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}
    return invalid_argument(
        f"Unexpected element type in feature: {name} expecting type: {names[kind]}"
    )


def _example_from_json(value: Any) -> tf.train.Example:
    if not isinstance(value, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_json_type(value)}")
    example = tf.train.Example()
    for name, content in value.items():
        feature = example.features.feature[name]
        items = content if isinstance(content, list) else [content]
        kind: str | None = None
        for item in items:
            if (
                item is None
                or isinstance(item, list)
                or (isinstance(item, dict) and not _is_b64(item))
            ):
                raise invalid_argument(
                    f"Feature: {name} has element with unexpected JSON type: {_json_type(item)}"
                )
            if isinstance(item, bool):
                wanted, converted = "int64_list", int(item)
            elif isinstance(item, dict):
                wanted, converted = "bytes_list", _b64_decode(item)
            elif isinstance(item, str):
                wanted, converted = "bytes_list", item.encode("utf-8")
            elif isinstance(item, float):
                if abs(item) > np.finfo(np.float32).max and np.isfinite(item):
                    raise _lossy(item, "float")
                wanted, converted = "float_list", item
            else:
                if item > _INT64_MAX:
                    raise invalid_argument(
                        f"Feature: {name} has uint64 element. Only int64 is supported."
                    )
                wanted, converted = "int64_list", item
            if kind is not None and kind != wanted:
                raise _feature_kind_error(name, kind)
            kind = wanted
            getattr(feature, wanted).value.append(converted)
    return example


# --------------------------------------------------------------------------------------------
# Request dispatch


class RestApi:
    """Answers REST requests with the shared `ServingApi`.

    The HTTP front end (`RestServer`) holds room in the API's in-flight budget for a request
    before it reads the body, so the handlers here do not reserve it again.
    """

    def __init__(
        self,
        api: ServingApi,
        max_body_bytes: int | None = None,
        metrics_path: str | None = PROMETHEUS_PATH,
    ) -> None:
        self.api = api
        self.max_body_bytes = max_body_bytes
        # Where Prometheus metrics are served (a --monitoring_config_file); None: nowhere.
        self.metrics_path = metrics_path

    def handle(self, method: str, target: str, body: bytes) -> RestResponse:
        """Answer one HTTP request; never raises."""
        path = urlsplit(target).path
        if self.metrics_path is not None and path == self.metrics_path:
            if method != "GET":
                return _error_response(invalid_argument(f"Unexpected method: {method}"))
            return RestResponse(
                200, self.api.metrics.render().encode(), "text/plain; version=0.0.4"
            )
        if not _API_PATH.fullmatch(path):
            return RestResponse(404, json.dumps({"error": f"Not found: {path}"}).encode())
        start = time.perf_counter()
        record: dict[str, str] = {"api": "", "model": "", "version": ""}
        status = "OK"
        try:
            output = self._dispatch(method, path, body, record)
            return RestResponse(200, output)
        except ServingError as error:
            status = error.code.name
            return _error_response(error)
        except RecursionError as error:
            status = grpc.StatusCode.INVALID_ARGUMENT.name
            return _error_response(invalid_argument(f"Request is nested too deeply: {error}"))
        except Exception as error:
            status = grpc.StatusCode.INTERNAL.name
            log.exception("REST request %s %s failed", method, path)
            return _error_response(
                ServingError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
            )
        finally:
            if record["api"]:
                self.api.record(
                    record["api"], REST, record["model"], record["version"], status, start
                )

    def _dispatch(self, method: str, path: str, body: bytes, record: dict[str, str]) -> bytes:
        malformed = invalid_argument(f"Malformed request: {method} {path}")
        if method == "POST":
            match = _PREDICTION_PATH.fullmatch(path)
        elif method == "GET":
            match = _STATUS_PATH.fullmatch(path)
        else:
            match = None
        if match is None:
            raise malformed
        name, version_text, label, verb = match.groups()
        name = unquote(name) if name else ""
        spec = model_pb2.ModelSpec(name=name)
        if version_text:
            version = int(version_text)
            if version > _INT64_MAX:
                raise invalid_argument(f"Failed to convert version: {version_text} to numeric.")
            spec.version.value = version
        if label:
            spec.version_label = unquote(label)
        record["model"] = name
        if method == "POST":
            if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Request body of {len(body)} bytes is larger than the maximum of "
                    f"{self.max_body_bytes} bytes",
                )
            if verb == "predict":
                record["api"] = "Predict"
                return self._predict(spec, body, record)
            if verb in ("classify", "regress"):
                record["api"] = verb.capitalize()
                return self._classify_or_regress(verb, spec, body, record)
            raise malformed
        if not name:
            raise invalid_argument("Missing model name in request.")
        if verb == "metadata":
            record["api"] = "GetModelMetadata"
            return self._metadata(spec, record)
        record["api"] = "GetModelStatus"
        return self._status(spec)

    @staticmethod
    def _document(body: bytes) -> dict[str, Any]:
        if not body:
            raise invalid_argument("JSON Parse error: The document is empty")
        try:
            document = json.loads(body)
        except json.JSONDecodeError as error:
            raise invalid_argument(
                f"JSON Parse error: {error.msg} at offset: {error.pos}"
            ) from error
        except RecursionError as error:
            raise invalid_argument("JSON Parse error: the document is nested too deeply") from error
        except UnicodeDecodeError as error:
            raise invalid_argument(
                f"JSON Parse error: Invalid encoding in string. {error}"
            ) from error
        if not isinstance(document, dict):
            raise _format_error(document, "Is not object")
        return document

    @staticmethod
    def _signature_name(document: dict[str, Any]) -> str:
        name = document.get("signature_name", "")
        if not isinstance(name, str):
            raise _format_error(
                document, "not formatted correctly. 'signature_name' key must be a string value."
            )
        return name

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes, record: dict[str, str]) -> bytes:
        document = self._document(body)
        spec.signature_name = self._signature_name(document)
        servable = self.api.manager.servable(spec)
        signature_key = spec.signature_name or DEFAULT_SIGNATURE
        signature: meta_graph_pb2.SignatureDef | None = servable.signature_defs.get(signature_key)
        if signature is None:
            raise invalid_argument(
                f'Serving signature name: "{signature_key}" not found in signature def'
            )
        infos = dict(signature.inputs)
        if not infos:
            raise invalid_argument(
                f"Failed to get input map for signature: {spec.signature_name or 'DEFAULT'}"
            )
        has_instances, has_inputs = "instances" in document, "inputs" in document
        if has_instances and has_inputs:
            raise _format_error(
                document,
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys "
                "to exist ",
            )
        if has_instances:
            arrays = _instances_to_arrays(document, document["instances"], infos)
        elif has_inputs:
            arrays = _columns_to_arrays(document["inputs"], infos)
        else:
            raise invalid_argument("Missing 'inputs' or 'instances' key")
        request = predict_pb2.PredictRequest()
        request.model_spec.CopyFrom(spec)
        for name, array in arrays.items():
            # The arrays already have the signature's dtypes (json_to_array checked them).
            tensor_proto_from_array(array, infos[name].dtype, request.inputs[name])
        response = self.api.predict(request, entrypoint=None, reserved=True)
        record["version"] = str(response.model_spec.version.value)
        outputs = {
            alias: (tf.make_ndarray(proto), proto.dtype)
            for alias, proto in sorted(response.outputs.items())
        }
        if not outputs:
            raise invalid_argument("Cannot convert empty tensor map to JSON")
        if has_instances:
            return json.dumps({"predictions": _rows(outputs)}).encode()
        columns = {
            alias: _json_values(array, dtype, _bytes_output(alias, dtype))
            for alias, (array, dtype) in outputs.items()
        }
        value = next(iter(columns.values())) if len(columns) == 1 else columns
        return json.dumps({"outputs": value}).encode()

    def _classify_or_regress(
        self, verb: str, spec: model_pb2.ModelSpec, body: bytes, record: dict[str, str]
    ) -> bytes:
        document = self._document(body)
        spec.signature_name = self._signature_name(document)
        request = wire.inference_request_type()()
        request.model_spec.CopyFrom(spec)
        if "context" in document:
            with_context = request.input.example_list_with_context
            with_context.context = _example_from_json(document["context"]).SerializeToString()
            target = with_context.examples
        else:
            target = request.input.example_list.examples
        examples = document.get("examples")
        if "examples" not in document:
            raise _format_error(
                document, "When method is classify, key 'examples' is expected and was not found"
            )
        if not isinstance(examples, list):
            raise _format_error(document, "Expecting 'examples' value to be an list/array")
        if not examples:
            raise _format_error(document, "'examples' value is an empty array")
        target.extend(_example_from_json(example).SerializeToString() for example in examples)
        if verb == "classify":
            response = self.api.classify(request, entrypoint=None, reserved=True)
            record["version"] = str(response.model_spec.version.value)
            results = [
                [[entry.label, _float32_json(entry.score)] for entry in row.classes]
                for row in response.result.classifications
            ]
            if not results:
                raise invalid_argument("Cannot convert empty ClassificationResults to JSON")
        else:
            response = self.api.regress(request, entrypoint=None, reserved=True)
            record["version"] = str(response.model_spec.version.value)
            results = [_float32_json(entry.value) for entry in response.result.regressions]
            if not results:
                raise invalid_argument("Cannot convert empty RegressionResults to JSON")
        return json.dumps({"results": results}).encode()

    def _metadata(self, spec: model_pb2.ModelSpec, record: dict[str, str]) -> bytes:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = self.api.get_model_metadata(request, entrypoint=None)
        record["version"] = str(response.model_spec.version.value)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        options = {
            "preserving_proto_field_name": True,
            "always_print_fields_with_no_presence": True,
        }
        document = {
            "model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {"signature_def": json_format.MessageToDict(signature_map, **options)},
        }
        return json.dumps(document, indent=1).encode()

    def _status(self, spec: model_pb2.ModelSpec) -> bytes:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(spec)
        response = self.api.get_model_status(request, entrypoint=None)
        document = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        return json.dumps(document, indent=1).encode()


def _bytes_output(alias: str, dtype: int) -> bool:
    return dtype == types_pb2.DT_STRING and alias.endswith("_bytes")


def _rows(outputs: dict[str, tuple[np.ndarray, int]]) -> list[Any]:
    batch = -1
    for alias, (array, _) in outputs.items():
        if array.ndim == 0:
            raise invalid_argument(f"Tensor name: {alias} has no shape information ")
        if batch >= 0 and array.shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {alias} has inconsistent batch size: {array.shape[0]} "
                f"expecting: {batch}"
            )
        batch = array.shape[0]
    columns = {
        alias: _json_values(array, dtype, _bytes_output(alias, dtype))
        for alias, (array, dtype) in outputs.items()
    }
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{alias: column[row] for alias, column in columns.items()} for row in range(batch)]


def _error_response(error: ServingError) -> RestResponse:
    return RestResponse(error.http_status, json.dumps({"error": error.message}).encode())


# --------------------------------------------------------------------------------------------
# HTTP server


def _too_large(length: int, limit: int, at_least: bool = False) -> ServingError:
    size = f"at least {length:,}" if at_least else f"{length:,}"
    return ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Request body of {size} bytes is larger than the maximum of {limit:,} bytes "
        "(grpc.max_receive_message_length in --grpc_channel_arguments)",
    )


class _Handler(BaseHTTPRequestHandler):
    rest: RestApi
    server: RestServer
    server_version = "widedeep-model-server"
    # Keep-alive: a client's connection serves many requests, without a TCP handshake and a
    # new server thread for each (HTTP/1.0 closes after every answer).
    protocol_version = "HTTP/1.1"
    # An idle or stalled client must not hold a thread for long (--rest_api_timeout_in_ms).
    timeout = 30
    # The headers and the body of an answer are two writes; with Nagle's algorithm the body
    # would wait for the client to acknowledge the headers (a delayed ACK on keep-alive).
    disable_nagle_algorithm = True

    # What is left of the current request's body: bytes (Content-Length), or chunks until the
    # last one (None while a chunked body is not finished), or nothing known (-1).
    _body_left: int | None = 0

    def parse_request(self) -> bool:
        # The request line has arrived: from here until its answer is written, a graceful
        # stop waits for this connection instead of closing it.
        self.server.set_busy(self.connection, True)
        self._body_left = 0
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.set_busy(self.connection, False)
            if self.server.stopping:
                self.close_connection = True

    def handle_expect_100(self) -> bool:
        # A client that asks before sending a body too large is told no at once, and sends none.
        limit = self.rest.max_body_bytes
        length = self._content_length()
        if limit is not None and length is not None and length > limit:
            self.close_connection = True
            self._send(_error_response(_too_large(length, limit)))
            return False
        return super().handle_expect_100()

    def _answer(self) -> None:
        try:
            response = self._admitted_answer()
        except ServingError as error:
            # The client may still be sending the refused body: read the rest of it, so that
            # it gets this answer instead of a reset connection. What is left could not be
            # told from a next request, so the connection closes after the answer.
            self._discard_body()
            self.close_connection = True
            response = _error_response(error)
        self._send(response)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def _admitted_answer(self) -> RestResponse:
        """The answer, given once the request has a worker and room in the memory budget."""
        limit = self.rest.max_body_bytes
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = None if chunked else self._content_length()
        if not chunked:
            if length is None:
                self._body_left = -1
                raise invalid_argument("Invalid Content-Length header")
            self._body_left = length
            if limit is not None and length > limit:
                raise _too_large(length, limit)
        else:
            self._body_left = None
        api = self.rest.api
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.server.worker(api.limits.in_flight_wait_seconds))
            if length:
                # Room for the body is held before it is read.
                stack.enter_context(api.budget.reserve(length, "this request's body"))
            body = self._read_body(length, limit)
            if chunked and body:
                stack.enter_context(api.budget.reserve(len(body), "this request's body"))
            if body:
                # And room for what its JSON is parsed into, before it is parsed.
                stack.enter_context(api.budget.reserve(json_body_bytes(body), "this request"))
            return self.rest.handle(self.command, self.path, body)

    def _content_length(self) -> int | None:
        """The Content-Length header (0 when absent), or None when it is not a count."""
        text = self.headers.get("Content-Length")
        try:
            length = int(text) if text else 0
        except ValueError:
            return None
        return length if length >= 0 else None

    def _send(self, response: RestResponse) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection or self.server.stopping:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self, length: int | None, limit: int | None) -> bytes:
        """The request's body, sized by Content-Length (`length`) or sent in chunks (None)."""
        if length is None:
            return self._read_chunked(limit)
        body = self.rfile.read(length) if length else b""
        self._body_left = length - len(body)
        if self._body_left:
            raise invalid_argument("The request body ended early")
        return body

    def _read_chunked(self, limit: int | None) -> bytes:
        body = bytearray()
        while True:
            size = self._chunk_size()
            if size == 0:
                return bytes(body)
            if limit is not None and len(body) + size > limit:
                self._skip(size)
                raise _too_large(len(body) + size, limit, at_least=True)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self._body_left = -1
                raise invalid_argument("The chunked request body ended early")
            body += chunk
            self.rfile.readline(_MAX_CHUNK_LINE)  # the CRLF after the chunk

    def _chunk_size(self) -> int:
        """The size of the next chunk; at the last one, reads the trailer and ends the body."""
        line = self.rfile.readline(_MAX_CHUNK_LINE)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self._body_left = -1
            raise invalid_argument("Invalid chunk size in a chunked request body") from None
        if size < 0:
            self._body_left = -1
            raise invalid_argument("Invalid chunk size in a chunked request body")
        if size == 0:
            # Trailer fields, if any, up to the empty line that ends the body.
            while self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                pass
            self._body_left = 0
        return size

    def _skip(self, size: int) -> int:
        """Reads and drops up to `size` bytes, a block at a time; returns how many.

        At most `_DISCARD_BYTES_PER_SECOND`: a client that keeps sending bodies the server
        refuses is slowed down, instead of taking the machine's time from the requests the
        server answers.
        """
        # One buffer, read into straight from the socket: no allocation per block, and the
        # interpreter is free while the kernel copies (other requests run meanwhile).
        block = memoryview(bytearray(min(size, _DISCARD_BLOCK)))
        skipped = 0
        started = time.monotonic()
        while skipped < size:
            count = self.rfile.readinto(block[: min(size - skipped, len(block))])
            if not count:
                break
            skipped += count
            ahead = skipped / _DISCARD_BYTES_PER_SECOND - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return skipped

    def _discard_body(self) -> None:
        """Reads and drops what is left of a refused body, up to `_MAX_DISCARDED_BYTES`.

        Dropping takes no memory. Past the bound, or when the body cannot be delimited, the
        connection is closed with the rest unread.
        """
        left = self._body_left
        try:
            if left is not None and left > 0:
                self._body_left = left - self._skip(min(left, _MAX_DISCARDED_BYTES))
                return
            discarded = 0
            while left is None and discarded <= _MAX_DISCARDED_BYTES:
                size = self._chunk_size()
                if size == 0:
                    return
                discarded += self._skip(size)
                self.rfile.readline(_MAX_CHUNK_LINE)
        except (OSError, ServingError):
            return  # the client hung up, or sent something that is not a chunk

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


class RestServer(ThreadingHTTPServer):
    """A threaded HTTP/1.1 server whose `stop` lets requests in flight finish.

    Connections are kept alive between requests, each served by its own thread; at most
    `num_threads` requests are answered at once (TF Serving's `--rest_api_num_threads`), the
    others wait for a worker. A connection that stalls for `timeout_seconds` is closed. On
    `stop`, idle connections are closed at once and busy ones after their answer (sent with
    ``Connection: close``).
    """

    # Track request threads so `stop` can wait for them (ThreadingHTTPServer's are daemons).
    daemon_threads = False
    block_on_close = False
    # Connections the kernel queues before they are accepted: a burst of new clients must not
    # wait for TCP's retransmission (1 s and more) behind socketserver's default of 5.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        host: str,
        port: int,
        rest: RestApi,
        *,
        num_threads: int = 16,
        timeout_seconds: float = 30.0,
    ) -> None:
        handler = type("RestHandler", (_Handler,), {"rest": rest, "timeout": timeout_seconds})
        super().__init__((host, port), handler)
        self.num_threads = num_threads
        self._workers = threading.BoundedSemaphore(num_threads)
        self._thread: threading.Thread | None = None
        self._in_flight: set[threading.Thread] = set()
        self._in_flight_lock = threading.Lock()
        # Open connections, each with whether a request on it is being answered.
        self._connections: dict[socket.socket, bool] = {}
        self.stopping = False

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return self.server_address[1]

    @contextlib.contextmanager
    def worker(self, wait_seconds: float) -> Iterator[None]:
        """Holds one of the `num_threads` workers; RESOURCE_EXHAUSTED if none frees in time."""
        if not self._workers.acquire(timeout=wait_seconds):
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is busy: {self.num_threads} REST requests are being answered "
                "(--rest_api_num_threads); retry later",
            )
        try:
            yield
        finally:
            self._workers.release()

    def set_busy(self, connection: socket.socket, busy: bool) -> None:
        """Marks a connection as answering a request (True) or waiting for one (False)."""
        with self._in_flight_lock:
            if connection in self._connections:
                self._connections[connection] = busy

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_one, args=(request, client_address), name="rest-request"
        )
        with self._in_flight_lock:
            if self.stopping:
                self.shutdown_request(request)
                return
            self._in_flight.add(thread)
            self._connections[request] = False
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(threading.current_thread())
                self._connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is not a server fault; log it, don't print it.
        log.debug("REST connection from %s failed", client_address, exc_info=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="rest-server", daemon=True)
        self._thread.start()

    def stop(self, grace: float | None) -> None:
        """Stop accepting, close idle connections, wait up to `grace` seconds for the rest."""
        self.shutdown()
        self.server_close()
        with self._in_flight_lock:
            self.stopping = True
            threads = list(self._in_flight)
            idle = [c for c, busy in self._connections.items() if not busy]
        for connection in idle:
            # Wakes the thread waiting for the connection's next request line.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = None if grace is None else time.monotonic() + grace
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        if self._thread is not None:
            self._thread.join()
