"""`widedeep query` over TF Serving's REST API, against the built-in server on loopback.

The model is the session's movies model; the server runs in this process with both APIs, so a
query ranked through REST can be compared with the same query ranked through gRPC. Retries and
deadlines are checked against a stub HTTP server that answers as TF Serving does.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from serving.client import (
    ClientSettings,
    Endpoint,
    ExampleEncoder,
    RankingClient,
    ScoringError,
    saved_model_input_types,
)
from serving.release.validate import score_in_process
from serving.server import ModelServer, ServerSettings
from transform.artifacts import export_dir

QUERY = {"user_id": 3, "occupation": "writer", "user_age": 31, "recent_movies": ["m1", "m2"]}
CANDIDATES = [
    {"movie_id": f"m{i}", "genres": ["drama"], "release_year": 1990 + i, "popularity": 0.1 * i}
    for i in range(30)
]
QUICK = ClientSettings(timeout_s=3.0, retries=1)


@pytest.fixture(scope="module")
def server(movies_model: Path, movies_small_config, tmp_path_factory) -> Iterator[ModelServer]:
    """The built-in server on the movies model, gRPC and REST on free loopback ports."""
    base = tmp_path_factory.mktemp("rest_base") / movies_small_config.model_name
    base.mkdir()
    (base / "1").symlink_to(export_dir(movies_model).absolute())
    settings = ServerSettings(
        model_name=movies_small_config.model_name,
        model_base_path=str(base),
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    )
    with ModelServer(settings) as started:
        assert started.wait_until_available(settings.model_name, 1, timeout=60)
        yield started


def _grpc(server: ModelServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def _rest(server: ModelServer) -> str:
    return f"http://127.0.0.1:{server.rest_api_port}"


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, held for the block: bound but not listening, so a
    connection is refused and no other process can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Against the built-in server


@pytest.mark.parametrize("batch_size, parallelism", [(30, 1), (7, 3), (1, 4)])
def test_rest_and_grpc_rank_a_query_identically(
    server: ModelServer, movies_model: Path, movies_small_config, batch_size: int, parallelism: int
) -> None:
    config = movies_small_config
    settings = ClientSettings(batch_size=batch_size, parallelism=parallelism)
    with RankingClient(_grpc(server), config.model_name, settings, config=config) as client:
        by_grpc = client.rank(QUERY, CANDIDATES)
    with RankingClient(_rest(server), config.model_name, settings, config=config) as client:
        by_rest = client.rank(QUERY, CANDIDATES)
    assert [r.candidate["movie_id"] for r in by_rest] == [r.candidate["movie_id"] for r in by_grpc]
    assert [r.score for r in by_rest] == [r.score for r in by_grpc]
    assert [r.rank for r in by_rest] == list(range(1, len(CANDIDATES) + 1))
    # And both are the model's own scores (examples typed as the model parses them).
    types = saved_model_input_types(export_dir(movies_model))
    examples = ExampleEncoder(config, types).encode_query(QUERY, CANDIDATES)
    expected = score_in_process(movies_model, examples)
    got = {r.candidate["movie_id"]: r.score for r in by_rest}
    np.testing.assert_allclose(
        [got[c["movie_id"]] for c in CANDIDATES], expected, rtol=0, atol=1e-5
    )


def test_rest_names_a_version_in_the_path(server: ModelServer, movies_small_config) -> None:
    name = movies_small_config.model_name
    with RankingClient(_rest(server), name, QUICK, movies_small_config, version=1) as client:
        assert client.score(QUERY, CANDIDATES[:3]).shape == (3,)
    with (
        RankingClient(_rest(server), name, QUICK, movies_small_config, version=7) as client,
        pytest.raises(ScoringError, match=r"HTTP 404 NOT_FOUND: .*Specific\(.*, 7\)"),
    ):
        client.score(QUERY, CANDIDATES[:3])


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_unknown_model_is_named(server: ModelServer, api: str) -> None:
    target = _rest(server) if api == "rest" else _grpc(server)
    with (
        RankingClient(target, "no_such_model", QUICK) as client,
        pytest.raises(ScoringError, match=r"no_such_model: .*NOT_FOUND.*no_such_model"),
    ):
        client.score(QUERY, CANDIDATES[:2])


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_unreachable_server_says_so(api: str) -> None:
    with (
        _closed_port() as port,
        RankingClient(
            target := f"http://127.0.0.1:{port}" if api == "rest" else f"127.0.0.1:{port}",
            "m",
            QUICK,
        ) as client,
        pytest.raises(ScoringError, match=f"cannot reach the model server at {target}"),
    ):
        client.score(QUERY, CANDIDATES[:2])


@pytest.mark.parametrize("api", ["grpc", "rest"])
def test_a_query_waits_for_a_server_that_is_still_starting(
    movies_model: Path, movies_small_config, tmp_path: Path, api: str
) -> None:
    name = movies_small_config.model_name
    base = tmp_path / name
    base.mkdir()
    (base / "1").symlink_to(export_dir(movies_model).absolute())
    with _closed_port() as port:
        pass  # a port nothing listens on; the server takes it once the client is waiting
    settings = ServerSettings(
        model_name=name,
        model_base_path=str(base),
        port=port if api == "grpc" else 0,
        rest_api_port=port if api == "rest" else 0,
        file_system_poll_wait_seconds=0,
    )
    target = f"http://127.0.0.1:{port}" if api == "rest" else f"127.0.0.1:{port}"
    said: list[str] = []
    servers: list[ModelServer] = []

    def start_server(line: str) -> None:
        said.append(line)
        servers.append(ModelServer(settings).__enter__())

    try:
        with RankingClient(target, name, QUICK, movies_small_config) as client:
            client.wait_until_serving(60, on_wait=start_server)
            ranked = client.rank(QUERY, CANDIDATES)
    finally:
        for started in servers:
            started.__exit__(None, None, None)
    assert len(said) == 1 and f"waiting up to 60 s for {name!r} at {target}" in said[0], said
    assert len(ranked) == len(CANDIDATES)


def test_waiting_for_a_server_that_never_comes_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"query": QUERY, "candidates": []})))
    with _closed_port() as port:
        argv = ["query", "--server", f"127.0.0.1:{port}", "--model-name", "m"]
        assert main([*argv, "--wait-for-server", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "waiting up to 0.5 s for 'm'" in err
    assert "cannot reach the model server" in err and "after waiting 0.5 s" in err, err


def test_rest_client_on_the_grpc_port_says_which_port(server: ModelServer) -> None:
    with (
        RankingClient(f"http://{_grpc(server)}", "m", QUICK) as client,
        pytest.raises(ScoringError, match="REST port"),
    ):
        client.score(QUERY, CANDIDATES[:2])


def _write_query(path: Path) -> Path:
    path.write_text(json.dumps({"query": QUERY, "candidates": CANDIDATES}))
    return path


def test_cli_query_over_rest_prints_the_grpc_ranking(
    server: ModelServer,
    movies_model: Path,
    movies_small_config,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = _write_query(tmp_path / "q.json")
    rankings = []
    for target in (_grpc(server), _rest(server)):
        argv = ["query", "--server", target, "--model_name", movies_small_config.model_name]
        argv += ["--config", str(movies_model / "config.yaml"), "--query", str(query)]
        argv += ["--batch-size", "8", "--json"]
        assert main(argv) == 0
        rankings.append(json.loads(capsys.readouterr().out))
    assert rankings[0] == rankings[1]
    assert len(rankings[1]) == len(CANDIDATES)


@pytest.mark.parametrize(
    "server_arg, message",
    [
        ("http://127.0.0.1:{rest}", "no_such_model: HTTP 404 NOT_FOUND"),
        ("ftp://127.0.0.1:{rest}", "--server: unknown scheme 'ftp'"),
        ("http://127.0.0.1:{free}", "cannot reach the model server"),
    ],
)
def test_cli_query_errors_are_one_line_and_exit_2(
    server: ModelServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    server_arg: str,
    message: str,
) -> None:
    with _closed_port() as closed:
        target = server_arg.format(rest=server.rest_api_port, free=closed)
        argv = ["query", "--server", target, "--model_name", "no_such_model", "--timeout", "2"]
        assert main([*argv, "--query", str(_write_query(tmp_path / "q.json"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("widedeep query: error:")
    assert message in err


# --------------------------------------------------------------------------------------------
# Against a stub that answers as TF Serving does


class _Stub:
    """An HTTP server whose answers a test scripts; it records every request."""

    def __init__(self, answer: Callable[[int, dict[str, Any]], tuple[int, Any]]):
        self.requests: list[tuple[str, dict[str, Any]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, body))
                status, document = answer(len(stub.requests), body)
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[..., _Stub]]:
    made: list[_Stub] = []

    def make(answer: Callable[[int, dict[str, Any]], tuple[int, Any]]) -> _Stub:
        made.append(_Stub(answer))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _scores(body: dict[str, Any]) -> list[list[float]]:
    return [[0.25] for _ in body["instances"]]


def test_request_is_tf_serving_row_format_and_503_is_retried(stub) -> None:
    def answer(n: int, body: dict[str, Any]) -> tuple[int, Any]:
        if n <= 2:
            return 503, {"error": "Servable not available yet"}
        return 200, {"predictions": _scores(body)}

    server = stub(answer)
    examples = ExampleEncoder().encode_query(QUERY, CANDIDATES[:3])
    settings = ClientSettings(batch_size=5, retries=3, timeout_s=10)
    with RankingClient(server.url + "/prefix/", "ranker", settings, version=4) as client:
        scores = client.score_examples(examples)
    np.testing.assert_array_equal(scores, np.full(3, 0.25, dtype=np.float32))
    assert len(server.requests) == 3
    path, body = server.requests[-1]
    assert path == "/prefix/v1/models/ranker/versions/4:predict"
    assert body == {
        "signature_name": "serving_default",
        "instances": [{"examples": {"b64": base64.b64encode(e).decode()}} for e in examples],
    }


def test_retries_are_bounded_and_the_last_error_is_reported(stub) -> None:
    server = stub(lambda n, body: (503, {"error": "overloaded"}))
    with (
        RankingClient(server.url, "ranker", ClientSettings(retries=2, timeout_s=10)) as client,
        pytest.raises(ScoringError, match="ranker: HTTP 503 UNAVAILABLE: overloaded"),
    ):
        client.score_examples([b"x"])
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(stub) -> None:
    server = stub(lambda n, body: (400, {"error": "JSON Value: bad"}))
    with (
        RankingClient(server.url, "ranker", ClientSettings(retries=3)) as client,
        pytest.raises(ScoringError, match="HTTP 400 INVALID_ARGUMENT: JSON Value: bad"),
    ):
        client.score_examples([b"x"])
    assert len(server.requests) == 1


def test_batches_run_in_parallel_and_merge_in_order(stub) -> None:
    in_flight, peak, lock = [0], [0], threading.Lock()

    def answer(n: int, body: dict[str, Any]) -> tuple[int, Any]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        # Each example's score is its own first byte, so the merge order shows.
        values = [[base64.b64decode(i["examples"]["b64"])[0] / 255] for i in body["instances"]]
        return 200, {"predictions": values}

    server = stub(answer)
    examples = [bytes([i]) for i in range(12)]
    with RankingClient(server.url, "m", ClientSettings(batch_size=3, parallelism=4)) as client:
        scores = client.score_examples(examples)
    np.testing.assert_allclose(scores, np.arange(12) / 255, rtol=1e-6)
    assert len(server.requests) == 4 and peak[0] == 4


def test_deadline_covers_a_slow_server(stub) -> None:
    # The answer would come after 2 s: an error naming the deadline means the client gave up.
    server = stub(lambda n, body: (time.sleep(2), (200, {"predictions": _scores(body)}))[1])
    with (
        RankingClient(server.url, "ranker", ClientSettings(timeout_s=0.5)) as client,
        pytest.raises(ScoringError, match=r"deadline of 0.5 s exceeded"),
    ):
        client.score_examples([b"x"])


@pytest.mark.parametrize(
    "document, message",
    [
        ({"predictions": [[0.5], [0.5]]}, "1 candidates sent, 2 scores received"),
        ({"outputs": [[0.5]]}, "no 'predictions'"),
        ({"predictions": [{"a": [0.1], "b": [0.2]}]}, "no 'probabilities' output"),
        ({"predictions": [[float("nan")]]}, "not a finite number"),
    ],
)
def test_malformed_answers_are_refused(stub, document: dict[str, Any], message: str) -> None:
    server = stub(lambda n, body: (200, document))
    with RankingClient(server.url, "m") as client, pytest.raises(ScoringError, match=message):
        client.score_examples([b"x"])


def test_several_outputs_are_read_by_name(stub) -> None:
    server = stub(lambda n, body: (200, {"predictions": [{"probabilities": [0.75], "x": 1}]}))
    with RankingClient(server.url, "m") as client:
        assert client.score_examples([b"x"]).tolist() == [0.75]


# --------------------------------------------------------------------------------------------
# Targets and encoding


@pytest.mark.parametrize(
    "target, api, where",
    [
        ("localhost:8500", "grpc", "localhost:8500"),
        ("grpc://localhost:8500", "grpc", "localhost:8500"),
        ("dns:///serving.internal:8500", "grpc", "dns:///serving.internal:8500"),
        ("http://localhost:8501", "rest", "http://localhost:8501"),
        ("https://serving.example.com/tfs/", "rest", "https://serving.example.com/tfs"),
    ],
)
def test_server_targets(target: str, api: str, where: str) -> None:
    endpoint = Endpoint.parse(target)
    assert (endpoint.api, str(endpoint)) == (api, where)
    if target.startswith("https"):
        assert (endpoint.port, endpoint.path, endpoint.tls) == (443, "/tfs", True)


@pytest.mark.parametrize("target", ["ftp://host:1", "http://", "http://host:x", ""])
def test_bad_server_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="--server"):
        Endpoint.parse(target)


def test_query_encoding_equals_merging_the_features() -> None:
    encoder = ExampleEncoder()
    query = {"user": "u1", "age": 30, "apps": ["a", "b"], "hour": 3}
    candidates = [{"app": "c", "rating": 4.5}, {"app": "d", "hour": 5}, {}]
    got = [tf.train.Example.FromString(e) for e in encoder.encode_query(query, candidates)]
    for example, candidate in zip(got, candidates, strict=True):
        merged = {k: encoder.feature(k, v) for k, v in {**query, **candidate}.items()}
        assert example == tf.train.Example(features=tf.train.Features(feature=merged))
    # A candidate's own value of a query feature wins, as the model's parser reads it.
    parsed = tf.io.parse_example(
        encoder.encode_query(query, candidates), {"hour": tf.io.FixedLenFeature([1], tf.int64)}
    )
    assert parsed["hour"].numpy().ravel().tolist() == [3, 5, 3]
