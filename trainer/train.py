"""Model training (paper section 4.2): datagen output in, a trained and exported model out.

:func:`train` is a pure function of its arguments: it checks its inputs, trains the wide, deep
or wide & deep model, checkpoints as it goes, evaluates the eval split after every epoch (or
``training.evals_per_epoch`` times an epoch), stops when the eval metric has not improved for
``training.early_stopping.patience`` evaluations (``training.epochs`` is the most it trains),
and exports the SavedModel of the best evaluation. Output layout (``out_dir``)::

    run.json            what this run is (config and data fingerprints, towers, warm start)
                        and its status: training, stopped (max_steps) or complete
    config.yaml         the config used
    model_spec.json     the model's inputs and layers (read by a later warm start)
    vocabularies/       copies of the vocabulary files the model was trained with
    checkpoints/        model, both optimizers (slots included), step, epoch and position,
                        and the early-stopping state; checkpoints/best/ the weights of the
                        best evaluation
    logs/train, logs/eval   TensorBoard summaries: the loss of every step, every evaluation
    warm_start.json     rows carried per table, when warm-started
    eval_curve.json     every evaluation: step, epoch, AUC, log loss, mean training loss
    learning_curve.png  the same as a plot, the exported evaluation circled
    metrics.json        offline metrics on the eval split of the exported model: AUC, log
                        loss, label rate, examples, best step, and the eval curve
    roc.png             ROC curve on the eval split
    export/             the SavedModel (see :mod:`trainer.export`), with
                        assets.extra/{tf_serving_warmup_requests, config.yaml, metrics.json,
                        model_spec.json}; written as export.partial/ and moved into place
                        when complete (a previous export waits in export.previous/ for the
                        two renames), so a reader never sees half an export

A run that is stopped (``max_steps``) or killed resumes from its last checkpoint when started
again with the same arguments: the shuffle order of every epoch is fixed by the seed, so the
batches already trained on are skipped, not trained on twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from trainer import data as data_lib
from trainer import export as export_lib
from trainer import metrics as metrics_lib
from trainer import warmstart
from trainer.errors import TrainError
from trainer.model import WideDeepModel, build_model, checkpoint_objects
from trainer.spec import ModelSpec, Towers, build_model_spec, parse_towers
from transform import artifacts
from transform.artifacts import (
    CHECKPOINTS_DIR,
    CONFIG_YAML,
    EXPORT_DIR,
    METRICS_FILE,
    MODEL_SPEC_FILE,
    STATUS_COMPLETE,
    STATUS_STOPPED,
    STATUS_TRAINING,
    SUMMARY_JSON,
    TRANSFORM_DIRS,
    VOCABULARIES_DIR,
    WARM_START_FILE,
)
from transform.artifacts import TRAINING_STATE_FILE as RUN_FILE
from transform.config import Config
from transform.paths import remove_paths

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
ROC_FILE = "roc.png"
EVAL_CURVE_FILE = "eval_curve.json"
LEARNING_CURVE_FILE = "learning_curve.png"
BEST_DIR = "best"
"""Sub-folder of ``checkpoints/`` holding the weights of the best evaluation so far."""
OUTPUTS = (
    RUN_FILE,
    CONFIG_YAML,
    MODEL_SPEC_FILE,
    VOCABULARIES_DIR,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    EXPORT_DIR,
    METRICS_FILE,
    ROC_FILE,
    EVAL_CURVE_FILE,
    LEARNING_CURVE_FILE,
    WARM_START_FILE,
    EXPORT_DIR + ".partial",
    EXPORT_DIR + ".previous",
)
"""Everything :func:`train` writes in ``out_dir``; ``overwrite`` removes these and nothing else."""

MAX_STEPS_PER_CALL = 100
"""Training steps run inside one compiled call between two progress updates (the default of
``train(steps_per_execution=...)``)."""

CHECKPOINTS_TO_KEEP = 3
HEARTBEAT_TIMEOUT_S = 60
"""Multi-worker training: how long a worker's heartbeats may stop before the job fails."""
WORKER_START_TIMEOUT_S = 300.0
"""Multi-worker training: how long the workers of TF_CONFIG have to start and find each other
(the environment variable `WORKER_START_TIMEOUT_ENV` changes it)."""
WORKER_START_TIMEOUT_ENV = "WIDEDEEP_WORKER_START_TIMEOUT_S"
_COORDINATED_JOBS = ("chief", "worker")
FINGERPRINT_SECTIONS = ("label", "features", "crosses", "model", "training")


@dataclass(frozen=True)
class TrainResult:
    """What a training run did and wrote."""

    out_dir: Path
    status: str
    """complete (every epoch trained), or stopped (``max_steps`` reached first)."""
    step: int
    """Global step at the end of the run."""
    total_steps: int
    """Steps of the whole run (epochs x steps per epoch)."""
    resumed_from_step: int
    """Step of the checkpoint the run resumed from (0 when it started fresh)."""
    examples_per_second: float
    """Training throughput of this run (examples of the global batch per wall second)."""
    metrics: dict[str, Any] | None
    """Offline metrics on the eval split (None on a worker that is not the chief)."""
    export_dir: Path | None
    warm_start: warmstart.WarmStartReport | None
    model: WideDeepModel | None = dataclasses.field(default=None, compare=False, repr=False)
    """The trained model, without optimizers (None on a worker that is not the chief)."""
    best_step: int | None = None
    """Step of the evaluation whose weights were exported (None: the last step's)."""
    stopped_early: bool = False
    """Training ended before ``epochs`` because the eval split stopped improving."""
    eval_curve: tuple[dict[str, Any], ...] = ()
    """Every evaluation of the run: step, epoch, AUC, log loss, mean training loss."""


