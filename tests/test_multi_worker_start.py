"""A multi-worker job whose workers do not all start: a deadline, a clear error, signals heard.

Each test runs `widedeep train --distribute multi_worker` as a real process, with a TF_CONFIG
naming two workers of which only one is started. The strategy is set up before anything else
(the data is never read), so no datagen output is needed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_ENV = "WIDEDEEP_WORKER_START_TIMEOUT_S"

pytestmark = pytest.mark.timeout(300)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_alone(tmp_path: Path, index: int, timeout_s: str) -> tuple[subprocess.Popen, int]:
    """Worker `index` of a two-worker cluster, started alone; returns it and its peer's port."""
    ports = _free_ports(2)
    tf_config = {
        "cluster": {"worker": [f"localhost:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TF_CONFIG": json.dumps(tf_config),
        TIMEOUT_ENV: timeout_s,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", "movies",
         "--data", str(tmp_path / "data"), "--out", str(tmp_path / "model"),
         "--distribute", "multi_worker", "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return process, ports[1 - index]


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


def test_a_chief_whose_peer_never_starts_fails_at_the_deadline(tmp_path: Path) -> None:
    process, peer = _start_alone(tmp_path, 0, "3")
    code, stderr = _finish(process)
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("widedeep train: error: distribute=multi_worker: worker 1"), stderr
    assert f"(localhost:{peer}) of TF_CONFIG did not start within 3 s" in last
    assert TIMEOUT_ENV in last
    assert "waiting up to 3 s for worker 1" in stderr  # it said what it waited for


def test_a_worker_whose_chief_never_starts_fails_at_the_deadline(tmp_path: Path) -> None:
    process, _ = _start_alone(tmp_path, 1, "3")
    code, stderr = _finish(process)
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert "distribute=multi_worker: the workers of TF_CONFIG did not all start within 3 s" in last


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_chief_waiting_for_its_peer_stops_at_a_signal(tmp_path: Path, signum: int) -> None:
    process, _ = _start_alone(tmp_path, 0, "600")
    assert process.stderr is not None
    for line in process.stderr:
        if "waiting up to 600 s for worker 1" in line:
            break
    else:
        pytest.fail(f"the chief never said it was waiting (exit {process.wait()})")
    process.send_signal(signum)
    code, stderr = _finish(process)
    if signum == signal.SIGTERM:
        assert code == 2
        assert "stopped by SIGTERM while waiting for the workers" in stderr
    else:
        assert code == 130 and "interrupted" in stderr
