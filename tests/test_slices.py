"""Model analysis in the quality gate: slices, bootstrap intervals and calibration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from serving.release import analysis
from serving.release.validate import format_verdict, read_raw_eval_examples, validate
from tests import logs
from transform import artifacts
from transform.config import ConfigError, SliceKind, SliceSpec, load_config, parse_config
from transform.metrics import log_loss


def pairwise_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    """AUC by comparing every positive with every negative (ties one half)."""
    w = np.ones(len(y)) if w is None else w
    p, n = y > 0, y == 0
    wins = (s[p][:, None] > s[n][None, :]) + 0.5 * (s[p][:, None] == s[n][None, :])
    pair = w[p][:, None] * w[n][None, :]
    return float((wins * pair).sum() / pair.sum())


def test_weighted_auc_equals_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(np.float64)
    s = np.round(rng.random(300) + 0.4 * y, 1)  # many ties
    weights = rng.poisson(1.0, (300, 4)).astype(np.float32)
    got = analysis.weighted_aucs(y, s, weights)
    for b in range(4):
        assert got[b] == pytest.approx(pairwise_auc(y, s, weights[:, b]), abs=1e-9)
    order = np.argsort(s, kind="stable")
    part = rng.random(300) < 0.4
    sliced = analysis.weighted_aucs(y, s, np.ones((300, 1), np.float32), order[part[order]])
    assert sliced[0] == pytest.approx(pairwise_auc(y[part], s[part]), abs=1e-9)
    one_class = analysis.weighted_aucs(np.zeros(5), np.arange(5.0), np.ones((5, 2), np.float32))
    assert np.isnan(one_class).all()


def with_validation(config, **settings):
    return dataclasses.replace(
        config, validation=dataclasses.replace(config.validation, **settings)
    )


MOVIES_SLICES = (
    SliceSpec("occupation", buckets=3),
    SliceSpec("movie_id", kind=SliceKind.IN_VOCABULARY),
    SliceSpec("recent_movies", buckets=3),
    SliceSpec("user_age", buckets=4),
)


def test_slice_metrics_equal_a_direct_computation(
    movies_data: Path, movies_model: Path, movies_small_config, tmp_path: Path
) -> None:
    config = with_validation(movies_small_config, slices=MOVIES_SLICES, slice_min_rows=20)
    examples, labels = read_raw_eval_examples(movies_data, config.label)
    scores = analysis_scores(movies_model, examples)
    other = np.clip(scores + np.random.default_rng(0).normal(0, 0.1, len(scores)), 0.01, 0.99)
    result = analysis.analyse(config, movies_data, examples, labels, scores, base_scores=other)
    rows = {r["slice"]: r for r in result["slices"]}

    # The slices, computed directly from the parsed examples.
    parsed = [tf.train.Example.FromString(e).features.feature for e in examples]
    occupation = np.array([f["occupation"].bytes_list.value[0].decode() for f in parsed])
    values, counts = np.unique(occupation, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")][:3]
    lengths = np.array([len(f["recent_movies"].bytes_list.value) for f in parsed])
    import tensorflow_transform as tft

    vocab = set(tft.TFTransformOutput(str(movies_data)).vocabulary_by_name("movies"))
    known = np.array([f["movie_id"].bytes_list.value[0] in vocab for f in parsed])
    expected = {f"occupation={v}": occupation == v for v in top}
    expected["occupation=other"] = ~np.isin(occupation, top)
    expected["movie_id=in vocabulary"] = known
    expected["movie_id=not in vocabulary"] = ~known
    expected["all"] = np.ones(len(labels), bool)
    assert set(expected) <= set(rows)
    length_rows = [r for r in result["slices"] if r["column"] == "recent_movies"]
    assert sum(r["rows"] for r in length_rows) == len(labels)
    for r in length_rows:  # "a to b" or "a": the rows whose list length is in it
        lo, _, hi = r["value"].partition(" to ")
        expected[r["slice"]] = (lengths >= float(lo)) & (lengths <= float(hi or lo))

    for name, mask in expected.items():
        row, y, s, b = rows[name], labels[mask], scores[mask], other[mask]
        assert row["rows"] == mask.sum(), name
        if not mask.any():  # reported, with nothing to measure
            assert row["model"] is None and not row["judged"]
            continue
        assert row["label_rate"] == pytest.approx(y.mean()), name
        assert row["model"]["log_loss"] == pytest.approx(log_loss(y, s)), name
        assert row["model"]["mean_prediction"] == pytest.approx(s.mean()), name
        assert row["model"]["calibration"] == pytest.approx(s.mean() / y.mean()), name
        if 0 < y.mean() < 1:
            assert row["model"]["auc"] == pytest.approx(pairwise_auc(y, s)), name
        if row["judged"]:
            assert row["auc_difference"] == pytest.approx(pairwise_auc(y, s) - pairwise_auc(y, b))
            low, high = row["auc_difference_interval"]
            assert low <= high

    # Calibration: ECE over 10 bins of equal rows, and mean prediction / label rate.
    order = np.argsort(scores, kind="stable")
    bins = np.arange(len(labels)) * 10 // len(labels)  # rank -> bin of equal rows
    ece = sum(
        abs(scores[order[bins == b]].sum() - labels[order[bins == b]].sum()) for b in range(10)
    )
    cal = result["calibration"]
    assert cal["ece"] == pytest.approx(ece / len(labels))
    assert cal["ratio"] == pytest.approx(scores.mean() / labels.mean())
    assert cal["ece_interval"][0] <= cal["ece"] <= cal["ece_interval"][1] + 0.01
    # The same inputs give the same intervals (a fixed seed).
    again = analysis.analyse(config, movies_data, examples, labels, scores, base_scores=other)
    assert again["slices"] == result["slices"]


def analysis_scores(model: Path, examples: list[bytes]) -> np.ndarray:
    from serving.release.validate import score_in_process

    return score_in_process(model, examples)


STUDENT_ROWS = 0.25


def slice_log(rows: int) -> object:
    """The movies log where one occupation (a quarter of the rows) likes exactly the popular
    movies: a strong signal that only this slice has."""
    import pyarrow as pa

    table = logs.movies_table(rows, seed=1)
    rng = np.random.default_rng(5)
    student = rng.random(rows) < STUDENT_ROWS
    occupation = [
        "student" if s else ("engineer" if o == "student" else o)
        for s, o in zip(student, table.column("occupation").to_pylist(), strict=True)
    ]
    popularity = table.column("popularity").to_numpy()
    liked = table.column("liked").to_numpy().copy()
    liked[student] = popularity[student] > np.median(popularity)
    table = table.set_column(
        table.column_names.index("occupation"), "occupation", pa.array(occupation, pa.string())
    )
    return table.set_column(
        table.column_names.index("liked"), "liked", pa.array(liked.astype(np.int64))
    )


def shuffle_labels(data: Path, out: Path, config, column: str, value: bytes) -> Path:
    """A copy of a datagen output whose train split has the labels of the rows with ``value``
    in ``column`` shuffled among themselves (the eval split is left as it is)."""
    import shutil

    import tensorflow_transform as tft

    shutil.copytree(data, out)
    ids = tft.TFTransformOutput(str(data)).vocabulary_by_name(column)
    wanted = ids.index(value)
    rng = np.random.default_rng(0)
    for shard in artifacts.shards(out, artifacts.TRAIN_DIR):
        records = list(tf.data.TFRecordDataset(shard, "GZIP").as_numpy_iterator())
        examples = [tf.train.Example.FromString(r) for r in records]
        chosen = [e for e in examples if e.features.feature[column].int64_list.value[0] == wanted]
        labels = [e.features.feature[config.label].int64_list.value[0] for e in chosen]
        for e, y in zip(chosen, rng.permutation(labels), strict=True):
            e.features.feature[config.label].int64_list.value[0] = int(y)
        with tf.io.TFRecordWriter(shard, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
            for e in examples:
                w.write(e.SerializeToString())
    return out


def test_a_model_worse_on_one_slice_only_fails_on_that_slice(
    movies_small_config, tmp_path: Path
) -> None:
    from pipeline.datagen import run_datagen
    from trainer.train import train

    few_epochs = dataclasses.replace(movies_small_config.training, epochs=3)
    config = with_validation(
        dataclasses.replace(movies_small_config, training=few_epochs),
        auc_tolerance=0.2,
        log_loss_tolerance=0.2,
        # Three epochs on labels this sharp leave the models under-confident: not the point here.
        calibration_error_tolerance=0.3,
        calibration_ratio_tolerance=1.0,
        slices=(SliceSpec("occupation", buckets=8, min_rows=30, tolerance=0.05),),
    )
    data = tmp_path / "data"
    run_datagen(config, str(logs.write_parquet(slice_log(2000), tmp_path / "log")), data, echo=None)
    # The same rows, but the model learns nothing about the students.
    shuffled = shuffle_labels(data, tmp_path / "shuffled", config, "occupation", b"student")
    models = {"good": tmp_path / "good", "bad": tmp_path / "bad"}
    train(config, data, models["good"], verbose=0)
    train(config, shuffled, models["bad"], verbose=0)
    verdict = validate(models["bad"], data, config, baseline=models["good"], skip_dry_run=True)
    rows = {r["slice"]: r for r in verdict.analysis["slices"]}
    overall, student = rows["all"], rows["occupation=student"]
    assert overall["auc_difference"] > -config.validation.auc_tolerance  # passes overall
    assert student["judged"] and not student["passed"]
    assert student["auc_difference"] < -0.05
    assert student["auc_difference_interval"][1] < 0
    failing = [r["slice"] for r in verdict.analysis["slices"] if not r["passed"]]
    assert "occupation=student" in failing  # the other occupations were trained alike
    assert not verdict.passed
    reason = next(r for r in verdict.reasons if "occupation=student" in r)
    assert f"{-student['auc_difference']:.4f}" in reason and "tolerance 0.05" in reason
    assert verdict.analysis["worst_slice"]["slice"] == "occupation=student"
    # The report beside the verdict, and the CLI's lines.
    saved = json.loads((models["bad"] / artifacts.VERDICT_FILE).read_text())
    assert saved["analysis"]["slices"][0]["slice"] == "all"
    report = (models["bad"] / artifacts.ANALYSIS_MD).read_text()
    assert "| occupation=student |" in report and "**FAIL**" in report
    assert (models["bad"] / artifacts.ANALYSIS_PNG).read_bytes()[:4] == b"\x89PNG"
    text = format_verdict(verdict)
    assert "occupation=student" in text and "FAIL" in text and "calibration" in text
    print(text)


def test_calibration_fails_biased_probabilities(
    movies_data: Path, movies_model: Path, movies_small_config
) -> None:
    examples, labels = read_raw_eval_examples(movies_data, movies_small_config.label)
    scores = analysis_scores(movies_model, examples)
    ok = analysis.analyse(movies_small_config, movies_data, examples, labels, scores)
    assert ok["problems"] == [], ok["problems"]
    assert ok["worst_slice"] is None and len(ok["slices"]) == 1
    biased = analysis.analyse(
        movies_small_config, movies_data, examples, labels, np.clip(scores * 1.8, 0, 0.999)
    )
    assert any("mean prediction / label rate" in p and "upwards" in p for p in biased["problems"])
    assert any("expected calibration error" in p for p in biased["problems"])


@pytest.mark.parametrize(
    ("slices", "key"),
    [
        (["no_such_column"], "validation.slices[0].column: unknown column 'no_such_column'"),
        (["occupation", {"column": "ocupation"}], "validation.slices[1].column"),
        ([{"column": "occupation", "tolerance": -0.1}], "validation.slices[0].tolerance"),
        ([{"column": "occupation", "tolerance": "high"}], "validation.slices[0].tolerance"),
        ([{"column": "occupation", "min_rows": 0}], "validation.slices[0].min_rows"),
        ([{"column": "occupation", "buckets": 1}], "validation.slices[0].buckets"),
        ([{"column": "user_age", "kind": "length"}], "validation.slices[0].kind"),
        ([{"column": "occupation", "kind": "values"}], "validation.slices[0].kind"),
        ([{"column": "occupation", "tolerence": 0.1}], "validation.slices[0].tolerence"),
        ("occupation", "validation.slices"),
    ],
)
def test_bad_slice_configs_are_refused_naming_the_key(slices, key: str) -> None:
    data = load_config("movies").to_dict()
    data["validation"]["slices"] = slices
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)


@pytest.mark.parametrize(
    "key", ["calibration_error_tolerance", "calibration_ratio_tolerance", "slice_auc_tolerance"]
)
def test_bad_gate_tolerances_are_refused_naming_the_key(key: str) -> None:
    data = load_config("movies").to_dict()
    data["validation"][key] = -1
    with pytest.raises(ConfigError, match=f"validation.{key}"):
        parse_config(data)


def test_slices_round_trip_through_yaml() -> None:
    data = load_config("movies").to_dict()
    data["validation"]["slices"] = ["occupation", {"column": "movie_id", "kind": "in_vocabulary"}]
    config = parse_config(data)
    assert config.validation.slices[0] == SliceSpec("occupation")
    assert config.slice_kind(config.validation.slices[0]) is SliceKind.VALUE
    assert parse_config(config.to_yaml()) == config


def test_the_daily_line_and_days_md_name_the_worst_slice() -> None:
    from pipeline.run import DayResult, format_days

    day = DayResult(
        day=2, rows=1000, vocabularies={"apps": 10}, vocabulary_growth={"apps": 2},
        warm_started=True, rows_carried=10, rows_new=2, auc=0.71, log_loss=0.4,
        served_auc=0.70, passed=True, reasons=[], version=2,
        worst_slice={"slice": "device=a|b", "auc_difference": -0.0123},
    )  # fmt: skip
    assert "worst slice device=a|b -0.0123" in day.line(3)
    table = format_days([day, dataclasses.replace(day, day=3, worst_slice=None)])
    header, _, second, third = table.splitlines()
    column = header.split(" | ").index("worst slice (AUC change)")
    assert second.split(" | ")[column] == "device=a\\|b -0.0123"
    assert third.split(" | ")[column] == "-"


def test_without_a_baseline_the_model_is_reported_alone(
    movies_data: Path, movies_model: Path, movies_small_config, tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(movies_model, model)
    config = with_validation(movies_small_config, slices=MOVIES_SLICES, slice_min_rows=20)
    verdict = validate(model, movies_data, config, skip_dry_run=True)
    assert verdict.passed, verdict.reasons
    rows = verdict.analysis["slices"]
    assert rows[0]["slice"] == "all" and len(rows) > 5
    assert not any(r["judged"] for r in rows) and verdict.analysis["worst_slice"] is None
    assert all(r["baseline"] is None for r in rows)
    low, high = rows[0]["auc_interval"]
    assert low < verdict.quality["auc"] < high
    assert rows[0]["popularity_auc"] == pytest.approx(verdict.quality["popularity"]["auc"])
    report = (model / artifacts.ANALYSIS_MD).read_text()
    assert "| slice | rows | label rate | AUC (95% interval) | popularity AUC |" in report
    assert (model / artifacts.ANALYSIS_PNG).exists()
    assert "occupation=" in format_verdict(verdict)
