"""Shared helpers of the benchmarks: machine description, timing a child process, results."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "out"


def free_port() -> int:
    """A TCP port free on loopback now, for a benchmark's reference server or REST port.

    A benchmark may race another process for it; tests do not use this (their servers bind
    port 0 and report the port they got).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran."""
    import psutil

    return {
        "date": dt.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_child(argv: list[str]) -> tuple[float, float]:
    """Runs a command; returns its wall time (s) and the peak RSS (GiB) of its largest process.

    The command must be the only child this process has run so far: the peak RSS comes from
    RUSAGE_CHILDREN, which keeps the largest of all children.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env)
    seconds = time.monotonic() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib / 2**20


def python_cmd(*args: str) -> list[str]:
    """A command line running this interpreter."""
    return [sys.executable, *args]


def write_results(name: str, data: dict[str, Any], markdown: str) -> None:
    """Writes ``results/<name>.json`` and ``results/<name>.md`` (the README quotes the latter)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
