"""``widedeep run``: every stage end to end, the daily loop under queries, and resuming."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from tensorflow_serving.apis import prediction_service_pb2_grpc

from pipeline.cli import main
from pipeline.run import RunOptions, build_query, run
from tests import logs
from transform.artifacts import predict_request
from transform.config import SliceSpec, load_config

DAY_ROWS = 2500


class _Client(threading.Thread):
    """Ranks the run's example query over and over with the plain TF Serving client."""

    def __init__(self, target: str, query_file: Path, config):
        super().__init__(daemon=True)
        import grpc

        from serving.client import ExampleEncoder, RankingClient, kinds_of_inputs

        query = json.loads(query_file.read_text())
        # Typed as the served model parses them, which its raw_features signature tells.
        with RankingClient(target, config.model_name) as client:
            types = kinds_of_inputs(client.model_inputs(required=True) or {})
        examples = ExampleEncoder(config, types).encode_query(query["query"], query["candidates"])
        self.request = predict_request(config.model_name, examples)
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.stop = threading.Event()
        self.versions: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        import grpc

        while not self.stop.is_set():
            try:
                response = self.stub.Predict(self.request, timeout=10)
                self.versions.append(response.model_spec.version.value)
            except grpc.RpcError as e:
                self.errors.append(f"{e.code().name}: {e.details()}")
            self.stop.wait(0.05)

    def wait_for_version(self, version: int, timeout_s: float) -> None:
        """Waits, with a deadline, until an answer from ``version`` has come back."""
        deadline = time.monotonic() + timeout_s
        while version not in self.versions and time.monotonic() < deadline:
            self.stop.wait(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        self.channel.close()


@pytest.fixture(scope="module")
def movies_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The movies preset, small, with a loose quality gate: this is about the loop's mechanics."""
    config = load_config("movies")
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, hidden_units=(16, 8), embedding_dim=8),
        training=dataclasses.replace(config.training, batch_size=128, epochs=1),
        validation=dataclasses.replace(
            config.validation,
            auc_tolerance=0.5,
            log_loss_tolerance=1.0,
            num_candidates=50,
            latency_budget_ms=10_000,  # a gate for production; a loaded test machine is slow
            slices=(SliceSpec("occupation", min_rows=20, tolerance=0.5),),
        ),
    )
    path = tmp_path_factory.mktemp("run_config") / "movies.yaml"
    path.write_text(config.to_yaml())
    return path


@pytest.fixture(scope="module")
def movie_days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three days of movie logs, one sub-folder a day, as a user would lay them out; the
    second day's labels are all 0 (a broken log that must not be trained on)."""
    root = tmp_path_factory.mktemp("movie_days")
    for day in (1, 2, 3):
        table = logs.movies_table(DAY_ROWS, seed=day)
        if day == 2:
            column = table.schema.get_field_index("liked")
            table = table.set_column(column, "liked", pa.array([0] * DAY_ROWS, pa.int64()))
        logs.write_parquet(table, root / f"2026-11-0{day}")
    return root


@pytest.fixture(scope="module")
def three_days(movies_config: Path, movie_days: Path, tmp_path_factory: pytest.TempPathFactory):
    """A three-day loop while a client keeps querying the server it deploys to."""
    config = load_config(movies_config)
    out = tmp_path_factory.mktemp("run") / "out"
    clients: list[_Client] = []
    seen_at_end: dict[str, object] = {}

    def on_serving(target: str) -> None:
        client = _Client(target, out / "query.json", config)
        client.start()
        clients.append(client)

    def keep_serving(target: str) -> None:
        # The run ends once version 2 serves; the querying thread may not have had an answer
        # from it yet (on a busy machine): wait for one before stopping it.
        clients[0].wait_for_version(2, timeout_s=60)
        clients[0].finish()
        seen_at_end["target"] = target

    result = run(
        config,
        out,
        RunOptions(input=str(movie_days)),
        keep_serving=keep_serving,
        on_serving=on_serving,
    )
    return result, clients[0], out


