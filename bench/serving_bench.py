"""Benchmark of serving, the paper's Table 2: latency of scoring one query's 200 candidates.

Trains the default ``app_store`` model on a simulated day (``widedeep simulate``, ``datagen``,
``train``), deploys its SavedModel into a model base path and starts ``widedeep serve`` on it
in a child process. One query (a user's and context features from the eval split) with 200
distinct candidate apps is then scored through gRPC with the standard
``tensorflow-serving-api`` client (``RankingClient``) as 1 batch of 200, 2 batches of 100 in
parallel and 4 of 50 in parallel, and, beside it in the same run, by the same SavedModel
called in this process on the same 200 serialized examples (the floor: no RPC, no server).
Served and in-process requests alternate in rounds, so both see the same background load.
A reference series runs the same requests against :func:`minimal_server`, the least a Python
gRPC server can do around the model, to separate what Python gRPC costs on this machine from
what the built-in server adds. Then throughput: candidates scored per second with 1, 2, 4 and 8 client threads, each
ranking 200 candidates a query. Results go to ``bench/results/serving.{json,md}``.

    python bench/serving_bench.py [--rows 200000] [--requests 500] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, free_port, machine, python_cmd, run_child, write_results
from serving.release.server_process import ServerProcess

MODEL_NAME = "app_ranker"
CANDIDATES = 200
SPLITS = ((200, 1), (100, 2), (50, 4))
CONCURRENCY = (1, 2, 4, 8)
ROUNDS = 10
WARMUP = 30
THROUGHPUT_SECONDS = 3.0
BREAKDOWN_REQUESTS = 150
TARGET_P99_MS = 10.0
TARGET_RATIO = 1.3
# Cheng et al. (2016), Table 2: serving latency of 200 candidates on Google's servers.
PAPER_MS = {(200, 1): 31, (100, 2): 17, (50, 4): 14}
QUERY_FEATURES = (
    "country",
    "language",
    "gender",
    "user_age",
    "installed_apps",
    "device",
    "hour",
    "day_of_week",
)


def say(text: str) -> None:
    """Progress, as the run goes."""
    print(f"[serving bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# The model and the query


def prepare_model(rows: int, work: Path, reuse: bool) -> tuple[Path, Path, dict[str, float]]:
    """Simulated logs -> datagen -> train with the app_store config; returns data, model."""
    logs, data, model = work / "serving_logs", work / "serving_data", work / "serving_model"
    if reuse and (model / "export" / "saved_model.pb").exists():
        say(f"reusing {model}")
        return data, model, {}
    for folder in (logs, data, model):
        shutil.rmtree(folder, ignore_errors=True)
    cli = ("-m", "pipeline.cli")
    say(f"simulating {rows:,} rows")
    simulate_s, _ = run_child(
        python_cmd(*cli, "simulate", "--out", str(logs), "--rows-per-day", str(rows), "--seed", "7")
    )
    say("datagen (DirectRunner)")
    datagen_s, _ = run_child(
        python_cmd(
            *cli, "datagen", "--config", "app_store", "--input", str(logs), "--out", str(data)
        )
    )
    say("training the default app_store model")
    train_s, _ = run_child(
        python_cmd(
            *cli,
            "train",
            "--config",
            "app_store",
            "--data",
            str(data),
            "--out",
            str(model),
            "--quiet",
        )
    )
    shutil.rmtree(logs, ignore_errors=True)
    return data, model, {"simulate": simulate_s, "datagen": datagen_s, "train": train_s}


def build_query(data: Path, config: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One eval user's query features and 200 distinct candidate apps of the eval split."""
    import tensorflow as tf

    from transform.artifacts import read_raw_eval_examples

    examples = [tf.train.Example.FromString(r) for r in read_raw_eval_examples(data, 50_000)]

    def values(example: Any, name: str) -> list[Any]:
        feature = example.features.feature[name]
        kind = feature.WhichOneof("kind")
        raw = list(getattr(feature, kind).value) if kind else []
        return [v.decode() if isinstance(v, bytes) else v for v in raw]

    candidate_features = [f.column for f in config.features if f.column not in QUERY_FEATURES]
    user = examples[0]
    query = {name: values(user, name) for name in QUERY_FEATURES}
    query = {k: v if k == "installed_apps" else v[0] for k, v in query.items()}
    candidates: dict[str, dict[str, Any]] = {}
    for example in examples:
        app = values(example, "impression_app")[0]
        if app not in candidates:
            candidates[app] = {name: values(example, name)[0] for name in candidate_features}
            if len(candidates) == CANDIDATES:
                break
    if len(candidates) < CANDIDATES:
        raise SystemExit(f"only {len(candidates)} distinct apps in the eval split")
    return query, list(candidates.values())


