"""``widedeep explain``: a planted cross found among the largest wide weights and mapped back to
its raw values, a query's scores split into parts that sum to the served score (through the
built-in server's gRPC API), and clear errors for bad input.

The log is tiny and made for the purpose: the label is 1 (mostly) exactly when ``shop`` is
``s3`` and ``item`` is ``i7``, which only the wide tower's cross of the two can learn alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests import logs

ROWS = 2400
PLANTED = ("s3", "i7")

CONFIG = """
model_name: planted
label: clicked
features:
  shop:  {kind: categorical, min_count: 1, towers: [deep]}
  item:  {kind: categorical, min_count: 1, towers: [wide, deep]}
  seen:  {kind: categorical_list, vocabulary: items, min_count: 1, towers: [deep]}
  price: {kind: numeric, quantiles: 4, towers: [wide, deep]}
crosses:
  shop_x_item: {features: [shop, item], hash_buckets: 500}
  seen_x_item: {features: [seen, item], hash_buckets: 500}
model:
  embedding_dim: 4
  hidden_units: [8]
  wide_optimizer: {name: ftrl, learning_rate: 0.5, l1_regularization: 0.001}
  deep_optimizer: {name: adagrad, learning_rate: 0.05}
training:
  batch_size: 64
  epochs: 4
data:
  eval_fraction: 0.2
"""


def planted_table(rows: int, seed: int = 0) -> pa.Table:
    """Shops and items at random; clicked (90%) iff the pair is PLANTED, else 5%."""
    rng = np.random.default_rng(seed)
    shop = np.array([f"s{i}" for i in rng.integers(0, 6, rows)])
    item = np.array([f"i{i}" for i in rng.integers(0, 10, rows)])
    # Make the planted pair common enough to be learned from a tiny log.
    boost = rng.random(rows) < 0.15
    shop[boost], item[boost] = PLANTED
    hit = (shop == PLANTED[0]) & (item == PLANTED[1])
    clicked = np.where(hit, rng.random(rows) < 0.9, rng.random(rows) < 0.05).astype(np.int64)
    seen = [[f"i{j}" for j in rng.integers(0, 10, rng.integers(0, 3))] for _ in range(rows)]
    return pa.table(
        {
            "shop": shop,
            "item": item,
            "seen": pa.array(seen, pa.list_(pa.string())),
            "price": rng.exponential(10.0, rows),
            "clicked": clicked,
        }
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The planted log, its datagen output and a model trained on it."""
    from pipeline.datagen import run_datagen
    from trainer.train import train
    from transform.config import load_config

    base = tmp_path_factory.mktemp("planted")
    table = planted_table(ROWS)
    log = logs.write_parquet(table, base / "log")
    config_path = base / "planted.yaml"
    config_path.write_text(CONFIG)
    config = load_config(config_path)
    run_datagen(config, str(log), base / "data", echo=None)
    train(config, base / "data", base / "model", verbose=0)
    return {"table": table, "log": log, "data": base / "data", "model": base / "model"}


def test_planted_cross_is_among_the_top_weights_as_its_raw_values(planted):
    from pipeline.explain import explain

    table = planted["table"]
    report = explain(planted["model"], top=5)
    crosses = [w for w in report.top if w.feature == "shop_x_item"]
    assert crosses, [w.to_dict() for w in report.top]
    best = crosses[0]
    assert best.weight > 0
    assert best.tuples[0].values == PLANTED
    assert best.value == "shop=s3 & item=i7"
    # Counted over the whole log (the default reads the log datagen recorded).
    shop, item = table["shop"].to_numpy(), table["item"].to_numpy()
    hit = (shop == PLANTED[0]) & (item == PLANTED[1])
    assert best.tuples[0].count == int(hit.sum())
    assert best.tuples[0].positives == int(table["clicked"].to_numpy()[hit].sum())
    stats = report.crosses["shop_x_item"]
    assert stats.rows_read == ROWS
    assert stats.pairs == ROWS
    assert stats.distinct_tuples == len(set(zip(shop, item, strict=True)))
    # The id is the very one the transform graph gives the pair.
    assert best.index == _transformed_cross_id(planted["data"], "s3", "i7")


