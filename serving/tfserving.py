"""Running the real ``tensorflow_model_server`` when it is installed, and its config files.

``widedeep serve`` prefers the real binary (production, the ``tensorflow/serving`` image in
``docker/``) and falls back to the built-in server, which speaks the same API. Both read the
same model config file, written here with TF Serving's own protos.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

BINARY = "tensorflow_model_server"


def find_binary() -> str | None:
    """Path of ``tensorflow_model_server`` on PATH, if any."""
    return shutil.which(BINARY)


def model_server_config(
    model_name: str, base_path: str, num_versions: int = 1
) -> model_server_config_pb2.ModelServerConfig:
    """The ModelServerConfig serving the latest ``num_versions`` of one model."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    model.model_version_policy.latest.num_versions = num_versions
    return config


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


BUILTIN_ONLY_FLAGS = (
    "--allow_reload_config",
    "--model_base_path_roots",
    "--max_request_tensor_bytes",
    "--max_in_flight_bytes",
    "--in_flight_wait_in_ms",
)
"""Flags of the built-in server that ``tensorflow_model_server`` does not know."""


def binary_argv(binary: str, argv: Sequence[str]) -> list[str]:
    """The command line for the real server, given ``widedeep serve``'s arguments.

    ``--model_name``/``--model_base_path`` become a generated model config file, so the real
    server runs from the same kind of file that production uses. Flags only the built-in
    server knows are left out (the real binary would refuse to start); see
    :func:`builtin_only_flags`.
    """
    args = _drop_flags(argv, BUILTIN_ONLY_FLAGS)
    name = _flag(args, "--model_name")
    base = _flag(args, "--model_base_path")
    if base is not None and _flag(args, "--model_config_file") is None:
        config = model_server_config(name or "default", str(Path(base).absolute()))
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
    return [a for a in argv if a.split("=", 1)[0] in BUILTIN_ONLY_FLAGS]


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
