"""Request logging as TF Serving does it: a sample of requests written as ``PredictionLog``s.

A model's ``logging_config`` in the model config file (TF Serving's ``LoggingConfig``,
tensorflow_serving/config/logging_config.proto) turns it on::

    model_config_list {
      config {
        name: "app_ranker"  base_path: "/srv/models/app_ranker"  model_platform: "tensorflow"
        logging_config {
          log_collector_config { type: "" filename_prefix: "/srv/request_logs/app_ranker" }
          sampling_config { sampling_rate: 0.1 }
        }
      }
    }

``--request_log_dir DIR --request_log_sampling_rate R`` gives every model without a
``logging_config`` of its own the same, with ``filename_prefix`` ``DIR/<model name>``.

Each successful Predict, Classify and Regress (gRPC or REST: both reach the same handlers with
the same protos) is kept with probability ``sampling_rate``, one random draw, and handed to a
writer thread through a bounded queue: the request is never slowed by the disk, and when the
queue is full (the disk is slower than the sampled traffic) the record is dropped and counted,
not waited for. The writer frames each ``PredictionLog`` (request, response, and
``log_metadata``: model spec with the version that answered, sampling config, tags, time) as a
TFRecord and writes whole records to a hidden temporary file, renamed to its final name (see
:mod:`transform.artifacts`) once it holds ``max_file_records`` records or ``max_file_bytes``
bytes, or is ``max_file_seconds`` old, or the server stops. A server killed meanwhile leaves
the temporary file; the next server on the same host finishes it (cut to its last whole
record, renamed). Counts of logged, dropped and failed records are in the Prometheus metrics
(:mod:`serving.metrics`).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import logging_config_pb2, model_server_config_pb2

from serving.errors import invalid_argument
from serving.metrics import Metrics
from transform import artifacts
from transform.records import frame_record, whole_records

log = logging.getLogger(__name__)

COLLECTOR_TYPES = ("", "tfrecord")
"""``log_collector_config.type`` values this server writes (both: TFRecord files)."""
PREDICT, CLASSIFY, REGRESS = "Predict", "Classify", "Regress"
LOGGED, DROPPED, FAILED = "logged", "dropped", "failed"
"""Outcomes counted: written; not queued (the queue was full); not written (an I/O error)."""
_ERROR_PAUSE_SECONDS = 5.0
_LOCK = threading.Lock()
# Temporary files open in this process: never taken for a killed server's leftovers.
_OPEN_FILES: set[Path] = set()
_SEQUENCE = iter(range(1, 1 << 62))


@dataclass(frozen=True)
class RequestLogOptions:
    """How request log files are written (for every logging config of a server)."""

    max_file_records: int = 100_000
    max_file_bytes: int = 128 << 20
    max_file_seconds: float = 600.0
    queue_records: int = 1024
    """Sampled requests waiting for the writer; more are dropped (and counted)."""
    queue_bytes: int = 64 << 20
    """Bytes of the requests waiting for the writer; more are dropped (and counted)."""


def default_logging_config(
    directory: str, sampling_rate: float, model_name: str
) -> logging_config_pb2.LoggingConfig:
    """The logging config ``--request_log_dir``/``--request_log_sampling_rate`` give a model."""
    config = logging_config_pb2.LoggingConfig()
    config.log_collector_config.filename_prefix = os.path.join(
        os.path.abspath(directory), model_name
    )
    config.sampling_config.sampling_rate = sampling_rate
    return config


def check_logging_config(model_name: str, config: logging_config_pb2.LoggingConfig) -> None:
    """Refuses a logging config this server cannot honour (INVALID_ARGUMENT naming why)."""
    where = f"Model {model_name}: logging_config"
    collector = config.log_collector_config
    if collector.type not in COLLECTOR_TYPES:
        raise invalid_argument(
            f"{where}.log_collector_config.type {collector.type!r} is not a log collector of "
            f"this server; use {' or '.join(repr(t) for t in COLLECTOR_TYPES)} (TFRecord files "
            "of PredictionLog)"
        )
    if not collector.filename_prefix:
        raise invalid_argument(f"{where}.log_collector_config.filename_prefix is empty")
    rate = config.sampling_config.sampling_rate
    if not 0.0 <= rate <= 1.0:
        raise invalid_argument(
            f"{where}.sampling_config.sampling_rate must be in [0, 1], got {rate}"
        )
    if config.HasField("custom_logging_config"):
        raise invalid_argument(f"{where}.custom_logging_config is not supported by this server")


class RequestLogger:
    """Samples the requests of one logging config and writes them from a background thread."""

    def __init__(
        self,
        config: logging_config_pb2.LoggingConfig,
        options: RequestLogOptions | None = None,
        metrics: Metrics | None = None,
        tags: tuple[str, ...] = ("serve",),
    ) -> None:
        self.config = config
        self.options = options or RequestLogOptions()
        self.sampling_rate = config.sampling_config.sampling_rate
        self.prefix = config.log_collector_config.filename_prefix
        self._metrics = metrics
        self._tags = tags
        self._random = random.Random()
        self._lock = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._queued_bytes = 0
        self._closing = False
        self._busy = False
        self.logged = 0
        self.dropped = 0
        self.failed = 0
        self.files: list[Path] = []
        self._file: Path | None = None
        self._fd: int | None = None
        self._file_records = 0
        self._file_bytes = 0
        self._file_deadline = 0.0
        self._error_until = 0.0
        self._host = host_name()
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------
    # Request threads

    def sample(self) -> bool:
        """One draw: whether this request is logged."""
        return self._random.random() < self.sampling_rate

    def offer(self, kind: str, request: Any, response: Any, model_name: str, version: int) -> bool:
        """Queue a sampled request for writing; False (counted as dropped) when full.

        The messages are only read afterwards, by the writer thread: callers must not change
        them once answered (the server does not).
        """
        size = request.ByteSize()
        item = (kind, request, response, model_name, version, time.time(), size)
        with self._lock:
            full = (
                len(self._queue) >= self.options.queue_records
                or self._queued_bytes + size > self.options.queue_bytes
            )
            if full or self._closing:
                self.dropped += 1
            else:
                self._queue.append(item)
                self._queued_bytes += size
                self._lock.notify()
                return True
        if self._metrics is not None:
            self._metrics.record_request_log(model_name, DROPPED)
        return False

    # ----------------------------------------------------------------------------------------
    # The writer thread

    def close(self, timeout: float | None = 10.0) -> None:
        """Write what is queued (up to ``timeout`` s), finish the file, stop the writer."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the writer thread is still at work."""
        return self._thread.is_alive()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.05))
        return True

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            self._recover_leftovers()
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    if self._fd is not None:
                        remaining = self._file_deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._lock.wait(remaining)
                    else:
                        self._lock.wait()
                batch = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                closing = self._closing
                self._busy = bool(batch)
            try:
                if batch:
                    self._write(batch)
                if self._fd is not None and (closing or time.monotonic() >= self._file_deadline):
                    self._finish()
            except Exception:
                # Never let the writer die: what it could not write is counted, it goes on.
                log.exception("Request log writer failed")
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()
            if closing:
                with self._lock:
                    if not self._queue:
                        return

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        if time.monotonic() < self._error_until:
            self._count(batch, FAILED)
            return
        records = [frame_record(self._prediction_log(item).SerializeToString()) for item in batch]
        # Several records a write, each written whole: a file cut short by a killed server
        # ends at most in one partial record, which readers leave out.
        start = 0
        while start < len(records):
            room = max(1, self.options.max_file_records - self._file_records)
            chunk = records[start : start + room]
            data = b"".join(chunk)
            try:
                if self._fd is None:
                    self._open()
                _write_all(self._fd, data)  # type: ignore[arg-type]
            except OSError as error:
                self._count(batch[start:], FAILED)
                self._error_until = time.monotonic() + _ERROR_PAUSE_SECONDS
                log.error(
                    "Cannot write request log %s: %s; dropping sampled requests for %.0f s",
                    self._file or self.prefix,
                    error,
                    _ERROR_PAUSE_SECONDS,
                )
                self._finish()
                return
            self._count(batch[start : start + len(chunk)], LOGGED)
            self._file_records += len(chunk)
            self._file_bytes += len(data)
            start += len(chunk)
            if (
                self._file_records >= self.options.max_file_records
                or self._file_bytes >= self.options.max_file_bytes
            ):
                self._finish()

    def _count(self, items: list[tuple[Any, ...]], outcome: str) -> None:
        if outcome == LOGGED:
            self.logged += len(items)
        else:
            self.failed += len(items)
        if self._metrics is None:
            return
        per_model = collections.Counter(item[3] for item in items)
        for model_name, count in per_model.items():
            self._metrics.record_request_log(model_name, outcome, count)

    def _prediction_log(self, item: tuple[Any, ...]) -> prediction_log_pb2.PredictionLog:
        kind, request, response, model_name, version, timestamp, _ = item
        record = prediction_log_pb2.PredictionLog()
        metadata = record.log_metadata
        metadata.model_spec.name = model_name
        metadata.model_spec.version.value = version
        metadata.model_spec.signature_name = request.model_spec.signature_name
        metadata.sampling_config.CopyFrom(self.config.sampling_config)
        metadata.saved_model_tags.extend(self._tags)
        metadata.timestamp_secs = int(timestamp)
        if kind == PREDICT:
            record.predict_log.request.CopyFrom(request)
            record.predict_log.response.CopyFrom(response)
        elif kind == CLASSIFY:
            # The request was read with its examples left serialized (serving.wire): the same
            # bytes are a ClassificationRequest.
            record.classify_log.request.MergeFromString(request.SerializeToString())
            record.classify_log.response.CopyFrom(response)
        else:
            record.regress_log.request.MergeFromString(request.SerializeToString())
            record.regress_log.response.CopyFrom(response)
        return record

    def _open(self) -> None:
        final = artifacts.request_log_name(
            self.prefix, dt.datetime.now(dt.UTC), self._host, os.getpid(), next(_SEQUENCE)
        )
        temp = artifacts.request_log_temp_name(final)
        # Marked as in use before it exists: another logger of this process with the same
        # prefix must never take it for a killed server's leftover.
        with _LOCK:
            _OPEN_FILES.add(temp)
        try:
            temp.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError:
            with _LOCK:
                _OPEN_FILES.discard(temp)
            raise
        self._file = temp
        self._file_records = self._file_bytes = 0
        self._file_deadline = time.monotonic() + self.options.max_file_seconds

    def _finish(self) -> None:
        """Close the file being written and give it its final name."""
        fd, temp = self._fd, self._file
        self._fd = self._file = None
        if fd is None or temp is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
            final = artifacts.request_log_final_name(temp)
            os.replace(temp, final)
            self.files.append(final)
        except OSError as error:
            log.error("Cannot finish request log %s: %s", temp, error)
        finally:
            with _LOCK:
                _OPEN_FILES.discard(temp)

    def _recover_leftovers(self) -> None:
        """Finish the files a server killed on this host left under this prefix."""
        folder, _, base = self.prefix.rpartition("/")
        base = base or artifacts.REQUEST_LOG_DEFAULT_NAME
        for temp in artifacts.request_log_temp_files(folder or ".", base):
            with _LOCK:
                if temp in _OPEN_FILES:
                    continue
            host_pid = _host_and_pid(temp, base)
            if host_pid is None or host_pid[0] != self._host or _alive(host_pid[1]):
                continue
            finish_leftover(temp)


