"""Rolling-window analysis: vocabularies and quantile boundaries over the last N days, with
tf.Transform's analyzer cache (one dataset key a day) on the real DirectRunner."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tensorflow_transform as tft

from pipeline.datagen import WindowDay, cached_day, run_datagen
from tests import logs
from transform.config import load_config
from transform.features import read_quantile_boundaries

MOVIES = load_config("movies")
REPO = Path(__file__).resolve().parents[1]
ONLY_DAY_1 = "m_only_day1"
ROWS = 240


def _day(tmp: Path, d: int, token: str | None = None) -> str:
    table = logs.movies_table(ROWS, seed=d)
    if token is not None:
        movies = table.column("movie_id").to_pylist()
        movies = [token if i % 4 == 0 else m for i, m in enumerate(movies)]
        table = table.set_column(
            table.schema.get_field_index("movie_id"), "movie_id", pa.array(movies)
        )
    return str(logs.write_parquet(table, tmp / "logs" / f"day={d}", shards=1))


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("window")
    return [_day(tmp, 1, ONLY_DAY_1), _day(tmp, 2), _day(tmp, 3)]


def _window(days: list[str], upto: int, n: int) -> list[WindowDay]:
    first = max(1, upto - n + 1)
    return [WindowDay(f"day-{d:03d}", days[d - 1]) for d in range(first, upto)]


def _movies(out: Path) -> set[bytes]:
    return set(tft.TFTransformOutput(str(out)).vocabulary_by_name("movies"))


def _datagen(days: list[str], d: int, out: Path, n: int, cache: Path | None) -> Path:
    run_datagen(
        MOVIES,
        days[d - 1],
        out,
        echo=None,
        window=_window(days, d, n),
        cache_dir=cache,
        cache_key=f"day-{d:03d}" if cache else None,
    )
    return out


@pytest.fixture(scope="module")
def cached_day3(days: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cached")
    cache = tmp / "cache"
    for d in (1, 2, 3):
        _datagen(days, d, tmp / f"day{d}", 3, cache)
    return tmp / "day3", cache


@pytest.mark.timeout(600)
def test_a_token_of_day_1_stays_in_day_3s_window_and_leaves_a_window_of_1(
    days: list[str], cached_day3: tuple[Path, Path], tmp_path: Path
) -> None:
    out, cache = cached_day3
    assert ONLY_DAY_1.encode() in _movies(out)
    assert all(cached_day(cache, f"day-{d:03d}") for d in (1, 2, 3))
    one = run_datagen(MOVIES, days[2], tmp_path / "alone", echo=None)
    assert ONLY_DAY_1.encode() not in _movies(one.out_dir)
    # Only the new day's rows are written.
    assert one.summary["splits"] == _summary_splits(out)


def _summary_splits(out: Path) -> dict:
    from transform.artifacts import read_summary

    return read_summary(out)["splits"]


@pytest.mark.timeout(600)
def test_cached_and_uncached_windows_give_the_same_analysis(
    days: list[str], cached_day3: tuple[Path, Path], tmp_path: Path
) -> None:
    cached, _ = cached_day3
    uncached = _datagen(days, 3, tmp_path / "uncached", 3, None)
    assert _movies(cached) == _movies(uncached)
    for name in MOVIES.vocabularies:
        a = tft.TFTransformOutput(str(cached)).vocabulary_by_name(name)
        b = tft.TFTransformOutput(str(uncached)).vocabulary_by_name(name)
        assert sorted(a) == sorted(b), name
    qa, qb = read_quantile_boundaries(str(cached)), read_quantile_boundaries(str(uncached))
    assert qa.keys() == qb.keys()
    for name in qa:
        np.testing.assert_allclose(qa[name], qb[name], rtol=1e-6, err_msg=name)


_RESTART = """
import sys
from pathlib import Path
from unittest import mock
from pipeline import datagen
from pipeline.datagen import WindowDay, run_datagen
from transform.config import load_config

days = sys.argv[1].split(",")
read = []
real = datagen._read_and_split
def spy(p, config, files, *args, **kwargs):
    read.append(list(files.paths))
    return real(p, config, files, *args, **kwargs)
with mock.patch.object(datagen, "_read_and_split", spy):
    run_datagen(
        load_config("movies"), days[2], Path(sys.argv[2]), echo=None,
        window=[WindowDay("day-001", days[0]), WindowDay("day-002", days[1])],
        cache_dir=sys.argv[3], cache_key="day-003",
    )
