"""The serving contract: rows typed as their log typed them, and raw JSON values, score alike.

Rows of a log are turned into tf.Examples by their own Arrow types (an int64 column as
int64_list, a double as float_list, strings as bytes_list), as a client that knows nothing of
the config would, and sent with the standard ``tensorflow-serving-api`` client over gRPC
(Predict and Classify) and as JSON over REST (:predict and :classify) to the built-in server on
loopback. Every path must give the scores the SavedModel gives the same examples in process;
the ``raw_features`` signature must give them from plain JSON values.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.client import (
    RAW_SIGNATURE,
    ClientSettings,
    RankingClient,
    ScoringError,
    saved_model_input_types,
)
from serving.release.validate import score_in_process
from serving.server import ModelServer, ServerSettings
from tests import logs
from tests.conftest import small_model
from transform.artifacts import export_dir
from transform.config import Config, Kind

ROWS = 40


# --------------------------------------------------------------------------------------------
# Helpers: a server on a model, and the APIs called as a plain client would


def _serve(model: Path, name: str, base: Path) -> ModelServer:
    folder = base / name
    folder.mkdir(parents=True)
    (folder / "1").symlink_to(export_dir(model).absolute())
    settings = ServerSettings(
        model_name=name,
        model_base_path=str(folder),
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
    )
    server = ModelServer(settings)
    server.start()
    assert server.wait_until_available(name, 1, timeout=60)
    return server


def _feature(value: Any, arrow_type: pa.DataType) -> tf.train.Feature | None:
    """A column's value as a tf.Example feature typed by the column's Arrow type."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if pa.types.is_list(arrow_type):
        arrow_type = arrow_type.value_type
    # tf.Example has no booleans and no decimals: a client sends 0/1 and floats.
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))


def _typed_by_arrow(table: pa.Table, columns: Sequence[str]) -> list[bytes]:
    """Serialized tf.Examples of the rows, every column typed by its own Arrow type."""
    out = []
    for row in table.select(list(columns)).to_pylist():
        feats = {}
        for name, value in row.items():
            feature = _feature(value, table.schema.field(name).type)
            if feature is not None:
                feats[name] = feature
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out


def _json_example(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """A row as a JSON example of TF Serving's REST classify API, by the row's Arrow types."""
    out = {}
    for name, value in row.items():
        if value is None:
            continue
        # REST types a JSON number by its form: 31 is int64, 31.0 float; true is int64 1.
        kind = schema.field(name).type
        if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            value = float(value)
        out[name] = value
    return out


def _columns(config: Config) -> list[str]:
    return list(dict.fromkeys(f.column for f in config.features))


def _predict(server: ModelServer, name: str, examples: list[bytes]) -> np.ndarray:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples, dtype=tf.string))
        response = stub.Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["probabilities"]).ravel()


def _classify(server: ModelServer, name: str, examples: list[bytes]) -> np.ndarray:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = "classification"
        for e in examples:
            request.input.example_list.examples.add().ParseFromString(e)
        response = stub.Classify(request, timeout=30)
    return np.array(
        [{c.label: c.score for c in r.classes}["1"] for r in response.result.classifications]
    )


def _post(server: ModelServer, path: str, document: Any) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps(document))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _rest_predict_b64(server: ModelServer, name: str, examples: list[bytes]) -> np.ndarray:
    instances = [{"b64": base64.b64encode(e).decode()} for e in examples]
    status, answer = _post(server, f"/v1/models/{name}:predict", {"instances": instances})
    assert status == 200, answer
    return np.array(answer["predictions"]).ravel()


def _rest_classify(server: ModelServer, name: str, examples: list[dict[str, Any]]) -> np.ndarray:
    document = {"signature_name": "classification", "examples": examples}
    status, answer = _post(server, f"/v1/models/{name}:classify", document)
    assert status == 200, answer
    return np.array([dict(r)["1"] for r in answer["results"]])


