"""Data generation end to end: every input format, both configs, bad input, portable runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipeline.datagen import (
    EVAL_DIR,
    EVAL_RAW_DIR,
    SUMMARY_JSON,
    TRAIN_DIR,
    OutputExistsError,
    run_datagen,
)
from pipeline.sources import InputError, InputFiles
from tests import logs
from transform.config import Config, load_config, parse_config

MOVIES = load_config("movies")
REPO = Path(__file__).resolve().parents[1]


def _read_examples(folder: Path, data_dir: Path) -> list[dict]:
    spec = tft.TFTransformOutput(str(data_dir)).transformed_feature_spec()
    files = sorted(str(p) for p in folder.glob("*.tfrecord.gz"))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(100_000)
    rows = []
    for batch in dataset:
        parsed = tf.io.parse_example(batch, spec)
        n = int(tf.shape(batch)[0])
        for i in range(n):
            row = {}
            for k, v in parsed.items():
                if isinstance(v, tf.SparseTensor):
                    row[k] = tf.sparse.to_dense(tf.sparse.slice(v, [i, 0], [1, v.dense_shape[1]]))
                    row[k] = row[k].numpy().ravel().tolist()
                else:
                    row[k] = v[i].numpy().item()
            rows.append(row)
            if len(rows) >= 50:
                return rows
    return rows


def test_parquet_output_layout_and_summary(movies_data: Path, movies_table: pa.Table) -> None:
    for name in (
        "transform_fn",
        "transformed_metadata",
        "metadata",
        "config.yaml",
        "summary.txt",
        SUMMARY_JSON,
    ):
        assert (movies_data / name).exists(), name
    assert list((movies_data / TRAIN_DIR).glob("*.tfrecord.gz"))
    assert list((movies_data / EVAL_DIR).glob("*.tfrecord.gz"))
    summary = json.loads((movies_data / SUMMARY_JSON).read_text())
    train, ev = summary["splits"][TRAIN_DIR], summary["splits"][EVAL_DIR]
    assert train["rows"] + ev["rows"] == movies_table.num_rows == summary["rows"]
    # eval_fraction is 0.2 of users; the split is by user, so only roughly 20% of rows.
    assert 0.1 < ev["rows"] / summary["rows"] < 0.3
    liked = pa.compute.sum(movies_table["liked"]).as_py()
    assert train["label_rate"] * train["rows"] + ev["label_rate"] * ev["rows"] == pytest.approx(
        liked
    )
    assert summary["vocabularies"]["movies"]["features"] == ["recent_movies", "movie_id"]
    assert len(summary["quantiles"]["user_age"]["boundaries"]) == 7  # n_q = 8
    assert summary["config_fingerprint"] == MOVIES.fingerprint()
    # The raw schema is there: serving parses raw examples with it.
    output = tft.TFTransformOutput(str(movies_data))
    assert set(output.raw_feature_spec()) == set(MOVIES.raw_columns)


def test_raw_eval_examples_are_kept(movies_data: Path) -> None:
    """Raw eval rows let models with other vocabularies be compared on the same examples."""
    files = sorted(str(p) for p in (movies_data / EVAL_RAW_DIR).glob("*.tfrecord.gz"))
    records = list(tf.data.TFRecordDataset(files, compression_type="GZIP"))
    summary = json.loads((movies_data / SUMMARY_JSON).read_text())
    assert len(records) == summary["splits"][EVAL_DIR]["rows"]
    # Typed as the log typed them: the recorded raw schema parses them.
    recorded = tft.TFTransformOutput(str(movies_data)).raw_feature_spec()
    parsed = tf.io.parse_example(tf.stack(records), recorded)
    assert parsed["movie_id"].dtype == tf.string and parsed["user_id"].dtype == tf.int64
    # user_age is int64 in the log, release_year and popularity are floats.
    assert summary["int_columns"] == ["user_age"]
    assert parsed["user_age"].dtype == tf.int64 and parsed["popularity"].dtype == tf.float32
    # Missing values were filled with the config's defaults before they were written.
    assert b"unknown" in set(parsed["occupation"].numpy().tolist())


def test_transformed_examples_hold_ids_and_normalised_values(movies_data: Path) -> None:
    output = tft.TFTransformOutput(str(movies_data))
    movies_size = output.vocabulary_size_by_name("movies")
    rows = _read_examples(movies_data / TRAIN_DIR, movies_data)
    assert rows
    for row in rows:
        assert 0 <= row["movie_id"] <= movies_size  # movies_size is the OOV id
        assert all(0 <= i <= movies_size for i in row["recent_movies"])
        assert 0.0 <= row["user_age"] <= 1.0 and 0.0 <= row["popularity"] <= 1.0
        assert all(0 <= h < 50_000 for h in row["recent_x_movie"])
        assert len(row["recent_x_movie"]) == len(row["recent_movies"])
        assert row["liked"] in (0, 1)


def test_split_is_by_user_and_deterministic(
    movies_data: Path, movies_table: pa.Table, tmp_path: Path
) -> None:
    users = {TRAIN_DIR: set(), EVAL_DIR: set()}
    output = tft.TFTransformOutput(str(movies_data))
    vocab = output.vocabulary_by_name("user_id")
    for split in users:
        for row in _read_examples(movies_data / split, movies_data):
            if row["user_id"] < len(vocab):
                users[split].add(vocab[row["user_id"]])
    assert users[TRAIN_DIR] and not users[TRAIN_DIR] & users[EVAL_DIR]


@pytest.mark.parametrize("fmt", ["csv", "tfrecord", "parquet-joined-lists"])
def test_every_format_gives_the_same_result(
    fmt: str, movies_table: pa.Table, movies_data: Path, tmp_path: Path
) -> None:
    if fmt == "csv":
        log = logs.write_csv(movies_table, tmp_path / "log")
    elif fmt == "parquet-joined-lists":
        # A warehouse export: each list one string, its values joined by data.list_delimiter
        # (one column dictionary-encoded, as a low-cardinality string column often is).
        table = logs.joined_lists(movies_table)
        genres = table.schema.get_field_index("genres")
        table = table.set_column(genres, "genres", table["genres"].dictionary_encode())
        log = logs.write_parquet(table, tmp_path / "log")
        fmt = "parquet"
    else:
        # One list as one string of joined values, as a log converted from CSV holds it.
        joined = logs.joined_lists(movies_table.select(["genres"]))["genres"]
        table = movies_table.set_column(
            movies_table.schema.get_field_index("genres"), "genres", joined
        )
        # Each column as the log types it: the user's age an int64_list where the config reads
        # a number, and the label a float_list of 0.0 and 1.0.
        log = logs.write_tfrecord(table, tmp_path / "log", float_columns=("liked",))
    result = run_datagen(MOVIES, str(log), tmp_path / "out", echo=None)
    expected = json.loads((movies_data / SUMMARY_JSON).read_text())
    got = result.summary
    assert got["input"]["format"] == fmt
    if fmt == "tfrecord":  # typed as the Parquet log types them (a CSV has no types to go by)
        assert got["int_columns"] == expected["int_columns"]
    for split in (TRAIN_DIR, EVAL_DIR):
        assert got["splits"][split]["rows"] == expected["splits"][split]["rows"]
        assert got["splits"][split]["label_rate"] == expected["splits"][split]["label_rate"]
    assert got["vocabularies"] == expected["vocabularies"]
    for name, q in expected["quantiles"].items():
        assert got["quantiles"][name]["boundaries"] == pytest.approx(q["boundaries"])


def test_app_store_simulated_logs(tmp_path: Path) -> None:
    from tools.simulator import SimulatorSettings, simulate

    settings = SimulatorSettings(num_users=2000, num_apps=300)
    simulate(tmp_path / "logs", days=1, rows_per_day=4000, seed=3, settings=settings)
    config = load_config("app_store")
    result = run_datagen(config, str(tmp_path / "logs"), tmp_path / "data", echo=None)
    summary = result.summary
    assert summary["rows"] == 4000
    assert 0 < summary["vocabularies"]["apps"]["size"] <= 300
    assert summary["vocabularies"]["hour"]["size"] == 24
    assert summary["crosses"]["installed_x_impression"]["hash_buckets"] == 200_000
    assert 0.0 < summary["splits"][TRAIN_DIR]["label_rate"] < 0.5


def test_portable_runner(movies_parquet: Path, movies_data: Path, tmp_path: Path) -> None:
    """The job runs on the portable Fn API path that Flink, Spark and Dataflow use."""
    result = run_datagen(
        MOVIES,
        str(movies_parquet),
        tmp_path / "out",
        beam_args=[
            "--runner=PortableRunner",
            "--job_endpoint=embed",
            "--environment_type=LOOPBACK",
        ],
        echo=None,
    )
    expected = json.loads((movies_data / SUMMARY_JSON).read_text())
    assert result.summary["splits"] == expected["splits"]
    assert result.summary["vocabularies"] == expected["vocabularies"]


def test_the_local_runner_is_the_python_one_and_downloads_nothing(
    small_table: pa.Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --runner, Beam's DirectRunner would try Prism first: a download from GitHub,
    and a folder left in the temp dir each run when that fails."""
    import tempfile

    from apache_beam.runners.portability import prism_runner

    tried: list[object] = []
    original = prism_runner.PrismRunner.run_pipeline

    def record(self: object, *args: object, **kwargs: object) -> object:
        tried.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", record)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    result = run_datagen(
        MOVIES, _parquet(small_table, tmp_path / "in"), tmp_path / "out", echo=None
    )
    assert result.summary["rows"] == 300
    assert tried == []
    # (TensorFlow's autograph leaves files there until the process exits; no folder stays.)
    assert [p.name for p in temp.iterdir() if p.is_dir()] == []


