"""Benchmark of the server under abuse: good requests while another client sends bad ones.

The default ``app_store`` model (trained as in ``serving_bench.py``, and shared with it through
``--reuse``) is served by ``widedeep serve --builtin`` with its default limits, in a child
process. One client sends good Predict requests of 200 candidates over gRPC, one at a time,
and measures their latency. A second client, in a process of its own, sends bad requests back
to back: gRPC messages over the 64 MiB limit, a 400-byte request declaring a tensor of 10^8
examples, a tensor whose values do not fill its shape, strings that are not examples, bytes
that are not a message, REST bodies over the limit (which the server reads and drops so the
client gets its 429), JSON that does not parse. Three phases rotate in rounds of one run, so
all see the same machine: good requests alone, while the second client sends bad requests (the
target: p99 within 1.5x of alone), and while it sends them from four threads at once (a stress
test, no target). The server's memory is sampled throughout. Results go to
``bench/results/hardening.{json,md}``.

    python bench/hardening_bench.py [--rows 200000] [--rounds 10] [--requests 200] [--reuse]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, write_results

MODEL_NAME = "app_ranker"
CANDIDATES = 200
TARGET_RATIO = 1.5
OVERSIZED_BYTES = 70 << 20  # over the default limit of 64 MiB on both APIs
DEADLINE_S = 60.0
STRESS_THREADS = 4
TARGET_PHASE = "one_client"
STRESS_PHASE = "stress"
PHASES = {"alone": 0, TARGET_PHASE: 1, STRESS_PHASE: STRESS_THREADS}
"""Each phase and the threads of the client sending bad requests meanwhile."""
PHASE_NAMES = {
    "alone": "alone",
    TARGET_PHASE: "while a second client sends bad requests",
    STRESS_PHASE: f"while a client sends bad requests from {STRESS_THREADS} threads (stress)",
}


def say(text: str) -> None:
    """Progress, as the run goes."""
    print(f"[hardening bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# The second client: bad requests, back to back, in its own process


def bad_requests(model_name: str) -> list[tuple[str, str, Any]]:
    """Each kind of bad request: (name, API, what to send)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from transform.artifacts import EXAMPLES_INPUT

    def predict(values: list[bytes], dims: list[int] | None = None) -> bytes:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        tensor = request.inputs[EXAMPLES_INPUT]
        tensor.dtype = tf.string.as_datatype_enum
        for size in dims if dims is not None else [len(values)]:
            tensor.tensor_shape.dim.add(size=size)
        tensor.string_val.extend(values)
        return request.SerializeToString()

    example = tf.train.Example()
    example.features.feature["country"].bytes_list.value.append(b"x" * 300)
    one = example.SerializeToString()
    return [
        ("gRPC message of 70 MiB", "grpc", predict([b"x" * OVERSIZED_BYTES])),
        ("gRPC tensor of 10^8 declared examples", "grpc", predict([one], [10**8])),
        ("gRPC shape [3] with 2 values", "grpc", predict([one, one], [3])),
        ("gRPC strings that are not examples", "grpc", predict([b"\xff\xff" + one] * 200)),
        ("gRPC bytes that are not a message", "grpc", b"\xff\xff\xff" + os.urandom(400)),
        ("REST body of 70 MiB", "rest", b" " * OVERSIZED_BYTES),
        ("REST JSON that does not parse", "rest", b'{"instances": [{"b64": "AAAA"}, '),
    ]