def test_daily_loop_deploys_while_queries_are_answered(three_days) -> None:
    result, client, _ = three_days
    day1, day2, day3 = result.days
    assert not day1.warm_started and day1.passed and day1.version == 1
    assert day2.blocked and day2.version is None  # see the test below
    assert day3.warm_started and day3.rows_carried > 0
    assert day3.served_auc is not None  # validated against the model being served
    assert day3.passed and day3.version == 2
    assert result.served_version == 2
    # The worst slice's AUC change against the served model, in the day line and days.md.
    assert day3.worst_slice["slice"].startswith("occupation=")
    assert f"worst slice {day3.worst_slice_text}," in day3.line(3)
    assert f"| {day3.worst_slice_text} |" in (three_days[2] / "days.md").read_text()
    # The client kept getting answers, first from version 1, then from version 2.
    assert not client.errors, client.errors[:3]
    assert client.versions[0] == 1 and client.versions[-1] == 2
    assert sorted(set(client.versions)) == [1, 2]
    assert result.probe_queries > 0 and not result.probe_failures


def test_a_day_with_a_blocking_anomaly_is_not_trained_on(three_days) -> None:
    """Day 2's labels are all 0: not trained on, the server kept answering from version 1,
    and day 3 is compared with day 1, the last day whose data was accepted."""
    result, client, out = three_days
    day2 = result.days[1]
    assert "label 'liked'" in day2.blocked[0] and "labelled 0" in day2.blocked[0]
    assert "NOT TRAINED" in day2.line(3) and "label 'liked'" in day2.line(3)
    state = json.loads((out / "run.json").read_text())
    assert "day 2 datagen" in state["stages"] and "day 2 train" not in state["stages"]
    assert not (out / "models" / "day=002").exists()
    blocked = json.loads((out / "data" / "day=002" / "anomalies.json").read_text())
    assert blocked["blocking"] and blocked["reference"] == str(out / "data" / "day=001")
    day3 = json.loads((out / "data" / "day=003" / "anomalies.json").read_text())
    assert day3["reference"] == str(out / "data" / "day=001")
    assert state["accepted"]["day"] == 3
    days_md = (out / "days.md").read_text()
    assert "| 2 | 2,500 |" in days_md and "not trained: label 'liked'" in days_md
    # The client was answered by version 1 until day 3's model replaced it.
    assert not client.errors and sorted(set(client.versions)) == [1, 2]


def test_each_day_holds_out_users_of_its_own(three_days, movies_config, movie_days) -> None:
    """The movies config splits by user: with one split for every day, the same users would
    be held out of training each day and no day's model would learn them."""
    from pipeline import sources

    _, _, out = three_days
    config = load_config(movies_config)
    files = sources.preflight(config, sources.resolve_input(str(movie_days / "2026-11-01")))
    batches = [
        sources.to_tfxio_batch(config, batch, path, files.int_columns)
        for path in files.paths
        for batch in sources.iter_parquet(config, path, 100_000)
    ]

    def held_out(salt: str) -> tuple[int, set[int]]:
        rows, users = 0, set()
        for batch in batches:
            mask = sources.split_mask(config, batch, salt)
            rows += int(mask.sum())
            ids = batch.column(batch.schema.get_field_index("user_id")).flatten()
            users |= set(np.asarray(ids)[mask].tolist())
        return rows, users

    summary = json.loads((out / "data" / "day=001" / "summary.json").read_text())
    assert summary["split_salt"] == "day-001"
    rows, day1_users = held_out("day-001")
    assert summary["splits"]["eval"]["rows"] == rows  # the split datagen wrote
    assert held_out("")[0] != rows  # not the standalone datagen's split of the same log
    day3 = json.loads((out / "data" / "day=003" / "summary.json").read_text())
    assert day3["split_salt"] == "day-003"
    day3_users = held_out("day-003")[1]
    assert day1_users and day3_users
    assert len(day1_users & day3_users) < 0.5 * len(day1_users)  # ~eval_fraction of them