@dataclass(frozen=True)
class _Data:
    """A checked datagen output."""

    path: Path
    tft_output: Any
    train_files: list[str]
    eval_files: list[str]
    train_rows: int
    eval_rows: int
    summary: dict[str, Any]
    fingerprint: str


def train(
    config: Config,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    towers: str | Towers = Towers.WIDE_DEEP,
    warm_start_from: str | Path | None = None,
    overwrite: bool = False,
    epochs: int | None = None,
    max_steps: int | None = None,
    distribute: str | None = None,
    export: bool = True,
    verbose: int = 1,
    callbacks: Sequence[Any] = (),
    steps_per_execution: int = MAX_STEPS_PER_CALL,
) -> TrainResult:
    """Trains a model on a datagen output, evaluates it and exports it.

    Args:
      config: The pipeline config (the one the datagen output was made with).
      data_dir: The datagen output folder.
      out_dir: The model folder (layout in the module docstring).
      towers: ``wide``, ``deep`` or ``wide_deep``: the paper's three models.
      warm_start_from: A previous model folder: embeddings, wide weights and optimizer slots
        start from it, carried over by token (see :mod:`trainer.warmstart`). Used when the run
        starts; a resumed run continues from its own checkpoint.
      overwrite: Discard what ``out_dir`` holds (a finished model or an unfinished run) and
        start over. Without it a finished model is refused and an unfinished run of the same
        arguments is resumed.
      epochs: Passes over the train split; defaults to ``config.training.epochs``.
      max_steps: Stop when the global step reaches this (the run can be resumed later).
      distribute: None to train in this process, ``multi_worker`` to train under
        MultiWorkerMirroredStrategy with the cluster of ``TF_CONFIG``. The strategy must be
        created before TensorFlow does any other work in the process, so in that mode call
        :func:`train` first thing.
      export: Export the SavedModel (and its warmup requests) at the end.
      verbose: 0 silent, 1 progress bar and summary, 2 one line per epoch and summary.
      callbacks: tf_keras callbacks, or any objects with the same methods: ``set_model``
        receives the model being trained, ``on_train_begin`` and ``on_train_end`` bracket the
        training loop, and ``on_train_batch_end(step, logs)`` follows every compiled call with
        the global step and ``{"loss": mean loss of the call}``. The time they take does not
        count in ``examples_per_second``.
      steps_per_execution: Most training steps run in one compiled call; calls end at the
        multiples of it (so callbacks see every multiple), at checkpoints and at epoch ends.

    Raises:
      TrainError: bad arguments, a missing or mismatched datagen output, an empty split, a
        finished model in ``out_dir``, an incompatible warm start source, or a loss that
        became NaN (the last good checkpoint is kept).
    """
    strategy = _make_strategy(distribute)  # first: it configures the TF runtime
    is_chief = _is_chief(strategy)
    towers = parse_towers(towers)
    epochs = config.training.epochs if epochs is None else epochs
    if epochs < 1:
        raise TrainError(f"epochs: expected an integer >= 1, got {epochs}")
    if max_steps is not None and max_steps < 0:
        raise TrainError(f"max_steps: expected an integer >= 0, got {max_steps}")
    if steps_per_execution < 1:
        raise TrainError(
            f"steps_per_execution: expected an integer >= 1, got {steps_per_execution}"
        )
    out = Path(out_dir).absolute()
    data = _open_data(config, Path(data_dir).absolute())
    if out == data.path or data.path in out.parents:
        raise TrainError(f"out_dir {out}: must not be inside the datagen output {data.path}")
    spec = build_model_spec(config, data.tft_output, towers)
    _check_memory(spec, config, echo=print if verbose and is_chief else log.info)
    run = {
        "config_fingerprint": config.fingerprint(FINGERPRINT_SECTIONS),
        "data_fingerprint": data.fingerprint,
        "towers": towers.value,
        "warm_start_from": str(Path(warm_start_from).absolute()) if warm_start_from else None,
    }
    resume = _check_out_dir(out, run, overwrite)
    source = None
    if warm_start_from and not resume:
        if Path(warm_start_from).absolute() == out:
            raise TrainError("warm_start_from: is out_dir itself; give the previous model's folder")
        source = warmstart.check_source(warm_start_from, spec)
    steps_per_epoch = _steps_per_epoch(config, data, strategy.num_replicas_in_sync)
    total_steps = epochs * steps_per_epoch
    target = total_steps if max_steps is None else min(total_steps, max_steps)

    # Checked everything: only now is anything written.
    if is_chief:
        _prepare_out_dir(out, run, overwrite and not resume, config, spec, data)
    _barrier(strategy)  # workers read out_dir only once the chief has prepared it
    latest = tf.train.latest_checkpoint(str(out / CHECKPOINTS_DIR))
    if latest is None and warm_start_from and source is None:
        source = warmstart.check_source(warm_start_from, spec)
    state = _State.create(strategy, spec, config, out, is_chief)
    _barrier(strategy)  # every worker has seen the same latest checkpoint before any is saved
    report = None
    if latest is not None:
        state.restore(latest, steps_per_epoch)
        log.info("resuming from %s (step %d of %d)", latest, state.step, total_steps)
    elif source is not None:
        report = warmstart.warm_start(state.model, source, _vocabulary_files(out, config))
        log.debug("%s", report.summary())  # the run's summary prints it
        if is_chief:
            warmstart.write_report(report, out / WARM_START_FILE)
        state.manager.save(checkpoint_number=0)  # a kill now resumes warm-started
    resumed_from = state.step

    writer = (
        tf.summary.create_file_writer(str(out / LOGS_DIR / "train"))
        if is_chief
        else tf.summary.create_noop_writer()
    )
    shown = verbose if is_chief else 0
    evaluator = _Evaluator(spec, data, config, out, state, is_chief, shown)
    if source is not None and latest is None:
        # The warm-started model is the first candidate: a day whose training only makes it
        # worse exports what it started from.
        evaluator.evaluate(0, steps_per_epoch, loss=None)
        state.manager.save(checkpoint_number=0)
    loop = _Loop(
        strategy,
        state,
        data,
        config,
        steps_per_epoch,
        epochs,
        writer,
        shown,
        callbacks=tuple(callbacks),
        steps_per_execution=steps_per_execution,
        evaluator=evaluator,
    )
    seconds = loop.run(target)
    step = state.step
    throughput = (loop.steps_trained * config.training.batch_size / seconds) if seconds > 0 else 0.0
    stopped_early = evaluator.should_stop() and step < total_steps
    status = STATUS_COMPLETE if step >= total_steps or stopped_early else STATUS_STOPPED
    result = TrainResult(
        out_dir=out,
        status=status,
        step=step,
        total_steps=total_steps,
        resumed_from_step=resumed_from,
        examples_per_second=throughput,
        metrics=None,
        export_dir=None,
        warm_start=report,
        stopped_early=stopped_early,
    )
    if not is_chief:
        state.discard_worker_checkpoints()
        return result

    # Evaluation and export work on a copy without optimizers and outside any strategy: the
    # weights of the best evaluation when training is complete, else the last step's.
    inference = evaluator.model
    best_step = evaluator.restore_best() if status == STATUS_COMPLETE else None
    if best_step is None:
        inference.set_weights(state.model.get_weights())
    metrics = _evaluate(inference, data, config, out, best_step if best_step is not None else step)
    metrics.update(
        towers=towers.value,
        status=status,
        train_examples_per_second=round(throughput, 1),
        steps_trained=step,
        best_step=best_step,
        stopped_early=stopped_early,
        early_stopping=dataclasses.asdict(config.training.early_stopping),
        eval_curve=list(evaluator.curve),
    )
    _write_json(out / METRICS_FILE, metrics)
    evaluator.plot(config, towers, best_step)
    export_dir = _export(inference, data, config, out) if export else None
    _write_json(out / RUN_FILE, {**run, "status": status, "step": step, "total_steps": total_steps})
    result = dataclasses.replace(
        result,
        metrics=metrics,
        export_dir=export_dir,
        model=inference,
        best_step=best_step,
        eval_curve=tuple(evaluator.curve),
    )
    if verbose:
        print(format_result(result))
    return result


