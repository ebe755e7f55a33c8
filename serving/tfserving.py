"""Running the real ``tensorflow_model_server`` when it is installed, and its config files.

``widedeep serve`` (:mod:`serving.command`) prefers the real binary (production, the
``tensorflow/serving`` image in ``docker/``) and falls back to the built-in server, which
speaks the same API. Both read the
same model config file, written here with TF Serving's own protos, and the same monitoring
config and batching parameters files (text protos whose messages the pip package does not
ship: they are declared here with TF Serving's field names and numbers, so a file either
server accepts parses here, and a misspelt field is refused as TF Serving refuses it).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.flags import BUILTIN_FLAG, tf_serving_spelling
from transform.artifacts import model_server_config

BINARY = "tensorflow_model_server"


def find_binary() -> str | None:
    """Path of ``tensorflow_model_server`` on PATH, if any."""
    return shutil.which(BINARY)


def write_model_config_file(
    path: str | Path, config: model_server_config_pb2.ModelServerConfig
) -> Path:
    """Writes ``config`` as the text proto TF Serving's --model_config_file reads."""
    path = Path(path)
    path.write_text(text_format.MessageToString(config))
    return path


def read_model_config_file(path: str | Path) -> model_server_config_pb2.ModelServerConfig:
    """Parses a model config file (text proto)."""
    return text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())


_PACKAGE = "widedeep.tfserving"
_FILE = "widedeep/tfserving/config_files.proto"


@functools.cache
def _config_messages() -> dict[str, Any]:
    """MonitoringConfig and BatchingParameters, as TF Serving declares them
    (config/monitoring_config.proto, servables/tensorflow/session_bundle_config.proto)."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package=_PACKAGE,
        syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name],
    )

    def field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False):
        label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
        out = f(name=name, number=number, type=kind, label=label)
        if type_name:
            out.type_name = type_name
        return out

    message = f.TYPE_MESSAGE
    proto.message_type.add(
        name="PrometheusConfig",
        field=[field("enable", 1, f.TYPE_BOOL), field("path", 2, f.TYPE_STRING)],
    )
    proto.message_type.add(
        name="MonitoringConfig",
        field=[field("prometheus_config", 1, message, f".{_PACKAGE}.PrometheusConfig")],
    )
    int64, string, boolean = (
        ".google.protobuf.Int64Value",
        ".google.protobuf.StringValue",
        ".google.protobuf.BoolValue",
    )
    proto.message_type.add(
        name="BatchingParameters",
        field=[
            field("max_batch_size", 1, message, int64),
            field("batch_timeout_micros", 2, message, int64),
            field("max_enqueued_batches", 3, message, int64),
            field("num_batch_threads", 4, message, int64),
            field("thread_pool_name", 5, message, string),
            field("allowed_batch_sizes", 6, f.TYPE_INT64, repeated=True),
            field("pad_variable_length_inputs", 7, f.TYPE_BOOL),
            field("enable_large_batch_splitting", 8, message, boolean),
            field("max_execution_batch_size", 9, message, int64),
        ],
    )
    pool = descriptor_pool.Default()
    try:
        file_descriptor = pool.FindFileByName(_FILE)
    except KeyError:
        pool.Add(proto)
        file_descriptor = pool.FindFileByName(_FILE)
    return {
        name: message_factory.GetMessageClass(file_descriptor.message_types_by_name[name])
        for name in ("MonitoringConfig", "BatchingParameters")
    }


def _parse_text_file(path: str | Path, kind: str, flag: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {path}: {error}") from None
    try:
        return text_format.Parse(text, _config_messages()[kind]())
    except text_format.ParseError as error:
        raise ValueError(f"{flag}: {path} is not a {kind} text proto: {error}") from None


def read_monitoring_config(path: str | Path) -> Any:
    """The MonitoringConfig of a ``--monitoring_config_file`` (ValueError naming the problem)."""
    return _parse_text_file(path, "MonitoringConfig", "--monitoring_config_file")


def read_batching_parameters(path: str | Path) -> Any:
    """The BatchingParameters of a ``--batching_parameters_file`` (ValueError if malformed)."""
    return _parse_text_file(path, "BatchingParameters", "--batching_parameters_file")


BUILTIN_ONLY_FLAGS = (
    "--allow_reload_config",
    "--model_base_path_roots",
    "--max_request_tensor_bytes",
    "--max_in_flight_bytes",
    "--in_flight_wait_in_ms",
    "--background_model_load",
    "--request_log_dir",
    "--request_log_sampling_rate",
    "--request_log_max_file_records",
    "--request_log_max_file_seconds",
)
"""Flags of the built-in server that ``tensorflow_model_server`` does not know."""


def binary_argv(binary: str, argv: Sequence[str]) -> list[str]:
    """The command line for the real server, given ``widedeep serve``'s arguments.

    ``--model_name``/``--model_base_path`` become a generated model config file, so the real
    server runs from the same kind of file that production uses. Flags only the built-in
    server knows are left out (the real binary would refuse to start); see
    :func:`builtin_only_flags`.
    """
    args = _drop_flags(tf_serving_spelling(argv), (*BUILTIN_ONLY_FLAGS, BUILTIN_FLAG))
    name = _flag(args, "--model_name")
    base = _flag(args, "--model_base_path")
    if base is not None and _flag(args, "--model_config_file") is None:
        config = model_server_config(name or "default", str(Path(base).absolute()), num_versions=1)
        folder = Path(tempfile.mkdtemp(prefix="widedeep-serve-"))
        path = write_model_config_file(folder / "models.config", config)
        args = _drop_values(args, ("--model_name", "--model_base_path"))
        args.append(f"--model_config_file={path}")
    return [binary, *args]


def _flag(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _drop_values(args: Sequence[str], names: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if a.startswith(tuple(n + "=" for n in names)):
            continue
        out.append(a)
    return out


def builtin_only_flags(argv: Sequence[str]) -> list[str]:
    """The arguments in ``argv`` that only the built-in server understands."""
    return [a for a in tf_serving_spelling(argv) if a.split("=", 1)[0] in BUILTIN_ONLY_FLAGS]


def models_with_logging_config(argv: Sequence[str]) -> list[str]:
    """The models whose entry in ``--model_config_file`` has a ``logging_config``.

    The open-source ``tensorflow_model_server`` has no log collector built in: it refuses to
    start with one ("No request-logger-creator provided"); the built-in server writes them.
    """
    path = _flag(tf_serving_spelling(argv), "--model_config_file")
    if not path:
        return []
    try:
        config = read_model_config_file(path)
    except (OSError, text_format.ParseError):
        return []  # the server itself reports an unreadable file
    return [m.name for m in config.model_config_list.config if m.HasField("logging_config")]


def _drop_flags(args: Sequence[str], names: tuple[str, ...]) -> list[str]:
    """``args`` without the flags ``names``: ``--flag=value``, or ``--flag`` and its value."""
    out: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg.split("=", 1)[0] not in names:
            out.append(arg)
        elif "=" not in arg and rest and not rest[0].startswith("--"):
            rest.pop(0)  # the flag's value
    return out
