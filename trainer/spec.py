"""The model's inputs, derived from the transform output and the config.

A :class:`ModelSpec` is everything the model's shape depends on: each transformed feature with
its role, the towers it feeds, the rows of its tables (vocabulary size, hash buckets or
quantiles) and its embedding size, plus the hidden layers. It is built by iterating
``tft_output.transformed_feature_spec()`` and looking each feature up in the config, so no
feature name is typed out twice; it is saved beside each model (``model_spec.json``) so a later
run can tell whether it can warm-start from that model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import tensorflow as tf

from trainer.errors import TrainError
from transform.config import Config, Kind
from transform.features import NUM_OOV_BUCKETS


class Towers(StrEnum):
    """Which of the paper's three models to train (Table 1: wide, deep, wide & deep)."""

    WIDE = "wide"
    DEEP = "deep"
    WIDE_DEEP = "wide_deep"

    @property
    def has_wide(self) -> bool:
        """True if the model has a wide tower."""
        return self is not Towers.DEEP

    @property
    def has_deep(self) -> bool:
        """True if the model has a deep tower."""
        return self is not Towers.WIDE


class Role(StrEnum):
    """How a transformed feature enters the model."""

    CATEGORICAL = "categorical"
    """One vocabulary id per example."""
    CATEGORICAL_LIST = "categorical_list"
    """A variable-length list of vocabulary ids."""
    NUMERIC = "numeric"
    """A quantile-normalised value in [0, 1]."""
    CROSS = "cross"
    """A variable-length list of hashed cross-product ids (wide tower only)."""


@dataclass(frozen=True)
class InputSpec:
    """One transformed feature as the model sees it.

    Attributes:
      name: Transformed feature name (the config's feature or cross name).
      role: How it enters the model.
      wide: Feeds the wide tower.
      deep: Feeds the deep tower.
      size: Rows of its tables: vocabulary tokens plus out-of-vocabulary ids, hash buckets of
        a cross, or quantiles of a numeric feature (its one-hot buckets in the wide tower).
      embedding_dim: Embedding size in the deep tower (categorical features only).
      vocabulary: Vocabulary file name, for categorical features.
    """

    name: str
    role: Role
    wide: bool
    deep: bool
    size: int
    embedding_dim: int = 0
    vocabulary: str = ""

    @property
    def is_sparse(self) -> bool:
        """True for variable-length features (lists and crosses)."""
        return self.role in (Role.CATEGORICAL_LIST, Role.CROSS)


