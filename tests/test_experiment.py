"""The Table 1 experiment: ranking, common random numbers, intervals, and a tiny run end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.experiment import (
    ARMS,
    CONTROL,
    ORACLE,
    RANDOM,
    ExperimentResult,
    ExperimentSettings,
    bootstrap_means,
    draw_queries,
    installs_per_query,
    online_outcome,
    ratio_interval,
    run_experiment,
    top_k_mask,
)
from tools.simulator import AppStoreWorld, SimulatorSettings
from transform.config import OptimizerConfig, load_config
from transform.metrics import auc, query_auc

TINY_WORLD = SimulatorSettings(num_users=2000, num_apps=300, num_categories=12)


def test_top_k_mask_ranks_within_each_query_and_breaks_ties_by_the_tiebreak() -> None:
    query = np.array([0, 0, 0, 1, 1, 2, 0])
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.7])
    tiebreak = np.array([0.0, 0.0, 0.0, 0.9, 0.1, 0.0, 0.0])
    np.testing.assert_array_equal(
        top_k_mask(query, scores, 2, tiebreak), [False, True, False, True, True, True, True]
    )
    np.testing.assert_array_equal(
        top_k_mask(query, scores, 1, tiebreak), [False, True, False, False, True, True, False]
    )
    np.testing.assert_array_equal(top_k_mask(query, scores, 10, tiebreak), np.ones(7, bool))


def test_query_auc_is_the_mean_auc_within_queries() -> None:
    rng = np.random.default_rng(0)
    query = rng.integers(0, 200, 3000)
    labels = (rng.random(3000) < 0.3).astype(float)
    scores = np.round(rng.random(3000) + 0.3 * labels, 1)  # many ties
    expected = [
        auc(labels[query == q], scores[query == q])
        for q in np.unique(query)
        if 0 < labels[query == q].sum() < (query == q).sum()
    ]
    assert query_auc(query, labels, scores) == pytest.approx(np.mean(expected), abs=1e-12)
    # A score that only separates queries (like a user's propensity) raises the pooled AUC
    # but does not rank anything within a query.
    rate = (np.bincount(query, weights=labels) / np.bincount(query))[query]
    assert auc(labels, rate) > 0.55
    assert query_auc(query, labels, rate) == 0.5


def test_installs_use_the_same_draw_for_the_same_app() -> None:
    query = np.array([0, 0, 1, 1])
    p = np.array([0.5, 0.2, 0.9, 0.1])
    u = np.array([0.4, 0.1, 0.95, 0.05])
    realised, expected = installs_per_query(query, np.array([1, 0, 1, 1], bool), p, u, 2)
    np.testing.assert_array_equal(realised, [1.0, 1.0])
    np.testing.assert_allclose(expected, [0.5, 1.0])


def test_identical_arms_have_no_gain_and_a_known_lift_is_covered() -> None:
    rng = np.random.default_rng(0)
    control = rng.poisson(0.5, 20_000).astype(float)
    scaled = control * 1.1
    lifted = control + rng.binomial(1, 0.05, 20_000)  # +10% on average, paired with control
    values = np.column_stack([control, control, scaled, lifted])
    means = bootstrap_means(values, 400, np.random.default_rng(1))
    gain, ci, delta = ratio_interval(values, means, 1, 0, 0.95)
    assert gain == 0.0 and ci == (0.0, 0.0)
    gain, ci, delta = ratio_interval(values, means, 2, 0, 0.95)
    assert gain == pytest.approx(0.1) and ci == pytest.approx((0.1, 0.1))
    gain, ci, delta = ratio_interval(values, means, 3, 0, 0.95)
    assert ci[0] < gain < ci[1] and delta[0] < gain < delta[1]
    assert ci[0] < 0.1 < ci[1] and ci[1] - ci[0] < 0.03
    assert delta == pytest.approx(ci, abs=0.003)
    # An independent arm with the same mean: the interval is wide and covers zero.
    other = np.column_stack([control, rng.poisson(0.5, 20_000).astype(float)])
    gain, ci, _ = ratio_interval(other, bootstrap_means(other, 400, rng), 1, 0, 0.95)
    assert ci[0] < 0 < ci[1] and ci[1] - ci[0] > 0.01


def test_draw_queries_keeps_whole_queries_with_the_true_probability() -> None:
    world = AppStoreWorld(TINY_WORLD)
    sample = draw_queries(world, 2, 500, seed=3, chunk_rows=997)
    assert sample.num_queries == 500
    per_query = np.bincount(sample.query)
    assert per_query.min() >= 1 and per_query.max() <= TINY_WORLD.max_candidates
    # Whole queries: the mean candidate count is not cut short by chunk boundaries.
    assert per_query.mean() > 0.8 * (TINY_WORLD.min_candidates + TINY_WORLD.max_candidates) / 2
    assert np.all(np.diff(sample.query) >= 0)
    np.testing.assert_allclose(
        sample.probability, sample.rows.column("true_probability").to_numpy(), atol=1e-12
    )
    assert len(set(sample.rows.column("query_id").to_pylist())) == 500
    again = draw_queries(world, 2, 500, seed=3, chunk_rows=997)
    np.testing.assert_array_equal(again.probability, sample.probability)
    # The memorisation logit of a row is the sum of its app's pairs with an installed companion.
    target, companion, effect = world.memorisation_pairs(2)
    pairs = {(int(t), int(c)): float(e) for t, c, e in zip(target, companion, effect, strict=True)}
    apps = sample.rows.column("impression_app").to_pylist()
    installed = sample.rows.column("installed_apps").to_pylist()
    by_hand = [
        sum(pairs.get((int(a[1:]), int(c[1:])), 0.0) for c in cs)
        for a, cs in zip(apps, installed, strict=True)
    ]
    np.testing.assert_allclose(sample.memorisation, by_hand, atol=1e-12)
    assert (sample.memorisation > 0).mean() > 0.01


def test_online_outcome_orders_oracle_above_random() -> None:
    world = AppStoreWorld(TINY_WORLD)
    sample = draw_queries(world, 1, 2000, seed=0)
    scores = {
        CONTROL: sample.probability + np.random.default_rng(1).normal(0, 0.1, len(sample.query)),
        ORACLE: sample.probability,
        RANDOM: np.random.default_rng(2).random(len(sample.query)),
    }
    out = online_outcome(sample, scores, 1, seed=0, bootstrap_samples=300)
    oracle, random, control = out.arms[ORACLE], out.arms[RANDOM], out.arms[CONTROL]
    assert oracle.expected_installs_per_query >= control.expected_installs_per_query
    assert control.expected_installs_per_query > random.expected_installs_per_query
    assert oracle.installs_per_query > random.installs_per_query
    assert random.gain_ci[1] < 0 < oracle.gain_ci[0]
    assert control.gain == 0.0 and control.gain_ci == (0.0, 0.0)
    # Companion pairs raise the install probability, so the oracle shows more of them.
    assert oracle.companion_share > random.companion_share


# --------------------------------------------------------------------------------------------
# A tiny run end to end: simulate, datagen, three trainings, offline and online, the report.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> ExperimentResult:
    base = load_config("app_store")
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model,
            hidden_units=(32, 16),
            deep_optimizer=OptimizerConfig(name="adagrad", learning_rate=0.2),
        ),
        training=dataclasses.replace(base.training, batch_size=256),
    )
    settings = ExperimentSettings(
        days=2,
        rows_per_day=6000,
        simulator=TINY_WORLD,
        online_queries=3000,
        top_k=(2, 1),
        bootstrap_samples=300,
    )
    return run_experiment(tmp_path_factory.mktemp("experiment"), config, settings, progress=None)


def test_tiny_run_gives_sane_numbers(tiny_run: ExperimentResult) -> None:
    r = tiny_run
    assert r.offline_day == 2 and r.online_day == 3
    assert r.train_rows + r.eval_rows == 6000 and r.offline_rows == 6000
    assert set(r.offline) == {*ARMS, ORACLE}
    assert r.offline[ORACLE].auc > 0.7
    for arm in ARMS:
        assert 0.5 < r.offline[arm].auc < r.offline[ORACLE].auc
        assert np.isfinite(r.offline[arm].log_loss)
    for k, outcome in r.online.items():
        assert outcome.queries == 3000 and outcome.impressions_per_query <= k
        arms = outcome.arms
        assert set(arms) == {*ARMS, ORACLE, RANDOM}
        assert arms[CONTROL].gain == 0.0
        best = arms[ORACLE].expected_installs_per_query
        for arm, o in arms.items():
            assert o.gain_ci[0] <= o.gain <= o.gain_ci[1], (k, arm)
            assert o.expected_gain_ci[0] <= o.expected_gain <= o.expected_gain_ci[1], (k, arm)
            assert o.expected_installs_per_query <= best + 1e-12, (k, arm)
        assert arms[ORACLE].installs_per_query > arms[RANDOM].installs_per_query
        assert arms[RANDOM].gain_ci[1] < 0 < arms[ORACLE].gain_ci[0]
        for arm in ARMS:  # a trained ranker beats ranking at random
            assert arms[arm].expected_installs_per_query > arms[RANDOM].expected_installs_per_query
        assert set(outcome.comparisons) == {"wide_deep_vs_deep"}


def test_report_writes_table_json_and_png(
    tiny_run: ExperimentResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import common, table1

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    data: dict[str, Any] = table1.report(tiny_run, minutes=1.0)
    saved = json.loads((tmp_path / "table1.json").read_text())
    assert (
        saved["online"]["2"]["arms"]["oracle"]["gain"]
        == data["online"]["2"]["arms"]["oracle"]["gain"]
    )
    assert saved["offline"]["wide_deep"]["auc"] == tiny_run.offline["wide_deep"].auc
    md = (tmp_path / "table1.md").read_text()
    for label in ("Wide (control)", "Deep", "Wide & Deep", "Oracle", "Random"):
        assert f"| {label}" in md
    assert f"{tiny_run.offline['deep'].auc:.4f}" in md
    assert (tmp_path / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