def _every_path(
    server: ModelServer, config: Config, model: Path, table: pa.Table
) -> dict[str, np.ndarray]:
    """The scores of the table's rows by every API, the rows typed by their Arrow types."""
    columns = _columns(config)
    examples = _typed_by_arrow(table, columns)
    name = config.model_name
    json_rows = [_json_example(r, table.schema) for r in table.select(columns).to_pylist()]
    return {
        "in process": score_in_process(model, examples),
        "gRPC Predict": _predict(server, name, examples),
        "gRPC Classify": _classify(server, name, examples),
        "REST predict": _rest_predict_b64(server, name, examples),
        "REST classify": _rest_classify(server, name, json_rows),
    }


def _assert_all_equal(scores: dict[str, np.ndarray]) -> None:
    expected = scores.pop("in process")
    assert expected.shape == (ROWS,) and np.all((expected > 0) & (expected < 1))
    for path, got in scores.items():
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=path)


# --------------------------------------------------------------------------------------------
# The movies log (Parquet): user_age is int64 in the log, release_year has missing values


@pytest.fixture(scope="module")
def movies_server(
    movies_model: Path, movies_small_config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    server = _serve(movies_model, movies_small_config.model_name, tmp_path_factory.mktemp("base"))
    yield server
    server.stop()


def test_movies_log_rows_score_through_every_api(
    movies_server: ModelServer, movies_model: Path, movies_small_config, movies_table: pa.Table
) -> None:
    table = movies_table.slice(0, ROWS)
    assert table.schema.field("user_age").type == pa.int64()
    assert table["release_year"].null_count + table["occupation"].null_count > 0
    _assert_all_equal(_every_path(movies_server, movies_small_config, movies_model, table))


def test_a_float_for_an_int64_column_is_refused_naming_it(
    movies_server: ModelServer, movies_small_config
) -> None:
    example = tf.train.Example()
    example.features.feature["user_age"].float_list.value.append(31.0)
    with pytest.raises(grpc.RpcError) as error:
        _predict(movies_server, movies_small_config.model_name, [example.SerializeToString()])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_age" in error.value.details() and "int64" in error.value.details()


def test_the_model_states_its_types_in_its_raw_signature(
    movies_server: ModelServer, movies_model: Path, movies_small_config
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{movies_server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = movies_small_config.model_name
        response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    inputs = signatures.signature_def[RAW_SIGNATURE].inputs
    assert set(inputs) == set(_columns(movies_small_config))
    dtypes = {name: tf.dtypes.as_dtype(info.dtype).name for name, info in inputs.items()}
    assert dtypes == {
        "user_id": "int64",
        "occupation": "string",
        "user_age": "int64",
        "recent_movies": "string",  # a list: its values joined by data.list_delimiter
        "movie_id": "string",
        "genres": "string",
        "release_year": "float32",
        "popularity": "float32",
    }
    assert saved_model_input_types(export_dir(movies_model)) == {
        "user_id": "int64",
        "user_age": "int64",
        "release_year": "float",
        "popularity": "float",
    }


# --------------------------------------------------------------------------------------------
# Raw JSON values over REST (and the same signature over gRPC)


def _raw_value(value: Any, feature_kind: Kind, delimiter: str) -> Any:
    if feature_kind is Kind.CATEGORICAL_LIST:
        return delimiter.join(value or [])
    if value is None:
        return "" if feature_kind is Kind.CATEGORICAL else math.nan
    return value


def _raw_instances(table: pa.Table, config: Config) -> list[dict[str, Any]]:
    kinds = {f.column: f.kind for f in config.features}
    delimiter = config.data.list_delimiter
    return [
        {k: _raw_value(v, kinds[k], delimiter) for k, v in row.items()}
        for row in table.select(_columns(config)).to_pylist()
    ]


def test_raw_json_values_over_rest_score_as_the_example_path(
    movies_server: ModelServer, movies_model: Path, movies_small_config, movies_table: pa.Table
) -> None:
    config = movies_small_config
    table = movies_table.slice(0, ROWS)
    expected = score_in_process(movies_model, _typed_by_arrow(table, _columns(config)))
    instances = _raw_instances(table, config)
    path = f"/v1/models/{config.model_name}:predict"
    # Row format: one object a candidate, plain JSON values ("" and NaN are missing values).
    status, answer = _post(
        movies_server, path, {"signature_name": RAW_SIGNATURE, "instances": instances}
    )
    assert status == 200, answer
    np.testing.assert_allclose(np.ravel(answer["predictions"]), expected, rtol=0, atol=1e-6)
    # Columnar format, the query's own columns given once for every candidate.
    inputs = {c: [i[c] for i in instances] for c in instances[0]}
    status, answer = _post(movies_server, path, {"signature_name": RAW_SIGNATURE, "inputs": inputs})
    assert status == 200, answer
    np.testing.assert_allclose(np.ravel(answer["outputs"]), expected, rtol=0, atol=1e-6)
    user = ("user_id", "occupation", "user_age")
    once = {k: [v[0]] if k in user else v[:5] for k, v in inputs.items()}
    status, answer = _post(movies_server, path, {"signature_name": RAW_SIGNATURE, "inputs": once})
    assert status == 200, answer
    same_user = [{**i, **{k: instances[0][k] for k in user}} for i in instances[:5]]
    document = {"signature_name": RAW_SIGNATURE, "instances": same_user}
    status, rows = _post(movies_server, path, document)
    assert status == 200, rows
    np.testing.assert_allclose(
        np.ravel(answer["outputs"]), np.ravel(rows["predictions"]), rtol=0, atol=1e-6
    )


def test_missing_and_malformed_raw_values_get_clear_errors(
    movies_server: ModelServer, movies_small_config, movies_table: pa.Table
) -> None:
    config = movies_small_config
    path = f"/v1/models/{config.model_name}:predict"
    instance = _raw_instances(movies_table.slice(0, 1), config)[0]
    # popularity has no default: NaN (missing) is refused, naming the column.
    document = {
        "signature_name": RAW_SIGNATURE,
        "instances": [{**instance, "popularity": math.nan}],
    }
    status, answer = _post(movies_server, path, document)
    assert status == 400 and "popularity" in answer["error"] and "no default" in answer["error"]
    # Two values where three candidates are scored.
    inputs = {k: [v, v, v] for k, v in instance.items()} | {"movie_id": ["m1", "m2"]}
    status, answer = _post(movies_server, path, {"signature_name": RAW_SIGNATURE, "inputs": inputs})
    assert status == 400 and "column movie_id has] [2]" in answer["error"]
    # A column left out entirely: TF Serving's REST API names the inputs it expects.
    partial = {k: v for k, v in instance.items() if k != "genres"}
    document = {"signature_name": RAW_SIGNATURE, "instances": [partial]}
    status, answer = _post(movies_server, path, document)
    assert status == 400 and "genres" in answer["error"]


# --------------------------------------------------------------------------------------------
# The scoring client: the query's own features once per request


QUERY = {"user_id": 3, "occupation": "writer", "user_age": 31, "recent_movies": ["m1", "m2"]}
CANDIDATES = [
    {"movie_id": f"m{i}", "genres": ["drama", "comedy"][: 1 + i % 2], "popularity": 0.1 * i}
    | ({"release_year": 1990 + i} if i % 3 else {})
    for i in range(23)
]


@pytest.mark.parametrize("api", ["grpc", "rest"])
@pytest.mark.parametrize("request_kind", ["classify", "raw"])
def test_query_sent_once_ranks_as_merged_examples(
    movies_server: ModelServer, movies_small_config, api: str, request_kind: str
) -> None:
    config = movies_small_config
    target = (
        f"http://127.0.0.1:{movies_server.rest_api_port}"
        if api == "rest"
        else f"127.0.0.1:{movies_server.grpc_port}"
    )
    base = ClientSettings(batch_size=10, parallelism=2, timeout_s=30)
    with RankingClient(target, config.model_name, base, config) as client:
        merged = client.score(QUERY, CANDIDATES)
    settings = dataclasses.replace(base, request=request_kind)
    with RankingClient(target, config.model_name, settings, config) as client:
        once = client.score(QUERY, CANDIDATES)
    assert merged.shape == (len(CANDIDATES),)
    np.testing.assert_allclose(once, merged, rtol=0, atol=1e-6)


def test_client_refuses_a_fraction_for_an_int64_column(
    movies_server: ModelServer, movies_small_config
) -> None:
    target = f"127.0.0.1:{movies_server.grpc_port}"
    config = movies_small_config
    with (
        RankingClient(target, config.model_name, ClientSettings(timeout_s=30), config) as client,
        pytest.raises(ValueError, match=r"'user_age'.*whole numbers"),
    ):
        client.score({**QUERY, "user_age": 31.5}, CANDIDATES[:2])


def test_raw_requests_need_a_model_with_the_signature(
    movies_server: ModelServer, movies_small_config
) -> None:
    settings = ClientSettings(request="raw", timeout_s=30)
    target = f"127.0.0.1:{movies_server.grpc_port}"
    with (
        RankingClient(target, "no_such_model", settings) as client,
        pytest.raises(ScoringError, match="NOT_FOUND"),
    ):
        client.score(QUERY, CANDIDATES[:2])


# --------------------------------------------------------------------------------------------
# Other logs: the app-store simulator's (int64 user_age, app_installs, app_age_days) and a
# CSV-born one (typed as pyarrow's CSV reader types it)


def _trained(config: Config, log: Path, out: Path) -> Path:
    from pipeline.datagen import run_datagen
    from trainer.train import train

    run_datagen(config, str(log), out / "data", echo=None)
    train(config, out / "data", out / "model", max_steps=30, verbose=0)
    return out / "model"


@pytest.fixture(scope="module")
def app_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Config, Path, pa.Table, ModelServer]]:
    import pyarrow.parquet as pq

    from tools.simulator import SimulatorSettings, simulate
    from transform.config import load_config

    out = tmp_path_factory.mktemp("app_store")
    settings = SimulatorSettings(num_users=1500, num_apps=200)
    simulate(out / "logs", days=1, rows_per_day=3000, seed=5, settings=settings)
    config = small_model(load_config("app_store"))
    model = _trained(config, out / "logs", out)
    table = pq.read_table(out / "logs" / "day=001")
    server = _serve(model, config.model_name, out / "base")
    yield config, model, table, server
    server.stop()


def test_app_store_log_rows_score_through_every_api(app_store) -> None:
    config, model, table, server = app_store
    for column in ("user_age", "app_installs", "app_age_days"):
        assert table.schema.field(column).type == pa.int64()
    _assert_all_equal(_every_path(server, config, model, table.slice(0, ROWS)))


def test_app_store_raw_json_values_score_as_the_example_path(app_store) -> None:
    config, model, table, server = app_store
    rows = table.slice(0, ROWS)
    expected = score_in_process(model, _typed_by_arrow(rows, _columns(config)))
    document = {"signature_name": RAW_SIGNATURE, "instances": _raw_instances(rows, config)}
    status, answer = _post(server, f"/v1/models/{config.model_name}:predict", document)
    assert status == 200, answer
    np.testing.assert_allclose(np.ravel(answer["predictions"]), expected, rtol=0, atol=1e-6)


def test_csv_born_log_rows_score_through_every_api(
    movies_table: pa.Table, movies_small_config, tmp_path: Path
) -> None:
    config = movies_small_config
    log = logs.write_csv(movies_table.slice(0, 1500), tmp_path / "log")
    model = _trained(config, log, tmp_path)
    # The rows as pyarrow's CSV reader types them: the release years (whole numbers written
    # without a decimal point) are int64 in the CSV, though double in the Parquet log.
    read = pacsv.read_csv(log / "log.csv")
    assert read.schema.field("user_age").type == pa.int64()
    assert read.schema.field("release_year").type == pa.int64()
    assert read.schema.field("popularity").type == pa.float64()
    # A list is one string of joined values in the CSV, and a client may send it so: the
    # model splits it as data generation did, and scores it as the values sent one by one.
    assert read.schema.field("genres").type == pa.string()
    split = read
    delimiter = config.data.list_delimiter
    lists = [f.column for f in config.features if f.kind is Kind.CATEGORICAL_LIST]
    for column in lists:
        values = [None if v is None else v.split(delimiter) for v in read[column].to_pylist()]
        split = split.set_column(
            split.schema.get_field_index(column), column, pa.array(values, pa.list_(pa.string()))
        )
    server = _serve(model, config.model_name, tmp_path / "base")
    try:
        scores = _every_path(server, config, model, read.slice(0, ROWS))
        # Both forms in one batch: a batch holding a joined list splits its values, and a
        # row's score must not depend on what else its batch holds.
        both = _typed_by_arrow(read.slice(0, ROWS), _columns(config))
        both += _typed_by_arrow(split.slice(0, ROWS), _columns(config))
        together = score_in_process(model, both)
        np.testing.assert_allclose(together[ROWS:], together[:ROWS], rtol=0, atol=1e-6)
        np.testing.assert_allclose(together[:ROWS], scores["in process"], rtol=0, atol=1e-6)
        _assert_all_equal(scores)
        # release_year is an int64 input here: the client fills a missing one with the
        # config's default (an int has no missing value in JSON).
        target = f"http://127.0.0.1:{server.rest_api_port}"
        settings = ClientSettings(batch_size=10, timeout_s=30)
        with RankingClient(target, config.model_name, settings, config) as client:
            merged = client.score(QUERY, CANDIDATES)
        settings = dataclasses.replace(settings, request="raw")
        with RankingClient(target, config.model_name, settings, config) as client:
            assert client.model_inputs()["release_year"] == tf.int64.as_datatype_enum
            np.testing.assert_allclose(client.score(QUERY, CANDIDATES), merged, atol=1e-6)
    finally:
        server.stop()


def test_boolean_and_decimal_columns_score_through_every_api(
    movies_table: pa.Table, movies_small_config, tmp_path: Path
) -> None:
    """A warehouse log: flags as boolean columns (an id, a number), a price as a DECIMAL."""
    import decimal

    import yaml

    from transform.config import parse_config

    rng = np.random.default_rng(3)
    table = movies_table.slice(0, 1500)
    table = table.append_column("weekend", pa.array(rng.random(len(table)) < 0.3))
    table = table.append_column("returning", pa.array(rng.random(len(table)) < 0.6))
    prices = [decimal.Decimal(f"{v:.2f}") for v in rng.uniform(0.5, 20.0, len(table))]
    table = table.append_column("price", pa.array(prices, pa.decimal128(9, 2)))
    data = yaml.safe_load(movies_small_config.to_yaml())
    data["features"]["weekend"] = {"kind": "categorical", "towers": ["wide", "deep"]}
    data["features"]["returning"] = {"kind": "numeric", "towers": ["wide", "deep"]}
    data["features"]["price"] = {"kind": "numeric", "quantiles": 5}
    data["crosses"]["weekend_x_genre"] = {"features": ["weekend", "genres"], "hash_buckets": 50}
    config = parse_config(data)
    model = _trained(config, logs.write_parquet(table, tmp_path / "log"), tmp_path)
    server = _serve(model, config.model_name, tmp_path / "base")
    try:
        _assert_all_equal(_every_path(server, config, model, table.slice(0, ROWS)))
    finally:
        server.stop()


def test_cli_query_sends_the_query_once_when_asked(
    movies_server: ModelServer, movies_small_config, tmp_path: Path, capsys
) -> None:
    from pipeline.cli import main

    query = tmp_path / "q.json"
    query.write_text(json.dumps({"query": QUERY, "candidates": CANDIDATES}))
    rankings = {}
    for kind in ("examples", "classify", "raw"):
        argv = ["query", "--server", f"http://127.0.0.1:{movies_server.rest_api_port}"]
        argv += ["--model_name", movies_small_config.model_name, "--query", str(query)]
        argv += ["--config", "movies", "--request", kind, "--json"]
        assert main(argv) == 0
        rankings[kind] = json.loads(capsys.readouterr().out)
    scores = {k: {r["candidate"]["movie_id"]: r["score"] for r in v} for k, v in rankings.items()}
    movies = [c["movie_id"] for c in CANDIDATES]
    for kind in ("classify", "raw"):
        np.testing.assert_allclose(
            [scores[kind][m] for m in movies],
            [scores["examples"][m] for m in movies],
            rtol=0,
            atol=1e-6,
        )
