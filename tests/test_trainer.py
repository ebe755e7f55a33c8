"""The trainer: variable groups, the three models, resume, warm start, export and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras

from tests import logs
from trainer import export as export_lib
from trainer import train as train_lib
from trainer.errors import TrainError
from trainer.model import (
    build_model,
    check_variable_groups,
    checkpoint_objects,
    optimizer_slots,
)
from trainer.spec import ModelSpec, build_model_spec, incompatibilities, resolve_compute_dtype
from trainer.train import HEARTBEAT_TIMEOUT_S, TrainResult, train
from transform.artifacts import (
    CLASSIFY_SIGNATURE,
    EXPLAIN_SIGNATURE,
    LOGIT_OUTPUT,
    PROBABILITY_OUTPUT,
    RAW_SIGNATURE,
    SERVING_SIGNATURE,
    read_raw_eval_examples,
    read_warmup_requests,
    warmup_path,
)
from transform.config import Config, OptimizerConfig, load_config
from transform.features import recorded_raw_spec, serving_feature_spec

MOVIES = load_config("movies")
ROOT = Path(__file__).resolve().parents[1]


def small_config(**training: Any) -> Config:
    """The movies preset with a small deep tower, which learns fast enough for a few steps."""
    return dataclasses.replace(
        MOVIES,
        model=dataclasses.replace(
            MOVIES.model,
            hidden_units=(32, 16),
            deep_optimizer=OptimizerConfig(name="adagrad", learning_rate=0.2),
        ),
        training=dataclasses.replace(
            MOVIES.training,
            **{"batch_size": 256, "steps_per_checkpoint": 5, "epochs": 2, **training},
        ),
    )


STEPS_PER_EPOCH = -(-9334 // 256)  # train rows of the 12k-row log (fixed by its seed) / batch
CONFIG = small_config()


def _datagen(tmp_path_factory: pytest.TempPathFactory, rows: int, seed: int, name: str) -> Path:
    from pipeline.datagen import run_datagen

    folder = tmp_path_factory.mktemp(name)
    log = logs.write_parquet(logs.movies_table(rows, seed=seed), folder / "log")
    run_datagen(MOVIES, str(log), folder / "data", echo=None)
    return folder / "data"


@pytest.fixture(scope="session")
def trainer_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datagen output of a 12k-row movies log: enough eval rows for a stable AUC."""
    return _datagen(tmp_path_factory, 12_000, seed=0, name="trainer_data")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datagen output of a smaller, different log: a smaller vocabulary with other ids."""
    return _datagen(tmp_path_factory, 200, seed=1, name="trainer_small_data")


@pytest.fixture(scope="module")
def tft_output(trainer_data: Path) -> Any:
    return tft.TFTransformOutput(str(trainer_data))


def _restore(model_dir: Path, config: Config = CONFIG) -> tuple[Any, dict[str, int]]:
    """The model and optimizers of a model folder's latest checkpoint, and its counters."""
    spec = ModelSpec.load(model_dir / "model_spec.json")
    optimizers = {"wide": config.model.wide_optimizer, "deep": config.model.deep_optimizer}
    model = build_model(spec, optimizers)
    counters = {k: tf.Variable(0, dtype=tf.int64) for k in ("step", "epoch", "batch_in_epoch")}
    tracker = {
        "best_value": tf.Variable(0.0, dtype=tf.float64),
        "best_step": tf.Variable(0, dtype=tf.int64),
        "evals_since_best": tf.Variable(0, dtype=tf.int64),
    }
    checkpoint = tf.train.Checkpoint(**checkpoint_objects(model), **counters, **tracker)
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    checkpoint.restore(latest).assert_consumed()
    return model, {k: int(v.numpy()) for k, v in counters.items()}


def _tokens(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1]


# --------------------------------------------------------------------------------------------
# Model and variable groups


@pytest.mark.parametrize("towers", ["wide", "deep", "wide_deep"])
def test_variable_groups_are_disjoint_and_cover_every_variable(tft_output: Any, towers: str):
    spec = build_model_spec(CONFIG, tft_output, towers)
    model = build_model(
        spec, {"wide": CONFIG.model.wide_optimizer, "deep": CONFIG.model.deep_optimizer}
    )
    groups = model.variable_groups()
    ids = [id(v) for g in groups.values() for v in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(v) for v in model.trainable_variables}
    assert (
        set(groups) == {"wide_deep": {"wide", "deep"}, "wide": {"wide"}, "deep": {"deep"}}[towers]
    )
    # The one bias b of equation 3 belongs to the wide (linear) part when there is one.
    assert any(v is model.bias for v in groups["wide" if towers != "deep" else "deep"])
    if towers != "deep":
        wide_tables = {v.name.split(":")[0] for v in model.wide.trainable_variables}
        assert wide_tables == {i.name for i in spec.wide_inputs}
        assert {"occupation_x_genre", "recent_x_movie", "popularity"} <= wide_tables
    if towers != "wide":
        # One table per vocabulary: movie_id and recent_movies share "movies".
        assert set(model.deep.embeddings) == {
            i.vocabulary for i in spec.deep_inputs if i.embedding_dim
        }
        assert "movie_id" not in model.deep.embeddings
        assert model.deep.embeddings["genres"].shape[1] == 8  # its own embedding_dim
        assert model.deep.embeddings["movies"].shape[1] == 16  # model.embedding_dim
    # Optimizers are the paper's: FTRL (with L1) for wide, AdaGrad for deep.
    kinds = {k: type(o).__name__ for k, o in model.tower_optimizers.items()}
    assert kinds == {k: {"wide": "Ftrl", "deep": "Adagrad"}[k] for k in groups}


def test_check_variable_groups_refuses_overlap_and_orphans():
    a, b, c = tf.Variable(1.0, name="a"), tf.Variable(2.0, name="b"), tf.Variable(3.0, name="c")
    check_variable_groups({"wide": [a], "deep": [b, c]}, [a, b, c])
    with pytest.raises(TrainError, match="both the wide and the deep optimizer"):
        check_variable_groups({"wide": [a, b], "deep": [b, c]}, [a, b, c])
    with pytest.raises(TrainError, match="trained by no optimizer: c"):
        check_variable_groups({"wide": [a], "deep": [b]}, [a, b, c])
    with pytest.raises(TrainError, match="does not train"):
        check_variable_groups({"wide": [a], "deep": [b, c]}, [a, b])


