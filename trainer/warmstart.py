"""Warm start (paper section 4.2): a new model starts from the previous model's weights.

Vocabularies change from one datagen run to the next: a token may get another id, new tokens
appear, rare ones drop out. Rows of the embeddings and of the wide weights are therefore
carried over by token, through the previous model's copy of its vocabulary files
(``<model dir>/vocabularies/``) and the new ones: a token keeps its learned row wherever its id
moved, new tokens keep their fresh initial rows. The out-of-vocabulary rows are carried as they
are. Hashed crosses, quantile buckets, hidden layers and the bias have no vocabulary and are
copied as they are. Optimizer slots (FTRL accumulators and linear terms, AdaGrad accumulators)
are carried the same way as the weights they belong to: FTRL derives its weights from those
slots, so carrying weights alone would be undone at the first update.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.errors import TrainError
from trainer.model import WideDeepModel, build_model, checkpoint_objects, optimizer_slots
from trainer.spec import ModelSpec, incompatibilities
from transform.artifacts import (
    CHECKPOINTS_DIR,
    CONFIG_YAML,
    MODEL_SPEC_FILE,
    VOCABULARIES_DIR,
    read_vocabulary,
)
from transform.config import ConfigError, load_config
from transform.features import NUM_OOV_BUCKETS


@dataclass(frozen=True)
class CarriedRows:
    """How one vocabulary-keyed table was carried over."""

    vocabulary: str
    carried: int
    """Tokens of the new vocabulary that kept their previous row."""
    new: int
    """Tokens of the new vocabulary the previous model did not have (fresh rows)."""
    dropped: int
    """Tokens of the previous vocabulary that are gone."""
    moved: int
    """Carried tokens whose id changed."""


@dataclass(frozen=True)
class WarmStartReport:
    """What a warm start carried over."""

    source: str
    checkpoint: str
    rows: dict[str, CarriedRows] = field(default_factory=dict)
    """Per table (``wide/<feature>`` or ``deep/<feature>``)."""
    copied: tuple[str, ...] = ()
    """Variables copied as they are (crosses, buckets, dense layers, bias)."""
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per tower, the optimizer slots carried with the weights."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``warm_start.json``."""
        return asdict(self)

    def summary(self) -> str:
        """One line per table: rows carried, new, dropped."""
        lines = [f"warm start from {self.source}"]
        for name, r in self.rows.items():
            lines.append(
                f"  {name:<28} {r.carried:>8,} rows carried ({r.moved:,} moved), "
                f"{r.new:,} new, {r.dropped:,} dropped"
            )
        lines.append(f"  copied as they are: {', '.join(self.copied) or 'none'}")
        return "\n".join(lines)


@dataclass(frozen=True)
class WarmStartSource:
    """A previous model directory, checked and ready to read."""

    model_dir: Path
    spec: ModelSpec
    checkpoint: str
    optimizers: dict[str, Any]


def check_source(model_dir: str | Path, spec: ModelSpec) -> WarmStartSource:
    """Checks that the model in ``model_dir`` can warm-start a model of ``spec``.

    Raises:
      TrainError: the directory is not a trained model, or its config is incompatible (the
        message names every difference).
    """
    model_dir = Path(model_dir)
    where = f"warm_start_from {model_dir}"
    if not model_dir.is_dir():
        raise TrainError(f"{where}: no such directory")
    for name in (MODEL_SPEC_FILE, CONFIG_YAML, VOCABULARIES_DIR):
        if not (model_dir / name).exists():
            raise TrainError(f"{where}: not a model directory of this trainer (no {name})")
    checkpoint = tf.train.latest_checkpoint(str(model_dir / CHECKPOINTS_DIR))
    if checkpoint is None:
        raise TrainError(f"{where}: holds no checkpoint to start from")
    previous = ModelSpec.load(model_dir / MODEL_SPEC_FILE)
    problems = incompatibilities(previous, spec)
    if problems:
        raise TrainError(
            f"{where}: the previous model is incompatible with this config: " + "; ".join(problems)
        )
    try:
        config = load_config(model_dir / CONFIG_YAML)
    except ConfigError as e:
        raise TrainError(f"{where}: {e}") from None
    optimizers = {"wide": config.model.wide_optimizer, "deep": config.model.deep_optimizer}
    for name, table in _vocabulary_tables(previous).items():
        if not (model_dir / VOCABULARIES_DIR / table).is_file():
            raise TrainError(f"{where}: vocabulary file of {name!r} missing ({table})")
    return WarmStartSource(model_dir, previous, checkpoint, optimizers)


