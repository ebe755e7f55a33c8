"""Shared fixtures: small logs and one datagen run per session for the tests that need one."""

from __future__ import annotations

import os

# Before TensorFlow is imported anywhere: tf.Transform's Keras layer is a tf_keras model.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import pyarrow as pa
import pytest

from tests import logs

MOVIES_ROWS = 3000


@pytest.fixture(scope="session")
def movies_table() -> pa.Table:
    """A small movie-ratings log in the shape of the ``movies`` preset."""
    return logs.movies_table(MOVIES_ROWS, seed=0)


@pytest.fixture(scope="session")
def movies_parquet(movies_table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The movies log as two Parquet files."""
    return logs.write_parquet(movies_table, tmp_path_factory.mktemp("movies_log"))


@pytest.fixture(scope="session")
def movies_data(movies_parquet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datagen output of the movies log (the one datagen run other test modules share)."""
    from pipeline.datagen import run_datagen
    from transform.config import load_config

    out = tmp_path_factory.mktemp("movies_data") / "data"
    run_datagen(load_config("movies"), str(movies_parquet), out, echo=None)
    return out
