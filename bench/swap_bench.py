"""Benchmark of a version swap: request latency while the server loads a new version.

The default ``app_store`` model (trained as in ``serving_bench.py``, and shared with it through
``--reuse``) is served by ``widedeep serve --builtin`` in a child process. Four client threads
send gRPC Predict requests of 50 candidates (the client's batch size) at a steady rate, each on
a fixed schedule, and record every latency, measured from the scheduled send time (a request
held back by a slow one counts its wait). Three phases of ``--seconds`` each:

- ``steady``: nothing happens;
- ``swap``: ``--swap-at`` seconds in, a new version (a copy of the model) is deployed into the
  base path (a staging folder renamed into place, as ``widedeep deploy`` does); the server
  loads it, replays its warmup requests and switches to it;
- ``broken``: the same with a broken version, whose last warmup request fails: the server loads
  and warms it up, refuses it and keeps serving the version it has.

The phases rotate in ``--rounds`` rounds, so all see the same machine. The target: p99 of the
10 s from the deploy on at most 1.5x the steady p99. Each round runs the server twice, with
its loads isolated from the requests it serves (the default) and without
(``--background_model_load=false``), to show what the isolation does. Results go to
``bench/results/swap.{json,md}``.

    python bench/swap_bench.py [--rows 200000] [--seconds 60] [--rounds 1] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, write_results

MODEL_NAME = "app_ranker"
CLIENT_THREADS = 4
BATCH = 50
WINDOW_S = 10.0
TARGET_RATIO = 1.5
PHASES = ("steady", "swap", "broken")
MODES = {"isolated": [], "not isolated": ["--background_model_load=false"]}
"""Each way the server runs, and its flags."""


def say(text: str) -> None:
    """Progress, as the run goes."""
    print(f"[swap bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# Versions


def stage_copy(export: Path, base: Path, version: int, broken: bool = False) -> Path:
    """Copies ``export`` into a staging folder of ``base`` for ``version``; returns it.

    A broken copy gets one more warmup request, for a signature the model does not have: the
    load and the warmup do all their work, and the last request fails the version.
    """
    staging = base / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(export, staging)
    if broken:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

        from transform.artifacts import warmup_path

        path = warmup_path(staging)

        records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = "no_such_signature"
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in [*records, log.SerializeToString()]:
                writer.write(record)
    return staging


def deploy_copy(export: Path, base: Path, version: int, broken: bool = False) -> None:
    """Copies ``export`` into ``base/<version>`` through a staging folder and one rename."""
    stage_copy(export, base, version, broken).rename(base / str(version))


# --------------------------------------------------------------------------------------------
# The clients


class Clients:
    """``CLIENT_THREADS`` threads sending Predict requests on a fixed schedule."""

    def __init__(self, target: str, requests: list[Any], rate: float) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._channels = [grpc.insecure_channel(target) for _ in range(CLIENT_THREADS)]
        self._stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in self._channels]
        self._requests = requests
        self._interval = 1.0 / rate
        self.samples: list[tuple[float, float, int]] = []
        """(scheduled send time, latency s, version that answered or -1 on an error)."""
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def run(self, seconds: float, started: float) -> None:
        """Sends for ``seconds`` from ``started`` (a time.monotonic time) on."""
        threads = [
            threading.Thread(target=self._send, args=(i, started, seconds), daemon=True)
            for i in range(CLIENT_THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _send(self, index: int, started: float, seconds: float) -> None:
        import grpc

        stub = self._stubs[index]
        # The threads' schedules interleave, so requests arrive evenly.
        offset = self._interval * index / CLIENT_THREADS
        k = 0
        while True:
            scheduled = started + offset + k * self._interval
            if scheduled - started >= seconds:
                return
            k += 1
            wait = scheduled - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            request = self._requests[(index + k) % len(self._requests)]
            try:
                response = stub.Predict(request, timeout=10)
                version = response.model_spec.version.value
            except grpc.RpcError as e:
                version = -1
                with self._lock:
                    self.errors.append(f"{e.code().name}: {e.details()}")
            latency = time.monotonic() - scheduled
            with self._lock:
                self.samples.append((scheduled - started, latency, version))

    def close(self) -> None:
        for c in self._channels:
            c.close()


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds, and the count."""
    ms = np.asarray(latencies_s) * 1000
    if not len(ms):
        return {"requests": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# --------------------------------------------------------------------------------------------
# One phase


def run_phase(
    phase: str,
    server: Any,
    requests: list[Any],
    export: Path,
    base: Path,
    version: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One phase on a running server; ``version`` is the number a deploy takes."""
    clients = Clients(server.target, requests, args.rate)
    deployed_at: list[float] = []

    # The copy is made beforehand: during the phase, the deploy is the rename that puts the
    # version in place (what `widedeep deploy` does last), and this process only measures.
    staging = (
        stage_copy(export, base, version, broken=phase == "broken") if phase != "steady" else None
    )
    started = time.monotonic() + 0.2

    def deploy_later() -> None:
        time.sleep(max(0.0, started + args.swap_at - time.monotonic()))
        staging.rename(base / str(version))
        deployed_at.append(time.monotonic() - started)

    deployer = None
    if phase != "steady":
        deployer = threading.Thread(target=deploy_later, daemon=True)
        deployer.start()
    clients.run(args.seconds, started)
    if deployer is not None:
        deployer.join()
    clients.close()
    samples = clients.samples
    swap_at = deployed_at[0] if deployed_at else args.swap_at
    window = [lat for t, lat, _ in samples if swap_at <= t < swap_at + WINDOW_S]
    outside = [lat for t, lat, _ in samples if not swap_at <= t < swap_at + WINDOW_S]
    new = [t for t, _, v in samples if v == version]
    return {
        "phase": phase,
        "deployed_at_s": round(swap_at, 2) if deployed_at else None,
        "switched_after_s": round(min(new) - swap_at, 2) if new and deployed_at else None,
        "versions": sorted({v for _, _, v in samples}),
        "errors": len(clients.errors),
        "error_examples": clients.errors[:3],
        "all": percentiles([lat for _, lat, _ in samples]),
        "window": percentiles(window),
        "outside_window": percentiles(outside),
        "load_average": load_average(),
        "samples": [(round(t, 4), round(lat, 5), v) for t, lat, v in samples],
    }


# --------------------------------------------------------------------------------------------
# Report


def markdown(data: dict[str, Any]) -> str:
    """The results as the table the README quotes."""
    lines = [
        f"Version swap on {data['machine']['cpus']} CPUs: {CLIENT_THREADS} client threads, "
        f"{data['rate']:g} Predict requests/s each of {BATCH} candidates (gRPC), "
        f"{data['seconds']:g} s a phase, the deploy at {data['swap_at']:g} s; p99 of the "
        f"{WINDOW_S:g} s from the deploy on vs the steady phase's p99 (target <= "
        f"{TARGET_RATIO}x). Load average before: {data['load_before']}, after: "
        f"{data['load_after']}.",
        "",
        "| server | phase | requests | errors | p50 ms | p99 ms | max ms | p99 ms, 10 s from the "
        "deploy | vs steady p99 | each round | new version answers after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for mode, rounds in data["modes"].items():
        for phase in [p for p in PHASES if p in rounds[0]]:
            rows = [r[phase] for r in rounds]
            reference = "steady" if "steady" in rounds[0] else phase
            steady = np.median([r[reference]["all"]["p99_ms"] for r in rounds])
            window = np.median([r["window"]["p99_ms"] for r in rows])
            switched = [r["switched_after_s"] for r in rows if r["switched_after_s"] is not None]
            # Each round's window p99 against its own steady p99.
            each = ", ".join(
                f"{r['window']['p99_ms'] / s[reference]['all']['p99_ms']:.2f}x"
                for r, s in zip(rows, rounds, strict=True)
            )
            lines.append(
                f"| {mode} | {phase} | {sum(r['all']['requests'] for r in rows):,} | "
                f"{sum(r['errors'] for r in rows)} | "
                f"{np.median([r['all']['p50_ms'] for r in rows]):.2f} | "
                f"{np.median([r['all']['p99_ms'] for r in rows]):.2f} | "
                f"{max(r['all']['max_ms'] for r in rows):.0f} | {window:.2f} | "
                f"{window / steady:.2f}x | {each} | "
                + (f"{np.median(switched):.1f} s" if switched else "-")
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--report", action="store_true", help="write swap.md again from swap.json; run nothing"
    )
    parser.add_argument("--rows", type=int, default=200_000, help="simulated rows to train on")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of a phase")
    parser.add_argument("--swap-at", type=float, default=20.0, help="when the deploy happens")
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s of each thread")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three phases")
    parser.add_argument("--modes", default=",".join(MODES), help="server modes to run")
    parser.add_argument("--phases", default=",".join(PHASES), help="phases to run")
    parser.add_argument("--reuse", action="store_true", help="reuse a model trained before")
    args = parser.parse_args()
    if args.report:
        from bench.common import RESULTS

        data = json.loads((RESULTS / "swap.json").read_text())
        write_results("swap", data, markdown(data))
        return

    from bench.serving_bench import prepare_model, start_server
    from transform.artifacts import predict_request, read_raw_eval_examples

    load_before = load_average()
    say(f"load average {load_before}")
    data_dir, model, _ = prepare_model(args.rows, WORK, args.reuse)
    export = model / "export"
    examples = read_raw_eval_examples(data_dir, BATCH * 20, drop="installed")  # the label
    requests = [
        predict_request(MODEL_NAME, examples[i : i + BATCH]) for i in range(0, len(examples), BATCH)
    ]

    modes = {m: MODES[m] for m in args.modes.split(",")}
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode, flags in modes.items():
            base = WORK / "swap_base" / MODEL_NAME
            shutil.rmtree(base.parent, ignore_errors=True)
            base.mkdir(parents=True)
            deploy_copy(export, base, 1)
            server = start_server(base, WORK / f"swap_server_{mode.replace(' ', '_')}.log", flags)
            try:
                server.wait_for_version(1, 180)
                version = 2
                outcome = {}
                for phase in args.phases.split(","):
                    say(f"round {round_ + 1}, server {mode}: {phase}")
                    outcome[phase] = run_phase(phase, server, requests, export, base, version, args)
                    row = outcome[phase]
                    say(
                        f"  p50 {row['all']['p50_ms']} ms, p99 {row['all']['p99_ms']} ms, "
                        f"window p99 {row['window']['p99_ms']} ms, errors {row['errors']}, "
                        f"switched after {row['switched_after_s']} s, versions {row['versions']}"
                    )
                    if phase != "steady":
                        version += 1
                results[mode].append(outcome)
            finally:
                server.stop()
    data = {
        "machine": machine(),
        "rows": args.rows,
        "seconds": args.seconds,
        "swap_at": args.swap_at,
        "rate": args.rate,
        "client_threads": CLIENT_THREADS,
        "batch": BATCH,
        "window_s": WINDOW_S,
        "target_ratio": TARGET_RATIO,
        "load_before": load_before,
        "load_after": load_average(),
        "modes": results,
    }
    # Every request's (time, latency, version), for a closer look; not part of the results.
    samples = {
        mode: [{phase: outcome.pop("samples") for phase, outcome in r.items()} for r in rounds]
        for mode, rounds in results.items()
    }
    (WORK / "swap_samples.json").write_text(json.dumps(samples))
    write_results("swap", data, markdown(data))


if __name__ == "__main__":
    main()
