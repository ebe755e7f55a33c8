"""The built-in model server: TF Serving's gRPC and REST APIs over a model base path.

`ModelServer(ServerSettings(...)).start()` serves `<base>/<model_name>/<version>/` SavedModels on
a gRPC port (`PredictionService`, `ModelService`) and, optionally, a REST port (`/v1/models/...`
and Prometheus metrics at `/monitoring/prometheus/metrics`). `main(argv)` is the command line,
taking `tensorflow_model_server`'s own flag names, so the two servers are interchangeable.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving import flags, limits, tfserving
from serving.api import ServingApi
from serving.errors import ServingError
from serving.grpc_api import service_handlers
from serving.limits import RequestLimits
from serving.metrics import PROMETHEUS_PATH, Metrics
from serving.models import ManagerSettings, ModelManager
from serving.request_log import (
    RequestLogOptions,
    ServerRequestLogger,
    check_logging_config,
    default_logging_config,
)
from serving.rest import RestApi, RestServer
from serving.servable import ServableOptions
from transform.artifacts import model_server_config

log = logging.getLogger(__name__)

# The largest answer gRPC may send (TF Serving's `SetMaxMessageSize(kint32max)`); requests are
# bounded lower, by `max_receive_message_length`.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
GRPC_CALLS_PER_THREAD = 16
SWITCH_INTERVAL_SECONDS = 0.0005
GRPC_MIN_QUEUED_CALLS = 128
# With background model loads: the pause after each warmup request, in times its duration.
WARMUP_PAUSE_RATIO = 1.0
DEFAULT_REQUEST_LOG_SAMPLING_RATE = 0.1


@dataclass(frozen=True)
class ServerSettings:
    """What to serve and how; names follow `tensorflow_model_server`'s flags.

    Give either `model_config_file` (a text `ModelServerConfig`) or `model_base_path` (served as
    `model_name`). Ports: 0 picks a free port; `rest_api_port=None` serves no REST API.
    `grpc_channel_arguments` are passed to the gRPC server as is.
    `tensorflow_intra_op_parallelism` (threads one op may use) and
    `tensorflow_inter_op_parallelism` (ops, and so requests, run at once) size TensorFlow's
    thread pools; 0 lets TensorFlow choose. They apply to the whole process and only before
    TensorFlow has run anything in it.

    Memory (see `serving.limits`): `max_receive_message_length` bounds a request on both APIs
    (64 MiB by default, where TF Serving allows 2 GiB; `grpc.max_receive_message_length` in
    `grpc_channel_arguments` sets it too); `max_request_tensor_bytes` bounds what one request's
    tensors take once expanded to their declared shapes; `max_in_flight_bytes` bounds all
    requests being answered, and a request that does not fit waits up to
    `in_flight_wait_seconds` before RESOURCE_EXHAUSTED. `rest_api_num_threads` REST requests
    are answered at once; `rest_api_timeout_in_ms` is how long a REST connection may stall.
    gRPC calls beyond `GRPC_CALLS_PER_THREAD` per `grpc_max_threads` (at least
    `GRPC_MIN_QUEUED_CALLS`) at once are refused with RESOURCE_EXHAUSTED.

    Model management: HandleReloadConfigRequest is refused unless `allow_reload_config`;
    `model_base_path_roots` confines every model's base path to those folders.

    Metrics are exposed on the REST port at `metrics_path` (None: not exposed), as a
    `--monitoring_config_file` says. `enable_batching` and `batching_parameters_file` are
    TF Serving's server-side batching: accepted (the file is checked) so one command line
    serves with either server, and applied by `tensorflow_model_server` only; the built-in
    server runs each request as it arrives.

    `background_model_load` isolates loading from serving: versions load and warm up in
    threads of lower scheduling priority, with pauses between warmup requests, without
    Python's full garbage collections, which would stop every thread, and with a shorter
    thread switch interval, so request threads wait less for the interpreter lock (see
    `serving.models.load_isolated`): requests keep their latency while a new version is
    swapped in (bench/swap_bench.py).

    Request logging (`serving.request_log`): a model's `logging_config` in the model config
    file, or, for every model without one, `request_log_dir` (files
    `<request_log_dir>/<model name>-*.tfrecord`) at `request_log_sampling_rate`;
    `request_log` sets file rotation and the writer's queue.
    """

    model_name: str = "default"
    model_base_path: str | None = None
    model_config_file: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int | None = None
    file_system_poll_wait_seconds: float = 1.0
    model_config_file_poll_wait_seconds: float = 0.0
    max_num_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    num_load_threads: int = 2
    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
    enable_signature_method_name_check: bool = False
    saved_model_tags: tuple[str, ...] = ("serve",)
    grpc_max_threads: int = 8
    max_receive_message_length: int = limits.DEFAULT_MAX_REQUEST_BYTES
    grpc_channel_arguments: tuple[tuple[str, int | str], ...] = ()
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    max_request_tensor_bytes: int = limits.DEFAULT_MAX_REQUEST_TENSOR_BYTES
    max_in_flight_bytes: int = limits.DEFAULT_MAX_IN_FLIGHT_BYTES
    in_flight_wait_seconds: float = limits.DEFAULT_IN_FLIGHT_WAIT_SECONDS
    rest_api_num_threads: int = dataclasses.field(
        default_factory=limits.default_rest_api_num_threads
    )
    rest_api_timeout_in_ms: int = 30_000
    allow_reload_config: bool = False
    model_base_path_roots: tuple[str, ...] = ()
    metrics_path: str | None = PROMETHEUS_PATH
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    background_model_load: bool = True
    request_log_dir: str | None = None
    request_log_sampling_rate: float = DEFAULT_REQUEST_LOG_SAMPLING_RATE
    request_log: RequestLogOptions = dataclasses.field(default_factory=RequestLogOptions)


def load_model_server_config(settings: ServerSettings) -> model_server_config_pb2.ModelServerConfig:
    """The ModelServerConfig the settings describe (parsed file, or the single model)."""
    if settings.model_config_file:
        return parse_model_config_file(Path(settings.model_config_file))
    if not settings.model_base_path:
        raise ValueError(
            "Both server_options.model_base_path and server_options.model_config_file are empty!"
        )
    base_path = str(Path(settings.model_base_path).absolute())
    return model_server_config(settings.model_name, base_path)


def parse_model_config_file(path: Path) -> model_server_config_pb2.ModelServerConfig:
    """Parse a model config file in TF Serving's text-proto `ModelServerConfig` format."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"Cannot read model config file {path}: {error}") from error
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"Invalid model config file {path}: {error}") from error
    return config