SPEC_VERSION = 2
"""Layout of the model's variables: 2 keeps one deep embedding table per vocabulary (1 kept
one per feature). A model can warm-start only from one of the same layout."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model's variables depend on."""

    label: str
    towers: Towers
    inputs: tuple[InputSpec, ...]
    hidden_units: tuple[int, ...]
    dropout: float = 0.0
    seed: int = 0
    compute_dtype: str = "float32"
    embedding_stddev: float = 0.0
    """Standard deviation of the initial embeddings; 0 means 1/sqrt(embedding_dim)."""
    unknown_id_rate: float = 0.0
    """Share of vocabulary ids replaced by the out-of-vocabulary id in training."""
    version: int = SPEC_VERSION

    @property
    def wide_inputs(self) -> tuple[InputSpec, ...]:
        """Inputs of the wide tower (empty when the model has none)."""
        return tuple(i for i in self.inputs if i.wide) if self.towers.has_wide else ()

    @property
    def deep_inputs(self) -> tuple[InputSpec, ...]:
        """Inputs of the deep tower (empty when the model has none)."""
        return tuple(i for i in self.inputs if i.deep) if self.towers.has_deep else ()

    def input(self, name: str) -> InputSpec:
        """The input called ``name``."""
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``model_spec.json``."""
        d = dataclasses.asdict(self)
        d["towers"] = self.towers.value
        d["hidden_units"] = list(self.hidden_units)
        d["inputs"] = [{**dataclasses.asdict(i), "role": i.role.value} for i in self.inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Reads back :meth:`to_dict`."""
        inputs = tuple(InputSpec(**{**i, "role": Role(i["role"])}) for i in d["inputs"])
        return cls(
            label=d["label"],
            towers=Towers(d["towers"]),
            inputs=inputs,
            hidden_units=tuple(d["hidden_units"]),
            dropout=float(d.get("dropout", 0.0)),
            seed=int(d.get("seed", 0)),
            compute_dtype=str(d.get("compute_dtype", "float32")),
            embedding_stddev=float(d.get("embedding_stddev", 0.0)),
            unknown_id_rate=float(d.get("unknown_id_rate", 0.0)),
            version=int(d.get("version", 1)),
        )

    def save(self, path: Path) -> None:
        """Writes the spec as JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        """Reads a spec written by :meth:`save`."""
        return cls.from_dict(json.loads(path.read_text()))


def parse_towers(towers: str | Towers) -> Towers:
    """Checks a ``towers`` argument: one of wide, deep, wide_deep."""
    try:
        return Towers(towers)
    except ValueError:
        allowed = ", ".join(t.value for t in Towers)
        raise TrainError(f"towers: unknown value {towers!r}; expected one of {allowed}") from None


def build_model_spec(config: Config, tft_output: Any, towers: str | Towers) -> ModelSpec:
    """Derives the model's inputs from the transform output, annotated by the config.

    Args:
      config: The pipeline config the transform output was made with.
      tft_output: A ``tft.TFTransformOutput`` of the datagen output.
      towers: wide, deep or wide_deep.

    Raises:
      TrainError: the transformed features and the config disagree (a feature is missing on
        one side, or has another type than its kind implies).
    """
    towers = parse_towers(towers)
    feature_spec = tft_output.transformed_feature_spec()
    features = {f.name: f for f in config.features}
    crosses = {c.name: c for c in config.crosses}
    inputs = []
    for name in sorted(feature_spec):
        spec = feature_spec[name]
        if name == config.label:
            _expect(name, spec, tf.io.FixedLenFeature, tf.int64, "the label")
            continue
        if name in crosses:
            _expect(name, spec, tf.io.VarLenFeature, tf.int64, "a cross")
            inputs.append(
                InputSpec(name, Role.CROSS, wide=True, deep=False, size=crosses[name].hash_buckets)
            )
            continue
        feature = features.get(name)
        if feature is None:
            raise TrainError(
                f"transformed feature {name!r} is not in the config: the datagen output was "
                "made with another config"
            )
        if feature.kind is Kind.NUMERIC:
            _expect(name, spec, tf.io.FixedLenFeature, tf.float32, "a numeric feature")
            role, size, dim, vocab = Role.NUMERIC, feature.quantiles, 0, ""
        else:
            is_list = feature.kind is Kind.CATEGORICAL_LIST
            want = tf.io.VarLenFeature if is_list else tf.io.FixedLenFeature
            _expect(name, spec, want, tf.int64, f"a {feature.kind.value} feature")
            role = Role.CATEGORICAL_LIST if is_list else Role.CATEGORICAL
            size = int(tft_output.vocabulary_size_by_name(feature.vocabulary)) + NUM_OOV_BUCKETS
            dim, vocab = config.embedding_dim(feature), feature.vocabulary
        inputs.append(
            InputSpec(
                name,
                role,
                wide=feature.in_wide,
                deep=feature.in_deep,
                size=size,
                embedding_dim=dim if feature.in_deep else 0,
                vocabulary=vocab,
            )
        )
    names = {i.name for i in inputs}
    missing = [n for n in [*features, *crosses] if n not in names]
    if config.label not in feature_spec:
        missing.insert(0, config.label)
    if missing:
        raise TrainError(
            f"the transform output has no feature {', '.join(map(repr, missing))} of the config: "
            "the datagen output was made with another config"
        )
    model = ModelSpec(
        label=config.label,
        towers=towers,
        inputs=tuple(inputs),
        hidden_units=tuple(config.model.hidden_units),
        dropout=config.model.dropout,
        seed=config.training.seed,
        compute_dtype=resolve_compute_dtype(config.model.compute_dtype),
        embedding_stddev=config.model.embedding_stddev,
        unknown_id_rate=config.model.unknown_id_rate,
    )
    if towers.has_wide and not model.wide_inputs:
        raise TrainError("towers: the config gives the wide tower no features and no crosses")
    if towers.has_deep and not model.deep_inputs:
        raise TrainError("towers: the config gives the deep tower no features")
    return model


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of native bfloat16 matrix arithmetic, which oneDNN uses."""


