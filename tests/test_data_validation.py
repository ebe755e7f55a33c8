"""Data validation: the statistics datagen computes, and the anomalies found against them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import anomalies as dv
from pipeline import statistics
from pipeline.cli import main
from pipeline.datagen import run_datagen
from pipeline.sources import MissingColumnError
from tests import logs
from transform import artifacts
from transform.config import ConfigError, Severity, load_config, parse_config

ROWS = 400


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


@pytest.fixture(scope="module")
def good_table() -> pa.Table:
    return logs.movies_table(ROWS, seed=3)


@pytest.fixture(scope="module")
def good_data(good_table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datagen output of a good day: the reference."""
    root = tmp_path_factory.mktemp("good")
    logs.write_parquet(good_table, root / "log")
    run_datagen(load_config("movies"), str(root / "log"), root / "data", echo=None)
    return root / "data"


def test_statistics_equal_a_direct_computation(good_table: pa.Table, good_data: Path) -> None:
    stats = artifacts.read_statistics(good_data)
    df = good_table.to_pandas()
    cols = stats["columns"]
    assert stats["rows"] == ROWS
    assert stats["label_rate"] == pytest.approx(df["liked"].mean())
    # A categorical column with missing values (filled by the config's default later).
    occ = cols["occupation"]
    assert occ["kind"] == "categorical" and occ["type"] == "string"
    assert occ["missing"] == df["occupation"].isna().sum()
    assert occ["missing_rate"] == pytest.approx(df["occupation"].isna().mean())
    counts = df["occupation"].value_counts()
    assert occ["distinct"] == counts.size and occ["distinct_exact"]
    assert occ["tokens"] == {k: int(v) for k, v in counts.items()}
    top_token, top_share = occ["top_tokens"][0]
    assert top_share == pytest.approx(counts.iloc[0] / counts.sum())
    assert counts[top_token] == counts.iloc[0]
    # Integer ids are counted as text.
    assert cols["user_id"]["type"] == "int"
    assert cols["user_id"]["distinct"] == df["user_id"].nunique()
    # A list column: lengths and element tokens.
    lengths = df["recent_movies"].map(len).to_numpy()
    rm = cols["recent_movies"]
    assert rm["type"] == "list<string>"
    assert rm["length"]["mean"] == pytest.approx(lengths.mean())
    assert rm["length"]["quantiles"] == pytest.approx(np.quantile(lengths, np.linspace(0, 1, 11)))
    elements = np.concatenate(df["recent_movies"].to_numpy())
    assert rm["values"] == elements.size
    assert rm["distinct"] == np.unique(elements).size
    # Numeric columns: NaN is missing; exact quantiles on a small input.
    for name in ("popularity", "release_year", "user_age"):
        x = df[name].to_numpy(dtype=float)
        x = x[~np.isnan(x)]
        s = cols[name]
        assert s["missing"] == ROWS - x.size
        assert s["mean"] == pytest.approx(x.mean())
        assert (s["min"], s["max"]) == (pytest.approx(x.min()), pytest.approx(x.max()))
        assert s["quantiles"] == pytest.approx(np.quantile(x, np.linspace(0, 1, 11)))
    assert cols["user_age"]["type"] == "int" and cols["popularity"]["type"] == "float"
    # Crosses: one product per combination of a row's present values, counted and told apart.
    for name, a, b in (
        ("recent_x_movie", "recent_movies", "movie_id"),
        ("occupation_x_genre", "occupation", "genres"),
    ):
        products = [
            (x, y)
            for xs, ys in zip(df[a], df[b], strict=True)
            for x in _values(xs)
            for y in _values(ys)
        ]
        c = stats["crosses"][name]
        assert c["products"] == len(products)
        assert c["distinct"] == len(set(products)) and c["distinct_exact"]
        assert c["per_bucket"] == pytest.approx(len(set(products)) / c["hash_buckets"])
    # No reference: only the checks that need none, and this day passes them.
    report = json.loads((good_data / artifacts.ANOMALIES_JSON).read_text())
    assert report["reference"] is None and report["anomalies"] == []
    assert "statistics (statistics.json)" in (good_data / artifacts.SUMMARY_TXT).read_text()


