"""Benchmarks of the trainer: throughput, warm start, and the paper's three models.

On two simulated days (day 2 brings new apps, so its vocabularies are larger), each datagen'd
on its own:

1. **Throughput**: steady-state training examples/s of :func:`trainer.train.train` (the
   config's wide & deep model) against ``tf_keras.experimental.WideDeepModel`` built with the
   same towers (a ``LinearModel`` over the same wide inputs as multi-hot sparse tensors, a DNN
   with the same embeddings and ReLU layers), the same optimizers (FTRL + L1 on the linear part,
   AdaGrad on the DNN) and batch size, trained on day 1 by ``Model.fit`` over the tf.data
   guide's input pipeline (parallel reads, shuffle, batch, vectorised parse). Each run is a
   child process of its own; the runs alternate (ours, Keras, Keras, ours) to spread the
   machine's noise over both. To show where the difference comes from, ours is also run with
   ``model.compute_dtype: float32`` and Keras fed our input pipeline (:mod:`trainer.data`), and
   Keras with ``steps_per_execution`` as large as our trainer's compiled calls. The rate is timed between
   two step counts after a warm-up; process CPU time over the same steps is also reported.
2. **Warm start**: a model trained on day 2 from scratch for one epoch reaches eval AUC
   A_cold; a model warm-started from the day-1 model is evaluated on the same day-2 eval split
   every few steps until the end of its epoch: the steps it needs to reach A_cold.
3. **The three models** (``wide``, ``deep``, ``wide_deep``) trained on day 1: eval AUC, log
   loss and steady-state examples/s.

Results go to ``bench/results/train.{json,md}`` and ``bench/results/warm_start.png``.

    python bench/train_bench.py [--rows-per-day 300000] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, WORK, machine, python_cmd, write_results

TARGET_SPEEDUP = 1.5
"""Our examples/s over tf_keras WideDeepModel's."""
TARGET_WARM_FRACTION = 0.25
"""Steps the warm-started model may take to reach A_cold, as a share of the cold run's."""
WARMUP_STEPS = 100
"""Steps trained before the throughput clock starts (tracing, first batches, pipeline fill)."""
TIMING_GRANULE = 100
"""The clock reads at multiples of this step (our trainer's default compiled call)."""
EVAL_EVERY_FRACTION = 0.025
"""Warm start: the eval split is scored every 2.5% of an epoch over its first 30%..."""
EVAL_EVERY_FRACTION_LATER = 0.1
"""...and about every 10% after that."""
CONFIG_NAME = "app_store"

BENCH_DIR = WORK / "train"


# --------------------------------------------------------------------------------------------
# Child processes: each step of the benchmark runs in a fresh interpreter.


def _child_simulate(args: dict[str, Any]) -> dict[str, Any]:
    from tools.simulator import simulate

    started = time.monotonic()
    simulate(args["out"], days=2, rows_per_day=args["rows_per_day"], seed=args["seed"])
    return {"seconds": time.monotonic() - started}


