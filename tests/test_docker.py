"""docker/: the compose file serves any config, with flags both servers accept.

No Docker engine runs here: the compose file is read as Compose reads it (its ``${VAR:-default}``
variables filled in from an environment), its server command line is parsed by `widedeep
serve`'s own parser with the files it mounts, and the built-in server is started with that
command line on a real model to answer the healthcheck's request and serve the metrics where
the monitoring config says.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import tfserving
from serving.metrics import PROMETHEUS_PATH
from serving.server import ModelServer, build_parser, settings_from_args
from transform.artifacts import export_dir

DOCKER = Path(__file__).resolve().parent.parent / "docker"
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${VAR} and ${VAR:-default} (default if unset or empty)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _service(env: dict[str, str]) -> dict[str, Any]:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    return _interpolate(compose["services"]["serving"], env)


def _flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(f.lstrip("-").split("=", 1) for f in service["command"])


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path ("source:target:mode")."""
    return {v.rsplit(":", 2)[1]: v.rsplit(":", 2)[0] for v in service["volumes"]}


def _local_argv(service: dict[str, Any], models: Path) -> list[str]:
    """The compose command line with each mounted path replaced by its host file."""
    mounts = _mounts(service)
    argv = []
    for flag in service["command"]:
        name, value = flag.split("=", 1)
        for target, source in mounts.items():
            if value == target or value.startswith(target + "/"):
                host = models if target == "/models" else DOCKER / source
                value = str(host) + value[len(target) :]
        argv.append(f"{name}={value}")
    return argv


@pytest.mark.parametrize(
    "env, name, base",
    [
        ({}, "app_ranker", "../serving_models"),
        (
            {"WIDEDEEP_MODEL_NAME": "movie_ranker", "WIDEDEEP_MODEL_BASE_PATH": "/srv/models"},
            "movie_ranker",
            "/srv/models",
        ),
    ],
)
def test_compose_serves_the_model_the_environment_names(
    env: dict[str, str], name: str, base: str
) -> None:
    service = _service(env)
    assert service["image"].startswith("tensorflow/serving:")
    flags = _flags(service)
    assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"
    assert flags["model_name"] == name and flags["model_base_path"] == f"/models/{name}"
    assert _mounts(service)["/models"] == base
    assert f"GET /v1/models/{name} HTTP/1.0" in " ".join(service["healthcheck"]["test"])
    # Every file a flag names is mounted from docker/.
    mounts = _mounts(service)
    for key in ("batching_parameters_file", "monitoring_config_file"):
        assert (DOCKER / mounts[flags[key]]).is_file()
    assert "app_ranker" not in json.dumps(_service({"WIDEDEEP_MODEL_NAME": "x"}))


def test_every_compose_flag_is_one_widedeep_serve_accepts(tmp_path: Path) -> None:
    service = _service({})
    parser = build_parser()
    known = {a.dest for a in parser._actions}
    for flag in service["command"]:
        assert flag.lstrip("-").split("=", 1)[0] in known, flag
    settings = settings_from_args(_local_argv(service, tmp_path))
    monitoring = tfserving.read_monitoring_config(DOCKER / "monitoring.config")
    assert settings.metrics_path == monitoring.prometheus_config.path
    assert settings.enable_batching and settings.batching_parameters_file
    batching = tfserving.read_batching_parameters(DOCKER / "batching_parameters.txt")
    assert batching.max_batch_size.value > 0 and batching.num_batch_threads.value > 0


def test_malformed_server_files_are_refused_naming_them(tmp_path: Path) -> None:
    bad = tmp_path / "monitoring.config"
    bad.write_text("prometheus_config { enabled: true }\n")
    with pytest.raises(ValueError, match=r"--monitoring_config_file: .*enabled"):
        settings_from_args(["--model_base_path=/m", f"--monitoring_config_file={bad}"])
    batching = tmp_path / "batching.txt"
    batching.write_text("max_batch_size { value: 'many' }\n")
    with pytest.raises(ValueError, match=r"--batching_parameters_file: .*max_batch_size|value"):
        settings_from_args(["--model_base_path=/m", f"--batching_parameters_file={batching}"])
    off = tmp_path / "off.config"
    off.write_text("prometheus_config { enable: false }\n")
    settings = settings_from_args(["--model_base_path=/m", f"--monitoring_config_file={off}"])
    assert settings.metrics_path is None


def _get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_compose_command_line_serves_a_model_of_another_config(
    movies_model: Path, movies_small_config, tmp_path: Path
) -> None:
    name = movies_small_config.model_name
    service = _service({"WIDEDEEP_MODEL_NAME": name})
    models = tmp_path / "models"
    (models / name).mkdir(parents=True)
    (models / name / "1").symlink_to(export_dir(movies_model).absolute())
    argv = [
        a for a in _local_argv(service, models) if not a.startswith(("--port=", "--rest_api_port="))
    ]
    # Free ports instead of 8500 and 8501 (0 means "no REST API" to both servers).
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    settings = settings_from_args([*argv, f"--port={ports[0]}", f"--rest_api_port={ports[1]}"])
    with ModelServer(settings) as server:
        assert server.wait_until_available(name, 1, timeout=60)
        status, body = _get(server.rest_api_port, f"/v1/models/{name}")  # the healthcheck's
        assert status == 200 and "AVAILABLE" in body
        monitoring = tfserving.read_monitoring_config(DOCKER / "monitoring.config")
        status, metrics = _get(server.rest_api_port, monitoring.prometheus_config.path)
        assert status == 200 and ":tensorflow:serving:" in metrics
    assert settings.metrics_path == PROMETHEUS_PATH  # the shipped file keeps TF Serving's path