def test_run_writes_its_artifacts_and_ranks_through_the_endpoint(three_days) -> None:
    result, _, out = three_days
    state = json.loads((out / "run.json").read_text())
    for day in (1, 3):
        for stage in ("datagen", "train", "validate", "deploy"):
            assert f"day {day} {stage}" in state["stages"]
    assert (out / "serving" / "movie_ranker" / "2" / "saved_model.pb").exists()
    assert "| 3 |" in (out / "days.md").read_text()
    ranking = json.loads((out / "ranking.json").read_text())
    scores = [r["score"] for r in ranking["ranking"]]
    assert scores == sorted(scores, reverse=True) and len(scores) > 1
    assert ranking["version"] == 2
    # The query holds one impression's user, context and history; candidates are distinct
    # movies (the item the config infers: it shares its vocabulary with recent_movies).
    query = json.loads((out / "query.json").read_text())
    assert query["item"] == "movie_id"
    assert {"user_id", "occupation", "recent_movies"} <= set(query["query"])
    movies = [c["movie_id"] for c in query["candidates"]]
    assert len(movies) == len(set(movies)) == 50
    assert [r["candidate"]["movie_id"] for r in ranking["ranking"]] != movies  # ranked
    assert sorted(r["candidate"]["movie_id"] for r in ranking["ranking"]) == sorted(movies)
    assert 0.0 < result.metrics["auc"] <= 1.0