def host_name() -> str:
    """This host's name as request log file names hold it (no '/' or '-' in it)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _host_and_pid(temp: Path, base: str) -> tuple[str, int] | None:
    stem = artifacts.request_log_final_name(temp).name[: -len(artifacts.REQUEST_LOG_SUFFIX)]
    parts = stem[len(base) + 1 :].split("-", 1)
    if len(parts) != 2:
        return None
    fields = parts[1].rsplit("-", 2)
    if len(fields) != 3 or not fields[1].isdigit():
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own files are all in _OPEN_FILES
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def finish_leftover(temp: Path) -> Path | None:
    """A killed writer's temporary file cut to its last whole record and renamed (removed if
    it holds none); returns the finished file."""
    records, whole = whole_records(temp.read_bytes())
    if not records:
        temp.unlink(missing_ok=True)
        return None
    with open(temp, "r+b") as f:
        f.truncate(whole)
    final = artifacts.request_log_final_name(temp)
    os.replace(temp, final)
    log.info("Finished request log %s left by a stopped server (%d records)", final, len(records))
    return final


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class ServerRequestLogger:
    """The request loggers of every model, from the model config (TF Serving's class name).

    Loggers are keyed by their logging config, as in TF Serving: a reload keeps the writer of
    a config it keeps, and finishes those of the configs it drops.
    """

    def __init__(
        self,
        options: RequestLogOptions | None = None,
        metrics: Metrics | None = None,
        default: tuple[str, float] | None = None,
        tags: tuple[str, ...] = ("serve",),
    ) -> None:
        self.options = options or RequestLogOptions()
        self._metrics = metrics
        self._default = default
        self._tags = tags
        self._lock = threading.Lock()
        self._loggers: dict[bytes, RequestLogger] = {}
        # Loggers a reload dropped: finishing their files, waited for by close().
        self._retired: list[RequestLogger] = []
        # Read by request threads without the lock: replaced whole on every update.
        self._routes: dict[str, tuple[RequestLogger, ...]] = {}

    def configs(
        self, config: model_server_config_pb2.ModelServerConfig
    ) -> dict[str, list[logging_config_pb2.LoggingConfig]]:
        """The logging configs of each model of ``config`` (its own, else the default)."""
        out: dict[str, list[logging_config_pb2.LoggingConfig]] = {}
        if config.WhichOneof("config") != "model_config_list":
            return out
        for model in config.model_config_list.config:
            if model.HasField("logging_config"):
                out[model.name] = [model.logging_config]
            elif self._default is not None:
                directory, rate = self._default
                out[model.name] = [default_logging_config(directory, rate, model.name)]
        return out

    def update(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Log the models of ``config`` as it says (checked beforehand: ``validate_config``
        of :mod:`serving.models` checks each logging config)."""
        wanted = self.configs(config)
        with self._lock:
            loggers: dict[bytes, RequestLogger] = {}
            routes: dict[str, tuple[RequestLogger, ...]] = {}
            for name, logging_configs in wanted.items():
                chosen = []
                for logging_config in logging_configs:
                    key = logging_config.SerializeToString(deterministic=True)
                    logger = loggers.get(key) or self._loggers.get(key)
                    if logger is None:
                        logger = RequestLogger(
                            logging_config, self.options, self._metrics, self._tags
                        )
                        log.info(
                            "Logging %.4g of the requests of %s to %s-*%s",
                            logger.sampling_rate,
                            name,
                            logger.prefix,
                            artifacts.REQUEST_LOG_SUFFIX,
                        )
                    loggers[key] = logger
                    chosen.append(logger)
                routes[name] = tuple(chosen)
            dropped = [logger for key, logger in self._loggers.items() if key not in loggers]
            self._loggers = loggers
            self._routes = routes
            self._retired = [r for r in self._retired if r.running] + dropped
        for logger in dropped:
            logger.close(timeout=0)  # the writer finishes on its own

    def log(self, kind: str, request: Any, response: Any, model_name: str, version: int) -> None:
        """Called once a request succeeded: samples it for each of its model's loggers."""
        loggers = self._routes.get(model_name)
        if not loggers:
            return
        for logger in loggers:
            if logger.sample():
                logger.offer(kind, request, response, model_name, version)

    @property
    def loggers(self) -> list[RequestLogger]:
        """The loggers in use."""
        with self._lock:
            return list(self._loggers.values())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every logger has written what it was given; False on timeout."""
        return all(logger.flush(timeout) for logger in self.loggers)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and finish every file (waits up to ``timeout`` s in all)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            loggers = list(self._loggers.values()) + self._retired
            self._loggers = {}
            self._routes = {}
            self._retired = []
        for logger in loggers:
            logger.close(max(0.0, deadline - time.monotonic()))