def warm_start(
    model: WideDeepModel, source: WarmStartSource, vocabularies: Mapping[str, Path]
) -> WarmStartReport:
    """Initialises ``model`` and its optimizers' slots from the model in ``source``.

    Call it outside any distribution strategy scope: the previous model is rebuilt and
    restored locally, then its values are assigned to ``model``'s variables.

    Args:
      model: The new model, built with its optimizers (slots created).
      source: The checked previous model (:func:`check_source`).
      vocabularies: The new model's vocabulary files, by vocabulary name.
    """
    previous = build_model(source.spec, source.optimizers)
    tf.train.Checkpoint(**checkpoint_objects(previous)).restore(
        source.checkpoint
    ).expect_partial().assert_existing_objects_matched()

    tables = _vocabulary_tables(model.spec)
    row_maps: dict[str, tuple[np.ndarray, np.ndarray, CarriedRows]] = {}
    for vocab in sorted(set(tables.values())):
        old = read_vocabulary(source.model_dir / VOCABULARIES_DIR / vocab)
        new = read_vocabulary(vocabularies[vocab])
        row_maps[vocab] = _row_map(vocab, old, new)

    table_of = _table_names(model)
    table_of_previous = _table_names(previous)
    new_groups, old_groups = model.variable_groups(), previous.variable_groups()
    rows: dict[str, CarriedRows] = {}
    copied: list[str] = []
    slots: dict[str, tuple[str, ...]] = {}
    for tower, new_vars in new_groups.items():
        old_vars = old_groups[tower]
        new_opt, old_opt = model.tower_optimizers[tower], previous.tower_optimizers[tower]
        shared_slots = tuple(
            s for s in new_opt.get_slot_names() if s in set(old_opt.get_slot_names())
        )
        slots[tower] = shared_slots
        for new_var, old_var in zip(new_vars, old_vars, strict=True):
            name = table_of.get(id(new_var), new_var.name)
            if table_of_previous.get(id(old_var), old_var.name) != name:
                raise TrainError(f"warm start: variable {name} has no counterpart")
            pairs = [(new_var, old_var)] + [
                (optimizer_slots(new_opt, new_var)[s], optimizer_slots(old_opt, old_var)[s])
                for s in shared_slots
            ]
            vocab = tables.get(name)
            if vocab is None:
                for new_v, old_v in pairs:
                    if tuple(new_v.shape) != tuple(old_v.shape):
                        raise TrainError(
                            f"warm start: {name} has shape {tuple(old_v.shape)} in the previous "
                            f"model and {tuple(new_v.shape)} now"
                        )
                    new_v.assign(old_v.numpy())
                copied.append(name)
                continue
            new_rows, old_rows, counts = row_maps[vocab]
            for new_v, old_v in pairs:
                value = new_v.numpy()
                value[new_rows] = old_v.numpy()[old_rows]
                new_v.assign(value)
            rows[name] = counts
        if type(new_opt) is type(old_opt):
            # Steps already taken matter to optimizers with bias correction (Adam).
            new_opt.iterations.assign(old_opt.iterations.numpy())
    return WarmStartReport(
        source=str(source.model_dir),
        checkpoint=source.checkpoint,
        rows=rows,
        copied=tuple(copied),
        slots=slots,
    )


def write_report(report: WarmStartReport, path: Path) -> None:
    """Writes the report as JSON."""
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _vocabulary_tables(spec: ModelSpec) -> dict[str, str]:
    """Each vocabulary-keyed table of a model (``wide/<f>``, ``deep/<f>``) and its vocabulary."""
    out = {}
    for i in spec.wide_inputs:
        if i.vocabulary:
            out[f"wide/{i.name}"] = i.vocabulary
    for i in spec.deep_inputs:
        if i.vocabulary:
            out[f"deep/{i.vocabulary}"] = i.vocabulary  # one table per vocabulary
    return out


def _table_names(model: WideDeepModel) -> dict[int, str]:
    """Stable names of a model's lookup tables, keyed by variable id."""
    out = {}
    if model.wide is not None:
        out.update({id(v): f"wide/{n}" for n, v in model.wide.tables.items()})
    if model.deep is not None:
        out.update({id(v): f"deep/{n}" for n, v in model.deep.embeddings.items()})
    return out


def _row_map(vocab: str, old: list[bytes], new: list[bytes]) -> tuple[np.ndarray, np.ndarray, Any]:
    """Rows of the new table and the previous rows they take, plus counts."""
    old_index = {t: i for i, t in enumerate(old)}
    new_rows, old_rows = [], []
    moved = 0
    for j, token in enumerate(new):
        i = old_index.get(token)
        if i is not None:
            new_rows.append(j)
            old_rows.append(i)
            moved += i != j
    carried = len(new_rows)
    # The out-of-vocabulary rows follow the tokens in both tables.
    for k in range(NUM_OOV_BUCKETS):
        new_rows.append(len(new) + k)
        old_rows.append(len(old) + k)
    counts = CarriedRows(
        vocabulary=vocab,
        carried=carried,
        new=len(new) - carried,
        dropped=len(old) - carried,
        moved=moved,
    )
    return np.array(new_rows, np.int64), np.array(old_rows, np.int64), counts