def test_a_second_run_continues_from_the_finished_stages(
    three_days, movies_config: Path, movie_days: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = three_days
    query = (out / "query.json").read_text()
    argv = ["run", "--config", str(movies_config), "--input", str(movie_days), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for day in (1, 3):
        for stage in ("datagen", "train", "validate", "deploy"):
            assert f"[day {day} {stage}] done before" in printed
    assert "[day 2 datagen] done before" in printed and "[day 2] not trained on" in printed
    assert "ranking of" in printed and "eval AUC" in printed
    # The same query is ranked: kept in query.json, and built the same way from the log.
    assert (out / "query.json").read_text() == query
    (out / "query.json").unlink()
    assert main(argv) == 0
    assert "candidates are distinct 'movie_id' items (inferred" in capsys.readouterr().out
    assert (out / "query.json").read_text() == query


def test_other_settings_are_refused_and_nothing_is_lost(
    three_days, movies_config: Path, movie_days: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = three_days
    before = (out / "run.json").read_text()
    code = main(
        [
            "run", "--config", str(movies_config), "--input", str(movie_days), "--out", str(out),
            "--days", "1",
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "days" in err and "--overwrite" in err
    assert (out / "run.json").read_text() == before


def test_more_days_than_the_input_holds_is_refused(
    movies_config: Path, movie_days: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run", "--config", str(movies_config), "--input", str(movie_days),
            "--out", str(tmp_path / "out"), "--days", "4",
        ]
    )  # fmt: skip
    assert code == 2
    assert "holds 3 day(s)" in capsys.readouterr().err


def test_a_config_reading_a_column_the_first_day_lacks_is_refused_before_any_work(
    movies_config: Path, movie_days: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = yaml.safe_load(movies_config.read_text())
    # The feature reads a column under a name the logs do not use.
    spec["features"]["occupation"]["column"] = "job"
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["run", "--config", str(renamed), "--out", str(out)]
    assert main([*argv, "--input", str(movie_days)]) == 2
    err = capsys.readouterr().err
    assert "2026-11-01" in err and "no column 'job' (feature 'occupation')" in err, err
    # Simulated logs have the app store's columns, not the movies'.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the simulated app-store log has no column" in err and "--input" in err, err
    assert not out.exists()  # nothing written, so a fixed config starts afresh


def test_simulated_run_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `make demo` does, on a tiny simulated day."""
    config = load_config("app_store")
    # 3,000 rows train a model for 60 steps, and its eval split holds ~25 installs: whether
    # its calibration passes is down to chance, and the test is about the stages' mechanics.
    validation = dataclasses.replace(
        config.validation,
        latency_budget_ms=10_000,
        calibration_ratio_tolerance=5.0,
        calibration_error_tolerance=1.0,
    )
    config = dataclasses.replace(config, validation=validation)
    (tmp_path / "app_store.yaml").write_text(config.to_yaml())
    out = tmp_path / "demo"
    code = main(
        [
            "run", "--config", str(tmp_path / "app_store.yaml"), "--out", str(out),
            "--rows-per-day", "3000", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "[simulate]" in printed and "[day 1 deploy] version 1" in printed
    assert "ranking of 200 candidates" in printed
    assert "offline metrics of the served model" in printed
    query = json.loads((out / "query.json").read_text())
    # One user and context; 200 distinct candidate apps.
    assert "installed_apps" in query["query"] and "country" in query["query"]
    apps = [c["impression_app"] for c in query["candidates"]]
    assert len(apps) == len(set(apps)) == 200


def test_build_query_splits_query_and_candidate_features() -> None:
    config = load_config("movies")
    rows = [
        {"user_id": u, "occupation": o, "user_age": 30, "recent_movies": ["m1"],
         "movie_id": m, "genres": [g], "release_year": 2000.0, "popularity": p}
        for u, o in ((1, "artist"), (2, "doctor"))
        for m, g, p in (("m1", "drama", 0.1), ("m2", "comedy", 0.2), ("m3", "drama", 0.3))
    ]  # fmt: skip
    built = build_query(config, rows, num_candidates=10)
    assert set(built["query"]) == {"user_id", "occupation", "user_age", "recent_movies",
                                   "release_year"}  # fmt: skip
    assert [c["movie_id"] for c in built["candidates"]] == ["m1", "m2", "m3"]
    assert set(built["candidates"][0]) == {"movie_id", "genres", "popularity"}


def test_build_query_ranks_distinct_items_for_one_impression() -> None:
    """A real log's history list and hour differ between impressions of one query: they are
    the query's (from its first impression), and an item shown twice is one candidate."""
    config = load_config("app_store")
    assert config.item_feature.name == "impression_app"
    rows = []
    for i, app in enumerate(["a1", "a2", "a1", "a3", "a2", "a4", "a1", "a5"]):
        rows.append(
            {"query_id": "q1" if i < 6 else "q2", "country": "us" if i < 6 else "fr",
             "language": "en", "gender": "f", "user_age": 30, "device": "phone",
             "installed_apps": [f"x{i}"], "hour": i % 3, "day_of_week": 2,
             "impression_app": app, "app_category": {"a1": "games"}.get(app, "tools"),
             "app_age_days": 10, "app_rating": float(len(app)), "app_installs": 5})  # fmt: skip
    built = build_query(config, rows, num_candidates=200)
    apps = [c["impression_app"] for c in built["candidates"]]
    assert apps == ["a1", "a2", "a3", "a4", "a5"]  # distinct, in order of first appearance
    assert built["item"] == "impression_app"
    # One impression of the query with most impressions (q1): its own history and hour.
    assert built["query"]["installed_apps"] == ["x0"] and built["query"]["hour"] == 0
    assert built["query"]["country"] == "us"
    assert set(built["candidates"][0]) == {"impression_app", "app_category"}
    assert build_query(config, list(rows), num_candidates=200) == built
    assert len(build_query(config, rows, num_candidates=2)["candidates"]) == 2


def test_a_run_saved_before_the_window_setting_continues(tmp_path: Path) -> None:
    """A run.json without a ``window`` ran with a one-day window: the same settings continue it
    and another window is refused."""
    from pipeline.run import STATE_FILE, RunError, _State

    config = load_config("movies")
    key = RunOptions(input=None, days=2).key(config)
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"settings": {k: v for k, v in key.items() if k != "window"}})
    )
    assert _State.open(tmp_path, key, overwrite=False).data["settings"].get("window") is None
    wider = RunOptions(input=None, days=2, window=3).key(config)
    with pytest.raises(RunError, match="window differ"):
        _State.open(tmp_path, wider, overwrite=False)