def _child_datagen(args: dict[str, Any]) -> dict[str, Any]:
    from pipeline.datagen import run_datagen
    from transform.config import load_config

    started = time.monotonic()
    result = run_datagen(load_config(CONFIG_NAME), args["input"], args["out"], echo=None)
    return {"seconds": time.monotonic() - started, "summary": _jsonable(result.summary)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Clock:
    """Reads wall and process CPU time when given step counts are reached."""

    def __init__(self, marks: tuple[int, int]):
        self.marks = marks
        self.reads: dict[int, tuple[float, float]] = {}

    def read(self, steps_done: int) -> None:
        if steps_done in self.marks:
            self.reads[steps_done] = (time.monotonic(), time.process_time())

    def rate(self, batch_size: int) -> dict[str, Any]:
        (a, b) = self.marks
        if a not in self.reads or b not in self.reads:
            raise RuntimeError(f"the clock missed step {a} or {b}: {sorted(self.reads)}")
        wall = self.reads[b][0] - self.reads[a][0]
        cpu = self.reads[b][1] - self.reads[a][1]
        examples = (b - a) * batch_size
        return {
            "from_step": a,
            "to_step": b,
            "examples_per_second": examples / wall,
            "cpu_ms_per_1k_examples": 1e6 * cpu / examples,
            "load_average_1m": os.getloadavg()[0],
        }


def _keras_callback_class() -> Any:
    import tf_keras

    class Clock(tf_keras.callbacks.Callback):
        """Reads the clock after every call; ``steps_of`` maps the callback's batch to steps."""

        _supports_tf_logs = True  # keeps Keras from converting the logs to numpy every step

        def __init__(self, clock: _Clock, steps_of: Any):
            super().__init__()
            self.clock = clock
            self.steps_of = steps_of

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.clock.read(self.steps_of(batch))

    return Clock


def _eval_curve_class() -> Any:
    import numpy as np
    import tensorflow as tf
    import tf_keras

    from trainer import data as data_lib
    from transform import metrics as metrics_lib

    class EvalCurve(tf_keras.callbacks.Callback):
        """Scores the eval split at given global steps (and before the first step)."""

        def __init__(self, eval_files: list[str], feature_spec: Any, label: str, at: set[int]):
            super().__init__()
            self.dataset = data_lib.eval_dataset(eval_files, feature_spec, label, 4096)
            self.at = at
            self.points: list[dict[str, Any]] = []

        def set_model(self, model: Any) -> None:
            super().set_model(model)
            self.predict = tf.function(lambda features: model.predict_step(features))

        def on_train_begin(self, logs: Any = None) -> None:
            self._score(0)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch in self.at:
                self._score(batch)

        def _score(self, step: int) -> None:
            labels, probabilities = [], []
            for features, y in self.dataset:
                probabilities.append(self.predict(features).numpy().ravel())
                labels.append(y.numpy().ravel())
            m = metrics_lib.offline_metrics(np.concatenate(labels), np.concatenate(probabilities))
            self.points.append({"step": step, "auc": m["auc"], "log_loss": m["log_loss"]})

    return EvalCurve


def _child_ours(args: dict[str, Any]) -> dict[str, Any]:
    """Trains with our trainer; times the steady state or records an eval curve."""
    import tensorflow_transform  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF loads Keras)

    from trainer.train import train
    from transform.config import load_config

    config = load_config(CONFIG_NAME)
    if args.get("compute_dtype"):
        import dataclasses

        model = dataclasses.replace(config.model, compute_dtype=args["compute_dtype"])
        config = dataclasses.replace(config, model=model)
    callbacks: list[Any] = []
    clock = None
    curve = None
    steps_per_execution = TIMING_GRANULE
    if args.get("timing"):
        clock = _Clock(tuple(args["timing"]))
        callbacks.append(_keras_callback_class()(clock, lambda step: step))
    if args.get("eval_at"):
        import tensorflow_transform as tft

        data = Path(args["data"])
        curve = _eval_curve_class()(
            sorted(str(p) for p in (data / "eval").glob("part-*")),
            tft.TFTransformOutput(str(data)).transformed_feature_spec(),
            config.label,
            set(args["eval_at"]),
        )
        callbacks.append(curve)
        steps_per_execution = args["eval_granule"]
    epochs = args.get("epochs") or config.training.epochs
    started = time.monotonic()
    result = train(
        config,
        args["data"],
        args["out"],
        towers=args["towers"],
        warm_start_from=args.get("warm_start_from"),
        overwrite=True,
        epochs=args.get("epochs"),
        export=False,
        verbose=0,
        callbacks=callbacks,
        steps_per_execution=steps_per_execution,
    )
    m = result.metrics
    spec = json.loads((Path(args["out"]) / "model_spec.json").read_text())
    out = {
        "towers": args["towers"],
        "compute_dtype": spec["compute_dtype"],
        "seconds": time.monotonic() - started,
        "steps": result.step,
        "best_step": result.best_step,
        "epochs_trained": round(result.step / (result.total_steps / epochs), 2),
        "run_examples_per_second": result.examples_per_second,
        "auc": m["auc"],
        "log_loss": m["log_loss"],
        "eval_examples": m["examples"],
    }
    if clock is not None:
        out["steady"] = clock.rate(config.training.batch_size)
    if curve is not None:
        out["curve"] = curve.points
    if result.warm_start is not None:
        out["warm_start"] = {
            name: {"carried": r.carried, "new": r.new, "dropped": r.dropped, "moved": r.moved}
            for name, r in result.warm_start.rows.items()
        }
        out["warm_start_copied"] = list(result.warm_start.copied)
    return out


