"""The scoring client: one query's features and its candidates in, the candidates ranked out.

As in the paper (section 4.3), a request's candidates are split into smaller batches that are
scored in parallel and merged, which cuts the latency of one query. It speaks TensorFlow
Serving's gRPC API or, given an ``http://`` target, its REST API, so it works against
``tensorflow_model_server`` and the built-in server alike. Three kinds of request
(``ClientSettings.request``):

- ``examples``: ``Predict`` on ``serving_default``, one serialized tf.Example of raw features a
  candidate, the query's features merged into each (REST: ``:predict``, base64-encoded);
- ``classify``: ``Classify`` with ``example_list_with_context``: the query's features are one
  context example sent once a request, each candidate an example of its own features (REST:
  ``:classify`` with ``"context"`` and ``"examples"`` as plain JSON values);
- ``raw``: ``Predict`` on the ``raw_features`` signature, one named input per raw column, the
  query's columns given one value for all candidates (REST: ``:predict`` in the columnar format,
  ``{"inputs": {"user_id": [3], "movie_id": ["m1", "m2", ...]}}``).

Features are typed as the model parses them: the log's own types, read once from the model's
``raw_features`` signature (GetModelMetadata), or as given (``input_types``).
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from transform.artifacts import (
    CLASSIFY_SIGNATURE,
    EXAMPLES_INPUT,
    POSITIVE_CLASS,
    PROBABILITIES_OUTPUT,
    RAW_SIGNATURE,
    SERVING_SIGNATURE,
    predict_request,
)
from transform.config import Config, DataConfig, Kind
from transform.errors import UsageError, WidedeepError
from transform.examples import ExampleEncoder, as_int, json_text

REQUEST_KINDS = ("examples", "classify", "raw")
"""What a request carries: merged tf.Examples, a context example and the candidates' own
examples (Classify), or raw values by column (the ``raw_features`` signature)."""
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_KIND_OF_DTYPE = {types_pb2.DT_INT64: "int64", types_pb2.DT_FLOAT: "float"}


class ScoringError(WidedeepError, RuntimeError):
    """A request the server refused, that could not reach it or not finish within its deadline."""


@dataclass(frozen=True)
class ClientSettings:
    """How a query's candidates are scored.

    Attributes:
      batch_size: Candidates per request; a query with more is split into several requests.
      parallelism: Requests of one query in flight at once.
      timeout_s: Deadline of the whole query, retries included.
      retries: Attempts after the first when the server is UNAVAILABLE or RESOURCE_EXHAUSTED
        (HTTP 503 or 429 on REST) or cannot be reached (a restart, a version switch on a load
        balancer), with jittered exponential backoff.
      signature_name: The model's signature that returns probabilities, for ``examples``
        requests (``classify`` uses ``classification``, ``raw`` uses ``raw_features``).
      max_message_mb: Largest message sent or received.
      request: What a request carries: ``examples``, ``classify`` or ``raw`` (see the
        module's docstring).
    """

    batch_size: int = 50
    parallelism: int = 4
    timeout_s: float = 5.0
    retries: int = 3
    signature_name: str = SERVING_SIGNATURE
    max_message_mb: int = 64
    request: str = "examples"

    def __post_init__(self) -> None:
        if self.request not in REQUEST_KINDS:
            raise UsageError(
                f"request: expected one of {', '.join(REQUEST_KINDS)}, got {self.request!r}"
            )

    @classmethod
    def from_config(cls, config: Config) -> ClientSettings:
        """The settings of a pipeline config's ``serving`` section."""
        s = config.serving
        return cls(
            batch_size=s.batch_size,
            parallelism=s.parallelism,
            timeout_s=s.timeout_s,
            retries=s.retries,
        )


@dataclass(frozen=True)
class Ranked:
    """One candidate with its score and rank (1 is best)."""

    rank: int
    score: float
    candidate: Mapping[str, Any]


def kinds_of_inputs(inputs: Mapping[str, int]) -> dict[str, str]:
    """The tf.Example types of a model's columns, from its ``raw_features`` signature inputs
    (name -> DataType enum): an int64 input is an int64 feature, a float input a float one.
    A string input is a string column or a list (whose values keep the config's type)."""
    return {
        name: _KIND_OF_DTYPE[dtype] for name, dtype in inputs.items() if dtype in _KIND_OF_DTYPE
    }


def saved_model_input_types(path: str | Path) -> dict[str, str] | None:
    """:func:`kinds_of_inputs` of the SavedModel at ``path`` (None if it has no
    ``raw_features`` signature): how examples must be typed to score with it in process."""
    from serving.servable import read_meta_graph

    signature = read_meta_graph(Path(path), ("serve",)).signature_def.get(RAW_SIGNATURE)
    if signature is None:
        return None
    return kinds_of_inputs({name: info.dtype for name, info in signature.inputs.items()})


REST_SCHEMES = ("http", "https")
GRPC_SCHEME_PREFIX = "grpc://"
# gRPC's own target syntax (name resolvers), passed to the channel as is.
GRPC_RESOLVER_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds")


SERVER_POLL_S = 0.2
"""How often :meth:`RankingClient.wait_until_serving` asks a server that is not serving yet."""


@dataclass(frozen=True)
class Endpoint:
    """Where a model server listens and which of its APIs the client speaks.

    ``host:port`` (or ``grpc://host:port``, or any other gRPC target such as
    ``dns:///host:port``) is TF Serving's gRPC API; ``http://host:port`` or
    ``https://host:port`` (optionally with a path prefix, e.g. behind a proxy) is its REST API.
    """

    api: str
    """``grpc`` or ``rest``."""
    target: str
    """The gRPC target, or the REST URL without a trailing slash."""
    host: str = ""
    port: int = 0
    path: str = ""
    tls: bool = False

    @classmethod
    def parse(cls, target: str) -> Endpoint:
        """The endpoint a ``--server`` value names; ValueError if it names none."""
        text = target.strip()
        scheme = text.split("://", 1)[0].lower() if "://" in text else ""
        if scheme in REST_SCHEMES:
            parts = urlsplit(text)
            try:
                port = parts.port
            except ValueError:
                raise UsageError(f"--server: bad port in {target!r}") from None
            if not parts.hostname or parts.query or parts.fragment:
                raise UsageError(
                    f"--server: expected http://HOST:PORT (the REST API), got {target!r}"
                )
            tls = scheme == "https"
            return cls(
                api="rest",
                target=text.rstrip("/"),
                host=parts.hostname,
                port=port or (443 if tls else 80),
                path=parts.path.rstrip("/"),
                tls=tls,
            )
        if scheme == "grpc":
            text = text[len(GRPC_SCHEME_PREFIX) :]
        elif scheme and scheme not in GRPC_RESOLVER_SCHEMES:
            raise UsageError(
                f"--server: unknown scheme {scheme!r} in {target!r}; expected HOST:PORT (gRPC) "
                "or http://HOST:PORT (REST)"
            )
        if not text:
            raise UsageError("--server: expected HOST:PORT (gRPC) or http://HOST:PORT (REST)")
        return cls(api="grpc", target=text)

    def __str__(self) -> str:
        return self.target


class _Failure(Exception):
    """One request that failed; `retryable` when the server may answer a new attempt."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def _settled(run: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """Runs a request now; returns what waiting for it gives (its scores or its failure)."""
    try:
        scores = run()
    except _Failure as e:
        failure = e

        def fail() -> np.ndarray:
            raise failure

        return fail
    return lambda: scores


class _GrpcTransport:
    """TF Serving's PredictionService through a gRPC channel.

    `send` starts a call as a future on the channel; `call` makes it in the calling thread,
    which saves a thread hand-off (about 0.3 ms on loopback) for the last call of a wave. A
    payload is a (method, request, answer reader) triple built by the ``*_payload`` methods.
    """

    def __init__(
        self, endpoint: Endpoint, model_name: str, settings: ClientSettings, version: int | None
    ):
        self._endpoint = endpoint
        self._model_name = model_name
        self._settings = settings
        self._version = version
        limit = settings.max_message_mb * 1024 * 1024
        self._channel = grpc.insecure_channel(
            endpoint.target,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _spec(self, request: Any, signature_name: str) -> None:
        request.model_spec.name = self._model_name
        request.model_spec.signature_name = signature_name
        if self._version is not None:
            request.model_spec.version.value = self._version

    def request(self, examples: Sequence[bytes]) -> predict_pb2.PredictRequest:
        return predict_request(
            self._model_name,
            examples,
            signature_name=self._settings.signature_name,
            version=self._version,
        )

    def examples_payload(self, examples: Sequence[bytes]) -> Any:
        return (self._stub.Predict, self.request(examples), _probabilities)

    def classify_payload(self, context: bytes, examples: Sequence[bytes]) -> Any:
        request = classification_pb2.ClassificationRequest()
        self._spec(request, CLASSIFY_SIGNATURE)
        with_context = request.input.example_list_with_context
        with_context.context.ParseFromString(context)
        for example in examples:
            with_context.examples.add().ParseFromString(example)
        return (self._stub.Classify, request, _classify_probabilities)

    def raw_payload(self, columns: Mapping[str, tuple[list[Any], int]]) -> Any:
        request = predict_pb2.PredictRequest()
        self._spec(request, RAW_SIGNATURE)
        for name, (values, dtype) in columns.items():
            request.inputs[name].CopyFrom(
                tf.make_tensor_proto(values, dtype=tf.dtypes.as_dtype(dtype), shape=[len(values)])
            )
        return (self._stub.Predict, request, _probabilities)

    def send(self, payload: Any, deadline: float) -> Callable[[], np.ndarray]:
        method, request, read = payload
        call = method.future(request, timeout=deadline - time.monotonic())

        def wait() -> np.ndarray:
            try:
                return read(call.result())
            except grpc.RpcError as e:
                raise self._failure(e) from None

        return wait

    def call(self, payload: Any, deadline: float) -> Callable[[], np.ndarray]:
        method, request, read = payload

        def run() -> np.ndarray:
            try:
                response = method(request, timeout=deadline - time.monotonic())
            except grpc.RpcError as e:
                raise self._failure(e) from None
            return read(response)

        return _settled(run)

    def signature_inputs(self, signature_name: str, deadline: float) -> dict[str, int] | None:
        """The named signature's inputs (name -> DataType), None when the model lacks it."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self._model_name
        if self._version is not None:
            request.model_spec.version.value = self._version
        try:
            response = self._stub.GetModelMetadata(request, timeout=deadline - time.monotonic())
        except grpc.RpcError as e:
            raise self._failure(e) from None
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def.get(signature_name)
        if signature is None:
            return None
        return {name: info.dtype for name, info in signature.inputs.items()}

    def _failure(self, error: grpc.RpcError) -> _Failure:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
            message = f"cannot reach the model server at {self._endpoint} (gRPC): {details}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"{self._model_name}: deadline of {self._settings.timeout_s} s exceeded"
        else:
            message = f"{self._model_name}: {code.name}: {details}"
        return _Failure(message, code in _RETRYABLE)


# The HTTP statuses TF Serving answers the retryable gRPC codes with (UNAVAILABLE,
# RESOURCE_EXHAUSTED), and a proxy's "upstream unreachable".
_RETRYABLE_HTTP = (503, 429, 502)
_HTTP_CODE_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class _RestTransport:
    """TF Serving's REST API, ``POST /v1/models/<name>[/versions/<v>]:predict`` or ``:classify``.

    ``examples`` requests are the row format with the serialized examples base64-encoded, as TF
    Serving requires for binary strings: ``{"signature_name": ..., "instances": [{"examples":
    {"b64": ...}}, ...]}``; ``classify`` requests carry plain JSON features (``"context"`` and
    ``"examples"``), ``raw`` requests plain JSON values by column (the columnar format).
    Requests run on `parallelism` threads (the last of a wave in the calling thread), each with
    its own keep-alive connection (http.client). A payload is a (verb, body, answer reader)
    triple built by the ``*_payload`` methods.
    """

    def __init__(
        self, endpoint: Endpoint, model_name: str, settings: ClientSettings, version: int | None
    ):
        self._endpoint = endpoint
        self._model_name = model_name
        self._settings = settings
        path = f"{endpoint.path}/v1/models/{quote(model_name, safe='')}"
        if version is not None:
            path += f"/versions/{version}"
        self.model_path = path
        self.path = path + ":predict"
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, settings.parallelism), thread_name_prefix="rest-client"
        )
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def body(self, examples: Sequence[bytes]) -> bytes:
        # Written directly rather than by json.dumps of 200 small dicts (a third of the
        # time): base64 text needs no JSON escaping.
        head = json.dumps(
            {"signature_name": self._settings.signature_name, "instances": []},
            separators=(",", ":"),
        ).encode()[:-3]  # without the closing "[]}"
        opening = b'{"' + EXAMPLES_INPUT.encode() + b'":{"b64":"'
        instances = b",".join(opening + base64.b64encode(e) + b'"}}' for e in examples)
        return head + b"[" + instances + b"]}"

    def examples_payload(self, examples: Sequence[bytes]) -> Any:
        count = len(examples)
        return (":predict", self.body(examples), lambda data: _rest_probabilities(data, count))

    def classify_payload(self, context: Mapping[str, Any], examples: Sequence[Any]) -> Any:
        document = {"signature_name": CLASSIFY_SIGNATURE, "context": context, "examples": examples}
        count = len(examples)
        body = json.dumps(document, separators=(",", ":")).encode()
        return (":classify", body, lambda data: _rest_classify_probabilities(data, count))

    def raw_payload(self, columns: Mapping[str, tuple[list[Any], int]], count: int) -> Any:
        inputs = {
            name: [json_text(v) if isinstance(v, bytes) else v for v in values]
            for name, (values, _) in columns.items()
        }
        # NaN (a missing float) is written as the bare NaN TF Serving's JSON parser accepts.
        body = json.dumps(
            {"signature_name": RAW_SIGNATURE, "inputs": inputs}, separators=(",", ":")
        ).encode()
        return (":predict", body, lambda data: _rest_output_probabilities(data, count))

    def send(self, payload: Any, deadline: float) -> Callable[[], np.ndarray]:
        future = self._pool.submit(self._post, payload, deadline)
        return future.result

    def call(self, payload: Any, deadline: float) -> Callable[[], np.ndarray]:
        return _settled(lambda: self._post(payload, deadline))

    def signature_inputs(self, signature_name: str, deadline: float) -> dict[str, int] | None:
        """The named signature's inputs (name -> DataType), None when the model lacks it."""
        status, data = self._request("GET", self.model_path + "/metadata", None, deadline)
        if status != 200:
            raise self._http_failure(status, data)
        try:
            document = json.loads(data)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            json_format.ParseDict(
                document["metadata"]["signature_def"], signatures, ignore_unknown_fields=True
            )
        except (ValueError, KeyError, TypeError, json_format.ParseError) as e:
            raise _Failure(
                f"{self._model_name}: the REST metadata answer is not TF Serving's ({e})",
                retryable=False,
            ) from None
        signature = signatures.signature_def.get(signature_name)
        if signature is None:
            return None
        return {name: info.dtype for name, info in signature.inputs.items()}

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._endpoint.tls else http.client.HTTPConnection
            connection = kind(self._endpoint.host, self._endpoint.port)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _post(self, payload: Any, deadline: float) -> np.ndarray:
        verb, body, read = payload
        status, data = self._request("POST", self.model_path + verb, body, deadline)
        if status != 200:
            raise self._http_failure(status, data)
        return read(data)

    def _request(
        self, method: str, path: str, body: bytes | None, deadline: float
    ) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            connection = self._connection()
            reused = connection.sock is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Failure(self._deadline_message(), retryable=False)
            connection.timeout = remaining
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except TimeoutError:
                connection.close()
                raise _Failure(self._deadline_message(), retryable=False) from None
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
                connection.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: reconnect
                raise self._unreachable(e) from None
            except OSError as e:
                connection.close()
                raise self._unreachable(e) from None
            except http.client.HTTPException as e:
                connection.close()
                raise _Failure(
                    f"the server at {self._endpoint} did not answer as TF Serving's REST API "
                    f"({type(e).__name__}); is this the REST port (8501 by default) and not "
                    "the gRPC one?",
                    retryable=False,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _deadline_message(self) -> str:
        return f"{self._model_name}: deadline of {self._settings.timeout_s} s exceeded"

    def _unreachable(self, error: OSError | http.client.HTTPException) -> _Failure:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return _Failure(
            f"cannot reach the model server at {self._endpoint} (REST): {reason}", retryable=True
        )

    def _http_failure(self, status: int, data: bytes) -> _Failure:
        text = data.decode("utf-8", errors="replace")
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            detail = document["error"]
        else:
            detail = text.strip()[:300] or "(empty body)"
        code = _HTTP_CODE_NAMES.get(status, "")
        where = f"{self._model_name}: HTTP {status}" + (f" {code}" if code else "")
        return _Failure(f"{where}: {detail}", retryable=status in _RETRYABLE_HTTP)


class RankingClient:
    """Scores and ranks candidates through a model server's gRPC or REST endpoint.

    Args:
      target: ``host:port`` of the gRPC API, or ``http://host:port`` of the REST API (see
        `Endpoint`). Both give the same scores.
      model_name: The model's name on the server.
      settings: Batching, parallelism, deadline, retries and the kind of request (the same
        for both APIs).
      config: The pipeline config: the features' types where the model does not tell them,
        and the list delimiter of ``raw`` requests.
      version: A specific model version; None for the one the server serves.
      input_types: The model's tf.Example types by column (``int64``, ``float``, ``bytes``);
        None reads them once from the model's ``raw_features`` signature (GetModelMetadata),
        falling back on the config's types for a model that has none.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        settings: ClientSettings | None = None,
        config: Config | None = None,
        version: int | None = None,
        input_types: Mapping[str, str] | None = None,
    ):
        self.settings = settings or ClientSettings()
        self.model_name = model_name
        self.version = version
        self.endpoint = Endpoint.parse(target)
        transport = _RestTransport if self.endpoint.api == "rest" else _GrpcTransport
        self._transport = transport(self.endpoint, model_name, self.settings, version)
        self._config = config
        self._types = dict(input_types) if input_types is not None else None
        self._encoder = ExampleEncoder(config, self._types)
        self._raw_inputs: dict[str, int] | None = None
        self._list_columns = (
            {f.column for f in config.features if f.kind is Kind.CATEGORICAL_LIST}
            if config is not None
            else set()
        )
        self._list_delimiter = (config.data if config is not None else DataConfig()).list_delimiter
        # An int input has no missing value: the config's default stands in for one.
        self._defaults = {
            f.column: f.default
            for f in (config.features if config else ())
            if f.default is not None
        }

    def close(self) -> None:
        """Closes the channel or the HTTP connections."""
        self._transport.close()

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score_examples(self, examples: Sequence[bytes]) -> np.ndarray:
        """Probabilities of serialized tf.Examples, scored in parallel batches.

        Batches of `batch_size` are sent `parallelism` at a time; a batch the server answers
        UNAVAILABLE or RESOURCE_EXHAUSTED (HTTP 503 or 429), or that cannot reach the server,
        is sent again after a jittered exponential backoff, up to `retries` times, all within
        the deadline of `timeout_s`.
        """
        s = self.settings
        batches = [examples[i : i + s.batch_size] for i in range(0, len(examples), s.batch_size)]
        return self._score_payloads(
            [(len(b), self._transport.examples_payload(b)) for b in batches]
        )

    def _score_payloads(self, payloads: Sequence[tuple[int, Any]]) -> np.ndarray:
        """Sends each (candidates, request) payload, retried as `score_examples` says."""
        if not payloads:
            return np.zeros(0, dtype=np.float32)
        s = self.settings
        deadline = time.monotonic() + s.timeout_s
        scores: list[np.ndarray | None] = [None] * len(payloads)
        pending = list(range(len(payloads)))
        attempt = 0
        while pending:
            failure: _Failure | None = None
            # Requests run concurrently; at most `parallelism` at a time.
            for start in range(0, len(pending), s.parallelism):
                wave = pending[start : start + s.parallelism]
                calls = {}
                for i in wave:
                    if deadline - time.monotonic() <= 0:
                        raise ScoringError(f"deadline of {s.timeout_s} s exceeded")
                    # The others are in flight while the last is made in this thread.
                    start_call = self._transport.call if i == wave[-1] else self._transport.send
                    calls[i] = start_call(payloads[i][1], deadline)
                for i in wave:
                    try:
                        got = calls[i]()
                    except _Failure as e:
                        if not e.retryable or attempt >= s.retries:
                            raise ScoringError(e.message) from None
                        failure = e
                        continue
                    if got.size != payloads[i][0]:
                        raise ScoringError(
                            f"{self.model_name}: {payloads[i][0]} candidates sent, "
                            f"{got.size} scores received"
                        )
                    scores[i] = got
            pending = [i for i in pending if scores[i] is None]
            if pending:
                attempt += 1
                backoff = min(0.05 * 2**attempt, 1.0) * (0.5 + random.random())
                if time.monotonic() + backoff >= deadline:
                    last = f" (last error: {failure.message})" if failure else ""
                    raise ScoringError(f"deadline of {s.timeout_s} s exceeded while retrying{last}")
                time.sleep(backoff)
        return np.concatenate([x for x in scores if x is not None])

    def wait_until_serving(
        self, timeout_s: float, on_wait: Callable[[str], None] | None = None
    ) -> float:
        """Waits until the server answers for the model (or the version asked for); returns
        the seconds waited.

        A server started moments ago is still loading its models (seconds, warmup included):
        until then it refuses connections or does not know the model.

        Raises:
          ScoringError: no answer within ``timeout_s``, with the last error seen.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        told = False
        while True:
            try:
                # GetModelMetadata answers once a version is loaded, on either API; one
                # attempt may hang on a half-started server, so it gets a few seconds only.
                self._transport.signature_inputs(
                    RAW_SIGNATURE, min(deadline, time.monotonic() + 5.0)
                )
                return time.monotonic() - started
            except _Failure as e:
                if time.monotonic() >= deadline:
                    raise ScoringError(
                        f"{e.message} (after waiting {timeout_s:g} s for the server)"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(
                        f"waiting up to {timeout_s:g} s for {self.model_name!r} at "
                        f"{self.endpoint}: {e.message}"
                    )
                    told = True
            time.sleep(min(SERVER_POLL_S, max(0.0, deadline - time.monotonic())))

    def model_inputs(self, required: bool = False) -> dict[str, int] | None:
        """The inputs of the served model's ``raw_features`` signature (name -> DataType).

        Read once with GetModelMetadata. None when the model has no such signature (a model
        exported before it existed), or, unless ``required``, when the server cannot say now.
        """
        if self._raw_inputs is not None:
            return self._raw_inputs
        deadline = time.monotonic() + self.settings.timeout_s
        try:
            inputs = self._transport.signature_inputs(RAW_SIGNATURE, deadline)
        except _Failure as e:
            if required:
                raise ScoringError(e.message) from None
            return None
        if inputs is None and required:
            raise ScoringError(
                f"{self.model_name}: the model has no {RAW_SIGNATURE!r} signature (it was "
                "exported before models had one); send examples instead (--request examples)"
            )
        if inputs is not None:
            self._raw_inputs = inputs
        return inputs

    def _typed_encoder(self) -> ExampleEncoder:
        """The encoder, typed by the model once its types are known."""
        if self._types is None:
            inputs = self.model_inputs()
            if inputs is not None:
                self._types = kinds_of_inputs(inputs)
                self._encoder = ExampleEncoder(self._config, self._types)
        return self._encoder

    def score(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """The probability of each candidate for the query, in candidate order."""
        s = self.settings
        if s.request == "examples":
            return self.score_examples(self._typed_encoder().encode_query(query, candidates))
        batches = [
            candidates[i : i + s.batch_size] for i in range(0, len(candidates), s.batch_size)
        ]
        if s.request == "classify":
            payloads = [(len(b), self._classify_payload(query, b)) for b in batches]
        else:
            inputs = self.model_inputs(required=True) or {}
            payloads = [(len(b), self._raw_payload(inputs, query, b)) for b in batches]
        return self._score_payloads(payloads)

    def _classify_payload(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> Any:
        encoder = self._typed_encoder()
        if isinstance(self._transport, _RestTransport):
            return self._transport.classify_payload(
                encoder.json_features(query), [encoder.json_features(c) for c in candidates]
            )
        return self._transport.classify_payload(
            encoder.encode(query), [encoder.encode(c) for c in candidates]
        )

    def _raw_payload(
        self,
        inputs: Mapping[str, int],
        query: Mapping[str, Any],
        candidates: Sequence[Mapping[str, Any]],
    ) -> Any:
        """One value per candidate of each input, or one for all when only the query has it."""
        columns: dict[str, tuple[list[Any], int]] = {}
        for name in sorted(inputs):
            dtype = inputs[name]
            own = [c.get(name) for c in candidates]
            shared = query.get(name)
            if all(v is None for v in own):
                values = [self._raw_value(name, shared, dtype, "the query")]
            else:
                values = [
                    self._raw_value(name, shared if v is None else v, dtype, f"candidate {i}")
                    for i, v in enumerate(own)
                ]
            columns[name] = (values, dtype)
        if isinstance(self._transport, _RestTransport):
            return self._transport.raw_payload(columns, len(candidates))
        return self._transport.raw_payload(columns)

    def _raw_value(self, name: str, value: Any, dtype: int, whose: str) -> Any:
        """A value as the ``raw_features`` input takes it; None is the input's missing value."""
        try:
            if dtype == types_pb2.DT_STRING:
                if value is None:
                    return b""  # missing: the column's default, or an empty list
                if isinstance(value, list | tuple) or name in self._list_columns:
                    items = value if isinstance(value, list | tuple) else [value]
                    texts = [v if isinstance(v, bytes) else str(v).encode() for v in items]
                    delimiter = self._list_delimiter.encode()
                    if any(delimiter in t for t in texts):
                        raise UsageError(
                            f"a value holds the list delimiter {self._list_delimiter!r}"
                        )
                    return delimiter.join(texts)
                return value if isinstance(value, bytes) else str(value).encode()
            if dtype == types_pb2.DT_FLOAT:
                return float("nan") if value is None else float(value)
            if dtype == types_pb2.DT_INT64:
                if value is None:
                    value = self._defaults.get(name)
                if value is None:
                    raise UsageError(
                        "no value, and an integer input has no missing value: give it one, or "
                        "a config whose feature has a default"
                    )
                return as_int(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"column {name!r} of {whose}: {e}") from None
        raise UsageError(
            f"column {name!r}: the {RAW_SIGNATURE!r} input has type "
            f"{types_pb2.DataType.Name(dtype)}, which this client does not send"
        )

    def rank(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> list[Ranked]:
        """The candidates sorted by score, best first."""
        scores = self.score(query, candidates)
        order = np.argsort(-scores, kind="stable")
        return [
            Ranked(rank=r + 1, score=float(scores[i]), candidate=candidates[i])
            for r, i in enumerate(order)
        ]


def _probabilities(response: Any) -> np.ndarray:
    if PROBABILITIES_OUTPUT in response.outputs:
        proto = response.outputs[PROBABILITIES_OUTPUT]
    elif len(response.outputs) == 1:
        proto = next(iter(response.outputs.values()))
    else:
        raise ScoringError(
            f"response has no {PROBABILITIES_OUTPUT!r} output: {sorted(response.outputs)}"
        )
    return _finite(tf.make_ndarray(proto).reshape(-1).astype(np.float32))


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ScoringError("the model returned a score that is not a finite number")
    return values


def _positive_score(classes: Sequence[tuple[str, float]]) -> float:
    """The score of class "1" among a candidate's classes (the last one if none is labelled)."""
    for label, score in classes:
        if label == POSITIVE_CLASS:
            return score
    if not classes:
        raise ScoringError("the Classify answer has a candidate without classes")
    return classes[-1][1]


def _classify_probabilities(response: Any) -> np.ndarray:
    values = [
        _positive_score([(c.label, c.score) for c in row.classes])
        for row in response.result.classifications
    ]
    return _finite(np.asarray(values, dtype=np.float32))


def _rest_classify_probabilities(data: bytes, expected: int) -> np.ndarray:
    """The scores of a REST classify answer (``{"results": [[["0", p0], ["1", p1]], ...]}``)."""
    document = _json_answer(data)
    results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, list):
        raise ScoringError(f"the REST answer has no 'results' list: {data[:200]!r}")
    try:
        values = [_positive_score([(str(c[0]), float(c[1])) for c in row]) for row in results]
    except (TypeError, ValueError, IndexError):
        raise ScoringError(
            f"the REST classify answer is not TF Serving's: {data[:200]!r}"
        ) from None
    if len(values) != expected:
        raise ScoringError(f"{expected} candidates sent, {len(values)} scores received")
    return _finite(np.asarray(values, dtype=np.float32))


def _rest_output_probabilities(data: bytes, expected: int) -> np.ndarray:
    """The scores of a REST predict answer in the columnar format (``{"outputs": ...}``)."""
    document = _json_answer(data)
    outputs = document.get("outputs") if isinstance(document, dict) else None
    if isinstance(outputs, dict):
        outputs = outputs.get(PROBABILITIES_OUTPUT)
    if not isinstance(outputs, list):
        raise ScoringError(
            f"the REST answer has no {PROBABILITIES_OUTPUT!r} outputs: {data[:200]!r}"
        )
    return _rest_scores(outputs, expected, "outputs")


def _json_answer(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoringError(f"the REST answer is not JSON ({e}): {data[:200]!r}") from None


def _rest_probabilities(data: bytes, expected: int) -> np.ndarray:
    """The scores of a REST predict answer in row format (``{"predictions": [...]}``)."""
    document = _json_answer(data)
    predictions = document.get("predictions") if isinstance(document, dict) else None
    if not isinstance(predictions, list):
        raise ScoringError(f"the REST answer has no 'predictions' list: {data[:200]!r}")
    # One named output: a list of values per instance; several: a list of objects.
    if predictions and isinstance(predictions[0], dict):
        keys = sorted(predictions[0])
        if PROBABILITIES_OUTPUT in keys:
            key = PROBABILITIES_OUTPUT
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise ScoringError(f"response has no {PROBABILITIES_OUTPUT!r} output: {keys}")
        try:
            predictions = [p[key] for p in predictions]
        except (KeyError, TypeError):
            raise ScoringError(f"a prediction lacks the {key!r} output") from None
    return _rest_scores(predictions, expected, "predictions")


def _rest_scores(values: Any, expected: int, what: str) -> np.ndarray:
    """A REST answer's scores as one float array: numbers, one per candidate sent, finite."""
    try:
        scores = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ScoringError(f"the REST answer's {what} are not numbers: {e}") from None
    if scores.size != expected:
        raise ScoringError(f"{expected} candidates sent, {scores.size} scores received")
    return _finite(scores)


def format_ranking(
    ranked: Sequence[Ranked], id_key: str | None = None, top: int | None = None
) -> str:
    """The ranking as an aligned table (rank, score, candidate id)."""
    rows = ranked[:top] if top else ranked
    lines = [f"{'rank':>4}  {'score':>8}  candidate"]
    for r in rows:
        key = id_key or next(iter(r.candidate), None)
        shown = r.candidate.get(key) if key else r.candidate
        lines.append(f"{r.rank:>4}  {r.score:>8.5f}  {shown}")
    if top and len(ranked) > top:
        lines.append(f"  ... {len(ranked) - top} more")
    return "\n".join(lines)