def resolve_compute_dtype(setting: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The deep tower's arithmetic for ``model.compute_dtype``: float32 or bfloat16.

    ``auto`` is bfloat16 where the CPU multiplies bfloat16 natively and no GPU is visible (a GPU
    trains float32 fast enough, and older GPUs have no bfloat16), float32 elsewhere: on CPUs
    without those instructions bfloat16 is emulated and slower than float32.
    """
    if setting != "auto":
        return setting
    if tf.config.list_physical_devices("GPU"):
        return "float32"
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "float32"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return "bfloat16" if any(f in flags for f in BF16_CPU_FLAGS) else "float32"


def _expect(name: str, spec: Any, kind: type, dtype: tf.dtypes.DType, what: str) -> None:
    shape_ok = kind is tf.io.VarLenFeature or tuple(spec.shape) == ()
    if not isinstance(spec, kind) or spec.dtype != dtype or not shape_ok:
        raise TrainError(
            f"transformed feature {name!r}: expected {what} ({kind.__name__} of {dtype.name}), "
            f"got {spec}; the datagen output was made with another config"
        )


def incompatibilities(previous: ModelSpec, current: ModelSpec) -> list[str]:
    """Why a model of spec ``previous`` cannot warm-start one of spec ``current``.

    Vocabulary sizes may differ (rows are carried over by token); everything else that shapes a
    variable must match. Returns one message per difference, empty when compatible.
    """
    problems = []
    if previous.version != current.version:
        return [
            f"it was trained by an earlier version of the trainer (variable layout "
            f"{previous.version}, now {current.version}); train one model cold first"
        ]
    if previous.towers is not current.towers:
        problems.append(f"towers: {previous.towers.value} before, {current.towers.value} now")
    if previous.hidden_units != current.hidden_units:
        problems.append(
            f"model.hidden_units: {list(previous.hidden_units)} before, "
            f"{list(current.hidden_units)} now"
        )
    before = {i.name: i for i in previous.inputs}
    now = {i.name: i for i in current.inputs}
    gone = [n for n in before if n not in now]
    added = [n for n in now if n not in before]
    if gone:
        problems.append(f"features removed: {', '.join(gone)}")
    if added:
        problems.append(f"features added: {', '.join(added)}")
    for name in (n for n in now if n in before):
        a, b = before[name], now[name]
        where = f"crosses.{name}" if b.role is Role.CROSS else f"features.{name}"
        if a.role is not b.role:
            problems.append(f"{where}: kind {a.role.value} before, {b.role.value} now")
            continue
        if (a.wide, a.deep) != (b.wide, b.deep):
            problems.append(f"{where}.towers: {_towers(a)} before, {_towers(b)} now")
        if a.embedding_dim != b.embedding_dim:
            problems.append(
                f"{where}.embedding_dim: {a.embedding_dim} before, {b.embedding_dim} now"
            )
        if b.role is Role.CROSS and a.size != b.size:
            problems.append(f"{where}.hash_buckets: {a.size} before, {b.size} now")
        if b.role is Role.NUMERIC and a.size != b.size:
            problems.append(f"{where}.quantiles: {a.size} before, {b.size} now")
        if a.vocabulary != b.vocabulary:
            problems.append(f"{where}.vocabulary: {a.vocabulary!r} before, {b.vocabulary!r} now")
    return problems


def _towers(i: InputSpec) -> str:
    return "[" + ", ".join(t for t, on in (("wide", i.wide), ("deep", i.deep)) if on) + "]"