def attacker(target: str, rest_port: int, model_name: str, threads_count: int) -> None:
    """Sends bad requests while told to ("start"/"stop" on stdin); prints counts at "quit".

    Each of `threads_count` threads sends the next kind of bad request as soon as the last one
    was answered, each from another start in the list.
    """
    import grpc

    kinds = bad_requests(model_name)
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 2 * OVERSIZED_BYTES)]
    )
    predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    sending = threading.Event()
    done = threading.Event()
    answers: Counter[str] = Counter()

    def send_forever(index: int) -> None:
        while not done.is_set():
            if not sending.wait(0.1):
                continue
            name, api, payload = kinds[index % len(kinds)]
            index += 1
            if api == "grpc":
                try:
                    predict(payload, timeout=DEADLINE_S)
                    answers[f"{name}: OK"] += 1
                except grpc.RpcError as error:
                    answers[f"{name}: {error.code().name}"] += 1
            else:
                connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=60)
                try:
                    connection.request("POST", f"/v1/models/{model_name}:predict", body=payload)
                    answers[f"{name}: HTTP {connection.getresponse().status}"] += 1
                except OSError as error:
                    answers[f"{name}: {type(error).__name__}"] += 1
                finally:
                    connection.close()

    threads = [
        threading.Thread(target=send_forever, args=(i * len(kinds) // threads_count,), daemon=True)
        for i in range(threads_count)
    ]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "start":
            sending.set()
        elif command == "stop":
            sending.clear()
        elif command == "quit":
            break
        print(f"ack {command} {sum(answers.values())}", flush=True)
    sending.clear()
    done.set()
    for thread in threads:
        thread.join()
    print(json.dumps(dict(answers)), flush=True)


class Attacker:
    """The second client's process, driven through its stdin."""

    def __init__(self, target: str, rest_port: int, threads_count: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--attacker", target, str(rest_port), str(threads_count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._sent = 0
        self._expect("ready")

    def _expect(self, text: str) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith(text):
            raise RuntimeError(f"the second client said {line!r}, expected {text!r}")
        return line[len(text) :].strip()

    def command(self, text: str) -> int:
        """Sends a command, waits for its acknowledgement; returns the bad requests sent."""
        assert self._process.stdin is not None
        self._process.stdin.write(text + "\n")
        self._process.stdin.flush()
        if text == "quit":
            return 0
        self._sent = int(self._expect(f"ack {text}"))
        return self._sent

    def sent(self) -> int:
        """Bad requests answered so far (as of the last command)."""
        return self._sent

    def finish(self) -> dict[str, int]:
        """Stops the client; what the server answered to each kind of bad request."""
        self.command("quit")
        assert self._process.stdout is not None
        answers = json.loads(self._process.stdout.readline())
        self._process.wait(timeout=120)
        return answers


# --------------------------------------------------------------------------------------------
# Measuring


class MemorySampler:
    """The peak resident memory of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self.peak = self._process.memory_info().rss
        self.start = self.peak
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        """Stops sampling; returns the resident memory now."""
        self._done.set()
        self._thread.join()
        return self._process.memory_info().rss


def stats(latencies_s: list[float]) -> dict[str, float]:
    """Percentiles and mean of latencies, in ms."""
    ms = np.asarray(latencies_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "requests": int(ms.size),
    }


def good_requests(send: Callable[[], Any], count: int) -> list[float]:
    """Latencies of `count` good requests, one at a time."""
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        send()
        latencies.append(time.perf_counter() - began)
    return latencies


def markdown(data: dict[str, Any]) -> str:
    """The results as the tables the README quotes."""
    phases = data["phases"]
    lines = [
        "| good requests (gRPC, 200 candidates) | p50 | p90 | p99 | max | requests "
        "| bad requests sent |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in phases.values():
        s = phase["good"]
        sent = phase.get("bad_sent")
        rate = f"{sent:,} ({sent / phase['seconds']:.0f}/s)" if sent is not None else ""
        lines.append(
            f"| {phase['name']} | {s['p50_ms']} ms | {s['p90_ms']} ms | {s['p99_ms']} ms | "
            f"{s['max_ms']} ms | {s['requests']:,} | {rate} |"
        )
    lines += ["", "| bad request | answers |", "|---|---|"]
    by_kind: dict[str, list[str]] = {}
    for key, count in sorted(data["bad_answers"].items()):
        kind, _, answer = key.rpartition(": ")
        by_kind.setdefault(kind, []).append(f"{count:,} x {answer}")
    for kind, answers in by_kind.items():
        lines.append(f"| {kind} | {', '.join(answers)} |")
    quiet = phases["alone"]["good"]
    target = phases[TARGET_PHASE]["good"]
    stress = phases[STRESS_PHASE]["good"]
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| p99 with a second client sending bad requests / p99 without <= {TARGET_RATIO} | "
        f"{data['p99_ratio']:.2f}x ({target['p99_ms']} / {quiet['p99_ms']} ms) | "
        f"{'yes' if data['met'] else 'no'} |",
        f"| (stress, no target) the same with {STRESS_THREADS} threads sending bad requests | "
        f"{stress['p99_ms'] / quiet['p99_ms']:.2f}x ({stress['p99_ms']} / {quiet['p99_ms']} ms) "
        "| |",
        "",
        f"Server: `widedeep serve --builtin` with its default limits, in its own process; its "
        f"resident memory was {data['server_rss_mib']['start']} MiB at the start, "
        f"{data['server_rss_mib']['peak']} MiB at its peak and {data['server_rss_mib']['end']} "
        f"MiB at the end. Good client: the tensorflow-serving-api stub, one request of "
        f"{CANDIDATES} eval examples at a time, {data['requests_per_phase']} requests a phase; "
        f"{data['rounds']} rounds of the three phases, in an order that rotates. The second "
        "client runs in its own process; each of its threads sends the next bad request (the "
        "kinds in turn) as soon as the last one was answered. Good requests failed: "
        f"{data['good_failures']}.",
        "",
        f"Measured {data['machine']['date']} on {data['machine']['cpus']} cores, "
        f"{data['machine']['memory_gib']} GiB, Python {data['machine']['python']}; load average "
        f"{data['load_before'][0]} before, {data['load_after'][0]} after (1 min).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="simulated rows to train on")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the three phases")
    parser.add_argument("--requests", type=int, default=200, help="good requests per phase")
    parser.add_argument("--reuse", action="store_true", help="reuse a model trained before")
    parser.add_argument("--attacker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        attacker(args.attacker[0], int(args.attacker[1]), MODEL_NAME, int(args.attacker[2]))
        return

    import shutil

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from bench.serving_bench import prepare_model, start_server

    load_before = load_average()
    say(f"load average {load_before}")
    work = WORK
    work.mkdir(parents=True, exist_ok=True)
    data_dir, model, _ = prepare_model(args.rows, work, args.reuse)
    base = work / "hardening_base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(model / "export", base / MODEL_NAME / "1")
    files = sorted(str(p) for p in (data_dir / "eval_raw").glob("*.tfrecord.gz"))
    examples = [
        r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP").take(CANDIDATES)
    ]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))

    server = start_server(base / MODEL_NAME, work / "hardening_server.log", [])
    latencies: dict[str, list[float]] = {name: [] for name in PHASES}
    seconds = dict.fromkeys(PHASES, 0.0)
    sent = dict.fromkeys(PHASES, 0)
    answers: Counter[str] = Counter()
    try:
        server.wait_for_version(1, 300)
        channel = grpc.insecure_channel(server.target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        failures = 0

        def send() -> None:
            nonlocal failures
            try:
                stub.Predict(request, timeout=DEADLINE_S)
            except grpc.RpcError:
                failures += 1

        say("warming up")
        good_requests(send, 50)
        attackers = {
            phase: Attacker(server.target, int(server.rest_api_port or 0), threads)
            for phase, threads in PHASES.items()
            if threads
        }
        memory = MemorySampler(server.pid or os.getpid())
        names = list(PHASES)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for phase in order:
                bad = attackers.get(phase)
                before = bad.sent() if bad else 0
                if bad:
                    bad.command("start")
                began = time.monotonic()
                latencies[phase] += good_requests(send, args.requests)
                if bad:
                    bad.command("stop")
                    sent[phase] += bad.sent() - before
                seconds[phase] += time.monotonic() - began
            say(
                f"round {round_index + 1}/{args.rounds}: p99 "
                + ", ".join(f"{name} {stats(latencies[name])['p99_ms']} ms" for name in names)
            )
        end_rss = memory.stop()
        for bad in attackers.values():
            answers.update(bad.finish())
        channel.close()
        if not server.running:
            raise RuntimeError(f"the server died:\n{server.log()}")
    finally:
        server.stop()
    phases = {
        name: {
            "name": PHASE_NAMES[name],
            "attack_threads": PHASES[name],
            "good": stats(latencies[name]),
            "seconds": round(seconds[name], 1),
            **({"bad_sent": sent[name]} if PHASES[name] else {}),
        }
        for name in names
    }
    ratio = phases[TARGET_PHASE]["good"]["p99_ms"] / phases["alone"]["good"]["p99_ms"]
    data = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "rounds": args.rounds,
        "requests_per_phase": args.requests,
        "phases": phases,
        "p99_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "good_failures": failures,
        "bad_answers": dict(answers),
        "server_rss_mib": {
            "start": round(memory.start / 2**20),
            "peak": round(memory.peak / 2**20),
            "end": round(end_rss / 2**20),
        },
    }
    write_results("hardening", data, markdown(data))


if __name__ == "__main__":
    main()
