"""Small impression logs for tests, written in each input format the pipeline reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

GENRES = ["drama", "comedy", "action", "horror", "romance", "scifi", "documentary"]
OCCUPATIONS = ["student", "engineer", "artist", "doctor", "writer", "retired", None]


def movies_table(rows: int, seed: int = 0) -> pa.Table:
    """A movie-ratings log in the shape of the ``movies`` preset config.

    The label depends on genre taste by occupation and on specific (recent movie, movie)
    pairs, so a model has something to learn; some occupations and release years are missing,
    which the config fills with defaults.
    """
    rng = np.random.default_rng(seed)
    n_users, n_movies = 200, 300
    user = rng.integers(0, n_users, rows)
    movie = rng.zipf(1.5, rows) % n_movies
    occ_of_user = rng.integers(0, len(OCCUPATIONS), n_users)
    movie_genres = [
        list(rng.choice(GENRES, size=rng.integers(1, 4), replace=False)) for _ in range(n_movies)
    ]
    recent = [
        [f"m{int(m)}" for m in rng.integers(0, n_movies, rng.integers(0, 6))] for _ in range(rows)
    ]
    occupation = [OCCUPATIONS[occ_of_user[u]] for u in user]
    logit = -1.0 + 0.8 * np.array(
        [
            ("drama" in movie_genres[m]) == (o in ("artist", "writer"))
            for m, o in zip(movie, occupation, strict=True)
        ]
    )
    logit += 2.0 * np.array(
        [f"m{(m + 1) % n_movies}" in r for m, r in zip(movie, recent, strict=True)]
    )
    liked = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    year = rng.integers(1950, 2024, rows).astype(float)
    year[rng.random(rows) < 0.05] = np.nan
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "occupation": pa.array(occupation, pa.string()),
            "user_age": pa.array(rng.integers(16, 80, rows), pa.int64()),
            "recent_movies": pa.array(recent, pa.list_(pa.string())),
            "movie_id": pa.array([f"m{int(m)}" for m in movie], pa.string()),
            "genres": pa.array([movie_genres[m] for m in movie], pa.list_(pa.string())),
            "release_year": pa.array(year, pa.float64(), from_pandas=True),
            "popularity": pa.array(rng.exponential(1.0, rows), pa.float64()),
            "liked": pa.array(liked, pa.int64()),
            "rating_time": pa.array(rng.integers(0, 10**9, rows), pa.int64()),
        }
    )


def write_parquet(table: pa.Table, folder: Path, shards: int = 2) -> Path:
    """Writes ``table`` as ``shards`` Parquet files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // shards)
    for i in range(shards):
        pq.write_table(
            table.slice(i * step, step),
            folder / f"part-{i:05d}.parquet",
            row_group_size=max(1, step // 2),
        )
    return folder


def joined_lists(table: pa.Table, list_delimiter: str = "|") -> pa.Table:
    """``table`` with each list column as strings of its values joined by ``list_delimiter``."""
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type):
            col = pa.array(
                [None if v is None else list_delimiter.join(v) for v in col.to_pylist()],
                pa.string(),
            )
        columns[name] = col
    return pa.table(columns)


def write_csv(table: pa.Table, folder: Path, list_delimiter: str = "|") -> Path:
    """Writes ``table`` as one CSV file, list columns joined by ``list_delimiter``."""
    folder.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(joined_lists(table, list_delimiter), folder / "log.csv")
    return folder


def write_tfrecord(
    table: pa.Table, folder: Path, gzip: bool = True, float_columns: tuple[str, ...] = ()
) -> Path:
    """Writes ``table`` as one TFRecord file of tf.Example (missing values left out).

    ``float_columns`` are written as float_list whatever their Arrow type.
    """
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("log.tfrecord.gz" if gzip else "log.tfrecord")
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for row in table.to_pylist():
            feats = {}
            for name, value in row.items():
                if value is None or (isinstance(value, float) and np.isnan(value)):
                    continue
                values = value if isinstance(value, list) else [value]
                if name in float_columns:
                    feats[name] = tf.train.Feature(
                        float_list=tf.train.FloatList(value=[float(v) for v in values])
                    )
                elif all(isinstance(v, str) for v in values):
                    feats[name] = tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[v.encode() for v in values])
                    )
                elif all(isinstance(v, int) for v in values):
                    feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
                else:
                    feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
            example = tf.train.Example(features=tf.train.Features(feature=feats))
            writer.write(example.SerializeToString())
    return path