print(len(read))
"""


@pytest.mark.timeout(600)
def test_the_cache_survives_a_restart(
    days: list[str], cached_day3: tuple[Path, Path], tmp_path: Path
) -> None:
    cached, cache = cached_day3
    # What a run of day 3 killed mid-job left beside the cache is cleared by the next one.
    leftover = cache / ".partial-day-003" / "day-003"
    leftover.mkdir(parents=True)
    (leftover / "MANIFEST").write_bytes(b"cut short")
    # A new process reads only the new day: the earlier days come from the cache.
    done = subprocess.run(
        [sys.executable, "-c", _RESTART, ",".join(days), str(tmp_path / "again"), str(cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "1"
    assert _movies(tmp_path / "again") == _movies(cached)
    assert not list(cache.glob(".partial-*"))


@pytest.mark.timeout(600)
def test_the_run_analyses_its_window_from_its_cache(days: list[str], tmp_path: Path) -> None:
    from pipeline.run import ANALYZER_CACHE_DIR, DATA_DIR, RunOptions, _Run

    logs_dir = Path(days[0]).parent
    options = RunOptions(input=str(logs_dir), window=2, verbose=0)
    r = _Run(MOVIES, tmp_path / "run", options, False, lambda line: None, None)
    r.resolve_days()
    assert len(r.day_inputs) == 3
    seen = []
    for d in (1, 2, 3):
        data = tmp_path / "run" / DATA_DIR / f"day={d:03d}"
        result = r.datagen(d, data, None)
        r.state.finish(f"day {d} datagen", result)
        seen.append((result["window"], ONLY_DAY_1.encode() in _movies(data)))
    # Day 2's window holds day 1; day 3's (two days) no longer does.
    assert seen == [([1], True), ([1, 2], True), ([2, 3], False)]
    cache = tmp_path / "run" / ANALYZER_CACHE_DIR
    assert all(cached_day(cache, f"day-{d:03d}") for d in (1, 2, 3))


@pytest.mark.timeout(600)
def test_the_cache_is_tf_transforms_format_and_a_large_one_is_read_by_tf_transform(
    days: list[str], cached_day3: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    from pipeline import analyzer_cache

    cached, cache = cached_day3
    # Past the size read when the job is built, tf.Transform's own reader reads the cache
    # this module wrote: the same analysis comes out.
    monkeypatch.setattr(analyzer_cache, "EAGER_READ_BYTES", 0)
    shutil.copytree(cache, tmp_path / "cache", ignore=shutil.ignore_patterns("day-003"))
    again = _datagen(days, 3, tmp_path / "again", 3, tmp_path / "cache")
    for name in MOVIES.vocabularies:
        a = tft.TFTransformOutput(str(cached)).vocabulary_by_name(name)
        b = tft.TFTransformOutput(str(again)).vocabulary_by_name(name)
        assert sorted(a) == sorted(b), name
    qa, qb = read_quantile_boundaries(str(cached)), read_quantile_boundaries(str(again))
    for name in qa:
        np.testing.assert_allclose(qa[name], qb[name], rtol=1e-6, err_msg=name)


@pytest.mark.timeout(60)
def test_a_damaged_cache_file_is_an_error_naming_it(tmp_path: Path) -> None:
    import tensorflow as tf

    from pipeline.analyzer_cache import CacheError, _records

    path = tmp_path / "0-00000-of-00001.gz"
    with tf.io.TFRecordWriter(str(path), tf.io.TFRecordOptions(compression_type="GZIP")) as w:
        for record in (b"first accumulator", b"second accumulator"):
            w.write(record)
    pattern = str(tmp_path / "0-*-of-*")
    assert _records(pattern, "GZIP") == [b"first accumulator", b"second accumulator"]
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(CacheError, match=r"0-00000-of-00001\.gz"):
        _records(pattern, "GZIP")
    plain = tmp_path / "1-00000-of-00001"
    with tf.io.TFRecordWriter(str(plain)) as w:
        w.write(b"metadata")
    plain.write_bytes(plain.read_bytes()[:-3])
    with pytest.raises(CacheError, match="damaged"):
        _records(str(tmp_path / "1-*-of-*"), "")