def test_local_runner_only_replaces_beams_local_runner() -> None:
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    from pipeline.datagen import local_runner

    for args in ([], ["--runner=DirectRunner"], ["--runner", "direct"]):
        assert isinstance(local_runner(PipelineOptions(args)), fn_runner.FnApiRunner), args
    for name in ("PortableRunner", "PrismRunner", "DataflowRunner", "BundleBasedDirectRunner"):
        assert local_runner(PipelineOptions([f"--runner={name}"])) is None, name
    # The options reach the runner's workers, as DirectRunner passes them.
    runner = local_runner(PipelineOptions(["--direct_num_workers=2"]))
    options = runner._provision_info.provision_info.pipeline_options
    assert options["beam:option:direct_num_workers:v1"] == "2"


# --------------------------------------------------------------------------------------------
# Bad input: one clear message naming the file, column or key; nothing existing is touched.


@pytest.fixture()
def small_table(movies_table: pa.Table) -> pa.Table:
    return movies_table.slice(0, 300)


def _parquet(table: pa.Table, folder: Path) -> str:
    return str(logs.write_parquet(table, folder, shards=1))


def test_a_bad_label_found_by_the_beam_job_is_one_line(
    small_table: pa.Table, tmp_path: Path
) -> None:
    """An error raised in a Beam DoFn (here a label of 0.5, which no footer shows) ends the
    command with its one line: Beam's own log of it, with a traceback, is not printed."""
    liked = small_table.schema.get_field_index("liked")
    labels = [float(v) for v in small_table["liked"].to_pylist()]
    labels[7] = 0.5
    table = small_table.set_column(liked, "liked", pa.array(labels, pa.float64()))
    log = _parquet(table, tmp_path / "log")
    exe = Path(sys.executable).with_name("widedeep")
    run = subprocess.run(
        [str(exe), "datagen", "--config", "movies", "--input", log, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    lines = [li for li in run.stderr.splitlines() if li.strip()]
    assert "Traceback" not in run.stderr, run.stderr
    assert "label column 'liked' holds 0.5; labels must be 0 or 1" in lines[-1], run.stderr
    assert lines[-1].startswith("widedeep datagen: error: ")


def test_missing_column_is_named(small_table: pa.Table, tmp_path: Path) -> None:
    log = _parquet(small_table.drop_columns(["genres"]), tmp_path / "log")
    with pytest.raises(InputError, match=r"part-00000.parquet: no column 'genres' \(feature"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()


def test_misspelt_column_suggests_the_name(small_table: pa.Table, tmp_path: Path) -> None:
    log = _parquet(
        small_table.rename_columns(["user_id", "ocupation", *small_table.column_names[2:]]),
        tmp_path / "log",
    )
    with pytest.raises(InputError, match=r"no column 'occupation'.*did you mean 'ocupation'"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)


def test_wrong_type_is_named(small_table: pa.Table, tmp_path: Path) -> None:
    table = small_table.set_column(
        small_table.schema.get_field_index("popularity"),
        "popularity",
        pa.array(["high"] * small_table.num_rows),
    )
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError, match=r"column 'popularity'.*holds string, expected numbers"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)


def test_a_time_column_read_as_a_number_says_what_to_do(
    small_table: pa.Table, tmp_path: Path
) -> None:
    """A log's time (a Parquet timestamp or date, or ISO text in a CSV) named as a numeric
    feature is refused with what to give the model instead."""
    column = small_table.schema.get_field_index("popularity")
    seconds = pa.array(range(1_600_000_000, 1_600_000_000 + small_table.num_rows), pa.int64())
    for k, times in enumerate(
        (
            seconds.cast(pa.timestamp("s")),
            seconds.cast(pa.timestamp("s")).cast(pa.date32()),
        )
    ):
        log = _parquet(small_table.set_column(column, "popularity", times), tmp_path / f"t{k}")
        with pytest.raises(
            InputError,
            match=rf"column 'popularity'.*holds {str(times.type)[:4]}\w*\[\w+\], expected numbers "
            r"\(a time is not read as a feature as it is: .*the hour or the day of the week",
        ):
            run_datagen(MOVIES, log, tmp_path / "out", echo=None)
    text = small_table.set_column(column, "popularity", pa.array(["2020-10-05 16:06:13"] * 300))
    log = logs.write_csv(text, tmp_path / "csv")
    with pytest.raises(
        InputError,
        match=r"line 2, column 'popularity'.*invalid value '2020-10-05 16:06:13' \(a time is not",
    ):
        run_datagen(MOVIES, str(log), tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()


def test_nulls_without_default_are_refused(small_table: pa.Table, tmp_path: Path) -> None:
    ages = small_table["user_age"].to_pylist()
    ages[5] = None
    table = small_table.set_column(
        small_table.schema.get_field_index("user_age"), "user_age", pa.array(ages, pa.int64())
    )
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError, match=r"column 'user_age'.*1 missing value.*default"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)


def test_nulls_in_csv_are_found_while_reading(small_table: pa.Table, tmp_path: Path) -> None:
    ages = small_table["user_age"].to_pylist()
    ages[250] = None  # past the first block the pre-flight check reads: found by the job
    table = small_table.set_column(
        small_table.schema.get_field_index("user_age"), "user_age", pa.array(ages, pa.int64())
    )
    log = logs.write_csv(table, tmp_path / "log")
    with pytest.raises(Exception, match=r"log.csv: column 'user_age'.*missing value"):
        run_datagen(MOVIES, str(log), tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_label_must_be_binary(small_table: pa.Table, tmp_path: Path) -> None:
    table = small_table.set_column(
        small_table.schema.get_field_index("liked"),
        "liked",
        pa.array([3] * small_table.num_rows, pa.int64()),
    )
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError, match=r"label column 'liked' holds only 3; labels must be 0"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()  # refused from the footer, before the Beam job


def test_empty_input(small_table: pa.Table, tmp_path: Path) -> None:
    log = _parquet(small_table.slice(0, 0), tmp_path / "log")
    with pytest.raises(InputError, match=r"hold no rows"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)
    with pytest.raises(InputError, match=r"matches no non-empty"):
        run_datagen(MOVIES, str(tmp_path / "nothing-*.parquet"), tmp_path / "out", echo=None)
    # A path given as it is (no wildcard) says what is wrong with that path.
    with pytest.raises(InputError, match=r"nothing.parquet: no such file or folder$"):
        run_datagen(MOVIES, str(tmp_path / "nothing.parquet"), tmp_path / "out", echo=None)
    (tmp_path / "empty.parquet").touch()
    with pytest.raises(InputError, match=r"empty.parquet: the file is empty$"):
        run_datagen(MOVIES, str(tmp_path / "empty.parquet"), tmp_path / "out", echo=None)
    (tmp_path / "_SUCCESS").write_text("done")
    with pytest.raises(InputError, match=r"_SUCCESS: a marker file .*, not data$"):
        run_datagen(MOVIES, str(tmp_path / "_SUCCESS"), tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()


def test_an_input_named_with_glob_characters_is_read_as_named(
    small_table: pa.Table, tmp_path: Path
) -> None:
    """A folder or file given as it is is taken literally, '[' and all (a glob of it would
    match nothing), and an output beside it is not taken for one inside it."""
    folder = tmp_path / "export[1]"
    log = _parquet(small_table, folder)
    for given in (folder, log):
        result = run_datagen(MOVIES, str(given), tmp_path / "out", overwrite=True, echo=None)
        splits = result.summary["splits"]
        assert splits["train"]["rows"] + splits["eval"]["rows"] == small_table.num_rows


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "log" / "broken.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not parquet" * 100)
    with pytest.raises(InputError, match=r"broken.parquet: not a readable Parquet file"):
        run_datagen(MOVIES, str(bad.parent), tmp_path / "out", echo=None)
    gz = tmp_path / "tf" / "broken.tfrecord.gz"
    gz.parent.mkdir()
    gz.write_bytes(b"\x1f\x8b garbage" * 50)
    with pytest.raises(InputError, match=r"broken.tfrecord.gz: not a readable TFRecord"):
        run_datagen(MOVIES, str(gz), tmp_path / "out", echo=None)


def test_existing_output_is_refused_and_kept(small_table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    log = _parquet(small_table, tmp_path / "log")
    with pytest.raises(OutputExistsError, match=r"already holds results.*--overwrite"):
        run_datagen(MOVIES, log, out, echo=None)
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_overwrite_keeps_the_old_output(small_table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    ages = small_table["user_age"].to_pylist()
    ages[250] = None
    bad = small_table.set_column(
        small_table.schema.get_field_index("user_age"), "user_age", pa.array(ages, pa.int64())
    )
    log = logs.write_csv(bad, tmp_path / "log")
    with pytest.raises(Exception, match=r"missing value"):
        run_datagen(MOVIES, str(log), out, overwrite=True, echo=None)
    assert (out / "precious.txt").read_text() == "keep me"


def test_mixed_formats_are_refused(small_table: pa.Table, tmp_path: Path) -> None:
    folder = tmp_path / "log"
    _parquet(small_table, folder)
    logs.write_csv(small_table, folder)
    with pytest.raises(InputError, match=r"mix formats"):
        run_datagen(MOVIES, str(folder), tmp_path / "out", echo=None)


def test_config_default_fills_missing_values(movies_data: Path, movies_table: pa.Table) -> None:
    # The movies log has missing occupations and release years; the config gives defaults.
    assert movies_table["occupation"].null_count > 0
    assert movies_table["release_year"].null_count > 0
    vocab = tft.TFTransformOutput(str(movies_data)).vocabulary_by_name("occupation")
    assert b"unknown" in vocab


def test_decimal_numbers_read_as_the_floats_they_are(small_table: pa.Table, tmp_path: Path) -> None:
    """A warehouse export's DECIMAL column (a price, say) is a numeric feature like a float."""
    import decimal

    cents = [round(v, 2) for v in small_table["popularity"].to_pylist()]
    floats = small_table.set_column(
        small_table.column_names.index("popularity"), "popularity", pa.array(cents)
    )
    decimals = floats.set_column(
        floats.column_names.index("popularity"),
        "popularity",
        pa.array([decimal.Decimal(f"{v:.2f}") for v in cents], pa.decimal128(9, 2)),
    )
    a = run_datagen(MOVIES, _parquet(floats, tmp_path / "f"), tmp_path / "out-f", echo=None)
    b = run_datagen(MOVIES, _parquet(decimals, tmp_path / "d"), tmp_path / "out-d", echo=None)
    assert b.summary["splits"] == a.summary["splits"]
    assert b.summary["quantiles"]["popularity"] == a.summary["quantiles"]["popularity"]
    stats = json.loads((tmp_path / "out-d" / "statistics.json").read_text())
    # Typed as it is served and logged: a request log compared with it sees no change of type.
    assert stats["columns"]["popularity"]["type"] == "float"


def test_int_categorical_read_from_strings_is_refused(
    small_table: pa.Table, tmp_path: Path
) -> None:
    table = small_table.set_column(
        0, "user_id", pa.array([str(v) for v in small_table["user_id"].to_pylist()])
    )
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError, match=r"column 'user_id'.*expected integers"):
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)


def test_config_with_other_column_names(small_table: pa.Table, tmp_path: Path) -> None:
    """Nothing assumes a column name: a config may map features to any columns."""
    config = parse_config(
        """
model_name: renamed
label: clicked
features:
  who: {kind: categorical, column: member, dtype: int, towers: [wide, deep]}
  what: {kind: categorical, column: item}
  tags: {kind: categorical_list, column: labels}
  how_old: {kind: numeric, column: age, quantiles: 4}
crosses:
  who_x_what: {features: [who, what], hash_buckets: 64}
"""
    )
    table = pa.table(
        {
            "member": small_table["user_id"],
            "item": small_table["movie_id"],
            "labels": small_table["genres"],
            "age": small_table["user_age"],
            "clicked": small_table["liked"],
        }
    )
    log = _parquet(table, tmp_path / "log")
    result = run_datagen(config, log, tmp_path / "out", echo=None)
    assert result.summary["rows"] == small_table.num_rows
    assert set(result.summary["vocabularies"]) == {"who", "what", "tags"}
    spec = tft.TFTransformOutput(str(tmp_path / "out")).transformed_feature_spec()
    assert set(spec) == {"who", "what", "tags", "how_old", "who_x_what", "clicked"}


# --------------------------------------------------------------------------------------------
# Two runs on one output, runs that were killed, and clearer messages


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding a lock file until its stdin closes; returns once it holds it."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from transform.paths import locked\n"
        f"with locked(Path({str(path)!r}), 'the output'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _release(holder: subprocess.Popen) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


@pytest.mark.timeout(300)
def test_a_second_run_on_one_output_is_refused_or_waits(
    small_table: pa.Table, tmp_path: Path
) -> None:
    from pipeline.datagen import lock_file
    from transform.paths import InUseError

    log = _parquet(small_table, tmp_path / "log")
    out = tmp_path / "out"
    holder = _hold_lock(lock_file(out))
    try:
        with pytest.raises(
            InUseError, match=rf"datagen output {out} is in use by PID {holder.pid}"
        ):
            run_datagen(MOVIES, log, out, echo=None)
        assert not out.exists() and not out.with_name("out.partial").exists()
        # What a killed run left beside the output is removed by the next run, once it holds
        # the lock (so never what a live run is writing).
        (tmp_path / "out.partial").mkdir()
        (tmp_path / "out.partial" / "half.tfrecord.gz").write_bytes(b"half")
        (tmp_path / "out.old-12345").mkdir()
        result: dict[str, object] = {}
        waiting = threading.Thread(
            target=lambda: result.update(done=run_datagen(MOVIES, log, out, echo=None, wait=True))
        )
        waiting.start()
        assert (tmp_path / "out.partial" / "half.tfrecord.gz").exists()
    finally:
        _release(holder)
    waiting.join(240)
    assert "done" in result
    assert (out / SUMMARY_JSON).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "log", "out"]


def test_output_inside_the_input_and_input_inside_the_output_are_refused(
    small_table: pa.Table, tmp_path: Path
) -> None:
    folder = tmp_path / "logs"
    _parquet(small_table, folder)
    with pytest.raises(InputError, match=r"--out .*logs/data is inside --input .*logs"):
        run_datagen(MOVIES, str(folder), folder / "data", echo=None)
    with pytest.raises(InputError, match=r"--out .*logs/data is inside --input"):
        run_datagen(MOVIES, f"{folder}/**", folder / "data", echo=None)
    with pytest.raises(InputError, match=r"is inside --out .*: replacing the output would delete"):
        run_datagen(MOVIES, str(folder), tmp_path, overwrite=True, echo=None)
    assert not (folder / "data").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet"]


@pytest.mark.timeout(300)
def test_a_train_split_of_no_rows_fails_datagen(small_table: pa.Table, tmp_path: Path) -> None:
    from pipeline import sources

    config = parse_config(
        {**MOVIES.to_dict(), "data": {"split_by": "occupation", "eval_fraction": 0.5}}
    )
    # One occupation for everyone, one that the split sends to eval.
    for value in ("artist", "doctor", "writer", "student", "engineer", "retired"):
        table = small_table.set_column(
            small_table.schema.get_field_index("occupation"),
            "occupation",
            pa.array([value] * small_table.num_rows),
        )
        batch = sources.to_tfxio_batch(config, table.to_batches()[0], "log")
        if sources.split_mask(config, batch).all():
            break
    else:
        pytest.fail("no occupation falls in the eval split")
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError, match=r"all 300 rows went to the eval split and none to train"):
        run_datagen(config, log, tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _plain_csv(table: pa.Table, path: Path) -> list[str]:
    """The table as CSV without quotes (lists joined by '|'); returns its lines."""
    lines = [",".join(table.column_names)]
    for row in table.to_pylist():
        cells = []
        for value in row.values():
            if isinstance(value, list):
                value = "|".join(value)
            cells.append("" if value is None else str(value))
        lines.append(",".join(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return lines


def _with_cell(line: str, index: int, value: str) -> str:
    """A line of `_plain_csv` with its field ``index`` set to ``value``."""
    cells = line.split(",")
    cells[index] = value
    return ",".join(cells)


def _as_a_spreadsheet_saves(lines: list[str], path: Path) -> None:
    """The lines with a UTF-8 byte order mark and CRLF line ends."""
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")


def test_csv_errors_name_the_column_and_the_line(small_table: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "log" / "log.csv"
    lines = _plain_csv(small_table, path)
    lines[42] = _with_cell(lines[42], small_table.column_names.index("popularity"), "very")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"log.csv: line 43, column 'popularity' \(feature 'popularity'\): .*'very'",
    ):
        run_datagen(MOVIES, str(path), tmp_path / "out", echo=None)


def test_csv_as_other_tools_write_it(small_table: pa.Table, tmp_path: Path) -> None:
    """A byte order mark and CRLF line ends (Excel's "CSV UTF-8"), labels written True and
    False (pandas' bool column): read as the plain file."""
    lines = _plain_csv(small_table, tmp_path / "plain" / "log.csv")
    label = small_table.column_names.index("liked")
    saved = tmp_path / "saved" / "log.csv"
    saved.parent.mkdir()
    written = [lines[0]]
    for line in lines[1:]:
        written.append(_with_cell(line, label, {"1": "True", "0": "False"}[line.split(",")[label]]))
    _as_a_spreadsheet_saves(written, saved)
    plain = run_datagen(MOVIES, str(tmp_path / "plain"), tmp_path / "out-plain", echo=None)
    spreadsheet = run_datagen(MOVIES, str(saved), tmp_path / "out-saved", echo=None)
    assert spreadsheet.summary["splits"] == plain.summary["splits"]
    assert spreadsheet.summary["vocabularies"] == plain.summary["vocabularies"]
    # An error in such a file is placed on its line, as in a plain one.
    bad = list(written)
    bad[42] = _with_cell(bad[42], small_table.column_names.index("popularity"), "very")
    _as_a_spreadsheet_saves(bad, saved)
    with pytest.raises(InputError, match=r"line 43, column 'popularity'"):
        run_datagen(MOVIES, str(saved), tmp_path / "out-bad", echo=None)
    # A label that is neither is named with its line.
    written[7] = _with_cell(written[7], label, "2")
    saved.write_text("\n".join(written))
    with pytest.raises(InputError, match=r"line 8, column 'liked' \(the label\).*'2'; a label is"):
        run_datagen(MOVIES, str(saved), tmp_path / "out-bad", echo=None)


def test_a_csv_header_read_as_one_column_or_with_spaces_says_why(
    small_table: pa.Table, tmp_path: Path
) -> None:
    lines = _plain_csv(small_table, tmp_path / "log" / "log.tsv")
    (tmp_path / "log" / "log.tsv").write_text("\n".join(x.replace(",", "\t") for x in lines))
    with pytest.raises(InputError, match=r'set data.csv_delimiter: "\\t" in the config'):
        run_datagen(MOVIES, str(tmp_path / "log"), tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()
    # Spaces after the commas stay in the names (and the values): said so, not "unreadable".
    (tmp_path / "log" / "log.tsv").unlink()
    (tmp_path / "log" / "log.csv").write_text("\n".join(x.replace(",", ", ") for x in lines))
    with pytest.raises(InputError, match=r"the header has spaces around its delimiters"):
        run_datagen(MOVIES, str(tmp_path / "log"), tmp_path / "out", echo=None)


def test_csv_unterminated_quote_is_named(small_table: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "log" / "log.csv"
    lines = _plain_csv(small_table, path)
    lines[10] = _with_cell(lines[10], 1, '"' + lines[10].split(",")[1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"log.csv: line 11: a quoted field .* never closed"):
        run_datagen(MOVIES, str(path), tmp_path / "out", echo=None)


def test_a_missing_label_is_not_told_to_take_a_default(
    small_table: pa.Table, tmp_path: Path
) -> None:
    labels = small_table["liked"].to_pylist()
    labels[7] = None
    table = small_table.set_column(
        small_table.schema.get_field_index("liked"), "liked", pa.array(labels, pa.int64())
    )
    log = _parquet(table, tmp_path / "log")
    with pytest.raises(InputError) as caught:
        run_datagen(MOVIES, log, tmp_path / "out", echo=None)
    message = str(caught.value)
    assert "column 'liked' (the label) has 1 missing value" in message
    assert "a label has no default" in message and "'default' in the config" not in message


def test_the_split_never_depends_on_the_label() -> None:
    """Without split_by, rows that differ only in their label land on the same side."""
    import dataclasses

    from pipeline.sources import split_mask
    from transform.config import DataConfig

    config = load_config("movies")
    config = dataclasses.replace(config, data=DataConfig(eval_fraction=0.5, split_by=""))
    rows = 400
    columns = {
        "user_id": pa.array([[i % 50] for i in range(rows)], pa.large_list(pa.int64())),
        "movie_id": pa.array([[f"m{i % 7}"] for i in range(rows)], pa.large_list(pa.string())),
        "liked": pa.array([[i % 2] for i in range(rows)], pa.large_list(pa.int64())),
    }
    batch = pa.RecordBatch.from_pydict(columns)
    is_eval = split_mask(config, batch)
    key = [(i % 50, i % 7) for i in range(rows)]
    side: dict[tuple[int, int], set[bool]] = {}
    for k, e in zip(key, is_eval, strict=True):
        side.setdefault(k, set()).add(bool(e))
    assert all(len(s) == 1 for s in side.values())  # one side per feature tuple
    assert 0 < is_eval.mean() < 1
    flipped = pa.RecordBatch.from_pydict(
        {
            **columns,
            "liked": pa.array([[1 - i % 2] for i in range(rows)], pa.large_list(pa.int64())),
        }
    )
    np.testing.assert_array_equal(split_mask(config, flipped), is_eval)


def test_a_salt_draws_another_split_of_the_same_keys() -> None:
    """Split by user, each salt holds out its own share of the users, the same one each time
    it is given; no user is held out under every salt (the daily loop's days)."""
    from pipeline.sources import split_mask

    config = load_config("movies")  # split_by: user_id, eval_fraction 0.2
    users = np.arange(5_000)
    batch = pa.RecordBatch.from_pydict(
        {"user_id": pa.array([[int(u)] for u in users], pa.large_list(pa.int64()))}
    )
    masks = {
        salt: split_mask(config, batch, salt) for salt in ["", *(f"day-{d}" for d in range(8))]
    }
    for salt, mask in masks.items():
        assert 0.17 < mask.mean() < 0.23, salt
        np.testing.assert_array_equal(split_mask(config, batch, salt), mask)
    assert (masks["day-0"] != masks[""]).any() and (masks["day-0"] != masks["day-1"]).any()
    always = np.logical_and.reduce([m for s, m in masks.items() if s])
    assert not always.any()
    overlap = (masks["day-0"] & masks["day-1"]).sum() / masks["day-0"].sum()
    assert overlap < 0.3  # independent draws share ~eval_fraction of their users


def test_csv_booleans_read_as_a_parquet_logs_booleans(
    small_table: pa.Table, tmp_path: Path
) -> None:
    """A column of true/false (pandas writes True/False) reads as 1 and 0 from CSV as from a
    Parquet boolean column: a numeric feature's values, a string id's tokens, and the log's
    integer type the model is then served with."""
    from pipeline import sources

    config = parse_config(
        {
            **MOVIES.to_dict(),
            "features": {
                **MOVIES.to_dict()["features"],
                "weekend": {"kind": "numeric", "towers": ["wide"]},
                "subscriber": {"kind": "categorical", "towers": ["wide"]},
            },
        }
    )
    rng = np.random.default_rng(0)
    table = small_table.append_column(
        "weekend", pa.array(rng.random(small_table.num_rows) < 0.3)
    ).append_column("subscriber", pa.array(rng.random(small_table.num_rows) < 0.5))
    parquet = sources.InputFiles(
        sources.InputFormat.PARQUET, (_parquet(table, tmp_path / "pq") + "/part-00000.parquet",)
    )
    lines = _plain_csv(table, tmp_path / "csv" / "log.csv")
    # As pandas writes a bool column, but for one line written in lower case.
    lines = [lines[0]] + [
        line.replace("true", "True").replace("false", "False") for line in lines[1:]
    ]
    lines[5] = lines[5].replace("True", "true").replace("False", "false")
    (tmp_path / "csv" / "log.csv").write_text("\n".join(lines) + "\n")
    csv = sources.InputFiles(sources.InputFormat.CSV, (str(tmp_path / "csv" / "log.csv"),))

    batches = {}
    for name, files in (("parquet", parquet), ("csv", csv)):
        files, batches[name] = _read_as_datagen(config, files)
        assert {"weekend", "subscriber"} <= set(files.int_columns), name
        assert sources.read_rows(config, files, 3)[0]["weekend"] in (0, 1)
    for column in ("weekend", "subscriber"):
        got = batches["csv"].column(column).flatten().to_pylist()
        assert got == batches["parquet"].column(column).flatten().to_pylist()
        assert set(got) == {0, 1}


def _read_as_datagen(config: Config, files: InputFiles) -> tuple[InputFiles, pa.RecordBatch]:
    """A one-file log's preflight and its rows as data generation reads them (TFXIO layout)."""
    from pipeline import sources

    files = sources.preflight(config, files)
    path = files.paths[0]
    if files.format is sources.InputFormat.PARQUET:
        read = sources.iter_parquet(config, path, 10_000)
    else:
        read = sources.iter_csv(config, path, 10_000, files.int_columns)
    raw = pa.Table.from_batches(list(read)).combine_chunks().to_batches()[0]
    return files, sources.to_tfxio_batch(config, raw, path, files.int_columns)


def test_a_tfrecord_log_is_read_as_it_types_its_columns(
    small_table: pa.Table, tmp_path: Path
) -> None:
    """A TFRecord log's whole numbers of a numeric feature (int64_list) and its label of 0.0 and
    1.0 (float_list) are found by preflight and decoded as such, by the cross explanations'
    reader too; a column that holds two types is refused, naming a record of each."""
    from pipeline import sources
    from pipeline.explain import raw_batches

    tfrecord = sources.InputFormat.TFRECORD
    path = logs.write_tfrecord(small_table, tmp_path / "log", float_columns=("liked",))
    files = sources.preflight(MOVIES, InputFiles(tfrecord, (str(path),)))
    assert files.int_columns == ("user_age",) and files.float_label
    batches = list(raw_batches(MOVIES, ["user_age", "liked"], str(path), files.int_columns))
    labels = np.concatenate([b["liked"].numpy() for b in batches])
    ages = np.concatenate([b["user_age"].numpy() for b in batches])
    assert labels.dtype == np.int64 and labels.tolist() == small_table["liked"].to_pylist()
    assert ages.dtype == np.int64 and ages.tolist() == small_table["user_age"].to_pylist()

    ints = logs.write_tfrecord(small_table.slice(0, 50), tmp_path / "a")
    floats = logs.write_tfrecord(small_table.slice(50), tmp_path / "b", float_columns=("user_age",))
    with pytest.raises(
        InputError,
        match=r"column 'user_age' \(feature 'user_age'\) holds int64_list values in "
        r".*a/log.tfrecord.gz \(record 1\) and float_list values in .*b/log.tfrecord.gz "
        r"\(record 1\); tf.Example parsing takes one type per column",
    ):
        sources.preflight(MOVIES, InputFiles(tfrecord, (str(ints), str(floats))))


def test_labels_as_logs_hold_them(small_table: pa.Table, tmp_path: Path) -> None:
    """A label of 0.0 and 1.0 (pandas keeps one with a missing value in a float column) reads
    as the integer label, from Parquet and from CSV; a NaN or any other value is refused, in
    every format, naming it."""
    from pipeline import sources

    liked = small_table.schema.get_field_index("liked")
    floats = small_table["liked"].cast(pa.float64())
    parquet, csv = sources.InputFormat.PARQUET, sources.InputFormat.CSV
    got = {}
    for name, table in (
        ("int", small_table),
        ("float", small_table.set_column(liked, "liked", floats)),
    ):
        path = _parquet(table, tmp_path / name) + "/part-00000.parquet"
        got[name] = _read_as_datagen(MOVIES, sources.InputFiles(parquet, (path,)))[1]
    lines = _plain_csv(small_table, tmp_path / "csv" / "log.csv")
    at = small_table.column_names.index("liked")
    lines = [lines[0]] + [_with_cell(li, at, li.split(",")[at] + ".0") for li in lines[1:]]
    (tmp_path / "csv" / "log.csv").write_text("\n".join(lines) + "\n")
    got["csv"] = _read_as_datagen(
        MOVIES, sources.InputFiles(csv, (str(tmp_path / "csv" / "log.csv"),))
    )[1]
    want = got["int"].column("liked").to_pylist()
    assert got["float"].column("liked").to_pylist() == want
    assert got["csv"].column("liked").to_pylist() == want

    for value, error in ((float("nan"), r"has 1 missing value\(s\) \(NaN\); a label has no default"),
                         (0.5, r"holds 0.5; labels must be 0 or 1")):  # fmt: skip
        labels = floats.to_pylist()
        labels[9] = value
        table = small_table.set_column(liked, "liked", pa.array(labels, pa.float64()))
        path = _parquet(table, tmp_path / f"bad-{value}") + "/part-00000.parquet"
        with pytest.raises(InputError, match=r"label column 'liked' " + error):
            _read_as_datagen(MOVIES, sources.InputFiles(parquet, (path,)))
    # A TFRecord log's labels are decoded as int64 and checked as the others are.
    decoded = pa.RecordBatch.from_arrays(
        [pa.array([[1], [0], [2]], pa.large_list(pa.int64()))], names=["liked"]
    )
    with pytest.raises(InputError, match=r"log.tfrecord: label 'liked' holds 2; labels must be"):
        sources.fill_missing(MOVIES, decoded, "log.tfrecord")
    # A rating given as the label is found in the Parquet footer, before any row is read.
    stars = [3 + v for v in small_table["liked"].to_pylist()]
    ratings = small_table.set_column(liked, "liked", pa.array(stars, pa.int64()))
    path = _parquet(ratings, tmp_path / "ratings") + "/part-00000.parquet"
    expected = r"'liked' holds values from 3 to 4; labels must be 0 or 1 \(make a rating"
    with pytest.raises(InputError, match=expected):
        sources.preflight(MOVIES, sources.InputFiles(parquet, (path,)))