def _steps_per_epoch(config: Config, data: _Data, replicas: int) -> int:
    """Batches per epoch, the same on every worker (each reads its share of every batch)."""
    batch_size = config.training.batch_size
    if batch_size % replicas:
        raise TrainError(
            f"training.batch_size: {batch_size} does not split evenly over {replicas} replicas"
        )
    steps = math.ceil((data.train_rows // replicas) / (batch_size // replicas))
    if steps < 1:
        raise TrainError(f"data_dir {data.path}: {data.train_rows} train rows for {replicas}")
    return steps


def _evaluate(
    model: WideDeepModel, data: _Data, config: Config, out: Path, step: int
) -> dict[str, Any]:
    """Offline metrics on the eval split, also written to TensorBoard and as a ROC curve."""
    labels, probabilities = predict(model, data)
    metrics = metrics_lib.offline_metrics(labels, probabilities)
    metrics.update(split="eval", model_name=config.model_name, step=step, data_dir=str(data.path))
    with tf.summary.create_file_writer(str(out / LOGS_DIR / "eval")).as_default(step=step):
        for key in ("auc", "log_loss", "mean_prediction"):
            if metrics[key] is not None:
                write_scalar(key, metrics[key])
    if metrics["auc"] is not None:
        title = f"{config.model_name} ({model.spec.towers.value}), step {step}"
        metrics_lib.plot_roc(labels, probabilities, out / ROC_FILE, title=title)
    return metrics


def _export(model: WideDeepModel, data: _Data, config: Config, out: Path) -> Path:
    """Exports the SavedModel with its warmup requests, config, metrics and model spec."""
    # Real eval examples when datagen kept them; else examples built from the vocabularies.
    warmup = artifacts.read_raw_eval_examples(
        data.path, export_lib.WARMUP_RECORDS, drop=config.label
    ) or export_lib.synthetic_examples(
        config,
        data.tft_output,
        artifacts.quantile_boundaries(data.summary),
        seed=config.training.seed,
    )
    extra = {name: out / name for name in (CONFIG_YAML, METRICS_FILE, MODEL_SPEC_FILE)}
    return export_lib.export_saved_model(
        model, data.tft_output, config, out / EXPORT_DIR, warmup, extra_files=extra
    )


def predict(
    model: WideDeepModel, data: _Data, batch_size: int = 4096, step: Any = None
) -> tuple[Any, Any]:
    """Labels and predicted probabilities of the eval split, as flat numpy arrays.

    ``step`` is a compiled ``model.predict_step`` to reuse (one is compiled when not given).
    """
    ds = data_lib.eval_dataset(
        data.eval_files,
        data.tft_output.transformed_feature_spec(),
        model.spec.label,
        batch_size,
    )
    step = step or tf.function(model.predict_step, reduce_retracing=True)
    labels, probabilities = [], []
    for features, y in ds:
        probabilities.append(step(features).numpy().ravel())
        labels.append(y.numpy().ravel())
    return np.concatenate(labels), np.concatenate(probabilities)


def write_scalar(name: str, value: float, step: int | None = None) -> None:
    """Writes a scalar to the default summary writer (at ``step``, or the writer's default)."""
    tf.summary.scalar(name, value, step=step)


def format_result(result: TrainResult) -> str:
    """The few lines a person reads at the end of a run."""
    lines = [
        f"training {result.status} at step {result.step:,} of {result.total_steps:,} "
        f"({result.examples_per_second:,.0f} examples/s"
        + (
            f", deep tower in {result.model.spec.compute_dtype}"
            if result.model is not None and result.model.deep is not None
            else ""
        )
        + f"): {result.out_dir}"
    ]
    if result.resumed_from_step:
        lines.append(f"  resumed from step {result.resumed_from_step:,}")
    if result.warm_start is not None:
        lines.append("  " + result.warm_start.summary().replace("\n", "\n  "))
    if result.metrics is not None:
        m = result.metrics
        area = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
        lines.append(
            f"  eval        AUC {area}, log loss {m['log_loss']:.4f}, label rate "
            f"{m['label_rate']:.4f}, {m['examples']:,} examples"
        )
    if result.eval_curve:
        curve = ", ".join(
            f"{e['epoch']:g}: {'n/a' if e['auc'] is None else format(e['auc'], '.4f')}"
            + ("*" if e["step"] == result.best_step else "")
            for e in result.eval_curve
        )
        lines.append(f"  eval curve  AUC by epoch {curve}")
        if result.best_step is not None:
            why = "early stopping" if result.stopped_early else "the best evaluation"
            lines.append(f"  exported    the model of step {result.best_step:,} (*: {why})")
    if result.export_dir is not None:
        lines.append(f"  export      {result.export_dir}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The training loop


@dataclass
class _State:
    """The model, its optimizers and the run's counters, and where they are checkpointed."""

    model: WideDeepModel
    step_var: tf.Variable
    epoch_var: tf.Variable
    position_var: tf.Variable
    manager: tf.train.CheckpointManager
    checkpoint_dir: Path
    is_chief: bool
    tracker: dict[str, tf.Variable]
    """Early stopping: the best evaluation's metric and step, evaluations since."""

    @classmethod
    def create(
        cls, strategy: Any, spec: ModelSpec, config: Config, out: Path, is_chief: bool
    ) -> _State:
        """Builds the model and its optimizers (slots included) and the checkpoint manager."""
        with strategy.scope():
            optimizers = {
                "wide": config.model.wide_optimizer,
                "deep": config.model.deep_optimizer,
            }
            model = build_model(spec, optimizers)
            counters = [
                tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
                for name in ("step", "epoch", "batch_in_epoch")
            ]
        # Outside the strategy: only the chief evaluates and assigns them.
        tracker = {
            "best_value": tf.Variable(0.0, dtype=tf.float64, trainable=False),
            "best_step": tf.Variable(-1, dtype=tf.int64, trainable=False),
            "evals_since_best": tf.Variable(0, dtype=tf.int64, trainable=False),
        }
        checkpoint = tf.train.Checkpoint(
            **checkpoint_objects(model),
            step=counters[0],
            epoch=counters[1],
            batch_in_epoch=counters[2],
            **tracker,
        )
        # Every worker saves (the strategy may need them all); only the chief's copy is kept.
        directory = out / CHECKPOINTS_DIR if is_chief else Path(tempfile.mkdtemp())
        manager = tf.train.CheckpointManager(
            checkpoint, str(directory), max_to_keep=CHECKPOINTS_TO_KEEP
        )
        return cls(model, *counters, manager, directory, is_chief, tracker)

    @property
    def step(self) -> int:
        """The global step: training steps taken so far."""
        return int(self.step_var.numpy())

    def restore(self, path: str, steps_per_epoch: int) -> None:
        """Restores everything from a checkpoint, which must match this model exactly."""
        self.manager.checkpoint.restore(path).assert_consumed()
        epoch, position = divmod(self.step, steps_per_epoch)
        saved = (int(self.epoch_var.numpy()), int(self.position_var.numpy()))
        if saved != (epoch, position):
            raise TrainError(
                f"checkpoint {path}: step {self.step} was epoch {saved[0]}, batch {saved[1]} "
                f"when saved, but is epoch {epoch}, batch {position} now: the number of "
                "workers changed the batches per epoch; resume with the same cluster"
            )

    def advance(self, step: int, steps_per_epoch: int) -> None:
        """Records the global step and where it is in its epoch."""
        self.step_var.assign(step)
        self.epoch_var.assign(step // steps_per_epoch)
        self.position_var.assign(step % steps_per_epoch)

    def discard_worker_checkpoints(self) -> None:
        """Removes a non-chief worker's throwaway checkpoints."""
        if not self.is_chief:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


class _Evaluator:
    """Evaluates the eval split during training, keeps the best weights and decides when to stop.

    Only the chief evaluates. The early-stopping counters live in the run's checkpoint (a
    resumed run continues where it was), the curve in ``eval_curve.json`` and TensorBoard, and
    the best weights in ``checkpoints/best/``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        data: _Data,
        config: Config,
        out: Path,
        state: _State,
        is_chief: bool,
        verbose: int,
    ) -> None:
        self.model = WideDeepModel(spec)
        # Eval batches differ in their list features' widths: one relaxed trace serves them all
        # instead of a new trace (and a retracing warning) per shape.
        self._predict = tf.function(self.model.predict_step, reduce_retracing=True)
        self._data, self._out, self._state = data, out, state
        self._is_chief, self._verbose = is_chief, verbose
        self._rule = config.training.early_stopping
        self._best = None
        self.curve: list[dict[str, Any]] = []
        if not is_chief:
            return
        self._best = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=self.model),
            str(out / CHECKPOINTS_DIR / BEST_DIR),
            max_to_keep=1,
        )
        path = out / EVAL_CURVE_FILE
        if path.exists() and state.step > 0:
            # A resumed run keeps the evaluations up to the checkpoint it resumed from.
            self.curve = [e for e in json.loads(path.read_text()) if e["step"] <= state.step]
        self._writer = tf.summary.create_file_writer(str(out / LOGS_DIR / "eval"))

    def evaluate(self, step: int, steps_per_epoch: int, loss: float | None) -> None:
        """Scores the eval split with the weights of ``step``; records and compares the result."""
        if not self._is_chief:
            return
        self.model.set_weights(self._state.model.get_weights())
        labels, probabilities = predict(self.model, self._data, step=self._predict)
        m = metrics_lib.offline_metrics(labels, probabilities)
        # With one class in the eval split AUC is undefined: log loss decides instead.
        name = self._rule.metric if m["auc"] is not None else "log_loss"
        value = m[name]
        tracker = self._state.tracker
        best_step = int(tracker["best_step"].numpy())
        best = float(tracker["best_value"].numpy())
        if name == "auc":
            improved = value > best + self._rule.min_delta
        else:
            improved = value < best - self._rule.min_delta
        if best_step < 0 or improved:
            tracker["best_value"].assign(value)
            tracker["best_step"].assign(step)
            tracker["evals_since_best"].assign(0)
            self._best.save(checkpoint_number=step)
        else:
            tracker["evals_since_best"].assign_add(1)
        entry = {
            "step": step,
            "epoch": round(step / steps_per_epoch, 3),
            "auc": m["auc"],
            "log_loss": m["log_loss"],
            "mean_prediction": m["mean_prediction"],
            "train_loss": loss,
            "best": int(tracker["best_step"].numpy()) == step,
        }
        self.curve = [e for e in self.curve if e["step"] != step] + [entry]
        _write_json(self._out / EVAL_CURVE_FILE, self.curve)
        with self._writer.as_default(step=step):
            for key in ("auc", "log_loss", "mean_prediction"):
                if m[key] is not None:
                    write_scalar(key, m[key])
        self._writer.flush()
        if self._verbose:
            area = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
            mark = "  (best so far)" if entry["best"] else ""
            print(
                f"eval at epoch {entry['epoch']:g}: AUC {area}, log loss {m['log_loss']:.4f}{mark}"
            )

    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement."""
        patience = self._rule.patience
        since = int(self._state.tracker["evals_since_best"].numpy())
        return patience > 0 and since >= patience

    def restore_best(self) -> int | None:
        """Loads the best evaluation's weights into :attr:`model`; returns its step.

        None when early stopping is off (``patience: 0``: the last step is the model) or no
        evaluation was made.
        """
        if self._rule.patience == 0 or self._best is None:
            return None
        latest = self._best.latest_checkpoint
        if latest is None:
            return None
        tf.train.Checkpoint(model=self.model).restore(latest).assert_existing_objects_matched()
        return int(self._state.tracker["best_step"].numpy())

    def plot(self, config: Config, towers: Towers, best_step: int | None) -> None:
        """Writes the learning curve (training loss and eval metrics by epoch) as a PNG."""
        if self._is_chief and self.curve:
            title = f"{config.model_name} ({towers.value})"
            metrics_lib.plot_learning_curve(
                self.curve, self._out / LEARNING_CURVE_FILE, title, best_step
            )


@dataclass
class _Loop:
    """Steps through the epochs, checkpointing, logging, evaluating and checking the loss."""

    strategy: Any
    state: _State
    data: _Data
    config: Config
    steps_per_epoch: int
    epochs: int
    writer: Any
    verbose: int
    callbacks: tuple[Any, ...] = ()
    steps_per_execution: int = MAX_STEPS_PER_CALL
    evaluator: _Evaluator | None = None
    callback_seconds: float = dataclasses.field(default=0.0, init=False)
    steps_trained: int = dataclasses.field(default=0, init=False)

    def _eval_every(self) -> int:
        return max(1, math.ceil(self.steps_per_epoch / self.config.training.evals_per_epoch))

    def _next_eval(self, step: int) -> int:
        """The first evaluation step after ``step``: evenly spaced, and every epoch's end."""
        epoch_start = (step // self.steps_per_epoch) * self.steps_per_epoch
        every = self._eval_every()
        within = ((step - epoch_start) // every + 1) * every
        return epoch_start + min(within, self.steps_per_epoch)

    def _is_eval_step(self, step: int) -> bool:
        return step > 0 and self._next_eval(step - 1) == step

    def _agree_to_stop(self) -> bool:
        """The chief's early-stopping decision, shared with every worker."""
        stop = self.evaluator is not None and self.evaluator.should_stop()
        if not (self.strategy.num_replicas_in_sync > 1 or _cluster(self.strategy)):
            return stop
        vote = self.strategy.run(
            lambda: tf.constant(1.0 if stop and self.evaluator._is_chief else 0.0)
        )
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, vote, axis=None)) > 0

    def run(self, target: int) -> float:
        """Trains until the global step reaches ``target`` or early stopping ends training;
        returns the seconds spent training (callbacks and evaluations excluded)."""
        from tf_keras.utils import Progbar

        step = self.state.step
        if step >= target or self._agree_to_stop():
            return 0.0
        run_steps = self._compile()
        every = self.config.training.steps_per_checkpoint
        per_call = self.steps_per_execution
        started = time.monotonic()
        self.callback_seconds = 0.0
        eval_seconds = 0.0
        for callback in self.callbacks:
            callback.set_model(self.state.model)
        self._call_back("on_train_begin")
        stopping = False
        while step < target and not stopping:
            epoch, position = divmod(step, self.steps_per_epoch)
            epoch_start = epoch * self.steps_per_epoch
            stop = min(epoch_start + self.steps_per_epoch, target)
            if self.verbose:
                print(f"Epoch {epoch + 1}/{self.epochs}")
            progbar = Progbar(self.steps_per_epoch, verbose=self.verbose, stateful_metrics=["loss"])
            if position and self.verbose == 1:
                progbar.update(position)
            iterator = iter(self._dataset(epoch, position))
            since_eval: list[float] = []
            while step < stop:
                n = min(
                    (step // every + 1) * every,
                    stop,
                    (step // per_call + 1) * per_call,
                    self._next_eval(step),
                )
                chunk_started = time.monotonic()
                losses = self._run_chunk(run_steps, iterator, step, n)
                chunk_seconds = max(time.monotonic() - chunk_started, 1e-9)
                examples = (n - step) * self.config.training.batch_size
                with self.writer.as_default():
                    # One point per step: the curve in TensorBoard is the real one.
                    for k, value in enumerate(losses):
                        write_scalar("loss", value, step=step + k + 1)
                    write_scalar("examples_per_second", examples / chunk_seconds, step=n)
                self.steps_trained += n - step
                step = n
                loss = float(np.mean(losses))
                since_eval.extend(losses)
                self.state.advance(step, self.steps_per_epoch)
                evaluated = self._is_eval_step(step) and self.evaluator is not None
                progbar.update(step - epoch_start, values=[("loss", loss)], finalize=step == stop)
                if evaluated:
                    eval_started = time.monotonic()
                    self.evaluator.evaluate(step, self.steps_per_epoch, float(np.mean(since_eval)))
                    since_eval = []
                    eval_seconds += time.monotonic() - eval_started
                if step % every == 0 or step == stop or evaluated:
                    self.state.manager.save(checkpoint_number=step)
                self._call_back("on_train_batch_end", step, {"loss": loss})
                if evaluated and self._agree_to_stop():
                    stopping = True
                    if self.verbose:
                        rule = self.config.training.early_stopping
                        print(
                            f"early stopping: no {rule.metric} gain over {rule.min_delta:g} in "
                            f"{rule.patience} evaluation(s); the best evaluation is exported"
                        )
                    break
        self._call_back("on_train_end")
        self.writer.flush()
        return time.monotonic() - started - self.callback_seconds - eval_seconds

    def _call_back(self, method: str, *args: Any) -> None:
        """Calls every callback's ``method``; their time is kept out of the training time."""
        if not self.callbacks:
            return
        started = time.monotonic()
        for callback in self.callbacks:
            getattr(callback, method)(*args)
        self.callback_seconds += time.monotonic() - started

    def _run_chunk(self, run_steps: Any, iterator: Any, step: int, n: int) -> list[float]:
        """Runs steps ``step`` to ``n`` in one compiled call; returns each step's loss and
        refuses a NaN loss."""
        try:
            losses, finite = run_steps(iterator, tf.constant(n - step, tf.int64))
        except tf.errors.OutOfRangeError:
            raise TrainError(
                f"data_dir {self.data.path}: the train split ended before step {n}: it holds "
                f"fewer rows than summary.json says ({self.data.train_rows}); rerun datagen"
            ) from None
        if not bool(finite):
            # Nothing after the last checkpoint is saved, so the last good state stays on disk.
            last = self.state.manager.latest_checkpoint
            raise TrainError(
                f"the loss became NaN or infinite between steps {step} and {n}; training "
                "stopped. The last good checkpoint is kept"
                + (f" ({last})" if last else " (none was saved yet)")
                + ": lower the learning rates or check the data"
            )
        return [float(v) for v in losses.numpy()]

    def _compile(self) -> Callable[..., Any]:
        strategy, model = self.strategy, self.state.model

        @tf.function
        def run_steps(iterator: Any, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            losses = tf.TensorArray(tf.float32, size=tf.cast(n, tf.int32))
            finite = tf.constant(True)
            for i in tf.range(n):
                out = strategy.run(model.train_step, args=(next(iterator),))
                loss = strategy.reduce(tf.distribute.ReduceOp.SUM, out["loss"], axis=None)
                losses = losses.write(tf.cast(i, tf.int32), loss)
                finite = tf.logical_and(finite, tf.math.is_finite(loss))
            return losses.stack(), finite

        return run_steps

    def _dataset(self, epoch: int, skip: int) -> Any:
        t = self.config.training
        spec = self.data.tft_output.transformed_feature_spec()

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            return data_lib.train_dataset(
                self.data.train_files,
                spec,
                self.state.model.spec.label,
                ctx.get_per_replica_batch_size(t.batch_size),
                epoch=epoch,
                seed=t.seed,
                shuffle_buffer=t.shuffle_buffer,
                steps=self.steps_per_epoch,
                skip_steps=skip,
                num_shards=ctx.num_input_pipelines,
                shard_index=ctx.input_pipeline_id,
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)


# --------------------------------------------------------------------------------------------
# Inputs, outputs and the cluster


def _open_data(config: Config, path: Path) -> _Data:
    """Checks a datagen output against the config and opens it."""
    import tensorflow_transform as tft

    if not path.is_dir():
        raise TrainError(f"data_dir {path}: no such directory; run datagen first")
    summary_path = path / SUMMARY_JSON
    for needed in (SUMMARY_JSON, *TRANSFORM_DIRS):
        if not (path / needed).exists():
            raise TrainError(f"data_dir {path}: not a datagen output (no {needed})")
    text = summary_path.read_text()
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainError(f"{summary_path}: not valid JSON ({e})") from None
    made_with = summary.get("config_fingerprint")
    if made_with != config.fingerprint():
        raise TrainError(
            f"data_dir {path}: made with another config (fingerprint {made_with}, this config's "
            f"is {config.fingerprint()}){_config_difference(config, path / CONFIG_YAML)}; "
            "rerun datagen with this config or train with the config it was made with"
        )
    splits = summary.get("splits", {})
    rows = {}
    files = {}
    for split in (artifacts.TRAIN_DIR, artifacts.EVAL_DIR):
        rows[split] = int(splits.get(split, {}).get("rows") or 0)
        files[split] = artifacts.shards(path, split)
        if rows[split] == 0:
            raise TrainError(
                f"data_dir {path}: the {split} split is empty (summary.json "
                f"splits.{split}.rows = 0); "
                + (
                    "raise data.eval_fraction or add rows, then rerun datagen"
                    if split == "eval"
                    else "add rows and rerun datagen"
                )
            )
        if not files[split]:
            raise TrainError(f"data_dir {path}: {split}/ holds no shards (part-*)")
    try:
        tft_output = tft.TFTransformOutput(str(path))
        tft_output.transformed_feature_spec()
    except Exception as e:  # tf.Transform raises several types for a damaged output
        raise TrainError(f"data_dir {path}: cannot read the transform output: {e}") from None
    return _Data(
        path=path,
        tft_output=tft_output,
        train_files=files["train"],
        eval_files=files["eval"],
        train_rows=rows["train"],
        eval_rows=rows["eval"],
        summary=summary,
        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def _config_difference(config: Config, other_path: Path) -> str:
    """Which features and crosses differ from the config a datagen output was made with."""
    from transform.config import ConfigError, load_config

    try:
        other = load_config(other_path)
    except (ConfigError, OSError):
        return ""
    mine = config.to_dict()
    theirs = other.to_dict()
    diffs = []
    if mine["label"] != theirs["label"]:
        diffs.append(f"label {theirs['label']!r} there, {mine['label']!r} here")
    for section in ("features", "crosses"):
        a, b = theirs[section], mine[section]
        only_there = [n for n in a if n not in b]
        only_here = [n for n in b if n not in a]
        changed = [n for n in b if n in a and a[n] != b[n]]
        if only_there:
            diffs.append(f"{section} only there: {', '.join(only_there)}")
        if only_here:
            diffs.append(f"{section} only here: {', '.join(only_here)}")
        if changed:
            diffs.append(f"{section} changed: {', '.join(changed)}")
    return f": {'; '.join(diffs)}" if diffs else ""


def _check_out_dir(out: Path, run: dict[str, Any], overwrite: bool) -> bool:
    """Decides what to do with ``out``; returns True when an unfinished run is resumed."""
    if not out.exists() or not any(out.iterdir()):
        return False
    run_path = out / RUN_FILE
    if not run_path.exists():
        if overwrite:
            return False
        raise TrainError(
            f"out_dir {out}: holds files but no model of this trainer ({RUN_FILE}); give an "
            "empty or new folder, or pass --overwrite to train there anyway"
        )
    try:
        previous = json.loads(run_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{run_path}: unreadable ({e}); pass --overwrite to start over") from None
    if overwrite:
        return False
    if previous.get("status") == STATUS_COMPLETE:
        raise TrainError(
            f"out_dir {out}: holds a finished model (step {previous.get('step')}); pass "
            "overwrite to replace it, or give another folder"
        )
    differs = [k for k in run if previous.get(k) != run[k]]
    if differs:
        raise TrainError(
            f"out_dir {out}: holds an unfinished run with other arguments ({', '.join(differs)} "
            "differ); rerun it with the same arguments to resume, or pass --overwrite to start over"
        )
    return tf.train.latest_checkpoint(str(out / CHECKPOINTS_DIR)) is not None


def _prepare_out_dir(
    out: Path, run: dict[str, Any], clear: bool, config: Config, spec: ModelSpec, data: _Data
) -> None:
    """Writes what a run needs before its first step; ``clear`` removes a previous run first.

    A previous export is kept: it is replaced only once the new one is complete.
    """
    if clear:
        remove_paths(out / name for name in OUTPUTS if name != EXPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / RUN_FILE, {**run, "status": STATUS_TRAINING})
    (out / CONFIG_YAML).write_text(config.to_yaml())
    spec.save(out / MODEL_SPEC_FILE)
    vocab_dir = out / VOCABULARIES_DIR
    vocab_dir.mkdir(exist_ok=True)
    for vocab in config.vocabularies:
        shutil.copyfile(data.tft_output.vocabulary_file_by_name(vocab), vocab_dir / vocab)


def _check_memory(spec: ModelSpec, config: Config, echo: Callable[[str], None]) -> None:
    """Says how much memory training will take; refuses a model that cannot fit."""
    from trainer import memory

    estimate = memory.estimate(spec, config)
    available = memory.available_memory()
    memory.check_fits(estimate, available)
    echo(memory.describe(estimate, available))


def _vocabulary_files(out: Path, config: Config) -> dict[str, Path]:
    return {vocab: out / VOCABULARIES_DIR / vocab for vocab in config.vocabularies}


def _write_json(path: Path, value: Any) -> None:
    """Writes JSON atomically: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def _make_strategy(distribute: str | None) -> Any:
    if distribute in (None, "", "none"):
        return tf.distribute.get_strategy()
    if distribute == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainError(
                "distribute=multi_worker: TF_CONFIG is not set; it describes the cluster "
                '({"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}})'
            )
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        timeout = _worker_start_timeout()
        _configure_coordination(resolver, timeout)
        _wait_for_workers(resolver, timeout)
        # The strategy's start blocks in TensorFlow until every worker has registered, holding
        # the interpreter: no Python signal handler runs meanwhile, and TensorFlow takes
        # SIGTERM for its preemption notices. The registration deadline bounds the wait.
        terminate = signal.getsignal(signal.SIGTERM)
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as error:
            first_line = (error.message or "").strip().splitlines()[:1]
            raise TrainError(
                f"distribute=multi_worker: the workers of TF_CONFIG did not all start within "
                f"{timeout:.0f} s ({''.join(first_line)}); start every worker, or give them "
                f"longer with {WORKER_START_TIMEOUT_ENV}"
            ) from None
        if terminate is not None and threading.current_thread() is threading.main_thread():
            # SIGTERM stops the trainer again, as it stops one that trains alone.
            signal.signal(signal.SIGTERM, terminate)
        return strategy
    raise TrainError(f"distribute: unknown value {distribute!r}; expected none or multi_worker")


def _worker_start_timeout() -> float:
    text = os.environ.get(WORKER_START_TIMEOUT_ENV)
    if not text:
        return WORKER_START_TIMEOUT_S
    try:
        timeout = float(text)
    except ValueError:
        timeout = 0.0
    if timeout <= 0:
        raise TrainError(f"{WORKER_START_TIMEOUT_ENV}: expected seconds > 0, got {text!r}")
    return timeout


def _wait_for_workers(resolver: Any, timeout: float) -> None:
    """On the coordination leader, waits until every other worker listens on its address.

    TensorFlow's own wait for the workers cannot be interrupted; this one, in Python, says
    what it waits for, gives up at the deadline with an error naming the workers missing, and
    ends at SIGTERM or SIGINT. The other workers wait in TensorFlow, for the leader, up to the
    registration deadline.
    """
    from tensorflow.python.distribute import multi_worker_util

    cluster = resolver.cluster_spec()
    me = f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}"
    if multi_worker_util.coordination_leader(cluster) != me:
        return
    peers = [
        (f"{job} {index}", address)
        for job in _COORDINATED_JOBS
        if job in cluster.jobs
        for index, address in enumerate(cluster.job_tasks(job))
        if (job, index) != (resolver.task_type, resolver.task_id)
    ]

    # The handler only takes note, for SIGINT too: an exception raised from it could land
    # anywhere (in the middle of writing a log line, which would swallow it, or in TensorFlow's
    # coordination set-up, which then keeps the process from ending).
    stopped: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {
            signum: signal.signal(signum, lambda signum, frame: stopped.append(signum))
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        if in_main_thread
        else {}
    )
    try:
        deadline = time.monotonic() + timeout
        waiting = [peer for peer in peers if not _listening(peer[1])]
        if waiting:
            log.info(
                "multi-worker: waiting up to %.0f s for %s to start",
                timeout,
                ", ".join(f"{name} ({address})" for name, address in waiting),
            )
        while waiting:
            if stopped and stopped[0] == signal.SIGINT:
                raise KeyboardInterrupt
            if stopped:
                raise TrainError(
                    f"distribute=multi_worker: stopped by {signal.Signals(stopped[0]).name} "
                    "while waiting for the workers of TF_CONFIG to start"
                )
            if time.monotonic() >= deadline:
                missing = ", ".join(f"{name} ({address})" for name, address in waiting)
                raise TrainError(
                    f"distribute=multi_worker: {missing} of TF_CONFIG did not start within "
                    f"{timeout:.0f} s; start every worker, or give them longer with "
                    f"{WORKER_START_TIMEOUT_ENV}"
                )
            time.sleep(0.5)
            waiting = [peer for peer in waiting if not _listening(peer[1])]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _listening(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _configure_coordination(resolver: Any, start_timeout: float) -> None:
    """The coordination service MultiWorkerMirroredStrategy sets up, with a longer heartbeat
    and a deadline for the workers to start.

    The strategy leaves an already configured service alone. The changes from its own
    configuration: `HEARTBEAT_TIMEOUT_S`, as TensorFlow's default of 10 s also declares a live
    worker dead when a loaded machine stalls it or its wall clock steps forward (the service
    times heartbeats by the wall clock), which fails the whole job; a worker that really dies
    still fails its peers' collective ops at once, through their connections to it. And a
    registration deadline (`start_timeout`): without it, a worker whose peer never starts waits
    for it forever.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    if resolver.task_type not in _COORDINATED_JOBS or context.context().coordination_service:
        return
    cluster = resolver.cluster_spec()
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
        for job in _COORDINATED_JOBS
        if job in cluster.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=jobs,
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        cluster_register_timeout_in_ms=int(start_timeout * 1000),
    )
    # The deadline applies only when registering waits at a barrier for every worker.
    context.context().coordination_service.cluster_register_with_barrier = True


def _is_chief(strategy: Any) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def _cluster(strategy: Any) -> bool:
    """True when training runs on a cluster of workers."""
    return bool(getattr(strategy, "cluster_resolver", None))


def _barrier(strategy: Any) -> None:
    """Waits for every worker (an all-reduce); a no-op in a single process."""
    if strategy.num_replicas_in_sync > 1 or _cluster(strategy):
        value = strategy.run(lambda: tf.constant(1.0))
        strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