def test_a_variable_outside_the_towers_is_refused(tft_output: Any):
    spec = build_model_spec(CONFIG, tft_output, "wide_deep")
    model = build_model(spec)
    model.stray = tf.Variable(tf.zeros([3]), name="stray")  # trainable, in no tower
    optimizers = {
        "wide": tf_keras.optimizers.legacy.SGD(),
        "deep": tf_keras.optimizers.legacy.SGD(),
    }
    with pytest.raises(TrainError, match="trained by no optimizer: stray"):
        model.set_optimizers(**optimizers)


def test_wide_tower_is_a_linear_model_over_active_ids(tft_output: Any):
    """One-hot, multi-hot (summed), quantile-bucket one-hot and hashed crosses."""
    spec = build_model_spec(CONFIG, tft_output, "wide")
    model = build_model(spec)
    for name, table in model.wide.tables.items():
        table.assign(
            tf.reshape(tf.range(table.shape[0], dtype=tf.float32), [-1, 1]) * 0.001
            + (1000.0 if name == "occupation" else 0.0)
        )
    features = {
        "occupation": tf.constant([2, 0], tf.int64),
        "genres": tf.sparse.SparseTensor([[0, 0], [0, 1]], tf.constant([1, 3], tf.int64), [2, 2]),
        "popularity": tf.constant([1.0, 0.0]),  # buckets 9 and 0
        "occupation_x_genre": tf.sparse.SparseTensor([[1, 0]], tf.constant([7], tf.int64), [2, 1]),
        "recent_x_movie": tf.sparse.SparseTensor(
            tf.zeros([0, 2], tf.int64), tf.zeros([0], tf.int64), [2, 0]
        ),
    }
    logits = model(features).numpy().ravel()
    expected = [1000.002 + 0.001 + 0.003 + 0.009, 1000.0 + 0.0 + 0.007]
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_deep_tower_pools_lists_and_zeros_empty_lists(tft_output: Any):
    spec = build_model_spec(CONFIG, tft_output, "deep")
    model = build_model(spec)
    table = model.deep.embeddings["movies"]
    ids = tf.sparse.SparseTensor([[0, 0], [0, 1]], tf.constant([4, 6], tf.int64), [2, 2])
    pooled = tf.nn.safe_embedding_lookup_sparse(table, ids, combiner="mean").numpy()
    np.testing.assert_allclose(pooled[0], (table.numpy()[4] + table.numpy()[6]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(pooled[1], np.zeros(table.shape[1]))


class FakeTransformOutput:
    """The two things the model spec reads from a transform output, derived from a config."""

    def __init__(self, config: Config, vocabulary_size: int = 50, drop: str = "", **types: Any):
        self.spec: dict[str, Any] = {config.label: tf.io.FixedLenFeature([], tf.int64)}
        for f in config.features:
            if f.kind.value == "categorical_list":
                self.spec[f.name] = tf.io.VarLenFeature(tf.int64)
            elif f.kind.value == "numeric":
                self.spec[f.name] = tf.io.FixedLenFeature([], tf.float32)
            else:
                self.spec[f.name] = tf.io.FixedLenFeature([], tf.int64)
        for c in config.crosses:
            self.spec[c.name] = tf.io.VarLenFeature(tf.int64)
        self.spec.update(types)
        self.spec.pop(drop, None)
        self.vocabulary_size = vocabulary_size

    def transformed_feature_spec(self) -> dict[str, Any]:
        return dict(self.spec)

    def vocabulary_size_by_name(self, name: str) -> int:
        return self.vocabulary_size


def _random_batch(spec: ModelSpec, rows: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    batch: dict[str, Any] = {}
    for i in spec.inputs:
        if i.role.value == "numeric":
            batch[i.name] = tf.constant(rng.random(rows), tf.float32)
        elif i.is_sparse:
            batch[i.name] = tf.sparse.from_dense(
                tf.constant(rng.integers(0, i.size, (rows, 3)) * rng.integers(0, 2, (rows, 3)))
            )
        else:
            batch[i.name] = tf.constant(rng.integers(0, i.size, rows), tf.int64)
    return batch


@pytest.mark.parametrize("towers", ["wide", "deep", "wide_deep"])
def test_the_app_store_model_builds_and_takes_a_step(towers: str):
    """The other preset: the paper's own model (installed apps x impression app in wide)."""
    config = load_config("app_store")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, hidden_units=(8, 4))
    )
    spec = build_model_spec(config, FakeTransformOutput(config), towers)
    if towers != "deep":
        assert [i.name for i in spec.wide_inputs] == ["impression_app", "installed_x_impression"]
        assert spec.input("installed_x_impression").size == 200_000
    model = build_model(
        spec, {"wide": config.model.wide_optimizer, "deep": config.model.deep_optimizer}
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    out = model.train_step((_random_batch(spec), tf.ones([8, 1])))
    assert np.isfinite(out["loss"].numpy())
    variables = model.trainable_variables
    changed = [not np.array_equal(a, v.numpy()) for a, v in zip(before, variables, strict=True)]
    assert any(changed)
    for optimizer in model.tower_optimizers.values():
        assert int(optimizer.iterations.numpy()) == 1


def test_bfloat16_deep_tower_scores_like_float32_and_trains_float32_weights():
    config = load_config("app_store")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, hidden_units=(64, 32))
    )
    spec = build_model_spec(config, FakeTransformOutput(config), "wide_deep")
    optimizers = {"wide": config.model.wide_optimizer, "deep": config.model.deep_optimizer}
    f32 = build_model(dataclasses.replace(spec, compute_dtype="float32"), optimizers)
    bf16 = build_model(dataclasses.replace(spec, compute_dtype="bfloat16"), optimizers)
    bf16.set_weights(f32.get_weights())  # same variables, same order, float32 in both
    assert [layer.compute_dtype for layer in bf16.deep.hidden] == ["bfloat16", "bfloat16"]
    assert all(v.dtype == tf.float32 for v in bf16.trainable_variables)
    batch = _random_batch(spec, rows=64)
    a, b = f32(batch).numpy(), bf16(batch).numpy()
    assert b.dtype == np.float32
    # 8 bits of mantissa in the products, float32 sums: logits agree to about 1%.
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.02)
    assert not np.array_equal(a, b)  # the products really were bfloat16
    before = [v.numpy().copy() for v in bf16.deep.trainable_variables]
    out = bf16.train_step((batch, tf.ones([64, 1])))
    assert np.isfinite(out["loss"].numpy())
    after = bf16.deep.trainable_variables
    assert all(v.dtype == tf.float32 for v in after)
    assert all(not np.array_equal(x, v.numpy()) for x, v in zip(before, after, strict=True))


