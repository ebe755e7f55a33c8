"""The one thing that starts a model server: ``widedeep serve`` in a child process.

The child is ``python -m serving.command`` (what ``widedeep serve`` runs): the real
``tensorflow_model_server`` when it is on PATH, else the built-in server. Either way the parent
speaks to it only through TF Serving's gRPC API (:class:`ModelServerClient`), as any client
would. Asked for port 0, the server binds a free port itself and prints which one (the line
TF Serving prints, ``Running gRPC ModelServer at HOST:PORT``), which the parent reads: no port
is picked by the parent, closed and handed to the child, where another process could take it
first.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from serving.release.server_client import ModelServerClient, ModelServerError
from transform.errors import WidedeepError

_GRPC_LINE = re.compile(r"Running gRPC ModelServer at (?:\S*):(\d+)")
_POLL_SECONDS = 0.1


class ServerProcessError(WidedeepError, RuntimeError):
    """The server process died, or did not serve what was expected in time."""


class ServerProcess:
    """``widedeep serve`` over one model base path, in a child process.

    Args:
      model_base_path: Folder holding the model's numbered versions.
      model_name: The model's name on the server.
      log_path: Where the server's output goes (kept, to explain a failure).
      port: gRPC port; 0: the server binds a free one and reports it (see :attr:`port`).
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
        self._port = port or None
        self.rest_api_port = rest_api_port
        self._poll_seconds = poll_seconds
        self._flags = list(flags)
        self._process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        """The gRPC port the server listens on.

        Raises:
          ServerProcessError: the server has not reported it yet (see
            :meth:`wait_for_version`).
        """
        if self._port is None:
            found = _GRPC_LINE.search(self._output())
            if found is None:
                raise ServerProcessError("the model server has not reported its port yet")
            self._port = int(found.group(1))
        return self._port

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC API."""
        return f"127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the REST API, when it is served."""
        return f"http://127.0.0.1:{self.rest_api_port}" if self.rest_api_port else None

    def start(self) -> None:
        """Starts the server; returns at once (see :meth:`wait_for_version`)."""
        argv = [
            sys.executable,
            "-m",
            "serving.command",
            f"--port={self._port or 0}",
            f"--model_name={self.model_name}",
            f"--model_base_path={self.model_base_path}",
            f"--file_system_poll_wait_seconds={self._poll_seconds}",
        ]
        if self.rest_api_port:
            argv.append(f"--rest_api_port={self.rest_api_port}")
        argv += self._flags
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child writes through its own descriptor; the parent reads the file by name, so
        # the two never share (and move) one file offset.
        with self.log_path.open("w") as log:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                # TensorFlow's C++ notices (cuInit on machines without a GPU) are not the
                # server's.
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
            )

    @property
    def pid(self) -> int | None:
        """The server process's id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def wait_for_version(self, version: int | None, timeout_s: float, poll_s: float = 0.2) -> float:
        """Waits until ``version`` (None: any version) is AVAILABLE; returns the seconds waited.

        Raises:
          ServerProcessError: the process died, the version failed to load, or the deadline
            passed; the message ends with the server's last lines.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        while self._port is None:
            if not self.running:
                raise ServerProcessError(f"the model server stopped:\n{self.log()}")
            if _GRPC_LINE.search(self._output()):
                break
            if time.monotonic() >= deadline:
                raise ServerProcessError(
                    f"the model server did not open its gRPC port within {timeout_s:.0f} s:\n"
                    f"{self.log()}"
                )
            time.sleep(_POLL_SECONDS)
        try:
            with ModelServerClient(self.target, self.model_name) as client:
                client.wait_for_version(
                    version,
                    max(0.0, deadline - time.monotonic()),
                    end_is_failure=True,
                    alive=lambda: self.running,
                    poll_s=poll_s,
                )
        except ModelServerError as e:
            raise ServerProcessError(f"{e}:\n{self.log()}") from None
        return time.monotonic() - started

    def _output(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log(self, lines: int = 20) -> str:
        """The last lines the server printed."""
        return "\n".join(self._output().splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops the server gracefully (SIGTERM: requests in flight finish), then kills it."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
