"""Request metrics in Prometheus text format, under TF Serving's metric names.

TF Serving exports `/tensorflow/serving/request_count` and `/tensorflow/serving/request_latency`
as `:tensorflow:serving:...` at `/monitoring/prometheus/metrics`. The same names are used here so
dashboards work against either server; the series carry a `version` label as well, so a new
version's error rate and latency can be told from the old one's during a rollout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

# TF Serving's latency buckets: Exponential(scale=10 us, growth=1.8, count=33), about 20 minutes.
LATENCY_BUCKETS_US: tuple[float, ...] = tuple(10.0 * 1.8**i for i in range(33))

_REQUEST_COUNT = ":tensorflow:serving:request_count"
_ERROR_COUNT = ":tensorflow:serving:request_error_count"
_LATENCY = ":tensorflow:serving:request_latency"
_LOAD_COUNT = ":tensorflow:serving:model_load_count"
# TF Serving has no metric of its request logging: this one is the built-in server's own.
_REQUEST_LOG_COUNT = ":widedeep:serving:request_log_count"

RequestKey = tuple[str, str, str, str]  # model_name, version, API, entrypoint


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_US))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(LATENCY_BUCKETS_US):
            if value <= bound:
                self.buckets[index] += 1
                break
        self.total += value
        self.count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True))


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Counters and latency histograms of requests and loads; thread-safe."""

    _REQUEST_LABELS = ("model_name", "version", "API", "entrypoint")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str, str, str], int] = {}
        self._errors: dict[tuple[str, str, str, str, str], int] = {}
        self._latency: dict[RequestKey, _Histogram] = {}
        self._loads: dict[tuple[str, str, str], int] = {}
        self._request_logs: dict[tuple[str, str], int] = {}

    def record_request(
        self,
        model_name: str,
        version: str,
        api: str,
        entrypoint: str,
        status: str,
        seconds: float,
    ) -> None:
        """Count one request and its latency; `status` is the gRPC code name ('OK', ...)."""
        key = (model_name, version, api, entrypoint)
        with self._lock:
            counted = (*key, status)
            self._requests[counted] = self._requests.get(counted, 0) + 1
            if status != "OK":
                self._errors[counted] = self._errors.get(counted, 0) + 1
            histogram = self._latency.get(key)
            if histogram is None:
                histogram = self._latency[key] = _Histogram()
            histogram.observe(seconds * 1e6)

    def record_load(self, model_name: str, version: int, status: str) -> None:
        """Count one attempt to load a model version, by outcome ('OK' or an error code)."""
        key = (model_name, str(version), status)
        with self._lock:
            self._loads[key] = self._loads.get(key, 0) + 1

    def record_request_log(self, model_name: str, outcome: str, count: int = 1) -> None:
        """Count sampled requests by what became of them: ``logged``, ``dropped`` (the
        writer's queue was full) or ``failed`` (they could not be written)."""
        key = (model_name, outcome)
        with self._lock:
            self._request_logs[key] = self._request_logs.get(key, 0) + count

    def request_log_count(self, model_name: str, outcome: str) -> int:
        """How many sampled requests of the model had that outcome so far."""
        with self._lock:
            return self._request_logs.get((model_name, outcome), 0)

    def render(self) -> str:
        """All metrics as a Prometheus text exposition page."""
        with self._lock:
            requests = dict(self._requests)
            errors = dict(self._errors)
            latency = {key: (list(h.buckets), h.total, h.count) for key, h in self._latency.items()}
            loads = dict(self._loads)
            request_logs = dict(self._request_logs)
        lines: list[str] = []
        counted_labels = (*self._REQUEST_LABELS, "status")
        for name, help_text, series in (
            (_REQUEST_COUNT, "The total number of requests.", requests),
            (_ERROR_COUNT, "The total number of requests that failed.", errors),
        ):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            for key in sorted(series):
                lines.append(f"{name}{{{_labels(counted_labels, key)}}} {series[key]}")
        lines.append(
            f"# HELP {_LATENCY} Distribution of wall time (in microseconds) for "
            "Tensorflow Serving request."
        )
        lines.append(f"# TYPE {_LATENCY} histogram")
        for key in sorted(latency):
            buckets, total, count = latency[key]
            labels = _labels(self._REQUEST_LABELS, key)
            cumulative = 0
            for bound, hits in zip(LATENCY_BUCKETS_US, buckets, strict=True):
                cumulative += hits
                lines.append(f'{_LATENCY}_bucket{{{labels},le="{bound:.6g}"}} {cumulative}')
            lines.append(f'{_LATENCY}_bucket{{{labels},le="+Inf"}} {count}')
            lines.append(f"{_LATENCY}_sum{{{labels}}} {_number(total)}")
            lines.append(f"{_LATENCY}_count{{{labels}}} {count}")
        lines.append(f"# HELP {_LOAD_COUNT} The number of attempts to load a model version.")
        lines.append(f"# TYPE {_LOAD_COUNT} counter")
        for key in sorted(loads):
            labels = _labels(("model_name", "version", "status"), key)
            lines.append(f"{_LOAD_COUNT}{{{labels}}} {loads[key]}")
        if request_logs:
            lines.append(
                f"# HELP {_REQUEST_LOG_COUNT} Sampled requests by outcome: logged, dropped "
                "(the log writer's queue was full) or failed (not written)."
            )
            lines.append(f"# TYPE {_REQUEST_LOG_COUNT} counter")
            for key in sorted(request_logs):
                labels = _labels(("model_name", "outcome"), key)
                lines.append(f"{_REQUEST_LOG_COUNT}{{{labels}}} {request_logs[key]}")
        return "\n".join(lines) + "\n"