def test_auto_compute_dtype_follows_the_cpu(tmp_path: Path):
    def cpu(flags: str) -> Path:
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
        return path

    assert resolve_compute_dtype("auto", cpu("avx512f avx512_bf16")) == "bfloat16"
    assert resolve_compute_dtype("auto", cpu("amx_tile amx_bf16")) == "bfloat16"
    assert resolve_compute_dtype("auto", cpu("avx512f")) == "float32"
    assert resolve_compute_dtype("auto", tmp_path / "missing") == "float32"
    assert resolve_compute_dtype("float32", cpu("avx512_bf16")) == "float32"
    assert resolve_compute_dtype("bfloat16", cpu("")) == "bfloat16"


def test_read_records_reads_every_shard_once_in_a_fixed_order(tmp_path: Path):
    from trainer.data import READ_BLOCK, read_records

    expected = []
    for shard in range(3):
        path = tmp_path / f"part-{shard:05d}.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), "GZIP") as writer:
            for i in range(READ_BLOCK * 2 + 7):
                record = f"{shard}:{i}".encode()
                writer.write(record)
                expected.append(record)
    files = [str(p) for p in tmp_path.iterdir()]
    first = [r.numpy() for r in read_records(files)]
    assert sorted(first) == sorted(expected)
    assert [r.numpy() for r in read_records(list(reversed(files)))] == first
    assert first[:READ_BLOCK] == expected[:READ_BLOCK]  # whole blocks, not one record a shard
    one = [r.numpy() for r in read_records([str(tmp_path / "part-00001.tfrecord.gz")])]
    assert one == [r for r in expected if r.startswith(b"1:")]


def test_transformed_features_must_match_the_config():
    config = load_config("app_store")
    with pytest.raises(TrainError, match="no feature 'app_rating' of the config"):
        build_model_spec(config, FakeTransformOutput(config, drop="app_rating"), "wide_deep")
    wrong = FakeTransformOutput(config, installed_apps=tf.io.FixedLenFeature([], tf.int64))
    with pytest.raises(TrainError, match="'installed_apps': expected a categorical_list"):
        build_model_spec(config, wrong, "wide_deep")
    extra = FakeTransformOutput(config, surprise=tf.io.FixedLenFeature([], tf.int64))
    with pytest.raises(TrainError, match="'surprise' is not in the config"):
        build_model_spec(config, extra, "wide_deep")


def test_incompatibilities_name_each_difference():
    config = load_config("app_store")
    before = build_model_spec(config, FakeTransformOutput(config), "wide_deep")
    grown = build_model_spec(config, FakeTransformOutput(config, 5000), "wide_deep")
    assert incompatibilities(before, grown) == []  # vocabularies may grow
    crosses = tuple(dataclasses.replace(c, hash_buckets=1000) for c in config.crosses)
    features = tuple(
        dataclasses.replace(f, quantiles=5) if f.name == "app_rating" else f
        for f in config.features
    )
    other = dataclasses.replace(config, crosses=crosses, features=features)
    after = build_model_spec(other, FakeTransformOutput(other), "wide_deep")
    assert incompatibilities(before, after) == [
        "features.app_rating.quantiles: 20 before, 5 now",
        "crosses.installed_x_impression.hash_buckets: 200000 before, 1000 now",
    ]


# --------------------------------------------------------------------------------------------
# Training the paper's three models


