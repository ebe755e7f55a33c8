"""The preprocessing_fn on in-memory rows: exact ids, OOV, quantiles and ties at boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from transform.config import parse_config
from transform.features import make_preprocessing_fn, raw_feature_spec, read_quantile_boundaries

CONFIG = parse_config(
    """
model_name: t
label: y
features:
  app: {kind: categorical, vocabulary: apps, min_count: 2, towers: [wide, deep]}
  installed: {kind: categorical_list, vocabulary: apps, min_count: 2}
  hour: {kind: categorical, dtype: int}
  score: {kind: numeric, quantiles: 5}
crosses:
  installed_x_app: {features: [installed, app], hash_buckets: 1000}
"""
)

# Token counts over app and installed together: a 7, b 3, c 1, d 1. With min_count 2 the
# shared vocabulary is [a, b] (most frequent first) and c, d get the OOV id 2.
TRAIN = [
    {"y": 1, "app": b"a", "installed": [b"b"], "hour": 3, "score": 1.0},
    {"y": 0, "app": b"a", "installed": [], "hour": 3, "score": 2.0},
    {"y": 0, "app": b"b", "installed": [b"a", b"c"], "hour": 5, "score": 3.0},
    {"y": 1, "app": b"a", "installed": [b"a"], "hour": 3, "score": 4.0},
    {"y": 0, "app": b"b", "installed": [], "hour": 7, "score": 5.0},
    {"y": 0, "app": b"d", "installed": [], "hour": 5, "score": 6.0},
    {"y": 0, "app": b"a", "installed": [], "hour": 3, "score": 7.0},
    {"y": 1, "app": b"a", "installed": [], "hour": 3, "score": 8.0},
]
UNSEEN = [
    {"y": 0, "app": b"zzz", "installed": [b"a", b"zzz"], "hour": 9, "score": 4.5},
    {"y": 0, "app": b"b", "installed": [], "hour": 3, "score": -100.0},
    {"y": 0, "app": b"b", "installed": [], "hour": 3, "score": 100.0},
]


@pytest.fixture(scope="module")
def transformed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, Path]:
    out = tmp_path_factory.mktemp("tft")
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec(raw_feature_spec(CONFIG))
    )
    with tft_beam.Context(temp_dir=str(out / "tmp")):
        (train, _), transform_fn = (TRAIN, metadata) | tft_beam.AnalyzeAndTransformDataset(
            make_preprocessing_fn(CONFIG)
        )
        unseen, _ = ((UNSEEN, metadata), transform_fn) | tft_beam.TransformDataset()
        _ = transform_fn | tft_beam.WriteTransformFn(str(out))
    return list(train), list(unseen), out


def _hashed(*parts: list[bytes]) -> list[int]:
    tensors = [tf.constant([p]) for p in parts]
    return tf.sparse.cross_hashed(tensors, num_buckets=1000).values.numpy().tolist()


def test_shared_vocabulary_ids_and_oov(transformed) -> None:
    train, unseen, out = transformed
    assert [r["app"] for r in train] == [0, 0, 1, 0, 1, 2, 0, 0]
    assert [r["installed"].tolist() for r in train][:4] == [[1], [], [0, 2], [0]]
    assert unseen[0]["app"] == 2 and unseen[0]["installed"].tolist() == [0, 2]
    output = tft.TFTransformOutput(str(out))
    assert output.vocabulary_by_name("apps") == [b"a", b"b"]


def test_integer_vocabulary(transformed) -> None:
    train, unseen, _ = transformed
    # hour counts: 3 five times, 5 twice, 7 once; 9 was never seen.
    assert [r["hour"] for r in train] == [0, 0, 1, 0, 2, 1, 0, 0]
    assert unseen[0]["hour"] == 3


def test_quantile_normalisation_and_ties(transformed) -> None:
    train, unseen, out = transformed
    boundaries = read_quantile_boundaries(str(out))["score"]
    assert boundaries == [2.0, 4.0, 5.0, 7.0]
    # (i - 1) / (n_q - 1) for the i-th of 5 quantiles; a value equal to a boundary starts the
    # next quantile (2.0, 4.0, 5.0 and 7.0 below).
    assert [r["score"] for r in train] == pytest.approx(
        [0.0, 0.25, 0.25, 0.5, 0.75, 0.75, 1.0, 1.0]
    )
    assert [r["score"] for r in unseen] == pytest.approx([0.5, 0.0, 1.0])
    # The same mapping from the definition: i - 1 = number of boundaries <= x.
    raw = [row["score"] for row in TRAIN + UNSEEN]
    expected = np.searchsorted(boundaries, raw, side="right") / 4
    assert [r["score"] for r in train + unseen] == pytest.approx(expected.tolist())


def test_cross_product_is_hashed_pairs(transformed) -> None:
    train, unseen, _ = transformed
    assert train[0]["installed_x_app"].tolist() == _hashed([b"b"], [b"a"])
    assert train[1]["installed_x_app"].tolist() == []  # nothing installed: no pair
    assert sorted(train[2]["installed_x_app"].tolist()) == sorted(
        _hashed([b"a"], [b"b"]) + _hashed([b"c"], [b"b"])
    )
    # Crosses hash raw values, so unseen pairs still get (stable) ids.
    assert sorted(unseen[0]["installed_x_app"].tolist()) == sorted(
        _hashed([b"a"], [b"zzz"]) + _hashed([b"zzz"], [b"zzz"])
    )


def test_label_passes_through(transformed) -> None:
    train, _, _ = transformed
    assert [r["y"] for r in train] == [row["y"] for row in TRAIN]


def test_raw_feature_spec_for_serving_has_defaults() -> None:
    config = parse_config(
        """
model_name: t
label: y
features:
  a: {kind: categorical, towers: [wide, deep], default: "none"}
  b: {kind: categorical_list}
  x: {kind: numeric, default: 0.5}
"""
    )
    spec = raw_feature_spec(config, with_label=False, with_defaults=True)
    assert set(spec) == {"a", "b", "x"}
    assert spec["a"].default_value == "none" and spec["x"].default_value == 0.5
    assert isinstance(spec["b"], tf.io.VarLenFeature)
    assert raw_feature_spec(config)["a"].default_value is None