def _set_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's thread pools (0 keeps TensorFlow's choice), as TF Serving's flags do."""
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    threading_config = tf.config.threading
    for value, getter, setter in (
        (
            intra_op,
            threading_config.get_intra_op_parallelism_threads,
            threading_config.set_intra_op_parallelism_threads,
        ),
        (
            inter_op,
            threading_config.get_inter_op_parallelism_threads,
            threading_config.set_inter_op_parallelism_threads,
        ),
    ):
        if not value or getter() == value:
            continue
        try:
            setter(value)
        except RuntimeError:
            # TensorFlow already runs in this process (a server started inside a program).
            log.warning(
                "TensorFlow thread pools are already set up in this process; "
                "--tensorflow_intra_op_parallelism/--tensorflow_inter_op_parallelism not applied"
            )
            return


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ModelServer:
    """TF Serving's gRPC and REST APIs served from Python, with TF Serving's version management.

    Started once and stopped once (also as a context manager). After `start()`, `grpc_port` and
    `rest_api_port` hold the bound ports; `manager` holds the versions, `metrics` the counters.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.request_logger = ServerRequestLogger(
            settings.request_log,
            self.metrics,
            default=(settings.request_log_dir, settings.request_log_sampling_rate)
            if settings.request_log_dir
            else None,
            tags=settings.saved_model_tags,
        )
        self.manager = ModelManager(
            ManagerSettings(
                file_system_poll_wait_seconds=settings.file_system_poll_wait_seconds,
                max_num_load_retries=settings.max_num_load_retries,
                load_retry_interval_seconds=settings.load_retry_interval_seconds,
                num_load_threads=settings.num_load_threads,
                allow_version_labels_for_unavailable_models=(
                    settings.allow_version_labels_for_unavailable_models
                ),
                model_base_path_roots=settings.model_base_path_roots,
                servable=ServableOptions(
                    tags=settings.saved_model_tags,
                    enable_model_warmup=settings.enable_model_warmup,
                    enable_signature_method_name_check=settings.enable_signature_method_name_check,
                    warmup_pause_ratio=WARMUP_PAUSE_RATIO
                    if settings.background_model_load
                    else 0.0,
                ),
                background_load=settings.background_model_load,
            ),
            metrics=self.metrics,
        )
        self.api = ServingApi(
            self.manager,
            self.metrics,
            RequestLimits(
                max_request_tensor_bytes=settings.max_request_tensor_bytes,
                max_in_flight_bytes=settings.max_in_flight_bytes,
                in_flight_wait_seconds=settings.in_flight_wait_seconds,
            ),
            allow_reload_config=settings.allow_reload_config,
            request_logger=self.request_logger,
        )
        self.grpc_port: int | None = None
        self.rest_api_port: int | None = None
        self._grpc_server: grpc.Server | None = None
        self._rest_server: RestServer | None = None
        self._stopped = threading.Event()
        self._config_thread: threading.Thread | None = None
        self._config_text: str | None = None

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Load the configured models, then open the ports and start watching the base paths.

        Like TF Serving, waits for the first load of every model before serving. A model that
        fails to load is reported by GetModelStatus and the server still starts (TF Serving
        would exit), so a later good version can be deployed without a restart. An invalid
        config raises `ValueError` or `ServingError`; a port in use raises `OSError`.
        """
        try:
            self._start()
        except BaseException:
            self.stop(grace=0)
            raise

    def _start(self) -> None:
        config = load_model_server_config(self.settings)
        if self.settings.request_log_dir:
            check_logging_config(
                "(every model, --request_log_dir)",
                default_logging_config(
                    self.settings.request_log_dir, self.settings.request_log_sampling_rate, "m"
                ),
            )
        if self.settings.enable_batching:
            log.info(
                "--enable_batching: server-side batching is applied by tensorflow_model_server; "
                "this server runs each request as it arrives"
            )
        _set_tensorflow_threads(
            self.settings.tensorflow_intra_op_parallelism,
            self.settings.tensorflow_inter_op_parallelism,
        )
        if self.settings.model_config_file:
            self._config_text = Path(self.settings.model_config_file).read_text()
        try:
            # Not atomic: a model whose first load fails stays configured, so a good version
            # deployed later is picked up without a restart.
            self.manager.reload_config(config, wait=True, atomic=False)
        except ServingError as error:
            if error.code != grpc.StatusCode.UNKNOWN:
                raise
            log.error("Serving without some models: %s", error.message)
        self.request_logger.update(config)
        self.manager.start()
        self._start_grpc()
        if self.settings.rest_api_port is not None:
            rest = RestApi(
                self.api,
                max_body_bytes=self._max_message_bytes(),
                metrics_path=self.settings.metrics_path,
            )
            address = _address(self.settings.host, self.settings.rest_api_port)
            try:
                self._rest_server = RestServer(
                    self.settings.host,
                    self.settings.rest_api_port,
                    rest,
                    num_threads=self.settings.rest_api_num_threads,
                    timeout_seconds=self.settings.rest_api_timeout_in_ms / 1000,
                )
            except OSError as error:
                raise OSError(f"Cannot listen for HTTP/REST on {address}: {error}") from error
            self._rest_server.start()
            self.rest_api_port = self._rest_server.port
            log.info(
                "Exporting HTTP/REST API at:%s ...",
                _address(self.settings.host, self.rest_api_port),
            )
        if (
            self.settings.model_config_file
            and self.settings.model_config_file_poll_wait_seconds > 0
        ):
            self._config_thread = threading.Thread(
                target=self._watch_config_file, name="model-config-poll", daemon=True
            )
            self._config_thread.start()

    def _channel_arguments(self) -> dict[str, int | str]:
        arguments: dict[str, int | str] = {
            "grpc.max_receive_message_length": self.settings.max_receive_message_length,
            "grpc.max_send_message_length": GRPC_MAX_MESSAGE_BYTES,
            # A second server on a busy port must fail, not silently share the port.
            "grpc.so_reuseport": 0,
        }
        arguments.update(dict(self.settings.grpc_channel_arguments))
        return arguments

    def _max_message_bytes(self) -> int:
        return int(self._channel_arguments()["grpc.max_receive_message_length"])

    def _start_grpc(self) -> None:
        threads = self.settings.grpc_max_threads
        server = grpc.server(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-request"),
            options=list(self._channel_arguments().items()),
            # Calls waiting for a thread hold buffered request bytes: past this many at once,
            # a new call is refused with RESOURCE_EXHAUSTED instead of queueing.
            maximum_concurrent_rpcs=max(GRPC_MIN_QUEUED_CALLS, GRPC_CALLS_PER_THREAD * threads),
        )
        server.add_generic_rpc_handlers(service_handlers(self.api))
        address = _address(self.settings.host, self.settings.port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            server.stop(None)
            raise OSError(f"Cannot listen for gRPC on {address}: {error}") from error
        if port == 0:
            server.stop(None)
            raise OSError(f"Cannot listen for gRPC on {address}")
        server.start()
        self._grpc_server = server
        self.grpc_port = port
        log.info("Running gRPC ModelServer at %s ...", _address(self.settings.host, port))

    def _watch_config_file(self) -> None:
        path = Path(str(self.settings.model_config_file))
        while not self._stopped.wait(self.settings.model_config_file_poll_wait_seconds):
            try:
                text = path.read_text()
                if text == self._config_text:
                    continue
                self._config_text = text
                log.info("Model config file %s changed; reloading", path)
                config = parse_model_config_file(path)
                self.manager.reload_config(config, wait=True)
                self.request_logger.update(config)
            except (OSError, ValueError, ServingError) as error:
                log.error("Model config file %s not applied: %s", path, error)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting requests, let those in flight finish (up to `grace` s), then unload."""
        self._stopped.set()
        grpc_done = self._grpc_server.stop(grace) if self._grpc_server is not None else None
        if self._rest_server is not None:
            self._rest_server.stop(grace)
            self._rest_server = None
        if grpc_done is not None:
            grpc_done.wait()
        self._grpc_server = None
        # No request is answered any more: what was sampled is written, the files finished.
        self.request_logger.close()
        # The manager first: a config reload waiting for loads ends when the manager stops.
        self.manager.stop()
        if self._config_thread is not None:
            self._config_thread.join()
            self._config_thread = None

    def wait_until_available(
        self, model_name: str, version: int | None = None, timeout: float = 30.0
    ) -> bool:
        """Wait until the model (or that version) is served; False on timeout or failed load."""
        return self.manager.wait_until_available(model_name, version, timeout)

    def poll_now(self) -> None:
        """Look for new, removed or changed versions now instead of at the next poll."""
        self.manager.poll_now()

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Apply a new model config, as HandleReloadConfigRequest does."""
        self.manager.reload_config(config, wait=True)
        self.request_logger.update(config)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of `tensorflow_model_server`, for the flags this server implements."""
    parser = argparse.ArgumentParser(
        prog="widedeep serve",
        description=(
            "Serve SavedModels over TensorFlow Serving's gRPC and REST APIs, with "
            "tensorflow_model_server's flags."
        ),
        epilog="examples:\n" + textwrap.indent(flags.SERVE_EXAMPLES, "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flags.add_server_arguments(parser)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """ServerSettings from `tensorflow_model_server`-style arguments."""
    return settings_from_namespace(build_parser().parse_args(argv))


def settings_from_namespace(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from parsed :func:`serving.flags.add_server_arguments` flags."""
    defaults = ServerSettings()
    for name, default in (
        ("rest_api_num_threads", defaults.rest_api_num_threads),
        ("max_request_tensor_bytes", defaults.max_request_tensor_bytes),
        ("max_in_flight_bytes", defaults.max_in_flight_bytes),
        ("in_flight_wait_in_ms", int(defaults.in_flight_wait_seconds * 1000)),
        ("request_log_sampling_rate", defaults.request_log_sampling_rate),
        ("request_log_max_file_records", defaults.request_log.max_file_records),
        ("request_log_max_file_seconds", defaults.request_log.max_file_seconds),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not args.model_config_file and not args.model_base_path:
        raise ValueError(
            "Both server_options.model_base_path and server_options.model_config_file are empty!"
        )
    channel_arguments = dict(args.grpc_channel_arguments)
    max_receive = int(
        channel_arguments.get("grpc.max_receive_message_length", limits.DEFAULT_MAX_REQUEST_BYTES)
    )
    for name in (
        "rest_api_num_threads",
        "rest_api_timeout_in_ms",
        "max_request_tensor_bytes",
        "max_in_flight_bytes",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    if args.in_flight_wait_in_ms < 0:
        raise ValueError(f"--in_flight_wait_in_ms: expected >= 0, got {args.in_flight_wait_in_ms}")
    metrics_path: str | None = PROMETHEUS_PATH
    if args.monitoring_config_file:
        prometheus = tfserving.read_monitoring_config(args.monitoring_config_file).prometheus_config
        metrics_path = (prometheus.path or PROMETHEUS_PATH) if prometheus.enable else None
        if metrics_path is not None and not metrics_path.startswith("/"):
            raise ValueError(
                f"--monitoring_config_file: prometheus_config.path must start with '/', got "
                f"{metrics_path!r}"
            )
    if args.batching_parameters_file:
        tfserving.read_batching_parameters(args.batching_parameters_file)
    rate = args.request_log_sampling_rate
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--request_log_sampling_rate: expected a number in [0, 1], got {rate}")
    for name in ("request_log_max_file_records", "request_log_max_file_seconds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name}: expected a number > 0, got {getattr(args, name)}")
    return ServerSettings(
        model_name=args.model_name,
        model_base_path=args.model_base_path or None,
        model_config_file=args.model_config_file or None,
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port or None,
        file_system_poll_wait_seconds=float(args.file_system_poll_wait_seconds),
        model_config_file_poll_wait_seconds=float(args.model_config_file_poll_wait_seconds),
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_seconds=args.load_retry_interval_micros / 1e6,
        num_load_threads=args.num_load_threads,
        enable_model_warmup=args.enable_model_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        enable_signature_method_name_check=args.enable_signature_method_name_check,
        saved_model_tags=tuple(tag for tag in args.saved_model_tags.split(",") if tag),
        grpc_max_threads=args.grpc_max_threads,
        max_receive_message_length=max_receive,
        grpc_channel_arguments=tuple(args.grpc_channel_arguments),
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
        max_request_tensor_bytes=args.max_request_tensor_bytes,
        max_in_flight_bytes=args.max_in_flight_bytes,
        in_flight_wait_seconds=args.in_flight_wait_in_ms / 1000,
        rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        allow_reload_config=args.allow_reload_config,
        model_base_path_roots=tuple(
            root.strip() for root in args.model_base_path_roots.split(",") if root.strip()
        ),
        metrics_path=metrics_path,
        enable_batching=args.enable_batching,
        batching_parameters_file=args.batching_parameters_file or None,
        background_model_load=args.background_model_load,
        request_log_dir=args.request_log_dir or None,
        request_log_sampling_rate=rate,
        request_log=dataclasses.replace(
            defaults.request_log,
            max_file_records=args.request_log_max_file_records,
            max_file_seconds=float(args.request_log_max_file_seconds),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the model server until SIGTERM or SIGINT; returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = settings_from_args(argv)
    except ValueError as error:
        print(f"Failed to start server. Error: {error}", file=sys.stderr)
        return 1
    # A request coming back from TensorFlow (which runs without the interpreter lock) waits for
    # whichever thread holds the lock to give it up: by default up to 5 ms, while other
    # requests (or a flood of bad ones) run Python code. A shorter slice keeps good requests'
    # tail latency low under such load, for a little more switching.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    if settings.background_model_load:
        # What is alive now (TensorFlow's modules: hundreds of thousands of objects) lives as
        # long as the process. Out of the collector's sight, a full collection walks only what
        # comes later (models, requests): pauses of tens of ms instead of hundreds, while
        # requests are served and when a version is swapped. Done here, where the process is
        # the server's alone, not in ModelServer, which may run inside another program.
        gc.collect()
        gc.freeze()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = ModelServer(settings)
    try:
        try:
            server.start()
        except (ValueError, OSError, ServingError) as error:
            print(f"Failed to start server. Error: {error}", file=sys.stderr)
            return 1
        print(f"Running gRPC ModelServer at {_address(settings.host, server.grpc_port or 0)} ...")
        if server.rest_api_port is not None:
            print(f"Exporting HTTP/REST API at:{_address(settings.host, server.rest_api_port)} ...")
        sys.stdout.flush()
        # Wake now and then: a signal handler runs only between Python bytecodes.
        while not stop.wait(0.5):
            pass
        log.info("Shutting down: finishing requests in flight")
        server.stop(grace=10.0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