@pytest.fixture(scope="module")
def trained(trainer_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("towers")
    return {
        towers: train(CONFIG, trainer_data, out / towers, towers=towers, export=False, verbose=0)
        for towers in ("wide", "deep", "wide_deep")
    }


@pytest.mark.parametrize("towers", ["wide", "deep", "wide_deep"])
def test_each_model_trains_and_beats_chance(trained: dict[str, TrainResult], towers: str):
    result = trained[towers]
    m = result.metrics
    assert result.status == "complete"
    assert result.step == result.total_steps == 2 * STEPS_PER_EPOCH
    # AUC's standard error on 2.7k eval rows is about 0.011: 0.52 is well clear of chance.
    assert m["auc"] > 0.52, m
    assert m["log_loss"] < 0.69, m
    assert m["examples"] == _summary(result)["splits"]["eval"]["rows"]
    assert abs(m["label_rate"] - _summary(result)["splits"]["eval"]["label_rate"]) < 1e-6
    assert result.examples_per_second > 0
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert saved["auc"] == pytest.approx(m["auc"]) and saved["towers"] == towers
    assert (result.out_dir / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _summary(result: TrainResult) -> dict[str, Any]:
    return json.loads(Path(result.metrics["data_dir"], "summary.json").read_text())


def test_tensorboard_logs_hold_loss_and_eval_metrics(trained: dict[str, TrainResult]):
    out = trained["wide_deep"].out_dir
    tags: dict[str, set[str]] = {}
    for split in ("train", "eval"):
        files = list((out / "logs" / split).glob("events.out.tfevents.*"))
        assert files, split
        tags[split] = {
            v.tag
            for f in files
            for event in tf.compat.v1.train.summary_iterator(str(f))
            for v in event.summary.value
        }
    assert {"loss", "examples_per_second"} <= tags["train"]
    assert {"auc", "log_loss"} <= tags["eval"]


def test_a_finished_model_is_refused_unless_overwrite(
    trained: dict[str, TrainResult], trainer_data: Path
):
    out = trained["wide"].out_dir
    with pytest.raises(TrainError, match="finished model"):
        train(CONFIG, trainer_data, out, towers="wide", export=False, verbose=0)
    again = train(
        CONFIG,
        trainer_data,
        out,
        towers="wide",
        overwrite=True,
        max_steps=2,
        export=False,
        verbose=0,
    )
    assert again.step == 2 and again.resumed_from_step == 0 and again.status == "stopped"


# --------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_continues_where_it_stopped(trainer_data: Path, tmp_path: Path):
    whole = train(CONFIG, trainer_data, tmp_path / "whole", export=False, verbose=0)
    first = train(CONFIG, trainer_data, tmp_path / "split", max_steps=7, export=False, verbose=0)
    assert (first.status, first.step, first.resumed_from_step) == ("stopped", 7, 0)
    _, counters = _restore(tmp_path / "split")
    assert counters == {"step": 7, "epoch": 0, "batch_in_epoch": 7}

    second = train(CONFIG, trainer_data, tmp_path / "split", export=False, verbose=0)
    assert (second.status, second.step, second.resumed_from_step) == ("complete", 74, 7)

    a, counters_a = _restore(tmp_path / "whole")
    b, counters_b = _restore(tmp_path / "split")
    assert counters_a == counters_b == {"step": 74, "epoch": 2, "batch_in_epoch": 0}
    # No step was trained twice: each optimizer took exactly one update per step.
    for tower in ("wide", "deep"):
        assert int(b.tower_optimizers[tower].iterations.numpy()) == 74
    # The interrupted run ends where the uninterrupted one does, slots included.
    for tower, group in a.variable_groups().items():
        for va, vb in zip(group, b.variable_groups()[tower], strict=True):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-5, err_msg=va.name)
            slots_a = optimizer_slots(a.tower_optimizers[tower], va)
            slots_b = optimizer_slots(b.tower_optimizers[tower], vb)
            assert (
                set(slots_a) == {"wide": {"accumulator", "linear"}, "deep": {"accumulator"}}[tower]
            )
            for name in slots_a:
                np.testing.assert_allclose(
                    slots_a[name].numpy(), slots_b[name].numpy(), atol=1e-5, err_msg=name
                )
    assert second.metrics["auc"] == pytest.approx(whole.metrics["auc"], abs=1e-4)


def test_callbacks_see_the_model_every_steps_per_execution(trainer_data: Path, tmp_path: Path):
    class Recorder(tf_keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[Any] = []

        def on_train_begin(self, logs: Any = None) -> None:
            self.events.append(("begin", int(self.model.tower_optimizers["deep"].iterations)))

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.events.append((batch, int(self.model.tower_optimizers["deep"].iterations)))
            assert np.isfinite(logs["loss"])
            time.sleep(0.2)  # not counted as training time

        def on_train_end(self, logs: Any = None) -> None:
            self.events.append(("end", None))

    recorder = Recorder()
    # 37 steps an epoch and a checkpoint every 5: calls end at the multiples of 4 and of 5.
    started = time.monotonic()
    result = train(
        CONFIG,
        trainer_data,
        tmp_path / "m",
        max_steps=21,
        export=False,
        verbose=0,
        callbacks=[recorder],
        steps_per_execution=4,
    )
    wall = time.monotonic() - started
    ends = [4, 5, 8, 10, 12, 15, 16, 20, 21]
    assert recorder.events == [("begin", 0), *((n, n) for n in ends), ("end", None)]
    seconds = 21 * CONFIG.training.batch_size / result.examples_per_second
    assert seconds <= wall - 0.2 * len(ends)
    with pytest.raises(TrainError, match="steps_per_execution: expected an integer >= 1"):
        train(CONFIG, trainer_data, tmp_path / "n", steps_per_execution=0, verbose=0)


def test_resume_after_kill_9(trainer_data: Path, tmp_path: Path):
    """A run killed mid-training restarts from its last checkpoint, not from step 0."""
    out = tmp_path / "killed"
    config_yaml = tmp_path / "config.yaml"
    config = small_config(steps_per_checkpoint=1, batch_size=64)
    config_yaml.write_text(config.to_yaml())
    code = (
        "from transform.config import load_config\n"
        "from trainer.train import train\n"
        f"train(load_config({str(config_yaml)!r}), {str(trainer_data)!r}, {str(out)!r}, "
        "epochs=1, export=False, verbose=0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_quiet_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
            if latest and int(latest.rsplit("-", 1)[1]) >= 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = int(tf.train.latest_checkpoint(str(out / "checkpoints")).rsplit("-", 1)[1])
    total = -(-9334 // 64)
    assert 10 <= killed_at < total
    assert json.loads((out / "run.json").read_text())["status"] == "training"

    result = train(config, trainer_data, out, epochs=1, export=False, verbose=0)
    assert result.resumed_from_step == killed_at
    assert result.step == total and result.status == "complete"
    model, _ = _restore(out, config)
    assert int(model.tower_optimizers["deep"].iterations.numpy()) == total


def _quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trainer_data: Path, tmp_path: Path):
    config = dataclasses.replace(
        small_config(steps_per_checkpoint=1),
        model=dataclasses.replace(
            CONFIG.model, deep_optimizer=OptimizerConfig(name="sgd", learning_rate=1e30)
        ),
    )
    with pytest.raises(TrainError, match=r"NaN or infinite between steps 1 and 2.*ckpt-1"):
        train(config, trainer_data, tmp_path / "nan", export=False, verbose=0)
    model, counters = _restore(tmp_path / "nan", config)
    assert counters["step"] == 1
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    assert not (tmp_path / "nan" / "export").exists()


# --------------------------------------------------------------------------------------------
# Warm start


@pytest.fixture(scope="module")
def previous_model(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("previous") / "model"
    return train(CONFIG, small_data, out, epochs=1, export=False, verbose=0)


def test_warm_start_carries_rows_by_token(
    previous_model: TrainResult, trainer_data: Path, small_data: Path, tmp_path: Path
):
    result = train(
        CONFIG,
        trainer_data,
        tmp_path / "warm",
        warm_start_from=previous_model.out_dir,
        max_steps=0,
        export=False,
        verbose=0,
    )
    old_vocab = _tokens(previous_model.out_dir / "vocabularies" / "movies")
    new_vocab = _tokens(tmp_path / "warm" / "vocabularies" / "movies")
    assert len(new_vocab) > len(old_vocab)  # the vocabulary grew
    moved = [t for t in old_vocab if t in new_vocab and new_vocab.index(t) != old_vocab.index(t)]
    fresh = [t for t in new_vocab if t not in old_vocab]
    assert moved and fresh

    before, _ = _restore(previous_model.out_dir)
    after, counters = _restore(tmp_path / "warm")
    assert counters["step"] == 0
    untrained = build_model(after.spec)  # the fresh initial values (seeded)
    # movie_id and recent_movies share the vocabulary "movies" and its one embedding table.
    assert set(after.deep.embeddings) >= {"movies"}
    assert not {"movie_id", "recent_movies"} & set(after.deep.embeddings)
    for table in ("movies",):
        old_rows = before.deep.embeddings[table].numpy()
        new_rows = after.deep.embeddings[table].numpy()
        for token in moved[:20]:
            np.testing.assert_array_equal(
                new_rows[new_vocab.index(token)], old_rows[old_vocab.index(token)]
            )
        for token in fresh[:5]:
            np.testing.assert_array_equal(
                new_rows[new_vocab.index(token)],
                untrained.deep.embeddings[table].numpy()[new_vocab.index(token)],
            )
        old_slot = optimizer_slots(before.tower_optimizers["deep"], before.deep.embeddings[table])
        new_slot = optimizer_slots(after.tower_optimizers["deep"], after.deep.embeddings[table])
        token = moved[0]
        np.testing.assert_array_equal(
            new_slot["accumulator"].numpy()[new_vocab.index(token)],
            old_slot["accumulator"].numpy()[old_vocab.index(token)],
        )
        report = result.warm_start.rows[f"deep/{table}"]
        assert report.carried == len(set(old_vocab) & set(new_vocab))
        assert report.new == len(fresh) and report.moved >= len(moved)

    # Wide weights of a categorical feature, and FTRL's slots, by token too.
    occupation_old = _tokens(previous_model.out_dir / "vocabularies" / "occupation")
    occupation_new = _tokens(tmp_path / "warm" / "vocabularies" / "occupation")
    for token in occupation_old:
        i, j = occupation_old.index(token), occupation_new.index(token)
        w_old, w_new = before.wide.tables["occupation"], after.wide.tables["occupation"]
        assert w_new.numpy()[j] == w_old.numpy()[i]
        for slot in ("accumulator", "linear"):
            s_old = optimizer_slots(before.tower_optimizers["wide"], w_old)[slot].numpy()
            s_new = optimizer_slots(after.tower_optimizers["wide"], w_new)[slot].numpy()
            assert s_new[j] == s_old[i]
    # Hashed crosses and dense layers are copied as they are.
    np.testing.assert_array_equal(
        after.wide.tables["recent_x_movie"].numpy(), before.wide.tables["recent_x_movie"].numpy()
    )
    np.testing.assert_array_equal(
        after.deep.hidden[0].kernel.numpy(), before.deep.hidden[0].kernel.numpy()
    )
    assert "wide/recent_x_movie" in result.warm_start.copied
    saved = json.loads((tmp_path / "warm" / "warm_start.json").read_text())
    assert saved["rows"]["deep/movies"]["carried"] == result.warm_start.rows["deep/movies"].carried


def test_warm_start_refuses_an_incompatible_model(
    previous_model: TrainResult, trainer_data: Path, tmp_path: Path
):
    other = dataclasses.replace(
        CONFIG, model=dataclasses.replace(CONFIG.model, hidden_units=(8,), embedding_dim=4)
    )
    with pytest.raises(TrainError) as error:
        train(
            other,
            trainer_data,
            tmp_path / "m",
            warm_start_from=previous_model.out_dir,
            export=False,
            verbose=0,
        )
    message = str(error.value)
    assert "model.hidden_units: [32, 16] before, [8] now" in message
    assert "features.movie_id.embedding_dim: 16 before, 4 now" in message
    assert not (tmp_path / "m").exists()  # refused before anything was written
    with pytest.raises(TrainError, match="towers: wide_deep before, deep now"):
        train(
            CONFIG,
            trainer_data,
            tmp_path / "d",
            towers="deep",
            warm_start_from=previous_model.out_dir,
            export=False,
            verbose=0,
        )
    with pytest.raises(TrainError, match="not a model directory"):
        train(CONFIG, trainer_data, tmp_path / "e", warm_start_from=trainer_data, verbose=0)


# --------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def exported(trainer_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model trained on a copy of the data, scored by Keras; the copy is then deleted."""
    root = tmp_path_factory.mktemp("exported")
    data = root / "data"
    shutil.copytree(trainer_data, data)
    result = train(CONFIG, data, root / "model", epochs=1, verbose=0)
    examples = _raw_examples(result)
    # Parsed as the model parses them: user_age is int64 in the log.
    spec = serving_feature_spec(CONFIG, recorded_raw_spec(data))
    raw = tf.io.parse_example(tf.constant(examples), spec)
    transformed = tft.TFTransformOutput(str(data)).transform_raw_features(
        raw, drop_unused_features=True
    )
    keras_scores = tf.sigmoid(result.model(transformed)).numpy()
    shutil.rmtree(data)
    return {"result": result, "examples": examples, "keras": keras_scores, "data": data}


def _raw_examples(result: TrainResult) -> list[bytes]:
    """The warmup requests' examples plus two hand-made ones: an unseen token, missing defaults."""
    requests = read_warmup_requests(warmup_path(result.export_dir))
    examples = [
        tf.make_ndarray(r.inputs["examples"])[0]
        for r in requests
        if r.model_spec.signature_name == SERVING_SIGNATURE
    ]

    def example(**features: Any) -> bytes:
        feature = {}
        for k, v in features.items():
            values = v if isinstance(v, list) else [v]
            if all(isinstance(x, str) for x in values):
                feature[k] = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[x.encode() for x in values])
                )
            elif all(isinstance(x, int) for x in values):
                feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
            else:
                feature[k] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    examples.append(
        example(
            user_id=7,
            occupation="astronaut",
            user_age=33,
            recent_movies=["m1", "m2"],
            movie_id="m3",
            genres=["drama"],
            release_year=1999.0,
            popularity=0.7,
        )
    )
    # occupation and release_year have defaults in the config: they may be left out.
    examples.append(
        example(
            user_id=3,
            user_age=60,
            recent_movies=[],
            movie_id="m9999",
            genres=["comedy"],
            popularity=2.5,
        )
    )
    return examples


def test_saved_model_is_self_contained_and_matches_keras(exported: dict[str, Any]):
    result = exported["result"]
    assert not exported["data"].exists()
    assert str(exported["data"]).encode() not in (result.export_dir / "saved_model.pb").read_bytes()
    loaded = tf.saved_model.load(str(result.export_dir))
    out = loaded.signatures[SERVING_SIGNATURE](examples=tf.constant(exported["examples"]))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (len(exported["examples"]), 1)
    # bfloat16 products are rounded to 8 bits of mantissa; the exported graph may fuse and
    # block them differently from the Keras call.
    bf16 = result.model.spec.compute_dtype == "bfloat16"
    np.testing.assert_allclose(
        probabilities, exported["keras"], rtol=1e-2 if bf16 else 1e-5, atol=1e-3 if bf16 else 1e-6
    )
    assert ((probabilities > 0) & (probabilities < 1)).all()
    assert np.ptp(probabilities) > 0  # the examples are told apart


def test_signatures_names_and_outputs(exported: dict[str, Any]):
    loaded = tf.saved_model.load(str(exported["result"].export_dir))
    assert set(loaded.signatures) == {
        SERVING_SIGNATURE,
        CLASSIFY_SIGNATURE,
        RAW_SIGNATURE,
        EXPLAIN_SIGNATURE,
    }
    serve = loaded.signatures[SERVING_SIGNATURE]
    classify = loaded.signatures[CLASSIFY_SIGNATURE]
    assert set(serve.structured_input_signature[1]) == {"examples"}
    assert set(classify.structured_input_signature[1]) == {"inputs"}
    assert serve.structured_outputs["probabilities"].dtype == tf.float32
    examples = tf.constant(exported["examples"][:4])
    out = classify(inputs=examples)
    assert set(out) == {"classes", "scores"}
    assert out["classes"].shape == (4, 2) and out["scores"].shape == (4, 2)
    assert out["classes"].numpy().tolist() == [[b"0", b"1"]] * 4
    np.testing.assert_allclose(out["scores"].numpy().sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        out["scores"].numpy()[:, 1:], serve(examples=examples)["probabilities"].numpy(), rtol=1e-6
    )
    # The explain signature's parts sum to the logit of the served probability.
    parts = loaded.signatures[EXPLAIN_SIGNATURE](examples=examples)
    total = parts["bias"] + parts["wide_logit"] + parts["deep_logit"]
    np.testing.assert_allclose(total.numpy(), parts[LOGIT_OUTPUT].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        parts[PROBABILITY_OUTPUT].numpy(),
        serve(examples=examples)["probabilities"].numpy().ravel(),
        rtol=1e-6,
    )


def test_warmup_requests_parse_and_score(exported: dict[str, Any]):
    result = exported["result"]
    path = warmup_path(result.export_dir)
    requests = read_warmup_requests(path)
    assert 1 <= len(requests) <= 1000
    loaded = tf.saved_model.load(str(result.export_dir))
    signatures = set()
    for request in requests:
        assert request.model_spec.name == CONFIG.model_name
        signature = request.model_spec.signature_name
        signatures.add(signature)
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = loaded.signatures[signature](**inputs)
        assert out["probabilities"].shape == (max(len(v) for v in inputs.values()), 1)
    # Both input paths are warmed up: serialized tf.Examples and raw values by column.
    assert signatures == {SERVING_SIGNATURE, RAW_SIGNATURE}


def test_warmup_requests_are_real_eval_examples_in_live_batch_sizes(
    exported: dict[str, Any], trainer_data: Path
):
    requests = read_warmup_requests(warmup_path(exported["result"].export_dir))
    requests = [r for r in requests if r.model_spec.signature_name == SERVING_SIGNATURE]
    sizes = [len(tf.make_ndarray(r.inputs["examples"])) for r in requests]
    assert CONFIG.validation.num_candidates in sizes and CONFIG.serving.batch_size in sizes
    assert sizes.count(1) == len(sizes) - len({CONFIG.validation.num_candidates,
                                               CONFIG.serving.batch_size})  # fmt: skip
    first = tf.train.Example.FromString(tf.make_ndarray(requests[0].inputs["examples"])[0])
    features = first.features.feature
    assert CONFIG.label not in features  # the label is not an input
    # The eval split's first examples (the model was trained on a copy of this data).
    singles = [tf.make_ndarray(r.inputs["examples"])[0] for r in requests if len(r.inputs[
        "examples"].string_val) == 1]  # fmt: skip
    assert singles == read_raw_eval_examples(
        trainer_data, export_lib.WARMUP_RECORDS, drop=CONFIG.label
    )


def test_model_folder_holds_config_metrics_and_vocabularies(exported: dict[str, Any]):
    result = exported["result"]
    out = result.out_dir
    assert (out / "config.yaml").read_text() == CONFIG.to_yaml()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"auc", "log_loss", "label_rate", "examples"} <= set(metrics)
    extra = result.export_dir / "assets.extra"
    assert json.loads((extra / "metrics.json").read_text()) == metrics
    assert (extra / "config.yaml").read_text() == CONFIG.to_yaml()
    assert sorted(p.name for p in (out / "vocabularies").iterdir()) == sorted(CONFIG.vocabularies)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# --------------------------------------------------------------------------------------------
# Multi-worker


def test_multi_worker_training_matches_one_process(
    trainer_data: Path, exported: dict[str, Any], tmp_path: Path
):
    """Two local workers split each global batch in two: the same updates as one process."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text(CONFIG.to_yaml())
    out = tmp_path / "model"
    code = (
        "import json\n"
        "from transform.config import load_config\n"
        "from trainer.train import train\n"
        f"r = train(load_config({str(config_yaml)!r}), {str(trainer_data)!r}, {str(out)!r}, "
        "epochs=1, distribute='multi_worker', export=False, verbose=0)\n"
        "from tensorflow.python.eager import context\n"
        "heartbeat = context.context().coordination_service.heartbeat_timeout_in_ms\n"
        "print('RESULT ' + json.dumps({'step': r.step, 'metrics': r.metrics, "
        "'heartbeat_ms': heartbeat}))\n"
    )
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = _quiet_env(
            TF_CONFIG=json.dumps(tf_config),
            TF_NUM_INTRAOP_THREADS="1",
            TF_NUM_INTEROP_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240))
        finally:
            if proc.poll() is None:
                proc.kill()
    # When one worker fails, the other reports only that its peer stopped: show both.
    failed = [
        f"worker {i} exited with {proc.returncode}:\n{err[-3000:]}"
        for i, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True))
        if proc.returncode != 0
    ]
    assert not failed, "\n\n".join(failed)
    results = []
    for stdout, _ in outputs:
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    chief, worker = results
    assert chief["step"] == worker["step"] == STEPS_PER_EPOCH
    assert chief["heartbeat_ms"] == worker["heartbeat_ms"] == HEARTBEAT_TIMEOUT_S * 1000
    assert worker["metrics"] is None  # only the chief evaluates and writes
    single = exported["result"].metrics  # the same config and data, one epoch, one process
    # Two replicas sum their gradients in another order than one process: a one-epoch AUC
    # moves by rounding alone, 0.0021 on one machine; a broken all-reduce moves it by far more.
    assert chief["metrics"]["auc"] == pytest.approx(single["auc"], abs=5e-3)
    assert chief["metrics"]["log_loss"] == pytest.approx(single["log_loss"], abs=2e-3)
    assert (out / "metrics.json").exists() and tf.train.latest_checkpoint(str(out / "checkpoints"))


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_data_dir_is_refused(tmp_path: Path):
    with pytest.raises(TrainError, match="no such directory; run datagen first"):
        train(CONFIG, tmp_path / "nothing", tmp_path / "m", verbose=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match=r"not a datagen output \(no summary.json\)"):
        train(CONFIG, tmp_path / "empty", tmp_path / "m", verbose=0)


def test_data_made_with_another_config_is_refused(trainer_data: Path, tmp_path: Path):
    features = tuple(
        dataclasses.replace(f, min_count=5) if f.name == "occupation" else f
        for f in CONFIG.features
    )
    other = dataclasses.replace(CONFIG, features=features)
    with pytest.raises(TrainError, match=r"made with another config.*features changed: occupation"):
        train(other, trainer_data, tmp_path / "m", verbose=0)
    assert not (tmp_path / "m").exists()


def test_empty_eval_split_is_refused(trainer_data: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(trainer_data, data)
    summary = json.loads((data / "summary.json").read_text())
    summary["splits"]["eval"]["rows"] = 0
    (data / "summary.json").write_text(json.dumps(summary))
    for shard in (data / "eval").iterdir():
        shard.unlink()
    with pytest.raises(TrainError, match="the eval split is empty"):
        train(CONFIG, data, tmp_path / "m", verbose=0)


def test_bad_arguments_are_refused(trainer_data: Path, tmp_path: Path, monkeypatch):
    with pytest.raises(TrainError, match="towers: unknown value 'both'"):
        train(CONFIG, trainer_data, tmp_path / "m", towers="both", verbose=0)
    with pytest.raises(TrainError, match="epochs: expected an integer >= 1"):
        train(CONFIG, trainer_data, tmp_path / "m", epochs=0, verbose=0)
    with pytest.raises(TrainError, match="must not be inside the datagen output"):
        train(CONFIG, trainer_data, trainer_data / "model", verbose=0)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TrainError, match="TF_CONFIG is not set"):
        train(CONFIG, trainer_data, tmp_path / "m", distribute="multi_worker", verbose=0)
    with pytest.raises(TrainError, match="distribute: unknown value"):
        train(CONFIG, trainer_data, tmp_path / "m", distribute="tpu", verbose=0)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="holds files but no model"):
        train(CONFIG, trainer_data, stranger, verbose=0)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_an_unfinished_run_with_other_arguments_is_refused(trainer_data: Path, tmp_path: Path):
    out = tmp_path / "m"
    train(CONFIG, trainer_data, out, towers="wide", max_steps=1, export=False, verbose=0)
    with pytest.raises(TrainError, match=r"unfinished run with other arguments \(towers differ\)"):
        train(CONFIG, trainer_data, out, towers="deep", export=False, verbose=0)
    resumed = train(CONFIG, trainer_data, out, towers="wide", max_steps=2, export=False, verbose=0)
    assert resumed.resumed_from_step == 1 and resumed.step == 2


def test_module_layout_is_documented():
    # The names the docstring promises are the names train() writes.
    doc = train_lib.__doc__
    for name in train_lib.OUTPUTS:
        assert name in doc, name


# --------------------------------------------------------------------------------------------
# Early stopping and unknown ids


def overfitting_config(**training: Any) -> Config:
    """A large deep tower with a high learning rate: on 200 rows it overfits within epochs."""
    settings = {
        "epochs": 30,
        "evals_per_epoch": 1,
        "batch_size": 64,
        "early_stopping": dataclasses.replace(MOVIES.training.early_stopping, patience=2),
        **training,
    }
    config = small_config(**settings)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(
            config.model,
            hidden_units=(128, 64),
            deep_optimizer=OptimizerConfig(name="adagrad", learning_rate=0.5),
        ),
    )


@pytest.fixture(scope="module")
def early_stopped(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("early") / "model"
    return train(overfitting_config(), small_data, out, towers="deep", verbose=0)


def test_early_stopping_stops_and_exports_the_best_evaluation(early_stopped: TrainResult):
    result = early_stopped
    config = overfitting_config()
    patience = config.training.early_stopping.patience
    assert result.status == "complete" and result.stopped_early
    assert result.step < result.total_steps
    curve = result.eval_curve
    assert [e["step"] for e in curve] == sorted({e["step"] for e in curve})
    best = max(curve, key=lambda e: e["auc"])
    # The first best evaluation is kept; the last `patience` evaluations brought nothing.
    assert result.best_step == best["step"] == curve[-1 - patience]["step"]
    assert all(e["auc"] <= best["auc"] + config.training.early_stopping.min_delta for e in curve)
    # What is exported is the best evaluation's model, not the last step's.
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert saved["best_step"] == best["step"] and saved["stopped_early"] is True
    assert saved["auc"] == pytest.approx(best["auc"], abs=1e-6)
    assert saved["log_loss"] == pytest.approx(best["log_loss"], abs=1e-6)
    loaded = tf.saved_model.load(str(result.out_dir / "export"))
    raw = _raw_eval_examples(Path(saved["data_dir"]))
    scores = loaded.signatures[SERVING_SIGNATURE](examples=tf.constant(raw))["probabilities"]
    labels = _eval_labels(Path(saved["data_dir"]), raw)
    from transform.metrics import auc

    assert auc(labels, scores.numpy().ravel()) == pytest.approx(best["auc"], abs=1e-4)
    assert (result.out_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((result.out_dir / "eval_curve.json").read_text()) == list(curve)


def _raw_eval_examples(data_dir: Path) -> list[bytes]:
    return read_raw_eval_examples(data_dir)


def _eval_labels(data_dir: Path, raw: list[bytes]) -> np.ndarray:
    label = MOVIES.label
    return np.array(
        [tf.train.Example.FromString(r).features.feature[label].int64_list.value[0] for r in raw]
    )


def test_an_early_stopped_run_resumes_to_the_same_result(
    early_stopped: TrainResult, small_data: Path, tmp_path: Path
):
    """Stopped between evaluations and started again, the run ends as the uninterrupted one."""
    out = tmp_path / "model"
    config = overfitting_config()
    first_eval = early_stopped.eval_curve[0]["step"]
    stopped = train(config, small_data, out, towers="deep", max_steps=first_eval * 2 + 1, verbose=0)
    assert stopped.status == "stopped"
    resumed = train(config, small_data, out, towers="deep", verbose=0)
    assert resumed.resumed_from_step == first_eval * 2 + 1
    assert resumed.step == early_stopped.step and resumed.best_step == early_stopped.best_step
    assert [e["auc"] for e in resumed.eval_curve] == pytest.approx(
        [e["auc"] for e in early_stopped.eval_curve], abs=1e-6
    )
    assert resumed.metrics["auc"] == pytest.approx(early_stopped.metrics["auc"], abs=1e-6)


def test_patience_zero_trains_every_epoch_and_exports_the_last_step(
    small_data: Path, tmp_path: Path
):
    config = overfitting_config(epochs=3)
    config = dataclasses.replace(
        config,
        training=dataclasses.replace(
            config.training,
            early_stopping=dataclasses.replace(config.training.early_stopping, patience=0),
        ),
    )
    result = train(config, small_data, tmp_path / "m", towers="deep", export=False, verbose=0)
    assert result.step == result.total_steps and not result.stopped_early
    assert result.best_step is None and len(result.eval_curve) == 3
    assert result.metrics["auc"] == pytest.approx(result.eval_curve[-1]["auc"], abs=1e-6)


def test_unknown_ids_score_like_the_learned_unknown(trainer_data: Path, tmp_path: Path):
    """An id the vocabulary does not know scores as the out-of-vocabulary row, which starts at
    zero and is trained by hiding known ids."""
    config = small_config(epochs=1)
    config = dataclasses.replace(  # float32: the comparison below is exact
        config,
        model=dataclasses.replace(config.model, unknown_id_rate=0.2, compute_dtype="float32"),
    )
    spec = build_model_spec(config, tft.TFTransformOutput(str(trainer_data)), "wide_deep")
    untrained = build_model(spec)
    for table in untrained.deep.embeddings.values():
        np.testing.assert_array_equal(table.numpy()[-1], 0.0)  # the OOV row starts at zero
        assert np.abs(table.numpy()[:-1]).max() > 0
    result = train(config, trainer_data, tmp_path / "m", verbose=0)
    users = result.model.deep.embeddings["user_id"].numpy()
    assert np.abs(users[-1]).max() > 0  # trained: hidden ids taught it

    never = build_model(dataclasses.replace(spec, unknown_id_rate=0.0))
    never.set_weights(result.model.get_weights())
    loaded = tf.saved_model.load(str(result.export_dir))
    raw = _raw_eval_examples(trainer_data)[:50]
    unknown_a = [_with_feature(r, "user_id", 10**9) for r in raw]
    unknown_b = [_with_feature(r, "user_id", 10**9 + 7) for r in raw]
    serve = loaded.signatures[SERVING_SIGNATURE]
    a = serve(examples=tf.constant(unknown_a))["probabilities"].numpy()
    b = serve(examples=tf.constant(unknown_b))["probabilities"].numpy()
    np.testing.assert_array_equal(a, b)
    # The same rows with the out-of-vocabulary id given directly to the trained model.
    tft_output = tft.TFTransformOutput(str(trainer_data))
    parsed = tf.io.parse_example(
        tf.constant(unknown_a), serving_feature_spec(config, recorded_raw_spec(trainer_data))
    )
    parsed[config.label] = tf.zeros([len(raw)], tf.int64)
    features = tft_output.transform_features_layer()(parsed)
    assert set(features["user_id"].numpy()) == {users.shape[0] - 1}
    direct = tf.sigmoid(never(features)).numpy()
    np.testing.assert_allclose(a.ravel(), direct.ravel(), atol=1e-5)


def _with_feature(serialized: bytes, name: str, value: int) -> bytes:
    example = tf.train.Example.FromString(serialized)
    example.features.feature[name].int64_list.value[:] = [value]
    return example.SerializeToString()