def _values(cell: object) -> list:
    """A cell's present values: a list's elements, a scalar, or nothing when missing."""
    if isinstance(cell, list | np.ndarray):
        return list(cell)
    return [] if cell is None or cell != cell else [cell]


def test_cross_statistics_estimate_many_products_and_say_when_buckets_are_too_few() -> None:
    config = parse_config(
        {
            "model_name": "m",
            "label": "y",
            "features": {
                "seen": {"kind": "categorical_list", "dtype": "int"},
                "item": {"kind": "categorical", "towers": ["wide"]},
            },
            "crosses": {"seen_x_item": {"features": ["seen", "item"], "hash_buckets": 50_000}},
        }
    )
    rng = np.random.default_rng(0)
    rows = 60_000
    lengths = rng.integers(0, 6, rows)
    seen = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()),
        pa.array(rng.integers(0, 2_000, lengths.sum())),
    )
    item = pa.array([f"i{v}" for v in rng.integers(0, 500, rows)])
    table = pa.table({"seen": seen, "item": item, "y": pa.array(rng.integers(0, 2, rows))})
    acc: dict = {}
    for batch in table.to_batches(max_chunksize=7_000):  # partial sketches, merged
        acc = statistics.merge(acc, statistics.batch_statistics(config, batch))
    c = statistics.finalize(config, acc)["crosses"]["seen_x_item"]
    item_of_row = np.repeat(np.asarray(item.to_pylist(), dtype=object), lengths)
    truth = len(set(zip(seen.flatten().to_pylist(), item_of_row, strict=True)))
    assert c["products"] == lengths.sum() and not c["distinct_exact"]
    # A sketch of 2,048 hashes: a relative standard error of about 1/sqrt(2,048) = 2.2%.
    assert c["distinct"] == pytest.approx(truth, rel=0.08)
    line = statistics.cross_detail(c)
    assert f"in 50,000 hash buckets ({c['per_bucket']:.2g} per bucket)" in line
    suggested = statistics.suggested_buckets(c["distinct"])
    assert 2 * c["distinct"] <= suggested < 2.1 * c["distinct"]
    assert f"hash_buckets of at least {suggested:,} keeps most apart" in line
    # Enough buckets: no advice.
    roomy = {**c, "hash_buckets": 4 * c["distinct"], "per_bucket": 0.25}
    assert "at least" not in statistics.cross_detail(roomy)


