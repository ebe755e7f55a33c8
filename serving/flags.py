"""``widedeep serve``'s command line: ``tensorflow_model_server``'s flags, declared once.

:func:`add_server_arguments` declares every flag the model servers take; the ``widedeep`` CLI
and the built-in server's own entry point (:func:`serving.server.settings_from_args`) both use
it, so ``widedeep serve --help`` lists every flag. Each flag is spelled with dashes, like every
other ``widedeep`` flag, and keeps TF Serving's own underscore name as an alias, the spelling
its users and its Docker images know (``--rest-api-port`` and ``--rest_api_port``).

Nothing here imports TensorFlow: ``--help`` answers at once. Defaults that live with the
server's limits are left ``None`` here and filled in from :class:`serving.server.ServerSettings`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from serving.metrics import PROMETHEUS_PATH

BUILTIN_FLAG = "--builtin"

SERVE_EXAMPLES = """\
widedeep serve --port 8500 --rest-api-port 8501 --model-name app_ranker \\
    --model-base-path serving_models/app_ranker
widedeep serve --port=8500 --model_config_file=/srv/models/models.config \\
    --model_config_file_poll_wait_seconds=30
widedeep serve --port 8500 --model-base-path /srv/models/app_ranker --allow-reload-config \\
    --model-base-path-roots /srv/models
widedeep serve --port 8500 --model-name app_ranker --model-base-path /srv/models/app_ranker \\
    --request-log-dir /srv/request_logs --request-log-sampling-rate 0.1

--model-base-path is the folder of ONE model's numbered versions (TF Serving's meaning):
MODELS_DIR/MODEL_NAME after 'widedeep deploy --models-dir MODELS_DIR'. Flags are spelled with
dashes, or with underscores as TF Serving spells them.

Runs tensorflow_model_server when it is on PATH (writing a model config file for
--model-name/--model-base-path), else the built-in server that speaks the same gRPC and REST
API; --builtin forces the built-in one. Flags only the built-in server knows are dropped, with
a warning, when the real binary runs.

Requests are at most 64 MiB (grpc.max_receive_message_length in --grpc-channel-arguments sets
it for both APIs); what they take in memory is bounded by --max-request-tensor-bytes and
--max-in-flight-bytes. HandleReloadConfigRequest is refused unless --allow-reload-config.

