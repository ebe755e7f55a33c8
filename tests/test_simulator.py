"""Tests of the app-store simulator: files, schema, determinism and the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tools.simulator import (
    METADATA_FILE,
    AppStoreWorld,
    SimulationSummary,
    SimulatorSettings,
    simulate,
)

SMALL = SimulatorSettings(num_users=2_000, num_apps=400, num_categories=20, new_app_fraction=0.05)
DAYS = 2
ROWS = 5_003  # not a multiple of the chunk or shard size, so the last pieces are partial
CHUNK = 1_000
SHARD = 2_048

# The contract downstream configs are written against, spelled out rather than imported.
EXPECTED_COLUMNS = [
    ("query_id", pa.string()),
    ("user_id", pa.string()),
    ("country", pa.string()),
    ("language", pa.string()),
    ("gender", pa.string()),
    ("user_age", pa.int64()),
    ("installed_apps", pa.list_(pa.string())),
    ("device", pa.string()),
    ("hour", pa.int64()),
    ("day_of_week", pa.int64()),
    ("impression_app", pa.string()),
    ("app_category", pa.string()),
    ("app_age_days", pa.int64()),
    ("app_rating", pa.float64()),
    ("app_installs", pa.int64()),
    ("installed", pa.int64()),
    ("true_probability", pa.float64()),
]


def _run(out: Path, seed: int = 7, **kwargs) -> SimulationSummary:
    args = dict(days=DAYS, rows_per_day=ROWS, settings=SMALL, chunk_rows=CHUNK, shard_rows=SHARD)
    args.update(kwargs)
    return simulate(out, seed=seed, **args)


def _day(out: Path, day: int) -> pa.Table:
    return pq.read_table(out / f"day={day:03d}")


def _app_index(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.cast(pc.utf8_slice_codeunits(column, 1), pa.int64()).to_numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationSummary]:
    out = tmp_path_factory.mktemp("sim") / "logs"
    return out, _run(out)


@pytest.fixture(scope="module")
def world(run: tuple[Path, SimulationSummary]) -> AppStoreWorld:
    return AppStoreWorld.from_dir(run[0])


def test_same_seed_gives_identical_files(run, tmp_path):
    out, summary = run
    again = _run(tmp_path / "again")
    assert [p.relative_to(out) for p in summary.files] == [
        p.relative_to(again.out_dir) for p in again.files
    ]
    for a, b in zip(summary.files, again.files, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
        assert a.read_bytes() == b.read_bytes()


def test_different_seed_gives_different_logs(run, tmp_path):
    out, _ = run
    other = _run(tmp_path / "other", seed=8, days=1)
    a = _day(out, 1)
    b = pq.read_table(other.out_dir / "day=001")
    assert not a.equals(b)
    assert not np.array_equal(a["true_probability"].to_numpy(), b["true_probability"].to_numpy())


def test_schema_and_types_are_exact(run):
    out, summary = run
    for path in summary.files:
        schema = pq.read_schema(path)
        assert [(f.name, f.type) for f in schema] == EXPECTED_COLUMNS
    table = _day(out, 1)
    assert set(table["gender"].to_pylist()) <= {"f", "m", "u"}
    assert 13 <= pc.min(table["user_age"]).as_py() <= pc.max(table["user_age"]).as_py() <= 80
    assert 0 <= pc.min(table["hour"]).as_py() <= pc.max(table["hour"]).as_py() <= 23
    assert set(table["day_of_week"].to_pylist()) == {0}
    assert 1.0 <= pc.min(table["app_rating"]).as_py() <= pc.max(table["app_rating"]).as_py() <= 5.0
    assert pc.min(table["app_installs"]).as_py() >= 0
    assert set(table["installed"].to_pylist()) == {0, 1}
    user_ids = table["user_id"].to_pylist()
    assert all(u.startswith("u") and len(u) == 8 for u in user_ids[:100])
    lengths = pc.list_value_length(table["installed_apps"]).to_numpy()
    assert 4.0 < lengths.mean() < 14.0
    assert len(set(table["country"].to_pylist())) > 10


def test_label_rate_in_range_and_matches_truth(run):
    out, summary = run
    assert len(summary.label_rate_per_day) == DAYS
    for day, rate in enumerate(summary.label_rate_per_day, start=1):
        assert 0.05 <= rate <= 0.15
        table = _day(out, day)
        labels = table["installed"].to_numpy()
        assert labels.mean() == pytest.approx(rate)
        # 5k Bernoulli draws: the sampled rate sits within a few standard errors of the truth.
        assert abs(labels.mean() - table["true_probability"].to_numpy().mean()) < 0.02


def test_rows_are_streamed_into_shards_and_row_groups(run):
    out, summary = run
    assert summary.rows == DAYS * ROWS
    assert summary.rows_per_day == (ROWS,) * DAYS
    for day in range(1, DAYS + 1):
        parts = sorted((out / f"day={day:03d}").glob("part-*.parquet"))
        assert [p.name for p in parts] == [
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet",
        ]
        assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [
            SHARD,
            SHARD,
            ROWS - 2 * SHARD,
        ]
        for p in parts:
            meta = pq.ParquetFile(p).metadata
            assert all(meta.row_group(i).num_rows <= CHUNK for i in range(meta.num_row_groups))
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["rows_per_day"] == ROWS
    assert [d["rows"] for d in meta["per_day"]] == [ROWS] * DAYS
    assert [d["num_apps"] for d in meta["per_day"]] == list(summary.apps_per_day)
    assert SimulatorSettings.from_dict(meta["settings"]) == SimulatorSettings(
        **{**SMALL.to_dict(), "seed": 7}
    )


def test_queries_share_user_and_context(run):
    out, _ = run
    table = _day(out, 1)
    query = table["query_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
    # Queries are contiguous: no id comes back after another query started.
    assert len(np.unique(query)) == len(starts)
    sizes = np.diff(np.r_[starts, len(query)])
    assert sizes.max() <= SMALL.max_candidates
    assert np.median(sizes) >= SMALL.min_candidates
    same = np.repeat(starts, sizes)
    for column in ("user_id", "country", "device", "hour", "installed_apps"):
        values = table[column].to_pylist()
        assert all(values[i] == values[j] for i, j in zip(range(len(values)), same, strict=True))
    pairs = table.select(["query_id", "impression_app"]).to_pylist()
    assert len({(p["query_id"], p["impression_app"]) for p in pairs}) == len(pairs)


def test_new_apps_appear_on_day_two(run, world):
    out, summary = run
    day1_catalog = world.catalog(1).num_apps
    assert summary.apps_per_day == (400, 420)
    apps1 = _app_index(_day(out, 1)["impression_app"])
    installed1 = _app_index(pc.list_flatten(_day(out, 1)["installed_apps"]))
    assert apps1.max() < day1_catalog and installed1.max() < day1_catalog
    day2 = _day(out, 2)
    apps2 = _app_index(day2["impression_app"])
    new = apps2 >= day1_catalog
    assert new.any()
    assert set(day2["impression_app"].filter(pa.array(new)).to_pylist()).isdisjoint(
        set(_day(out, 1)["impression_app"].to_pylist())
    )
    assert set(day2["app_age_days"].filter(pa.array(new)).to_pylist()) == {0}
    assert set(day2["app_installs"].filter(pa.array(new)).to_pylist()) == {0}


def test_installs_join_the_installed_set_the_next_day(run):
    out, _ = run
    day1 = _day(out, 1).select(["user_id", "impression_app", "installed"]).to_pylist()
    won = {(r["user_id"], r["impression_app"]) for r in day1 if r["installed"] == 1}
    day2 = _day(out, 2).select(["user_id", "installed_apps"]).to_pylist()
    later = {r["user_id"]: set(r["installed_apps"]) for r in day2}
    checked = [(u, a) for u, a in won if u in later]
    assert len(checked) > 20
    assert all(a in later[u] for u, a in checked)


def test_logged_probability_matches_the_ground_truth_api(run, world):
    out, _ = run
    for day in range(1, DAYS + 1):
        table = _day(out, day)
        recomputed = world.true_probability_of_rows(table, day)
        np.testing.assert_allclose(recomputed, table["true_probability"].to_numpy(), rtol=1e-12)
    # Changing what matters for the truth changes the answer: the check above can fail.
    shifted = table.set_column(
        table.schema.get_field_index("hour"), "hour", pc.add(pc.multiply(table["hour"], 0), 3)
    )
    assert not np.allclose(
        world.true_probability_of_rows(shifted, DAYS), table["true_probability"].to_numpy()
    )


def test_memorisation_pairs_move_the_probability_by_their_effect(world):
    targets, companions, effects = world.memorisation_pairs()
    assert len(targets) > 0 and (effects > 0).any() and (effects < 0).any()
    # Pairs whose target has a single companion: the logit shift is exactly that pair's effect.
    single = np.flatnonzero(np.bincount(targets)[targets] == 1)[:50]
    n = len(single)
    user = np.arange(n) % SMALL.num_users
    hour = np.full(n, 12)
    device = np.zeros(n, np.int64)
    app = targets[single]
    empty = world.true_probability(1, user, app, hour, device, np.zeros(n + 1, np.int64), [])
    with_companion = world.true_probability(
        1, user, app, hour, device, np.arange(n + 1), companions[single]
    )
    shift = np.log(with_companion / (1 - with_companion)) - np.log(empty / (1 - empty))
    np.testing.assert_allclose(shift, effects[single], atol=1e-9)
    assert (with_companion[effects[single] > 0] > empty[effects[single] > 0]).all()


def test_companion_installed_raises_probability_in_the_logs(run, world):
    out, _ = run
    targets, companions, effects = world.memorisation_pairs(DAYS)
    positive = set(
        zip(targets[effects > 0].tolist(), companions[effects > 0].tolist(), strict=True)
    )
    negative = set(
        zip(targets[effects < 0].tolist(), companions[effects < 0].tolist(), strict=True)
    )
    has_positive_companion = {t for t, _ in positive}
    with_pair, without_pair = [], []
    for day in range(1, DAYS + 1):
        table = _day(out, day)
        app = _app_index(table["impression_app"])
        installed = [{int(x[1:]) for x in row} for row in table["installed_apps"].to_pylist()]
        prob = table["true_probability"].to_numpy()
        for a, inst, p in zip(app.tolist(), installed, prob, strict=True):
            if a not in has_positive_companion:
                continue
            up = any((a, c) in positive for c in inst)
            down = any((a, c) in negative for c in inst)
            if up and not down:
                with_pair.append(p)
            elif not up and not down:
                without_pair.append(p)
    assert len(with_pair) > 30
    assert np.mean(with_pair) > 2 * np.mean(without_pair)


def test_world_is_deterministic_and_restored_from_dir(world):
    fresh = AppStoreWorld(SimulatorSettings(**{**SMALL.to_dict(), "seed": 7}))
    for a, b in zip(fresh.memorisation_pairs(DAYS), world.memorisation_pairs(DAYS), strict=True):
        np.testing.assert_array_equal(a, b)
    assert world.last_day == DAYS
    # The restored world carries the installs of both days; a fresh one only the initial sets.
    users = np.arange(SMALL.num_users)
    restored_sizes = np.diff(world.installed_sets(users)[0])
    fresh_sizes = np.diff(fresh.installed_sets(users)[0])
    assert (restored_sizes >= fresh_sizes).all() and restored_sizes.sum() > fresh_sizes.sum()
    other = AppStoreWorld(SimulatorSettings(**{**SMALL.to_dict(), "seed": 8}))
    assert not np.array_equal(other.memorisation_pairs()[1], fresh.memorisation_pairs()[1])


def test_refuses_to_overwrite_day_folders(tmp_path):
    out = tmp_path / "logs"
    _run(out, days=2)
    keep = out / "notes.txt"
    keep.write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    with pytest.raises(FileExistsError, match="day=001"):
        _run(out, days=1)
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before

    summary = _run(out, days=1, seed=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("day=")) == ["day=001"]
    assert keep.read_text() == "mine"
    assert json.loads((out / METADATA_FILE).read_text())["days"] == 1
    assert summary.days == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"days": 0}, "days"),
        ({"rows_per_day": 0}, "rows_per_day"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"shard_rows": -1}, "shard_rows"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _run(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="max_candidates"):
        SimulatorSettings(min_candidates=10, max_candidates=5)
    with pytest.raises(ValueError, match="base_rate"):
        SimulatorSettings(base_rate=1.5)
    with pytest.raises(ValueError, match="bogus"):
        SimulatorSettings.from_dict({"bogus": 1})


def test_candidates_are_mostly_not_installed_and_installed_ones_are_unlikely(run):
    out, _ = run
    table = _day(out, 2)
    rows = table.select(["impression_app", "installed_apps", "true_probability"]).to_pylist()
    already = np.array([r["impression_app"] in r["installed_apps"] for r in rows])
    prob = table["true_probability"].to_numpy()
    # Retrieval filters installed apps; the few let through are rarely installed again.
    assert already.mean() < 0.01
    assert already.any()
    assert prob[already].mean() < prob[~already].mean()