def test_injected_anomalies_are_each_reported_with_the_feature_named(
    good_table: pa.Table, good_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = logs.movies_table(ROWS, seed=4)
    bad = _replace(bad, "occupation", pa.nulls(ROWS, pa.string()))  # all null (has a default)
    bad = _replace(bad, "liked", pa.array(np.zeros(ROWS, np.int64)))  # label rate 0
    flood = np.where(np.arange(ROWS) % 10 == 0, bad.column("movie_id").to_numpy(), "m7")
    bad = _replace(bad, "movie_id", pa.array(flood.astype(str)))  # one token takes 90%
    bad = _replace(bad, "popularity", pc.multiply(bad.column("popularity"), 1000.0))
    logs.write_parquet(bad, tmp_path / "log")
    code = main(
        [
            "datagen", "--config", "movies", "--input", str(tmp_path / "log"),
            "--out", str(tmp_path / "data"), "--reference-statistics", str(good_data),
            "--fail-on-anomaly",
        ]
    )  # fmt: skip
    assert code == 1  # blocking anomalies, and the output is written all the same
    printed = capsys.readouterr()
    assert "blocking anomal" in printed.err and "data validation (against" in printed.out
    report = json.loads((tmp_path / "data" / artifacts.ANOMALIES_JSON).read_text())
    assert report["blocking"] and report["reference"] == str(good_data)
    found = {(a["kind"], a["column"]): a for a in report["anomalies"]}
    assert found[("all_missing", "occupation")]["features"] == ["occupation"]
    assert found[("all_missing", "occupation")]["severity"] == "block"
    assert "every row is labelled 0" in found[("label_rate", "liked")]["description"]
    flood_anomaly = found[("categorical_drift", "movie_id")]
    assert "'m7'" in flood_anomaly["description"] and flood_anomaly["value"] > 0.5
    drift = found[("numeric_drift", "popularity")]
    assert drift["features"] == ["popularity"] and drift["value"] > 0.5
    assert "popularity" in drift["description"]
    assert (tmp_path / "data" / artifacts.ANOMALIES_PNG).stat().st_size > 0
    assert report["plot"] == artifacts.ANOMALIES_PNG
    assert (tmp_path / "data" / artifacts.TRAIN_DIR).is_dir()


def test_a_dropped_column_is_named_before_beam_starts(good_table: pa.Table, tmp_path: Path):
    logs.write_parquet(good_table.drop_columns(["popularity"]), tmp_path / "log")
    config = load_config("movies")
    with pytest.raises(MissingColumnError) as e:
        run_datagen(config, str(tmp_path / "log"), tmp_path / "data", echo=None)
    anomaly = dv.column_error_anomaly(config, dv.COLUMN_MISSING, e.value.column, str(e.value))
    assert anomaly.features == ("popularity",) and anomaly.blocks
    assert "popularity" in anomaly.description


# --------------------------------------------------------------------------------------------
# The checks on statistics alone (no Beam)


def _stats(rows: int = 100, label_rate: float = 0.3, **columns) -> dict:
    cols = {"liked": {"kind": "label", "features": [], "type": "int", "rows": rows,
                      "missing": 0, "missing_rate": 0.0, "label_rate": label_rate}}  # fmt: skip
    for name, s in columns.items():
        cols[name] = {"features": [name], "rows": rows, "missing": 0, "missing_rate": 0.0, **s}
    return {"rows": rows, "label": "liked", "label_rate": label_rate, "columns": cols}


def _tokens(counts: dict[str, int], type_: str = "string") -> dict:
    return {"kind": "categorical", "type": type_, "values": sum(counts.values()),
            "tokens": counts, "tokens_complete": True}  # fmt: skip


def test_checks_that_need_no_reference() -> None:
    config = load_config("movies")
    ok = _stats(occupation=_tokens({"a": 60, "b": 40}))
    assert dv.find_anomalies(config, ok) == []
    config = dataclasses.replace(
        config, data_validation=dataclasses.replace(config.data_validation, min_rows=1000)
    )
    found = dv.find_anomalies(config, _stats(label_rate=1.0, occupation=_tokens({"a": 100})))
    kinds = {(a.kind, a.column) for a in found}
    assert kinds == {("too_few_rows", ""), ("label_rate", "liked")}


def test_checks_against_a_reference() -> None:
    config = load_config("movies")
    ref = _stats(label_rate=0.3, user_id=_tokens({"1": 50, "2": 50}, "int"),
                 occupation=_tokens({"a": 50, "b": 50}))  # fmt: skip
    today = _stats(
        rows=5,
        label_rate=0.1,
        user_id=_tokens({"u1": 3, "u2": 2}, "string"),  # ids changed format
        occupation={**_tokens({"a": 2, "b": 2}), "missing": 1, "missing_rate": 0.2},
    )
    found = {(a.kind, a.column): a for a in dv.find_anomalies(config, today, ref)}
    assert found[("column_retyped", "user_id")].blocks
    assert "int" in found[("column_retyped", "user_id")].description
    assert found[("unknown_tokens", "user_id")].value == 1.0
    assert found[("missing_rate", "occupation")].value == pytest.approx(0.2)
    assert found[("label_rate", "liked")].blocks
    assert ("too_few_rows", "") in found  # 5 rows, below 10% of the reference's 100


def test_a_reference_that_typed_a_boolean_label_bool_is_not_a_retyped_column() -> None:
    # Booleans are read as the integers 0 and 1; older statistics called them "bool".
    config = load_config("movies")
    ref = _stats()
    ref["columns"]["liked"]["type"] = "bool"
    found = {(a.kind, a.column) for a in dv.find_anomalies(config, _stats(), ref)}
    assert ("column_retyped", "liked") not in found
    ref["columns"]["liked"]["type"] = "string"
    found = {(a.kind, a.column) for a in dv.find_anomalies(config, _stats(), ref)}
    assert ("column_retyped", "liked") in found


def test_numeric_drift_measures_jensen_shannon_over_the_reference_deciles() -> None:
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, 5000)

    def numeric(values: np.ndarray) -> dict:
        return {
            "kind": "numeric", "type": "float", "mean": float(values.mean()),
            "quantiles": list(np.quantile(values, np.linspace(0, 1, 11))),
            "percentiles": list(np.quantile(values, np.linspace(0, 1, 101))),
        }  # fmt: skip

    ref = _stats(popularity=numeric(x))
    same = dv.find_anomalies(load_config("movies"), _stats(popularity=numeric(x[::-1])), ref)
    assert same == []
    p, q, _ = dv.numeric_buckets(ref["columns"]["popularity"], numeric(x * 1.02))
    assert dv.js_divergence(p, q) < 0.01
    p, q, _ = dv.numeric_buckets(ref["columns"]["popularity"], numeric(x * 1000))
    assert dv.js_divergence(p, q) > 0.5