# --------------------------------------------------------------------------------------------
# The server


def start_server(base: Path, log: Path, flags: Sequence[str]) -> ServerProcess:
    """The built-in server (gRPC and REST) on the base path, in a child process."""
    server = ServerProcess(
        base, MODEL_NAME, log, rest_api_port=free_port(), flags=["--builtin", *flags]
    )
    server.start()
    return server


def minimal_server(port: int, model_dir: str) -> None:
    """A reference: the least a Python gRPC Predict server can do, run in a child process.

    The same SavedModel and request protos as the built-in server, with TensorFlow's default
    thread pools, but no version management, validation, metrics or error mapping: the cost of
    Python gRPC and TensorFlow in one process, which no Python server can go below.
    """
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from serving.servable import tensor_proto_from_array
    from transform.artifacts import EXAMPLES_INPUT, PROBABILITIES_OUTPUT

    function = tf.saved_model.load(model_dir).signatures["serving_default"]

    def predict(request: Any, context: Any) -> Any:
        examples = tf.constant(list(request.inputs[EXAMPLES_INPUT].string_val), tf.string)
        scores = function(examples=examples)[PROBABILITIES_OUTPUT]
        response = predict_pb2.PredictResponse()
        tensor_proto_from_array(
            scores.numpy(), scores.dtype.as_datatype_enum, response.outputs[PROBABILITIES_OUTPUT]
        )
        return response

    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start_minimal_server(model_dir: Path) -> tuple[Any, str]:
    """Starts :func:`minimal_server`; returns the process and its target once it listens."""
    import subprocess

    import grpc

    port = free_port()
    argv = python_cmd(__file__, "--minimal-server", str(port), str(model_dir))
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        # It listens only once the model is loaded.
        grpc.channel_ready_future(channel).result(timeout=120)
    return process, target


# --------------------------------------------------------------------------------------------
# Measuring


def stats(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and mean in milliseconds."""
    ms = np.asarray(latencies_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "requests": int(ms.size),
    }


def in_process_scorer(
    function: Callable[..., Any], examples: list[bytes], batch_size: int, pool: ThreadPoolExecutor
) -> Callable[[], np.ndarray]:
    """Scores the examples with the SavedModel's signature in this process, batches at once."""
    import tensorflow as tf

    from transform.artifacts import EXAMPLES_INPUT, PROBABILITIES_OUTPUT

    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]

    def one(batch: list[bytes]) -> np.ndarray:
        # As the server does: the request's strings become a tensor, the scores numpy.
        inputs = {EXAMPLES_INPUT: tf.constant(batch, dtype=tf.string)}
        return function(**inputs)[PROBABILITIES_OUTPUT].numpy().reshape(-1)

    def score() -> np.ndarray:
        if len(batches) == 1:
            return one(batches[0])
        return np.concatenate(list(pool.map(one, batches)))

    return score


