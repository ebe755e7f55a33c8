"""Shared fixtures: small logs, one datagen run and one trained model per session."""

from __future__ import annotations

import dataclasses
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


def small_model(config):
    """A config with a small model: quick to train (with early stopping), still wide & deep."""
    model = dataclasses.replace(config.model, hidden_units=(16, 8), embedding_dim=8)
    training = dataclasses.replace(config.training, batch_size=128)
    return dataclasses.replace(config, model=model, training=training)


@pytest.fixture(scope="session")
def movies_small_config():
    """The movies preset with a small model (see `small_model`)."""
    from transform.config import load_config

    return small_model(load_config("movies"))


@pytest.fixture(scope="session")
def movies_model(
    movies_data: Path, movies_small_config, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A model trained on the movies log (the one training run serving tests share)."""
    from trainer.train import train

    out = tmp_path_factory.mktemp("model") / "good"
    train(movies_small_config, movies_data, out, verbose=0)
    return out