def _child_keras(args: dict[str, Any]) -> dict[str, Any]:
    """Trains ``tf_keras.experimental.WideDeepModel`` on the same data; times the steady state."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_transform as tft
    import tf_keras

    from trainer import data as data_lib
    from trainer.model import make_optimizer
    from trainer.spec import Role, build_model_spec
    from transform import metrics as metrics_lib
    from transform.config import load_config

    config = load_config(CONFIG_NAME)
    data = Path(args["data"])
    tft_output = tft.TFTransformOutput(str(data))
    feature_spec = tft_output.transformed_feature_spec()
    spec = build_model_spec(config, tft_output, "wide_deep")
    summary = json.loads((data / "summary.json").read_text())
    t = config.training
    steps = math.ceil(int(summary["splits"]["train"]["rows"]) / t.batch_size)

    def multi_hot(x: Any, size: int) -> tf.SparseTensor:
        """Ids (one a row, or a list a row) as the [batch, size] 0/1 matrix a linear model reads."""
        if isinstance(x, tf.SparseTensor):
            rows, ids, batch = x.indices[:, 0], x.values, x.dense_shape[0]
        else:
            ids = tf.reshape(x, [-1])
            batch = tf.shape(ids, out_type=tf.int64)[0]
            rows = tf.range(batch)
        return tf.SparseTensor(
            tf.stack([rows, ids], axis=1),
            tf.ones_like(ids, tf.float32),
            tf.stack([batch, tf.constant(size, tf.int64)]),
        )

    def keras_inputs(features: dict[str, Any], labels: Any) -> Any:
        """(linear inputs, dnn inputs), labels: WideDeepModel's two-input form."""
        linear = {}
        for i in spec.wide_inputs:
            x = features[i.name]
            if i.role is Role.NUMERIC:  # quantile bucket, one-hot (none in app_store)
                x = tf.clip_by_value(
                    tf.cast(tf.round(tf.reshape(x, [-1]) * (i.size - 1)), tf.int64), 0, i.size - 1
                )
            linear[i.name] = multi_hot(x, i.size)
        dnn = {i.name: features[i.name] for i in spec.deep_inputs}
        return (linear, dnn), labels

    def dataset(ds: tf.data.Dataset) -> tf.data.Dataset:
        ds = ds.map(keras_inputs, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    class PooledEmbedding(tf_keras.layers.Layer):
        """Mean of a list's embeddings; an empty list gives zeros."""

        def __init__(self, size: int, dim: int, initializer: Any, **kwargs: Any):
            super().__init__(**kwargs)
            self.table = self.add_weight(
                name="embeddings", shape=(size, dim), initializer=initializer
            )

        def call(self, ids: tf.SparseTensor) -> tf.Tensor:
            return tf.nn.safe_embedding_lookup_sparse(self.table, ids, combiner="mean")

    class DNN(tf_keras.Model):
        """The deep tower: embeddings and numeric features, ReLU layers, a logit."""

        def __init__(self) -> None:
            super().__init__(name="dnn")
            self.embed = {}
            for i in spec.deep_inputs:
                if i.role is Role.NUMERIC:
                    continue
                init = tf_keras.initializers.TruncatedNormal(
                    stddev=1.0 / math.sqrt(i.embedding_dim)
                )
                kind = PooledEmbedding if i.is_sparse else tf_keras.layers.Embedding
                self.embed[i.name] = kind(i.size, i.embedding_dim, init, name=f"embed_{i.name}")
            self.hidden = [
                tf_keras.layers.Dense(units, activation="relu") for units in spec.hidden_units
            ]
            self.logit = tf_keras.layers.Dense(1, use_bias=False)  # the bias is the linear one

        def call(self, features: dict[str, Any]) -> tf.Tensor:
            parts = []
            for i in spec.deep_inputs:
                x = features[i.name]
                if i.role is Role.NUMERIC:
                    parts.append(tf.reshape(tf.cast(x, tf.float32), [-1, 1]))
                elif i.is_sparse:
                    parts.append(self.embed[i.name](x))
                else:
                    parts.append(self.embed[i.name](tf.reshape(x, [-1])))
            h = tf.concat(parts, axis=1)
            for layer in self.hidden:
                h = layer(h)
            return self.logit(h)

    model = tf_keras.experimental.WideDeepModel(
        linear_model=tf_keras.experimental.LinearModel(units=1, kernel_initializer="zeros"),
        dnn_model=DNN(),
    )
    epochs = args.get("epochs") or 1
    model.compile(
        optimizer=[
            make_optimizer(config.model.wide_optimizer, "wide"),
            make_optimizer(config.model.deep_optimizer, "deep"),
        ],
        loss=tf_keras.losses.BinaryCrossentropy(from_logits=True),
        # The eval AUC early stopping watches (only when training more than one epoch).
        metrics=[tf_keras.metrics.AUC(name="auc", num_thresholds=2000, from_logits=True)]
        if epochs > 1
        else None,
        steps_per_execution=args["steps_per_execution"],
    )
    train_files = sorted(str(p) for p in (data / "train").glob("part-*"))
    if args.get("input") == "ours":
        train_ds = data_lib.train_dataset(
            train_files,
            feature_spec,
            spec.label,
            t.batch_size,
            epoch=0,
            seed=t.seed,
            shuffle_buffer=t.shuffle_buffer,
            steps=steps,
        )
    else:
        # The tf.data guide's recipe: parallel reads, shuffle, batch, vectorised parse.
        train_ds = (
            tf.data.TFRecordDataset(
                train_files, compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE
            )
            .shuffle(t.shuffle_buffer, seed=t.seed)
            .batch(t.batch_size)
            .take(steps)
            .map(
                data_lib.make_parse_fn(feature_spec, spec.label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        )
    clock = _Clock(tuple(args["timing"]))
    # Keras calls back after each execution with the index of its last batch.
    callbacks: list[Any] = [_keras_callback_class()(clock, lambda batch: batch + 1)]
    eval_files = sorted(str(p) for p in (data / "eval").glob("part-*"))
    eval_ds = dataset(data_lib.eval_dataset(eval_files, feature_spec, spec.label, 4096))
    fit_args: dict[str, Any] = {}
    if epochs > 1:
        # Trained as a Keras user would to convergence: the same early stopping as ours (eval
        # AUC, patience, minimum delta) with the best epoch's weights restored.
        es = config.training.early_stopping
        callbacks.append(
            tf_keras.callbacks.EarlyStopping(
                monitor="val_auc",
                mode="max",
                patience=es.patience,
                min_delta=es.min_delta,
                restore_best_weights=True,
            )
        )
        fit_args["validation_data"] = eval_ds
    # With steps_per_epoch, fit does not restart a finite dataset: repeat it (each pass
    # shuffles anew).
    started = time.monotonic()
    history = model.fit(
        dataset(train_ds).repeat() if epochs > 1 else dataset(train_ds),
        epochs=epochs,
        steps_per_epoch=steps,
        verbose=0,
        callbacks=callbacks,
        **fit_args,
    )
    seconds = time.monotonic() - started
    predict = tf.function(lambda x: tf.sigmoid(model(x, training=False)))
    labels, probabilities = [], []
    for x, y in eval_ds:
        probabilities.append(predict(x).numpy().ravel())
        labels.append(y.numpy().ravel())
    m = metrics_lib.offline_metrics(np.concatenate(labels), np.concatenate(probabilities))
    linear_vars = sum(int(np.prod(v.shape)) for v in model.linear_model.trainable_variables)
    dnn_vars = sum(int(np.prod(v.shape)) for v in model.dnn_model.trainable_variables)
    return {
        "seconds": seconds,
        "steps": steps,
        "steps_per_execution": args["steps_per_execution"],
        "input": args.get("input", "standard"),
        "steady": clock.rate(t.batch_size),
        "auc": m["auc"],
        "log_loss": m["log_loss"],
        "parameters": {"linear": linear_vars, "dnn": dnn_vars},
        "epochs_trained": len(history.history["loss"]),
        "val_auc_by_epoch": [round(float(a), 4) for a in history.history.get("val_auc", [])],
    }


CHILDREN = {
    "simulate": _child_simulate,
    "datagen": _child_datagen,
    "ours": _child_ours,
    "keras": _child_keras,
}


def _run(kind: str, args: dict[str, Any], label: str) -> dict[str, Any]:
    """Runs one child process; returns what it wrote."""
    import subprocess

    result_file = BENCH_DIR / "results" / f"{label}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    argv = python_cmd(__file__, "--child", kind, "--args", json.dumps(args))
    argv += ["--result", str(result_file)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    subprocess.run(argv, check=True, env=env)
    out = json.loads(result_file.read_text())
    print(f"    done in {time.monotonic() - started:.0f} s: {_brief(out)}", flush=True)
    return out


def _brief(out: dict[str, Any]) -> str:
    parts = []
    if "steady" in out:
        parts.append(f"{out['steady']['examples_per_second']:,.0f} examples/s")
    if out.get("auc") is not None:
        parts.append(f"AUC {out['auc']:.4f}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The benchmark


def _timing_marks(steps_per_epoch: int) -> tuple[int, int]:
    end = (steps_per_epoch // TIMING_GRANULE) * TIMING_GRANULE
    if end - WARMUP_STEPS < TIMING_GRANULE:
        raise SystemExit(
            f"{steps_per_epoch} steps an epoch is too few to time: give more --rows-per-day"
        )
    return WARMUP_STEPS, end


def _eval_schedule(steps_per_epoch: int) -> tuple[int, list[int]]:
    granule = max(1, round(steps_per_epoch * EVAL_EVERY_FRACTION))
    later = granule * max(1, round(EVAL_EVERY_FRACTION_LATER / EVAL_EVERY_FRACTION))
    early_end = math.ceil(0.3 * steps_per_epoch)
    at = {s for s in range(granule, early_end + 1, granule)}
    at |= set(range(later, steps_per_epoch, later)) | {steps_per_epoch}
    return granule, sorted(at)


def _steps_to_reach(curve: list[dict[str, Any]], auc: float) -> int | None:
    for point in curve:
        if point["auc"] >= auc:
            return point["step"]
    return None


def _plot(
    cold: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    a_cold: float,
    cold_steps: int,
    path: Path,
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot([p["step"] for p in cold], [p["auc"] for p in cold], "o-", ms=3, label="cold start")
    ax.plot(
        [p["step"] for p in warm],
        [p["auc"] for p in warm],
        "o-",
        ms=3,
        label="warm start from day 1",
    )
    ax.axhline(a_cold, color="grey", linestyle="--", label=f"A_cold = {a_cold:.4f}")
    ax.axvline(
        TARGET_WARM_FRACTION * cold_steps,
        color="grey",
        linestyle=":",
        label=f"{100 * TARGET_WARM_FRACTION:.0f}% of the cold steps",
    )
    ax.set_xlabel("training steps on day 2")
    ax.set_ylabel("eval AUC (day 2 eval split)")
    ax.set_title("Warm start: day-2 eval AUC while training on day 2")
    low = min(p["auc"] for p in cold + warm)
    ax.set_ylim(low - 0.01, max(p["auc"] for p in cold + warm) + 0.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-day", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="keep the simulated and datagen'd days of a previous run of the same size and seed",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = CHILDREN[args.child](json.loads(args.args))
        Path(args.result).write_text(json.dumps(out, indent=2) + "\n")
        return

    started = time.monotonic()
    load_before = os.getloadavg()
    logs, models = BENCH_DIR / "logs", BENCH_DIR / "models"
    days = {1: BENCH_DIR / "day1", 2: BENCH_DIR / "day2"}
    made = BENCH_DIR / "data.json"
    wanted = {"rows_per_day": args.rows_per_day, "seed": args.seed}
    if args.reuse_data and made.exists() and json.loads(made.read_text())["wanted"] == wanted:
        sim, gen = (json.loads(made.read_text())[k] for k in ("simulate", "datagen"))
        gen = {int(d): g for d, g in gen.items()}
        shutil.rmtree(models, ignore_errors=True)
    else:
        shutil.rmtree(BENCH_DIR, ignore_errors=True)
        sim = _run("simulate", {"out": str(logs), **wanted}, "simulate")
        gen = {
            d: _run("datagen", {"input": str(logs / f"day={d:03d}"), "out": str(p)}, f"datagen_{d}")
            for d, p in days.items()
        }
        made.write_text(json.dumps({"wanted": wanted, "simulate": sim, "datagen": gen}))
    from transform.config import load_config

    batch_size = load_config(CONFIG_NAME).training.batch_size
    train_rows = {d: int(g["summary"]["splits"]["train"]["rows"]) for d, g in gen.items()}
    eval_rows = {d: int(g["summary"]["splits"]["eval"]["rows"]) for d, g in gen.items()}
    steps = {d: math.ceil(r / batch_size) for d, r in train_rows.items()}
    marks = _timing_marks(steps[1])

    # 1. Throughput on day 1, alternating: ours, Keras, Keras, ours; then Keras with large
    # compiled calls. The first of ours is also the wide & deep model of section 3 and the
    # day-1 model the warm start starts from.
    day1 = str(days[1])

    def ours(towers: str, out: str, label: str, **extra: Any) -> dict[str, Any]:
        # One epoch, as WideDeepModel trains, unless `epochs=None` (the config's: early stopping).
        args_ = {"data": day1, "out": str(models / out), "towers": towers, "timing": marks}
        return _run("ours", {"epochs": 1, **args_, **extra}, label)

    def keras(spe: int, label: str, feed: str = "standard", epochs: int = 1) -> dict[str, Any]:
        args_ = {"data": day1, "timing": marks, "steps_per_execution": spe, "input": feed}
        return _run("keras", {**args_, "epochs": epochs}, label)

    ours_runs = [ours("wide_deep", "day1_wide_deep", "ours_1")]
    keras_runs = [keras(1, "keras_1"), keras(1, "keras_2")]
    ours_runs.append(ours("wide_deep", "day1_wide_deep_again", "ours_2"))
    # Where the difference comes from: our model code in float32, and Keras fed our input
    # pipeline.
    ours_f32 = ours("wide_deep", "day1_wide_deep_float32", "ours_float32", compute_dtype="float32")
    keras_our_input = keras(1, "keras_our_input", feed="ours")
    keras_spe = keras(TIMING_GRANULE, f"keras_spe{TIMING_GRANULE}")

    # 3. The other two models on day 1; then the three trained as the config says (up to
    # training.epochs, with early stopping).
    towers = {
        "wide": ours("wide", "day1_wide", "ours_wide"),
        "deep": ours("deep", "day1_deep", "ours_deep"),
        "wide_deep": ours_runs[0],
    }
    towers_default = {
        name: ours(name, f"day1_{name}_default", f"ours_{name}_default", epochs=None)
        for name in ("wide", "deep", "wide_deep")
    }
    # WideDeepModel trained the same way: up to training.epochs, the same early stopping.
    keras_converged = keras(1, "keras_converged", epochs=load_config(CONFIG_NAME).training.epochs)

    # 2. Warm start on day 2.
    granule, eval_at = _eval_schedule(steps[2])
    day2 = {"data": str(days[2]), "towers": "wide_deep", "eval_at": eval_at}
    day2["eval_granule"] = granule
    cold = _run("ours", {**day2, "epochs": 1, "out": str(models / "day2_cold")}, "day2_cold")
    warm = _run(
        "ours",
        {
            **day2,
            "epochs": 1,
            "out": str(models / "day2_warm"),
            "warm_start_from": str(models / "day1_wide_deep"),
        },
        "day2_warm",
    )
    load_after = os.getloadavg()
    total_seconds = time.monotonic() - started

    # Results.
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def rates(runs: list[dict[str, Any]]) -> list[float]:
        return [r["steady"]["examples_per_second"] for r in runs]

    def cpu(runs: list[dict[str, Any]]) -> list[float]:
        return [r["steady"]["cpu_ms_per_1k_examples"] for r in runs]

    ours_rate, keras_rate = mean(rates(ours_runs)), mean(rates(keras_runs))
    speedup = ours_rate / keras_rate
    speedup_spe = ours_rate / keras_spe["steady"]["examples_per_second"]
    keras_our_input_rate = keras_our_input["steady"]["examples_per_second"]
    speedup_same_input = ours_rate / keras_our_input_rate
    speedup_f32_same_input = ours_f32["steady"]["examples_per_second"] / keras_our_input_rate
    cpu_ratio = mean(cpu(keras_runs)) / mean(cpu(ours_runs))
    a_cold = cold["auc"]
    warm_steps = _steps_to_reach(warm["curve"], a_cold)
    warm_fraction = None if warm_steps is None else warm_steps / cold["steps"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "warm_start.png"
    _plot(cold["curve"], warm["curve"], a_cold, cold["steps"], png)

    m = machine()
    data = {
        "machine": m,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "bench_seconds": round(total_seconds, 1),
        "config": CONFIG_NAME,
        "training_epochs": load_config(CONFIG_NAME).training.epochs,
        "rows_per_day": args.rows_per_day,
        "seed": args.seed,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "simulate_seconds": round(sim["seconds"], 1),
        "datagen_seconds": {d: round(g["seconds"], 1) for d, g in gen.items()},
        "vocabulary_sizes": {
            d: {v: info["size"] for v, info in g["summary"]["vocabularies"].items()}
            for d, g in gen.items()
        },
        "throughput": {
            "timed_steps": list(marks),
            "ours": ours_runs,
            "keras_wide_deep_model": keras_runs,
            f"keras_wide_deep_model_steps_per_execution_{TIMING_GRANULE}": keras_spe,
            "ours_float32": ours_f32,
            "keras_wide_deep_model_our_input": keras_our_input,
            "compute_dtype": ours_runs[0]["compute_dtype"],
            "ours_examples_per_second": round(ours_rate),
            "keras_examples_per_second": round(keras_rate),
            "speedup": round(speedup, 3),
            "speedup_over_keras_steps_per_execution": round(speedup_spe, 3),
            "speedup_over_keras_fed_our_input": round(speedup_same_input, 3),
            "float32_speedup_over_keras_fed_our_input": round(speedup_f32_same_input, 3),
            "cpu_time_ratio_keras_over_ours": round(cpu_ratio, 3),
            "target_speedup": TARGET_SPEEDUP,
            "meets_target": speedup >= TARGET_SPEEDUP,
        },
        "warm_start": {
            "cold": cold,
            "warm": warm,
            "a_cold": a_cold,
            "cold_steps": cold["steps"],
            "warm_steps_to_a_cold": warm_steps,
            "warm_fraction_of_cold_steps": warm_fraction,
            "eval_every_steps_early": granule,
            "target_fraction": TARGET_WARM_FRACTION,
            "meets_target": warm_fraction is not None and warm_fraction <= TARGET_WARM_FRACTION,
            "plot": str(png.relative_to(RESULTS.parent.parent)),
        },
        "towers": {
            name: {
                "auc": r["auc"],
                "log_loss": r["log_loss"],
                "examples_per_second": r["steady"]["examples_per_second"],
                "cpu_ms_per_1k_examples": r["steady"]["cpu_ms_per_1k_examples"],
            }
            for name, r in towers.items()
        },
        "towers_default": {
            name: {
                "auc": r["auc"],
                "log_loss": r["log_loss"],
                "steps": r["steps"],
                "best_step": r["best_step"],
                "epochs_trained": r["epochs_trained"],
                "seconds": round(r["seconds"], 1),
            }
            for name, r in towers_default.items()
        },
        "auc_vs_keras": {
            "ours_one_epoch": ours_runs[0]["auc"],
            "keras_one_epoch_best": max(r["auc"] for r in keras_runs),
            "ours_converged": towers_default["wide_deep"]["auc"],
            "ours_converged_epochs": towers_default["wide_deep"]["epochs_trained"],
            "keras_converged": keras_converged["auc"],
            "keras_converged_epochs": keras_converged["epochs_trained"],
            "keras_converged_val_auc_by_epoch": keras_converged["val_auc_by_epoch"],
            "keras_converged_seconds": round(keras_converged["seconds"], 1),
            "meets_target": towers_default["wide_deep"]["auc"] >= keras_converged["auc"],
        },
    }
    write_results("train", data, _markdown(data))


def _markdown(d: dict[str, Any]) -> str:
    m, t, w = d["machine"], d["throughput"], d["warm_start"]
    av = d["auc_vs_keras"]
    a, b = t["timed_steps"]
    ours, keras = t["ours"], t["keras_wide_deep_model"]
    spe = t[f"keras_wide_deep_model_steps_per_execution_{TIMING_GRANULE}"]

    def rate(r: dict[str, Any]) -> str:
        return f"{r['steady']['examples_per_second']:,.0f}"

    def cpu(r: dict[str, Any]) -> str:
        return f"{r['steady']['cpu_ms_per_1k_examples']:,.0f}"

    def auc(r: dict[str, Any]) -> str:
        return f"{r['auc']:.4f}"

    met = {True: "met", False: "**not met**"}
    lines = [
        f"Data: {d['rows_per_day']:,} simulated rows a day (seed {d['seed']}), config "
        f"`{d['config']}`; day 1 trains on {d['train_rows'][1]:,} rows "
        f"({d['steps_per_epoch'][1]} steps of {d['batch_size']}), evaluates on "
        f"{d['eval_rows'][1]:,}; day 2: {d['train_rows'][2]:,} and {d['eval_rows'][2]:,} rows.",
        "",
        f"**Throughput** (day 1, one epoch each, examples/s timed from step {a} to step {b}, "
        "each run a process of its own, in the order listed):",
        "",
        "| run | examples/s | CPU ms / 1k examples | eval AUC | load avg (1 min) |",
        "|---|---|---|---|---|",
    ]
    dtype = t["compute_dtype"]
    order = [
        (f"ours (`trainer.train.train`, default config: {dtype}), 1st", ours[0]),
        ("`tf_keras.experimental.WideDeepModel`, `fit`, 1st", keras[0]),
        ("`tf_keras.experimental.WideDeepModel`, `fit`, 2nd", keras[1]),
        ("ours, 2nd", ours[1]),
        ("ours with `model.compute_dtype: float32`", t["ours_float32"]),
        ("`WideDeepModel`, `fit`, fed our input pipeline", t["keras_wide_deep_model_our_input"]),
        (f"`WideDeepModel`, `fit`, `steps_per_execution={TIMING_GRANULE}`", spe),
    ]
    for name, r in order:
        lines.append(
            f"| {name} | {rate(r)} | {cpu(r)} | {auc(r)} | {r['steady']['load_average_1m']:.2f} |"
        )
    lines += [
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| ours / `WideDeepModel` (mean examples/s of the two runs each) | "
        f"{t['speedup']:.2f}x ({t['ours_examples_per_second']:,} / "
        f"{t['keras_examples_per_second']:,}) | >= {t['target_speedup']}x: "
        f"{met[t['meets_target']]} |",
        f"| ours / `WideDeepModel` with `steps_per_execution={TIMING_GRANULE}` | "
        f"{t['speedup_over_keras_steps_per_execution']:.2f}x | |",
        f"| ours / `WideDeepModel` fed our input pipeline | "
        f"{t['speedup_over_keras_fed_our_input']:.2f}x | |",
        f"| ours in float32 / `WideDeepModel` fed our input pipeline (the model code alone) | "
        f"{t['float32_speedup_over_keras_fed_our_input']:.2f}x | |",
        f"| CPU time per example, `WideDeepModel` / ours | {t['cpu_time_ratio_keras_over_ours']:.2f}x"
        " | |",
        f"| eval AUC after one epoch, ours (1st run) vs `WideDeepModel` (best of two) | "
        f"{av['ours_one_epoch']:.4f} vs {av['keras_one_epoch_best']:.4f} | |",
        f"| eval AUC, each trained up to {d['training_epochs']} epochs with the same early "
        f"stopping (best epoch kept): ours vs `WideDeepModel` | {av['ours_converged']:.4f} "
        f"({av['ours_converged_epochs']} epochs) vs {av['keras_converged']:.4f} "
        f"({av['keras_converged_epochs']} epochs, {av['keras_converged_seconds']:.0f} s) | "
        f"at least as high: {met[av['meets_target']]} |",
        "",
        f"**Warm start** (day 2, wide & deep; eval AUC on day 2's eval split, scored every "
        f"{w['eval_every_steps_early']} steps over the first 30% of the epoch, then about every "
        "10%; curves in `bench/results/warm_start.png`):",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| cold start, one epoch ({w['cold_steps']} steps): A_cold | {w['a_cold']:.4f} | |",
        f"| warm start from the day-1 model, before its first step | "
        f"{w['warm']['curve'][0]['auc']:.4f} | |",
    ]
    if w["warm_steps_to_a_cold"] is None:
        reach = "not reached in one epoch"
    else:
        reach = (
            f"{w['warm_steps_to_a_cold']} ({100 * w['warm_fraction_of_cold_steps']:.1f}% of the "
            "cold steps)"
        )
    lines += [
        f"| warm start: steps to reach A_cold | {reach} | <= "
        f"{100 * w['target_fraction']:.0f}%: {met[w['meets_target']]} |",
        f"| warm start after one epoch | {w['warm']['auc']:.4f} | |",
        "",
        "| step on day 2 | share of the epoch | cold AUC | warm AUC |",
        "|---|---|---|---|",
    ]
    for c, h in zip(w["cold"]["curve"], w["warm"]["curve"], strict=True):
        lines.append(
            f"| {c['step']} | {100 * c['step'] / w['cold_steps']:.1f}% | {c['auc']:.4f} | "
            f"{h['auc']:.4f} |"
        )
    lines += [
        "",
        "Rows carried over by token from the day-1 model:",
        "",
        "| table | carried | moved | new | dropped |",
        "|---|---|---|---|---|",
    ]
    for name, r in w["warm"]["warm_start"].items():
        lines.append(
            f"| `{name}` | {r['carried']:,} | {r['moved']:,} | {r['new']:,} | {r['dropped']:,} |"
        )
    copied = w["warm"]["warm_start_copied"]
    tables = [n for n in copied if "/" in n]
    lines += [
        "",
        "Copied as they are: "
        + ", ".join(f"`{n}`" for n in tables)
        + f" and the {len(copied) - len(tables)} variables of the dense layers and the bias.",
        "",
        f"**The three models** (day 1, one epoch; examples/s timed from step {a} to step {b}):",
        "",
        "| model | eval AUC | eval log loss | examples/s | CPU ms / 1k examples |",
        "|---|---|---|---|---|",
    ]
    for name, r in d["towers"].items():
        lines.append(
            f"| `{name}` | {r['auc']:.4f} | {r['log_loss']:.4f} | "
            f"{r['examples_per_second']:,.0f} | {r['cpu_ms_per_1k_examples']:,.0f} |"
        )
    lines += [
        "",
        "**The three models trained as the config says** (day 1; up to `training.epochs`, "
        "early stopping on the eval AUC, the best evaluation exported):",
        "",
        "| model | eval AUC | eval log loss | epochs trained | exported step | training time |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in d["towers_default"].items():
        lines.append(
            f"| `{name}` | {r['auc']:.4f} | {r['log_loss']:.4f} | {r['epochs_trained']} | "
            f"{r['best_step']} | {r['seconds']:.0f} s |"
        )
    before, after = d["load_average_before"], d["load_average_after"]
    lines += [
        "",
        f"Measured {m['date']} on {m['cpus']} cores, {m['memory_gib']} GiB, Python "
        f"{m['python']}; load average {before[0]:.2f} before, {after[0]:.2f} after (1 min); "
        f"the whole benchmark took {d['bench_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