def _transformed_cross_id(data_dir: Path, shop: str, item: str) -> int:
    import tensorflow as tf
    import tensorflow_transform as tft

    out = tft.TFTransformOutput(str(data_dir))
    raw = {
        "shop": tf.constant([shop]),
        "item": tf.constant([item]),
        "seen": tf.SparseTensor(
            tf.zeros([0, 2], tf.int64), tf.constant([], tf.string), tf.constant([1, 0], tf.int64)
        ),
        "price": tf.constant([1.0]),
        "clicked": tf.constant([0], tf.int64),
    }
    transformed = out.transform_raw_features(raw, drop_unused_features=True)
    return int(transformed["shop_x_item"].values.numpy()[0])


def test_every_log_format_maps_crosses_alike(planted, tmp_path: Path):
    from pipeline.explain import explain

    csv = logs.write_csv(planted["table"], tmp_path / "csv")
    parquet = explain(planted["model"], top=30)
    from_csv = explain(planted["model"], top=30, input_patterns=str(csv))
    assert [w.to_dict() for w in from_csv.top] == [w.to_dict() for w in parquet.top]
    assert from_csv.crosses["seen_x_item"].to_dict() == parquet.crosses["seen_x_item"].to_dict()
    # TFRecords of raw tf.Examples: the eval split datagen kept.
    eval_rows = explain(planted["model"], top=30, input_patterns=str(planted["data"] / "eval_raw"))
    assert 0 < eval_rows.crosses["shop_x_item"].rows_read < ROWS
    best = next(w for w in eval_rows.top if w.feature == "shop_x_item")
    assert best.tuples[0].values == PLANTED


def test_a_list_cross_and_numeric_buckets_map_back(planted):
    from pipeline.explain import explain

    report = explain(planted["model"], top=10_000, sample_rows=500)
    seen = [w for w in report.top if w.feature == "seen_x_item" and w.tuples]
    assert seen
    for w in seen:
        seen_value, item_value = w.tuples[0].values
        assert seen_value.startswith("i") and item_value.startswith("i")
    assert report.crosses["seen_x_item"].rows_read == 500
    prices = [w for w in report.top if w.feature == "price"]
    assert prices and all(w.value.startswith("[") and w.value.endswith(")") for w in prices)
    items = {w.value for w in report.top if w.feature == "item"}
    assert PLANTED[1] in items