--request-log-dir logs a sample of the requests as TFRecord files of PredictionLog (what
'widedeep validate --request-log' reads); a model's logging_config in --model-config-file does
the same for that model, as in TF Serving. The built-in server writes them.\
"""
"""The examples and notes of ``widedeep serve --help``."""


def flag_bool(text: str) -> bool:
    """TF Serving's boolean flag values: true/false, 1/0, yes/no."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "t"):
        return True
    if lowered in ("0", "false", "no", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """Parse `--grpc_channel_arguments` ("key=value,key=value"; int values become ints)."""
    arguments: list[tuple[str, int | str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            arguments.append((key.strip(), int(value)))
        except ValueError:
            arguments.append((key.strip(), value.strip()))
    return tuple(arguments)


def names(flag: str) -> list[str]:
    """A TF Serving flag's spellings: with dashes first, then TF Serving's own."""
    dashed = flag.replace("_", "-")
    return [dashed, flag] if dashed != flag else [flag]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares every flag of the model servers on ``parser``."""

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(*names(name), dest=name.lstrip("-"), **kwargs)  # type: ignore[arg-type]

    flag("--port", type=int, default=8500, help="gRPC port (0 picks a free one)")
    flag("--rest_api_port", type=int, default=0, help="REST port; 0 (default) serves no REST")
    flag("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    flag("--model_name", default="default", help="name of the model served from the base path")
    flag("--model_base_path", default="", help="folder of ONE model's numbered versions")
    flag("--model_config_file", default="", help="text ModelServerConfig naming the models")
    flag("--model_config_file_poll_wait_seconds", type=int, default=0,
         help="re-read the model config file this often (0: never)")  # fmt: skip
    flag("--file_system_poll_wait_seconds", type=int, default=1,
         help="look for new versions this often")  # fmt: skip
    flag("--max_num_load_retries", type=int, default=5)
    flag("--load_retry_interval_micros", type=int, default=60_000_000)
    flag("--num_load_threads", type=int, default=2)
    flag("--grpc_max_threads", type=int, default=8)
    flag("--grpc_channel_arguments", type=parse_channel_arguments, default=(),
         help='e.g. "grpc.max_receive_message_length=4194304"')  # fmt: skip
    flag("--saved_model_tags", default="serve")
    flag("--tensorflow_intra_op_parallelism", type=int, default=0,
         help="threads one TensorFlow op may use (0: TensorFlow's choice)")  # fmt: skip
    flag("--tensorflow_inter_op_parallelism", type=int, default=0,
         help="TensorFlow ops run at once (0: TensorFlow's choice)")  # fmt: skip
    flag("--rest_api_num_threads", type=int,
         help="REST requests answered at once (default: 4 per CPU)")  # fmt: skip
    flag("--rest_api_timeout_in_ms", type=int, default=30_000,
         help="how long a REST connection may stall (default 30000)")  # fmt: skip
    flag("--max_request_tensor_bytes", type=int,
         help="bytes one request's tensors may take once expanded to their declared shapes "
         "(default 256 MiB)")  # fmt: skip
    flag("--max_in_flight_bytes", type=int,
         help="bytes of all requests being answered at once; more wait, then get "
         "RESOURCE_EXHAUSTED (default 1 GiB)")  # fmt: skip
    flag("--in_flight_wait_in_ms", type=int,
         help="how long a request waits for room among those in flight (default 5000)")  # fmt: skip
    flag("--model_base_path_roots", default="",
         help="comma-separated folders every model base path must be under")  # fmt: skip
    flag("--monitoring_config_file", default="",
         help="MonitoringConfig text proto: whether and where (on the REST port) Prometheus "
         f"metrics are exposed (default: at {PROMETHEUS_PATH})")  # fmt: skip
    flag("--batching_parameters_file", default="",
         help="BatchingParameters text proto; checked, and applied by "
         "tensorflow_model_server only (see --enable_batching)")  # fmt: skip
    flag("--request_log_dir", default="",
         help="log a sample of each model's requests (those without a logging_config in "
         "--model_config_file) as TFRecord files of PredictionLog, DIR/MODEL_NAME-*.tfrecord "
         "(built-in server)")  # fmt: skip
    flag("--request_log_sampling_rate", type=float,
         help="share of requests --request_log_dir logs, 0 to 1 (default 0.1)")  # fmt: skip
    flag("--request_log_max_file_records", type=int,
         help="a request log file is finished after this many records (default 100000)")  # fmt: skip
    flag("--request_log_max_file_seconds", type=float,
         help="... or once it is this many seconds old (default 600)")  # fmt: skip
    for name, default, text in (
        ("enable_model_warmup", True, None),
        ("allow_version_labels_for_unavailable_models", False, None),
        ("enable_signature_method_name_check", False, None),
        ("allow_reload_config", False,
         "let clients change the served models with HandleReloadConfigRequest"),
        ("enable_batching", False,
         "TF Serving's server-side batching: accepted so one command line serves with either "
         "server; the built-in server runs each request as it arrives"),
        ("background_model_load", True,
         "load and warm up new versions at a lower priority than requests (true by default)"),
    ):  # fmt: skip
        flag(f"--{name}", type=flag_bool, nargs="?", const=True, default=default, help=text)
    parser.add_argument(
        BUILTIN_FLAG,
        action="store_true",
        help="use the built-in server even if tensorflow_model_server is on PATH",
    )


def tf_serving_spelling(argv: Sequence[str]) -> list[str]:
    """``argv`` with every flag name spelled as TF Serving spells it (underscores)."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out
