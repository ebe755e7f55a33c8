"""The scoring client: one query's features and its candidates in, the candidates ranked out.

As in the paper (section 4.3), a request's candidates are split into smaller batches that are
scored in parallel and merged, which cuts the latency of one query. It speaks TensorFlow
Serving's gRPC API (``PredictionService.Predict`` on the ``serving_default`` signature, with
serialized tf.Examples of raw features) or, given an ``http://`` target, its REST API
(``POST /v1/models/<name>[/versions/<v>]:predict``, the examples base64-encoded), so it works
against ``tensorflow_model_server`` and the built-in server alike.
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
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from transform.config import Config, DType, Kind

EXAMPLES_INPUT = "examples"
PROBABILITIES_OUTPUT = "probabilities"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ScoringError(RuntimeError):
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
      signature_name: The model's signature that returns probabilities.
      max_message_mb: Largest message sent or received.
    """

    batch_size: int = 50
    parallelism: int = 4
    timeout_s: float = 5.0
    retries: int = 3
    signature_name: str = "serving_default"
    max_message_mb: int = 64

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


class ExampleEncoder:
    """Builds tf.Examples of raw features, typed by the config when one is given.

    Without a config, types follow the Python values: str is bytes, int is int64, float is
    float; with one, numbers of numeric features are floats and ids follow the feature's dtype.
    """

    def __init__(self, config: Config | None = None):
        self._kinds: dict[str, str] = {}
        if config is not None:
            for f in config.features:
                if f.kind is Kind.NUMERIC:
                    self._kinds[f.column] = "float"
                else:
                    self._kinds[f.column] = "bytes" if f.dtype is DType.STRING else "int64"

    def feature(self, name: str, value: Any) -> tf.train.Feature:
        """One tf.train.Feature of a raw value or list of values."""
        values = list(value) if isinstance(value, list | tuple) else [value]
        kind = self._kinds.get(name) or _kind_of(values)
        try:
            if kind == "float":
                return tf.train.Feature(
                    float_list=tf.train.FloatList(value=[float(v) for v in values])
                )
            if kind == "int64":
                return tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(v) for v in values])
                )
            return tf.train.Feature(
                bytes_list=tf.train.BytesList(
                    value=[v if isinstance(v, bytes) else str(v).encode() for v in values]
                )
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"feature {name!r}: cannot encode {value!r} as {kind}: {e}") from None

    def encode(self, features: Mapping[str, Any]) -> bytes:
        """A serialized tf.Example of a mapping of feature name to value(s)."""
        feats = {k: self.feature(k, v) for k, v in features.items() if v is not None}
        return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

    def encode_query(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> list[bytes]:
        """One example per candidate: the query's features merged with the candidate's.

        The query's features are serialized once: a serialized `Features` is a list of map
        entries, so the query's entries followed by the candidate's, wrapped as the Example's
        field 1, are the merged Example. A candidate that repeats a query feature is merged
        feature by feature instead (its own value wins).
        """
        base = {k: self.feature(k, v) for k, v in query.items() if v is not None}
        base_bytes = tf.train.Features(feature=base).SerializeToString()
        out = []
        for candidate in candidates:
            own = {k: self.feature(k, v) for k, v in candidate.items() if v is not None}
            if own.keys() & base.keys():
                feats = dict(base)
                feats.update(own)
                body = tf.train.Features(feature=feats).SerializeToString()
            else:
                body = base_bytes + tf.train.Features(feature=own).SerializeToString()
            out.append(_EXAMPLE_FEATURES_TAG + _varint(len(body)) + body)
        return out


# Example.features is field 1, length-delimited: tag (1 << 3) | 2.
_EXAMPLE_FEATURES_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _kind_of(values: list[Any]) -> str:
    if values and all(isinstance(v, bool | int | np.integer) for v in values):
        return "int64"
    if values and all(isinstance(v, float | int | np.floating | np.integer) for v in values):
        return "float"
    return "bytes"


REST_SCHEMES = ("http", "https")
GRPC_SCHEME_PREFIX = "grpc://"
# gRPC's own target syntax (name resolvers), passed to the channel as is.
GRPC_RESOLVER_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds")


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
                raise ValueError(f"--server: bad port in {target!r}") from None
            if not parts.hostname or parts.query or parts.fragment:
                raise ValueError(
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
            raise ValueError(
                f"--server: unknown scheme {scheme!r} in {target!r}; expected HOST:PORT (gRPC) "
                "or http://HOST:PORT (REST)"
            )
        if not text:
            raise ValueError("--server: expected HOST:PORT (gRPC) or http://HOST:PORT (REST)")
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
    """PredictionService.Predict through a gRPC channel.

    `send` starts a call as a future on the channel; `call` makes it in the calling thread,
    which saves a thread hand-off (about 0.3 ms on loopback) for the last call of a wave.
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

    def request(self, examples: Sequence[bytes]) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self._model_name
        request.model_spec.signature_name = self._settings.signature_name
        if self._version is not None:
            request.model_spec.version.value = self._version
        # What tf.make_tensor_proto writes for a list of bytes, without its per-value checks.
        tensor = request.inputs[EXAMPLES_INPUT]
        tensor.dtype = types_pb2.DT_STRING
        tensor.tensor_shape.dim.add(size=len(examples))
        tensor.string_val.extend(examples)
        return request

    def send(self, examples: Sequence[bytes], deadline: float) -> Callable[[], np.ndarray]:
        call = self._stub.Predict.future(
            self.request(examples), timeout=deadline - time.monotonic()
        )

        def wait() -> np.ndarray:
            try:
                return _probabilities(call.result())
            except grpc.RpcError as e:
                raise self._failure(e) from None

        return wait

    def call(self, examples: Sequence[bytes], deadline: float) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            try:
                response = self._stub.Predict(
                    self.request(examples), timeout=deadline - time.monotonic()
                )
            except grpc.RpcError as e:
                raise self._failure(e) from None
            return _probabilities(response)

        return _settled(run)

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
    """TF Serving's REST predict, ``POST /v1/models/<name>[/versions/<v>]:predict``.

    The body is the row format with the serialized examples base64-encoded, as TF Serving
    requires for binary strings: ``{"signature_name": ..., "instances": [{"examples":
    {"b64": ...}}, ...]}``. Requests run on `parallelism` threads (the last of a wave in the
    calling thread), each with its own keep-alive connection (http.client).
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

    def send(self, examples: Sequence[bytes], deadline: float) -> Callable[[], np.ndarray]:
        future = self._pool.submit(self._post, examples, deadline)
        return future.result

    def call(self, examples: Sequence[bytes], deadline: float) -> Callable[[], np.ndarray]:
        return _settled(lambda: self._post(examples, deadline))

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._endpoint.tls else http.client.HTTPConnection
            connection = kind(self._endpoint.host, self._endpoint.port)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _post(self, examples: Sequence[bytes], deadline: float) -> np.ndarray:
        body = self.body(examples)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
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
                connection.request("POST", self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                status = response.status
                break
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
        if status != 200:
            raise self._http_failure(status, data)
        return _rest_probabilities(data, len(examples))

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
      settings: Batching, parallelism, deadline and retries (the same for both APIs).
      config: The pipeline config, to type raw features exactly (recommended).
      version: A specific model version; None for the one the server serves.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        settings: ClientSettings | None = None,
        config: Config | None = None,
        version: int | None = None,
    ):
        self.settings = settings or ClientSettings()
        self.model_name = model_name
        self.version = version
        self.endpoint = Endpoint.parse(target)
        transport = _RestTransport if self.endpoint.api == "rest" else _GrpcTransport
        self._transport = transport(self.endpoint, model_name, self.settings, version)
        self._encoder = ExampleEncoder(config)

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
        if not examples:
            return np.zeros(0, dtype=np.float32)
        s = self.settings
        deadline = time.monotonic() + s.timeout_s
        batches = [examples[i : i + s.batch_size] for i in range(0, len(examples), s.batch_size)]
        scores: list[np.ndarray | None] = [None] * len(batches)
        pending = list(range(len(batches)))
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
                    calls[i] = start_call(batches[i], deadline)
                for i in wave:
                    try:
                        got = calls[i]()
                    except _Failure as e:
                        if not e.retryable or attempt >= s.retries:
                            raise ScoringError(e.message) from None
                        failure = e
                        continue
                    if got.size != len(batches[i]):
                        raise ScoringError(
                            f"{self.model_name}: {len(batches[i])} candidates sent, "
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

    def score(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> np.ndarray:
        """The probability of each candidate for the query, in candidate order."""
        return self.score_examples(self._encoder.encode_query(query, candidates))

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
    values = tf.make_ndarray(proto).reshape(-1).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ScoringError("the model returned a score that is not a finite number")
    return values


def _rest_probabilities(data: bytes, expected: int) -> np.ndarray:
    """The scores of a REST predict answer in row format (``{"predictions": [...]}``)."""
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoringError(f"the REST answer is not JSON ({e}): {data[:200]!r}") from None
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
    try:
        values = np.asarray(predictions, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ScoringError(f"the REST answer's predictions are not numbers: {e}") from None
    if values.size != expected:
        raise ScoringError(f"{expected} candidates sent, {values.size} scores received")
    if not np.all(np.isfinite(values)):
        raise ScoringError("the model returned a score that is not a finite number")
    return values


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