@pytest.fixture(scope="module")
def server(planted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from serving.server import ModelServer, ServerSettings
    from transform.artifacts import export_dir

    folder = tmp_path_factory.mktemp("base") / "planted"
    folder.mkdir()
    (folder / "1").symlink_to(export_dir(planted["model"]).absolute())
    settings = ServerSettings(
        model_name="planted",
        model_base_path=str(folder),
        port=0,
        file_system_poll_wait_seconds=0,
    )
    srv = ModelServer(settings)
    srv.start()
    assert srv.wait_until_available("planted", 1, timeout=60)
    yield srv
    srv.stop()


QUERY = {
    "query": {"shop": "s3", "seen": ["i1", "i7"]},
    "candidates": [
        {"item": "i7", "price": 3.0},
        {"item": "i2", "price": 30.0},
        {"item": "i9", "price": 0.5},
        {"item": "never_seen", "price": 12.0},
    ],
}


def test_query_split_sums_to_the_served_score_through_grpc(planted, server):
    from pipeline.explain import explain_query, load_model
    from serving.client import RankingClient

    model = load_model(planted["model"])
    target = f"127.0.0.1:{server.grpc_port}"
    remote = explain_query(
        model, QUERY["query"], QUERY["candidates"], server=target, model_name="planted"
    )
    with RankingClient(target, "planted") as client:
        served = client.score(QUERY["query"], QUERY["candidates"])
    assert len(remote) == len(QUERY["candidates"])
    for c in remote:
        assert c.bias + c.wide + c.deep == pytest.approx(c.logit, abs=1e-5)
        logit = math.log(served[c.index] / (1 - served[c.index]))
        assert c.logit == pytest.approx(logit, abs=1e-4)
        assert c.probability == pytest.approx(served[c.index], abs=1e-6)
        # The wide weights that fired add up to the wide part.
        assert sum(w.weight for w in c.fired) == pytest.approx(c.wide, abs=1e-5)
    # Best first; the planted pair wins, through its cross.
    assert remote[0].candidate["item"] == "i7"
    fired = {(w.feature, w.value) for w in remote[0].fired}
    assert ("shop_x_item", "shop=s3 & item=i7") in fired
    assert ("seen_x_item", "seen=i7 & item=i7") in fired
    unknown = next(c for c in remote if c.candidate["item"] == "never_seen")
    assert ("item", "<unknown>") in {(w.feature, w.value) for w in unknown.fired}
    # In process, from the SavedModel's signature: the same split.
    local = explain_query(model, QUERY["query"], QUERY["candidates"])
    for a, b in zip(remote, local, strict=True):
        assert (a.index, a.candidate) == (b.index, b.candidate)
        assert a.wide == pytest.approx(b.wide, abs=1e-6)
        assert a.deep == pytest.approx(b.deep, abs=1e-6)


def test_cli_prints_text_and_json(planted, tmp_path: Path, capsys: pytest.CaptureFixture):
    from pipeline.cli import main

    query = tmp_path / "query.json"
    query.write_text(json.dumps(QUERY))
    args = ["explain", "--model", str(planted["model"]), "--top", "3", "--query", str(query)]
    assert main([*args, "--neighbours", "item=i7", "--num-neighbours", "2"]) == 0
    text = capsys.readouterr().out
    assert "shop=s3 & item=i7" in text
    assert "nearest embeddings to item=i7" in text
    assert "logit = bias + wide + deep" in text
    assert main([*args, "--json", "--no-crosses"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["wide"]["top"]) == 3
    assert report["wide"]["crosses"] == {}
    first = report["query"]["candidates"][0]
    parts = first["bias"] + first["wide_logit"] + first["deep_logit"]
    assert parts == pytest.approx(first["logit"], abs=1e-5)
    assert report["neighbours"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--neighbours", "colour=red"], "'colour' is not a feature of the model"),
        (["--neighbours", "price=3"], "'price' has no embedding in the deep tower"),
        (["--neighbours", "item=i999"], "'i999' is not in the vocabulary of 'item'"),
        (["--neighbours", "item"], "expected FEATURE=TOKEN"),
        (["--top", "-1"], "--top"),
        (["--server", "localhost:1"], "--server: explains a query's candidates"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    planted, capsys: pytest.CaptureFixture, extra: list[str], message: str
):
    from pipeline.cli import EXIT_USAGE, main

    assert main(["explain", "--model", str(planted["model"]), *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_model_folder_without_export_is_refused(
    planted, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from pipeline.cli import EXIT_USAGE, main

    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.yaml").write_text(CONFIG)
    assert main(["explain", "--model", str(empty)]) == EXIT_USAGE
    assert "no SavedModel" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "no such folder" in capsys.readouterr().err


def test_crosses_need_the_raw_log(planted, tmp_path: Path, capsys: pytest.CaptureFixture):
    from pipeline.cli import EXIT_USAGE, main

    args = ["explain", "--model", str(planted["model"]), "--top", "50"]
    assert main([*args, "--input", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "--input" in capsys.readouterr().err


def test_a_wide_only_model_has_no_deep_part(planted, tmp_path: Path):
    from pipeline.explain import ExplainError, explain
    from trainer.train import train
    from transform.config import load_config

    config_path = tmp_path / "planted.yaml"
    config_path.write_text(CONFIG)
    out = tmp_path / "wide"
    train(load_config(config_path), planted["data"], out, towers="wide", max_steps=20, verbose=0)
    report = explain(out, top=3, query=QUERY, map_cross_ids=False)
    assert report.top and not report.crosses
    for c in report.candidates:
        assert c.deep == 0.0
        assert c.bias + c.wide == pytest.approx(c.logit, abs=1e-5)
        assert 1 / (1 + math.exp(-c.logit)) == pytest.approx(c.probability, abs=1e-6)
    with pytest.raises(ExplainError, match="no embedding in the deep tower"):
        explain(out, neighbour_specs=["item=i7"])