def interleaved(
    series: dict[str, Callable[[], Any]], requests: int, rounds: int = ROUNDS
) -> dict[str, list[float]]:
    """Latencies of each series, measured in alternating rounds after a warmup."""
    for run in series.values():
        for _ in range(WARMUP):
            run()
    latencies: dict[str, list[float]] = {name: [] for name in series}
    per_round = max(1, requests // rounds)
    for r in range(rounds):
        for name, run in series.items():
            for _ in range(per_round):
                began = time.perf_counter()
                run()
                latencies[name].append(time.perf_counter() - began)
        say(f"  round {r + 1}/{rounds}")
    return latencies


def server_predict_time(rest_url: str) -> tuple[float, int]:
    """Total seconds the server spent in gRPC Predict handlers so far, and their number.

    From its Prometheus metrics: the handler's time from the parsed request to the response
    (finding the version, tensors from protos, the model, protos from tensors).
    """
    import urllib.request

    url = f"{rest_url}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total_us, count = 0.0, 0
    for line in text.splitlines():
        if 'API="Predict"' not in line or 'entrypoint="GRPC"' not in line:
            continue
        if line.startswith(":tensorflow:serving:request_latency_sum"):
            total_us += float(line.rsplit(" ", 1)[1])
        elif line.startswith(":tensorflow:serving:request_latency_count"):
            count += int(line.rsplit(" ", 1)[1])
    return total_us / 1e6, count


def throughput(
    target: str, examples: list[bytes], threads: int, seconds: float
) -> dict[str, float]:
    """Candidates per second with `threads` clients, each ranking 200 candidates a query."""
    from serving.client import ClientSettings, RankingClient

    settings = ClientSettings(batch_size=CANDIDATES, parallelism=1, timeout_s=30.0)
    clients = [RankingClient(target, MODEL_NAME, settings) for _ in range(threads)]
    stop_at = time.monotonic() + 0.5 + seconds
    start_counting = time.monotonic() + 0.5
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def loop(i: int) -> None:
        while True:
            began = time.monotonic()
            if began >= stop_at:
                return
            clients[i].score_examples(examples)
            if began >= start_counting:
                latencies[i].append(time.monotonic() - began)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for c in clients:
        c.close()
    done = [x for per_thread in latencies for x in per_thread]
    queries_per_s = len(done) / seconds
    return {
        "threads": threads,
        "queries_per_second": round(queries_per_s, 1),
        "candidates_per_second": round(queries_per_s * CANDIDATES),
        "p50_ms": round(float(np.percentile(done, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(done, 99)) * 1000, 2),
    }


# --------------------------------------------------------------------------------------------
# Report


def split_name(batch_size: int, parallelism: int) -> str:
    if parallelism == 1:
        return f"1 batch of {batch_size}"
    return f"{parallelism} batches of {batch_size} in parallel"


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"| {CANDIDATES} candidates, one query | p50 | p90 | p99 | mean | in-process p50 "
        "| served / in-process (p50) | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["latency"]:
        floor = f"{row['in_process']['p50_ms']:.2f} ms" if row.get("in_process") else ""
        ratio = f"{row['ratio_p50']:.2f}x" if row.get("ratio_p50") else ""
        paper = f"{row['paper_ms']} ms" if row.get("paper_ms") else ""
        lines.append(
            f"| {row['name']} | {row['p50_ms']:.2f} ms | {row['p90_ms']:.2f} ms "
            f"| {row['p99_ms']:.2f} ms | {row['mean_ms']:.2f} ms | {floor} | {ratio} | {paper} |"
        )
    t = data["targets"]
    b = data["breakdown_200"]
    lines += [
        "",
        "| client threads (1 batch of 200 each) | queries/s | candidates/s | p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for row in data["throughput"]:
        lines.append(
            f"| {row['threads']} | {row['queries_per_second']:,.1f} "
            f"| {row['candidates_per_second']:,} | {row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms |"
        )
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| p99 of the best split < {TARGET_P99_MS:.0f} ms | {t['best_p99_ms']:.2f} ms "
        f"({t['best_p99_split']}) | {'yes' if t['p99_met'] else 'no'} |",
        f"| best served p50 / best in-process p50 <= {TARGET_RATIO} | {t['ratio']:.3f}x "
        f"({t['best_served_p50_ms']:.2f} / {t['best_in_process_p50_ms']:.2f} ms) "
        f"| {'yes' if t['ratio_met'] else 'no'} |",
        f"| reference: the minimal Python gRPC server / in-process (p50) | "
        f"{t['minimal_over_in_process_p50']:.3f}x | |",
        f"| reference: ours / the minimal Python gRPC server (p50, both with TensorFlow's default "
        f"pools) | {t['ours_over_minimal_p50']:.3f}x | |",
        "",
        f"Server: `widedeep serve --builtin {' '.join(data['server_flags'])}` (the row marked "
        "otherwise: without the two flags), in its own process; the minimal server is "
        "`minimal_server` in this benchmark (the same SavedModel behind a bare gRPC handler, no "
        "versions, checks or metrics); client: `RankingClient` "
        "(tensorflow-serving-api stubs) in the benchmark's process, where the in-process floor "
        "runs with the same thread pools. All series alternate in rounds. "
        f"Building the {CANDIDATES} tf.Examples from the query's JSON values "
        f"(`ExampleEncoder.encode_query`, part of `widedeep query`, not of the rows above): "
        f"{data['encode_p50_ms']:.2f} ms p50. "
        f"Where the time of 1 batch of 200 goes (means of {data['breakdown_requests']} "
        f"alternating requests): {b['client_mean_ms']:.2f} ms in the client, of which "
        f"{b['server_handler_mean_ms']:.2f} ms in the server's Predict handler, of which "
        f"about {b['in_process_mean_ms']:.2f} ms is the model call itself (in process).",
        "",
        f"Measured {m['date']} on {m['cpus']} cores, {m['memory_gib']} GiB, Python "
        f"{m['python']}; load average {data['load_before'][0]} before, "
        f"{data['load_after'][0]} after (1 min). Model: `app_store` defaults trained on "
        f"{data['rows']:,} simulated rows (eval AUC {data['model_auc']:.3f}).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="simulated rows to train on")
    parser.add_argument("--requests", type=int, default=500, help="requests per measurement")
    parser.add_argument("--reuse", action="store_true", help="reuse a model trained before")
    parser.add_argument("--minimal-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minimal_server:
        minimal_server(int(args.minimal_server[0]), args.minimal_server[1])
        return
    cpus = os.cpu_count() or 1
    # One thread per op and one op per core at once: a request runs on one core, parallel
    # batches of one query on several. The in-process floor runs with the same pools.
    intra_op, inter_op = 1, cpus
    server_flags = [
        f"--tensorflow_intra_op_parallelism={intra_op}",
        f"--tensorflow_inter_op_parallelism={inter_op}",
    ]
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)

    from serving.client import (
        ClientSettings,
        ExampleEncoder,
        RankingClient,
        saved_model_input_types,
    )
    from transform.config import load_config

    started = time.monotonic()
    load_before = load_average()
    say(f"load average {load_before}")
    config = load_config("app_store")
    data_dir, model_dir, prep_seconds = prepare_model(args.rows, WORK, args.reuse)
    auc = json.loads((model_dir / "metrics.json").read_text()).get("auc", float("nan"))

    query, candidates = build_query(data_dir, config)
    # Typed as the model parses them (its raw_features signature says how).
    encoder = ExampleEncoder(config, saved_model_input_types(model_dir / "export"))
    examples = encoder.encode_query(query, candidates)
    encode_times = []
    for _ in range(100):
        began = time.perf_counter()
        encoder.encode_query(query, candidates)
        encode_times.append(time.perf_counter() - began)
    say(f"query: {len(candidates)} candidates, {sum(map(len, examples)):,} bytes of tf.Examples")

    base = WORK / "serving_base"
    shutil.rmtree(base, ignore_errors=True)
    (base / MODEL_NAME).mkdir(parents=True)
    shutil.copytree(model_dir / "export", base / MODEL_NAME / "1")

    pool = ThreadPoolExecutor(max_workers=max(p for _, p in SPLITS))
    loaded = tf.saved_model.load(str(model_dir / "export"))
    function = loaded.signatures["serving_default"]
    say("starting the model server, and one with TensorFlow's default thread pools beside it")
    server = start_server(base / MODEL_NAME, WORK / "serving_server.log", server_flags)
    default_server = start_server(base / MODEL_NAME, WORK / "serving_server_default.log", [])
    minimal, minimal_target = start_minimal_server(model_dir / "export")
    clients: list[RankingClient] = []
    try:
        load_s = server.wait_for_version(None, timeout_s=120.0)
        default_server.wait_for_version(None, timeout_s=120.0)
        say(f"model AVAILABLE after {load_s:.1f} s")
        series: dict[str, Callable[[], Any]] = {}
        floors: dict[tuple[int, int], str] = {}
        reference = None
        for batch_size, parallelism in SPLITS:
            floor = in_process_scorer(function, examples, batch_size, pool)
            client = RankingClient(
                server.target,
                MODEL_NAME,
                ClientSettings(batch_size=batch_size, parallelism=parallelism, timeout_s=30.0),
            )
            clients.append(client)
            served = client.score_examples(examples)
            expected = floor()
            reference = expected if reference is None else reference
            difference = float(np.abs(served - expected).max())
            if difference > 1e-4:
                raise SystemExit(f"served scores differ from in-process ones by {difference}")
            key = f"grpc {batch_size}x{parallelism}"
            series[key] = lambda c=client: c.score_examples(examples)
            floors[(batch_size, parallelism)] = f"in-process {batch_size}x{parallelism}"
            series[floors[(batch_size, parallelism)]] = floor
        rest = RankingClient(
            server.rest_url, MODEL_NAME, ClientSettings(batch_size=CANDIDATES, parallelism=1)
        )
        clients.append(rest)
        np.testing.assert_allclose(rest.score_examples(examples), reference, atol=1e-4)
        series["rest 200x1"] = lambda: rest.score_examples(examples)
        default_client = RankingClient(
            default_server.target,
            MODEL_NAME,
            ClientSettings(batch_size=CANDIDATES, parallelism=1, timeout_s=30.0),
        )
        clients.append(default_client)
        series["grpc 200x1 default threads"] = lambda: default_client.score_examples(examples)
        minimal_client = RankingClient(
            minimal_target,
            MODEL_NAME,
            ClientSettings(batch_size=CANDIDATES, parallelism=1, timeout_s=30.0),
        )
        clients.append(minimal_client)
        np.testing.assert_allclose(minimal_client.score_examples(examples), reference, atol=1e-4)
        series["grpc 200x1 minimal server"] = lambda: minimal_client.score_examples(examples)
        say(
            f"latency: {args.requests} requests per series in {ROUNDS} alternating rounds, "
            f"{len(series)} series"
        )
        latencies = interleaved(series, args.requests)
        rows = []
        for batch_size, parallelism in SPLITS:
            served = stats(latencies[f"grpc {batch_size}x{parallelism}"])
            floor = stats(latencies[floors[(batch_size, parallelism)]])
            rows.append(
                {
                    "name": f"gRPC, {split_name(batch_size, parallelism)}",
                    "api": "grpc",
                    "batch_size": batch_size,
                    "parallelism": parallelism,
                    **served,
                    "in_process": floor,
                    "ratio_p50": round(served["p50_ms"] / floor["p50_ms"], 2),
                    "paper_ms": PAPER_MS[(batch_size, parallelism)],
                }
            )
        floor_200 = rows[0]["in_process"]

        def single_batch_row(key: str, name: str, api: str, **extra: Any) -> dict[str, Any]:
            """A 1 x 200 series against the in-process floor of 1 batch of 200."""
            measured = stats(latencies[key])
            return {
                "name": f"{'REST' if api == 'rest' else 'gRPC'}, {split_name(CANDIDATES, 1)}"
                + name,
                "api": api,
                **extra,
                "batch_size": CANDIDATES,
                "parallelism": 1,
                **measured,
                "in_process": floor_200,
                "ratio_p50": round(measured["p50_ms"] / floor_200["p50_ms"], 2),
            }

        default_row = single_batch_row(
            "grpc 200x1 default threads",
            ", TensorFlow's default thread pools",
            "grpc",
            server_flags=[],
        )
        minimal_row = single_batch_row(
            "grpc 200x1 minimal server",
            ", minimal Python gRPC server (reference, not ours)",
            "reference",
            server_flags=[],
        )
        rows += [default_row, minimal_row, single_batch_row("rest 200x1", "", "rest")]
        for row in rows[: len(SPLITS)]:
            floor = row["in_process"]
            rows.append(
                {
                    "name": f"in process (floor), {split_name(row['batch_size'], row['parallelism'])}",
                    "api": "in_process",
                    "batch_size": row["batch_size"],
                    "parallelism": row["parallelism"],
                    **floor,
                }
            )
        for row in rows:
            say(f"  {row['name']}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")

        say("where the time of 1 batch of 200 goes (client, server handler, model call)")
        single = clients[0]
        floor_200 = series[floors[(CANDIDATES, 1)]]
        client_s, model_s = [], []
        handler_before = server_predict_time(server.rest_url)
        for _ in range(BREAKDOWN_REQUESTS):
            began = time.perf_counter()
            single.score_examples(examples)
            client_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            floor_200()
            model_s.append(time.perf_counter() - began)
        handler_after = server_predict_time(server.rest_url)
        handler_ms = (
            (handler_after[0] - handler_before[0])
            / max(1, handler_after[1] - handler_before[1])
            * 1000
        )
        breakdown = {
            "client_mean_ms": round(float(np.mean(client_s)) * 1000, 2),
            "server_handler_mean_ms": round(handler_ms, 2),
            "in_process_mean_ms": round(float(np.mean(model_s)) * 1000, 2),
        }
        say(f"  {breakdown}")

        say(f"throughput: {THROUGHPUT_SECONDS:.0f} s at each of {CONCURRENCY} client threads")
        tput = []
        for threads in CONCURRENCY:
            tput.append(throughput(server.target, examples, threads, THROUGHPUT_SECONDS))
            say(f"  {threads} threads: {tput[-1]['candidates_per_second']:,} candidates/s")
    finally:
        for client in clients:
            client.close()
        server.stop()
        default_server.stop()
        minimal.terminate()
        minimal.wait()
    pool.shutdown()
    shutil.rmtree(base, ignore_errors=True)

    for row in rows:
        row.setdefault("server_flags", server_flags if row["api"] != "in_process" else [])
    served_rows = [r for r in rows if r["api"] == "grpc"]
    floor_rows = [r for r in rows if r["api"] == "in_process"]
    best_p99 = min(served_rows, key=lambda r: r["p99_ms"])
    best_served = min(served_rows, key=lambda r: r["p50_ms"])
    best_floor = min(floor_rows, key=lambda r: r["p50_ms"])
    ratio = best_served["p50_ms"] / best_floor["p50_ms"]
    data = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "rows": args.rows,
        "model_auc": auc,
        "prep_seconds": {k: round(v, 1) for k, v in prep_seconds.items()},
        "server_flags": server_flags,
        "model_load_seconds": round(load_s, 2),
        "candidates": CANDIDATES,
        "encode_p50_ms": round(float(np.percentile(encode_times, 50)) * 1000, 2),
        "latency": rows,
        "throughput": tput,
        "breakdown_200": breakdown,
        "breakdown_requests": BREAKDOWN_REQUESTS,
        "targets": {
            "p99_ms": TARGET_P99_MS,
            "ratio": round(ratio, 3),
            "ratio_target": TARGET_RATIO,
            "best_p99_ms": best_p99["p99_ms"],
            "best_p99_split": best_p99["name"],
            "p99_met": best_p99["p99_ms"] < TARGET_P99_MS,
            "best_served_p50_ms": best_served["p50_ms"],
            "best_in_process_p50_ms": best_floor["p50_ms"],
            "ratio_met": ratio <= TARGET_RATIO,
            "ours_over_minimal_p50": round(default_row["p50_ms"] / minimal_row["p50_ms"], 3),
            "minimal_over_in_process_p50": round(
                minimal_row["p50_ms"] / minimal_row["in_process"]["p50_ms"], 3
            ),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    say(f"done in {data['seconds']:.0f} s")
    write_results("serving", data, markdown(data))


if __name__ == "__main__":
    main()
