"""Benchmark of request logging: what logging every request costs the requests.

Trains the default ``app_store`` model on a simulated day (as ``bench/serving_bench.py`` does,
sharing its model with ``--reuse``), deploys it into a model base path and starts two built-in
servers on it in child processes: one without request logging, one logging every request
(``--request_log_dir``, ``--request_log_sampling_rate=1``). Both are sent the same Predict
requests of 200 raw eval examples through the standard ``tensorflow-serving-api`` client, in
alternating rounds so both see the same background load. Then the servers are stopped and the
log is read back: records written, dropped (the writer's queue was full) and the bytes a
logged request takes. Results go to ``bench/results/request_log.{json,md}``.

    python bench/request_log_bench.py [--rows 20000] [--requests 1000] [--reuse]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, write_results
from bench.serving_bench import (
    CANDIDATES,
    MODEL_NAME,
    interleaved,
    load_average,
    prepare_model,
    start_server,
    stats,
)


def say(text: str) -> None:
    """Progress, as the run goes."""
    print(f"[request log bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def log_counts(rest_url: str) -> dict[str, int]:
    """The server's request log counters by outcome, from its Prometheus metrics."""
    with urllib.request.urlopen(f"{rest_url}/monitoring/prometheus/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(":widedeep:serving:request_log_count{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + int(line.rsplit(" ", 1)[1])
    return counts


def markdown(data: dict[str, Any]) -> str:
    """The results as the README quotes them."""
    rows = [
        "| server | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in data["latency"].items():
        rows.append(f"| {name} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['mean_ms']} |")
    log = data["log"]
    return "\n".join(
        [
            f"Predict requests of {data['candidates']} candidates, {data['requests']:,} a server "
            f"in alternating rounds, built-in servers in child processes; "
            f"{data['machine']['cpus']} CPUs, load average {data['load_average']}.",
            "",
            *rows,
            "",
            f"Logged {log['records']:,} requests in {log['files']} files "
            f"({log['bytes_per_record']:,} bytes a request), dropped {log['dropped']}, "
            f"failed {log['failed']}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="simulated rows to train on")
    parser.add_argument("--requests", type=int, default=1000, help="requests a server")
    parser.add_argument("--reuse", action="store_true", help="reuse the trained model")
    args = parser.parse_args()

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.release.skew import read_prediction_logs
    from transform import artifacts

    work = WORK / "request_log"
    work.mkdir(parents=True, exist_ok=True)
    data, model, _ = prepare_model(args.rows, WORK, args.reuse)
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    (base / MODEL_NAME).mkdir(parents=True)
    (base / MODEL_NAME / "1").symlink_to(artifacts.export_dir(model).absolute())
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    examples = artifacts.read_raw_eval_examples(data, CANDIDATES, drop="installed")
    request = artifacts.predict_request(MODEL_NAME, examples)

    servers = {
        "no logging": start_server(base / MODEL_NAME, work / "plain.log", []),
        "logging every request": start_server(
            base / MODEL_NAME,
            work / "logged.log",
            [f"--request_log_dir={logs}", "--request_log_sampling_rate=1"],
        ),
    }
    try:
        channels, series = [], {}
        for name, server in servers.items():
            server.wait_for_version(1, 300)
            channel = grpc.insecure_channel(server.target)
            channels.append(channel)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            series[name] = lambda stub=stub: stub.Predict(request, timeout=30)
        say(f"{args.requests:,} requests a server")
        latencies = interleaved(series, args.requests)
        counts = log_counts(servers["logging every request"].rest_url or "")
        for channel in channels:
            channel.close()
    finally:
        for server in servers.values():
            server.stop()
    files = artifacts.request_log_files(logs)
    records = sum(1 for _ in read_prediction_logs(logs))
    data_out = {
        "machine": machine(),
        "load_average": load_average(),
        "candidates": len(examples),
        "requests": args.requests,
        "latency": {name: stats(values) for name, values in latencies.items()},
        "log": {
            "records": records,
            "files": len(files),
            "bytes_per_record": round(sum(f.stat().st_size for f in files) / max(records, 1)),
            "logged": counts.get("logged", 0),
            "dropped": counts.get("dropped", 0),
            "failed": counts.get("failed", 0),
        },
    }
    write_results("request_log", data_out, markdown(data_out))


if __name__ == "__main__":
    main()
