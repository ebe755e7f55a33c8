"""A model server in its own process: what ``validate``'s dry run and ``widedeep run`` start.

The process is ``widedeep serve`` (``python -m pipeline.cli serve``): the real
``tensorflow_model_server`` when it is on PATH, else the built-in server. Either way the
parent speaks to it only through TF Serving's gRPC API, as any client would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.END


class ServerProcessError(RuntimeError):
    """The server process died, or did not serve what was expected in time."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``widedeep serve`` over one model base path, in a child process.

    Args:
      model_base_path: Folder holding the model's numbered versions.
      model_name: The model's name on the server.
      log_path: Where the server's output goes (kept, to explain a failure).
      port: gRPC port; 0 picks a free one.
      rest_api_port: REST port; None serves no REST.
      poll_seconds: How often the server looks for new versions.
      flags: More ``widedeep serve`` flags (e.g. ``--builtin``, thread pool sizes).
    """

    def __init__(
        self,
        model_base_path: str | Path,
        model_name: str,
        log_path: str | Path,
        port: int = 0,
        rest_api_port: int | None = None,
        poll_seconds: int = 1,
        flags: Sequence[str] = (),
    ):
        self.model_base_path = Path(model_base_path).absolute()
        self.model_name = model_name
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.rest_api_port = rest_api_port
        self.target = f"127.0.0.1:{self.port}"
        self._poll_seconds = poll_seconds
        self._flags = list(flags)
        self._log: IO[str] | None = None
        self._process: subprocess.Popen | None = None

    @property
    def rest_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the REST API, when it is served."""
        return f"http://127.0.0.1:{self.rest_api_port}" if self.rest_api_port else None

    def start(self) -> None:
        """Starts the server; returns at once (see :meth:`wait_for_version`)."""
        argv = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "serve",
            f"--port={self.port}",
            f"--model_name={self.model_name}",
            f"--model_base_path={self.model_base_path}",
            f"--file_system_poll_wait_seconds={self._poll_seconds}",
        ]
        if self.rest_api_port:
            argv.append(f"--rest_api_port={self.rest_api_port}")
        argv += self._flags
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w+")
        self._process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )

    @property
    def pid(self) -> int | None:
        """The server process's id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def version_states(self, timeout_s: float = 2.0) -> dict[int, int] | None:
        """Each version's ``ModelVersionStatus.State``; None while the server does not answer."""
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = model_service_pb2_grpc.ModelServiceStub(channel)
                request = get_model_status_pb2.GetModelStatusRequest()
                request.model_spec.name = self.model_name
                response = stub.GetModelStatus(request, timeout=timeout_s)
        except grpc.RpcError:
            return None
        return {s.version: s.state for s in response.model_version_status}

    def wait_for_version(self, version: int | None, timeout_s: float, poll_s: float = 0.2) -> float:
        """Waits until ``version`` (None: any version) is AVAILABLE; returns the seconds waited.

        Raises:
          ServerProcessError: the process died, the version failed to load, or the deadline
            passed; the message ends with the server's last lines.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.running:
                raise ServerProcessError(f"the model server stopped:\n{self.log()}")
            states = self.version_states()
            if states:
                if version is None and _AVAILABLE in states.values():
                    return time.monotonic() - started
                if version is not None and states.get(version) == _AVAILABLE:
                    return time.monotonic() - started
                if version is not None and states.get(version) == _END:
                    raise ServerProcessError(
                        f"version {version} of {self.model_name!r} failed to load:\n{self.log()}"
                    )
                if version is None and states and all(s == _END for s in states.values()):
                    raise ServerProcessError(
                        f"the model server could not load {self.model_name!r}:\n{self.log()}"
                    )
            time.sleep(poll_s)
        raise ServerProcessError(
            f"{self.model_name!r} version {version if version is not None else 'any'} was not "
            f"AVAILABLE within {timeout_s:.0f} s:\n{self.log()}"
        )

    def log(self, lines: int = 20) -> str:
        """The last lines the server printed."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return "\n".join(self._log.read().splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops the server gracefully (SIGTERM: requests in flight finish), then kills it."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