def test_thresholds_and_severities_are_set_per_feature_in_the_config() -> None:
    d = load_config("movies").to_dict()
    d["data_validation"] = {
        "linf_distance": 0.5,
        "features": {"occupation": {"linf_distance": 0.05}},
        "severity": {"categorical_drift": "block"},
    }
    config = parse_config(d)
    ref = _stats(occupation=_tokens({"a": 50, "b": 50}), genres=_tokens({"a": 50, "b": 50}))
    today = _stats(occupation=_tokens({"a": 60, "b": 40}), genres=_tokens({"a": 60, "b": 40}))
    found = dv.find_anomalies(config, today, ref)
    assert [(a.kind, a.column, a.severity) for a in found] == [
        ("categorical_drift", "occupation", Severity.BLOCK)
    ]
    assert found[0].value == pytest.approx(0.1) and found[0].threshold == 0.05
    assert parse_config(config.to_yaml()) == config
    for bad, message in (
        ({"features": {"occupaton": {}}}, "data_validation.features.occupaton: unknown feature"),
        ({"js_divergence": 3}, "data_validation.js_divergence: expected a number in [0, 1]"),
        ({"severity": {"label_rate": "stop"}}, "data_validation.severity.label_rate: unknown"),
    ):
        d["data_validation"] = bad
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config(d)


def test_decoded_lists_sent_joined_count_as_their_values() -> None:
    """A request's list sent as one joined string ("a|b", as a CSV log holds it) is split as
    the model splits it: the same tokens, lengths and cross products as the values sent one
    by one, so the skew report does not see a list of one unknown token."""
    config = load_config("movies")
    rows = [["drama", "comedy"], [], ["action"], ["horror", "drama", "scifi"]]
    movies = pa.array([[b"m1"]] * 4, pa.large_list(pa.large_binary()))
    occupations = pa.array([[b"artist"]] * 4, pa.large_list(pa.large_binary()))

    def decoded(genres: list[list[str]]) -> pa.RecordBatch:
        values = pa.array(
            [[g.encode() for g in r] for r in genres], pa.large_list(pa.large_binary())
        )
        return pa.RecordBatch.from_arrays(
            [values, movies, occupations], names=["genres", "movie_id", "occupation"]
        )

    joined = [["|".join(r)] if r else [] for r in rows]
    joined[3] = ["horror|drama", "scifi"]  # partly joined
    split = statistics.batch_statistics(config, decoded(rows), decoded=True)
    sent_joined = statistics.batch_statistics(config, decoded(joined), decoded=True)
    for key in ("genres", ("cross", "occupation_x_genre")):
        got, want = sent_joined[key], split[key]
        assert (got.counts, got.lengths, got.values) == (want.counts, want.lengths, want.values)
        np.testing.assert_array_equal(np.sort(got.hashes), np.sort(want.hashes))
    assert split["genres"].lengths == {0: 1, 1: 1, 2: 1, 3: 1}
    assert split[("cross", "occupation_x_genre")].values == 6
