"""The scoring client: one query's features and its candidates in, the candidates ranked out.

As in the paper (section 4.3), a request's candidates are split into smaller batches that are
scored in parallel and merged, which cuts the latency of one query. It speaks TensorFlow
Serving's gRPC API (``PredictionService.Predict`` on the ``serving_default`` signature, with
serialized tf.Examples of raw features), so it works against ``tensorflow_model_server`` and the
built-in server alike.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from transform.config import Config, DType, Kind

EXAMPLES_INPUT = "examples"
PROBABILITIES_OUTPUT = "probabilities"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ScoringError(RuntimeError):
    """A request the server refused or that did not finish within its deadline."""


@dataclass(frozen=True)
class ClientSettings:
    """How a query's candidates are scored.

    Attributes:
      batch_size: Candidates per request; a query with more is split into several requests.
      parallelism: Requests of one query in flight at once.
      timeout_s: Deadline of the whole query, retries included.
      retries: Attempts after the first when the server is UNAVAILABLE (a restart, a version
        switch on a load balancer), with jittered exponential backoff.
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
        """One example per candidate: the query's features merged with the candidate's."""
        base = {k: self.feature(k, v) for k, v in query.items() if v is not None}
        out = []
        for candidate in candidates:
            feats = dict(base)
            feats.update({k: self.feature(k, v) for k, v in candidate.items() if v is not None})
            out.append(
                tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
            )
        return out


def _kind_of(values: list[Any]) -> str:
    if values and all(isinstance(v, bool | int | np.integer) for v in values):
        return "int64"
    if values and all(isinstance(v, float | int | np.floating | np.integer) for v in values):
        return "float"
    return "bytes"


class RankingClient:
    """Scores and ranks candidates through a model server's gRPC endpoint.

    Args:
      target: ``host:port`` of the server.
      model_name: The model's name on the server.
      settings: Batching, parallelism, deadline and retries.
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
        limit = self.settings.max_message_mb * 1024 * 1024
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._encoder = ExampleEncoder(config)

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score_examples(self, examples: Sequence[bytes]) -> np.ndarray:
        """Probabilities of serialized tf.Examples, scored in parallel batches."""
        if not examples:
            return np.zeros(0, dtype=np.float32)
        s = self.settings
        deadline = time.monotonic() + s.timeout_s
        batches = [examples[i : i + s.batch_size] for i in range(0, len(examples), s.batch_size)]
        scores: list[np.ndarray | None] = [None] * len(batches)
        pending = list(range(len(batches)))
        attempt = 0
        while pending:
            calls = {}
            # gRPC futures run concurrently on the channel; at most `parallelism` at a time.
            for start in range(0, len(pending), s.parallelism):
                wave = pending[start : start + s.parallelism]
                for i in wave:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ScoringError(f"deadline of {s.timeout_s} s exceeded")
                    calls[i] = self._stub.Predict.future(
                        self._request(batches[i]), timeout=remaining
                    )
                for i in wave:
                    try:
                        scores[i] = _probabilities(calls[i].result())
                    except grpc.RpcError as e:
                        if e.code() not in _RETRYABLE or attempt >= s.retries:
                            raise ScoringError(
                                f"{self.model_name}: {e.code().name}: {e.details()}"
                            ) from None
            pending = [i for i in pending if scores[i] is None]
            if pending:
                attempt += 1
                backoff = min(0.05 * 2**attempt, 1.0) * (0.5 + random.random())
                if time.monotonic() + backoff >= deadline:
                    raise ScoringError(f"deadline of {s.timeout_s} s exceeded while retrying")
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

    def _request(self, examples: Sequence[bytes]) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.settings.signature_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs[EXAMPLES_INPUT].CopyFrom(
            tf.make_tensor_proto(list(examples), dtype=tf.string, shape=[len(examples)])
        )
        return request


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
