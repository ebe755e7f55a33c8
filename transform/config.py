"""The pipeline config: one YAML file, loaded into typed objects and validated on load.

A config describes one ranking pipeline: the label column, every feature with its kind, its
vocabulary minimum count or quantile count and the tower(s) it feeds, the cross-product
transformations of the wide tower, and the model, training, validation and serving settings.
It is the single source of truth: the raw parsing spec, the tf.Transform ``preprocessing_fn``,
the model inputs and the serving signature are all derived from it.

Every problem is reported as a :class:`ConfigError` whose message names the key, e.g.
``features.country.min_count: expected an integer, got 'ten'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from transform.errors import UsageError

log = logging.getLogger(__name__)

PRESETS = ("app_store", "movies")
"""Configs shipped with the package, usable by name wherever a config path is expected."""

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Upper bounds of the sizes that decide a model's memory, far above any model of this kind:
# past them a value is a typo, and one table alone would outgrow a machine's memory (a cross's
# weight and its FTRL slots take 12 bytes a bucket). What fits a given machine is checked when
# training starts, from the vocabulary sizes the data gave (trainer.memory).
MAX_HASH_BUCKETS = 2**31 - 1
MAX_EMBEDDING_DIM = 4096
MAX_HIDDEN_UNITS = 65_536
MAX_QUANTILES = 10_000
MAX_WINDOW_DAYS = 366
MAX_SLICE_BUCKETS = 100
MAX_BOOTSTRAP_RESAMPLES = 10_000


class ConfigError(UsageError):
    """A config that cannot be used; the message names the offending key."""


class Kind(StrEnum):
    """How a raw column is read and transformed."""

    CATEGORICAL = "categorical"
    """One string or integer id per row: vocabulary ids, one-hot in wide, embedding in deep."""
    CATEGORICAL_LIST = "categorical_list"
    """A list of ids per row (e.g. installed apps): vocabulary ids, embeddings pooled."""
    NUMERIC = "numeric"
    """A real value: normalised to [0, 1] by its quantile, (i - 1) / (n_q - 1)."""


class Tower(StrEnum):
    """The two towers of the model."""

    WIDE = "wide"
    DEEP = "deep"


class DType(StrEnum):
    """Raw value type of a categorical column."""

    STRING = "string"
    INT = "int"


@dataclass(frozen=True)
class Feature:
    """One input feature: a raw column and how it is transformed and used.

    Attributes:
      name: Name of the feature, used for the transformed feature and the model input.
      kind: categorical, categorical_list or numeric.
      column: Raw column in the impression log (defaults to ``name``).
      dtype: Raw type of a categorical column's values: ``string`` or ``int``.
      min_count: Values seen fewer times than this get the out-of-vocabulary id.
      vocabulary: Name of a vocabulary shared with other features (same id space);
        defaults to the feature's own name.
      quantiles: Number of quantiles n_q of a numeric feature.
      towers: Which towers the feature feeds.
      embedding_dim: Embedding size in the deep tower (defaults to ``model.embedding_dim``).
      default: Value used when the raw value is missing; without it a missing value is an error.
    """

    name: str
    kind: Kind
    column: str = ""
    dtype: DType = DType.STRING
    min_count: int = 1
    vocabulary: str = ""
    quantiles: int = 10
    towers: tuple[Tower, ...] = (Tower.DEEP,)
    embedding_dim: int | None = None
    default: str | int | float | None = None

    @property
    def is_categorical(self) -> bool:
        """True for categorical and categorical_list features."""
        return self.kind in (Kind.CATEGORICAL, Kind.CATEGORICAL_LIST)

    @property
    def in_wide(self) -> bool:
        """True if the feature feeds the wide tower."""
        return Tower.WIDE in self.towers

    @property
    def in_deep(self) -> bool:
        """True if the feature feeds the deep tower."""
        return Tower.DEEP in self.towers


@dataclass(frozen=True)
class Cross:
    """A cross-product transformation of the wide tower: AND of its features' values.

    The cross of a list feature with a scalar one (installed apps x impression app) has one
    value per element of the list. Crosses are hashed into ``hash_buckets`` ids, so they need no
    vocabulary and keep their ids from one data set to the next (which makes them warm-startable).
    """

    name: str
    features: tuple[str, ...]
    hash_buckets: int = 100_000


DEFAULT_INITIAL_ACCUMULATOR = {"ftrl": 0.1, "adagrad": 0.001}
"""Initial accumulator of the adaptive optimizers when the config gives none.

FTRL keeps TensorFlow's 0.1. AdaGrad starts at 0.001: its first steps are then about
``learning_rate`` per coordinate, so small initial embeddings grow within the first epoch (with
0.1 they needed several, on the simulator and on MovieLens alike).
"""


@dataclass(frozen=True)
class OptimizerConfig:
    """One tower's optimizer. FTRL settings apply to ``ftrl`` only."""

    name: str
    learning_rate: float
    l1_regularization: float = 0.0
    l2_regularization: float = 0.0
    initial_accumulator_value: float | None = None

    @property
    def initial_accumulator(self) -> float:
        """The initial accumulator of FTRL or AdaGrad: as configured, else the default."""
        if self.initial_accumulator_value is not None:
            return self.initial_accumulator_value
        return DEFAULT_INITIAL_ACCUMULATOR.get(self.name, 0.1)


OPTIMIZER_DEFAULTS: dict[str, OptimizerConfig] = {
    "ftrl": OptimizerConfig(name="ftrl", learning_rate=0.5, l1_regularization=0.001),
    "adagrad": OptimizerConfig(name="adagrad", learning_rate=0.1),
    "adam": OptimizerConfig(name="adam", learning_rate=0.001),
    "sgd": OptimizerConfig(name="sgd", learning_rate=0.01),
}
"""Each optimizer's settings where a config names it but leaves them out.

A tower's optimizer given only some keys takes the others from here, and its ``name`` from the
tower's default: ``wide_optimizer: {learning_rate: 0.3}`` is FTRL at 0.3 that keeps the paper's
L1, not FTRL without it.
"""

FTRL_ONLY = ("l1_regularization", "l2_regularization")
"""Settings only FTRL reads: another optimizer given one refuses it rather than ignore it."""

ACCUMULATING = ("ftrl", "adagrad")
"""The optimizers that read ``initial_accumulator_value``."""

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
"""Values of ``model.compute_dtype``."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the two towers and their optimizers (paper section 4.2, Figure 4).

    Attributes:
      embedding_dim: Embedding size of categorical features in the deep tower.
      hidden_units: The ReLU layers of the deep tower.
      dropout: Dropout after each ReLU layer in training.
      compute_dtype: Arithmetic of the ReLU layers: float32, bfloat16 or auto.
      embedding_stddev: Standard deviation of the initial embeddings (0: 1/sqrt(dim)). Small
        initial rows keep a token seen a few times close to "no information" instead of a
        random direction as large as a trained one.
      unknown_id_rate: Share of the vocabulary ids of each training batch replaced by the
        out-of-vocabulary id, so that row learns what an unknown user or item is like.
      wide_optimizer: The wide tower's optimizer (FTRL with L1 in the paper).
      deep_optimizer: The deep tower's optimizer (AdaGrad in the paper).
    """

    embedding_dim: int = 32
    hidden_units: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.0
    compute_dtype: str = "auto"
    embedding_stddev: float = 0.05
    unknown_id_rate: float = 0.05
    wide_optimizer: OptimizerConfig = OPTIMIZER_DEFAULTS["ftrl"]
    deep_optimizer: OptimizerConfig = OPTIMIZER_DEFAULTS["adagrad"]


EARLY_STOPPING_METRICS = ("auc", "log_loss")
"""Values of ``training.early_stopping.metric``."""


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """When training stops before ``training.epochs``: the eval split stopped improving.

    Attributes:
      metric: ``auc`` (higher is better) or ``log_loss`` (lower is better), on the eval split.
      patience: Evaluations in a row without an improvement of at least ``min_delta`` after
        which training stops; 0 trains every epoch.
      min_delta: The least change of the metric that counts as an improvement.
    """

    metric: str = "auc"
    patience: int = 2
    min_delta: float = 0.0005


@dataclass(frozen=True)
class TrainingConfig:
    """How the trainer runs.

    Attributes:
      batch_size: Examples per training step.
      epochs: Most passes over the train split; early stopping usually ends training sooner.
      evals_per_epoch: Evaluations of the eval split per epoch (at evenly spaced steps, the
        last at the epoch's end); the best evaluated model is the one exported.
      early_stopping: When to stop before ``epochs``.
      steps_per_checkpoint: Steps between two checkpoints (evaluations also checkpoint).
      shuffle_buffer: Examples in the shuffle buffer of the train split.
      seed: Seed of initial weights, shuffling and the ids hidden in training.
    """

    batch_size: int = 512
    epochs: int = 10
    evals_per_epoch: int = 1
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    steps_per_checkpoint: int = 500
    shuffle_buffer: int = 10_000
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """How data generation reads the log and splits it.

    Attributes:
      eval_fraction: Share of rows held out for evaluation.
      split_by: Column whose value decides the split (e.g. a user or query id, so all of its
        rows land on one side); empty to split by the whole row.
      csv_delimiter: Field delimiter of CSV input.
      list_delimiter: Delimiter of list values inside one CSV field.
      window_days: Days of input the vocabularies and quantile boundaries of a day are
        computed over in ``widedeep run`` (the new day and the ones before it); the model
        still trains on the new day's rows. 1: each day alone.
    """

    eval_fraction: float = 0.1
    split_by: str = ""
    csv_delimiter: str = ","
    list_delimiter: str = "|"
    window_days: int = 1


class Severity(StrEnum):
    """What an anomaly of the data does: ``warn`` is reported; ``block`` also keeps
    ``widedeep run`` from training on the day (and ``widedeep datagen --fail-on-anomaly``
    exits non-zero)."""

    WARN = "warn"
    BLOCK = "block"


class SliceKind(StrEnum):
    """How the eval rows are cut into slices by one feature's raw values."""

    VALUE = "value"
    """Categorical: the most frequent values and "other"; numeric: quantile buckets."""
    IN_VOCABULARY = "in_vocabulary"
    """Categorical: whether the value is in the model's training vocabulary or not."""
    LENGTH = "length"
    """List: buckets of the number of values."""


@dataclass(frozen=True)
class SliceSpec:
    """One way of slicing the eval rows in the quality gate (``validation.slices``).

    Attributes:
      column: A feature's name (or its raw column): the slices are of that column's raw values.
      kind: ``value``, ``in_vocabulary`` or ``length``; None: ``length`` for a list feature,
        else ``value``.
      buckets: How many: the most frequent values of a categorical column (the rest make one
        more slice, "other"), quantile buckets of a numeric column or of a list's length
        (fewer when values repeat).
      tolerance: AUC drop against the baseline a slice may show (None:
        ``validation.slice_auc_tolerance``).
      min_rows: Fewer eval rows than this and the slice is reported but not judged (None:
        ``validation.slice_min_rows``).
    """

    column: str
    kind: SliceKind | None = None
    buckets: int = 5
    tolerance: float | None = None
    min_rows: int | None = None


@dataclass(frozen=True)
class ValidationConfig:
    """The dry run and quality check a model passes before it is deployed.

    Attributes:
      slices: Slices of the eval rows the model is also judged on (see :class:`SliceSpec`).
      slice_auc_tolerance: Default AUC drop against the baseline a slice may show.
      slice_min_rows: Default fewest eval rows of a slice that is judged.
      bootstrap_resamples: Resamples of the eval rows behind each confidence interval.
      calibration_error_tolerance: Largest expected calibration error (10 bins of equal
        rows); the model fails when the whole 95% interval of its ECE is above it.
      calibration_ratio_tolerance: Largest relative gap of the mean prediction from the label
        rate (0.2: a ratio in [0.8, 1.2]); the model fails when the whole 95% interval of the
        ratio is outside.
    """

    auc_tolerance: float = 0.005
    log_loss_tolerance: float = 0.01
    popularity_margin: float = 0.0
    """How much the eval AUC must exceed that of item popularity (``item``) to pass."""
    num_candidates: int = 200
    latency_budget_ms: float = 50.0
    num_requests: int = 50
    load_timeout_s: float = 120.0
    skew_severity: Severity = Severity.WARN
    """What training/serving skew found by ``validate --request-log`` does: ``warn`` reports
    it in the verdict, ``block`` also fails the model."""
    slices: tuple[SliceSpec, ...] = ()
    slice_auc_tolerance: float = 0.01
    slice_min_rows: int = 200
    bootstrap_resamples: int = 200
    calibration_error_tolerance: float = 0.15
    calibration_ratio_tolerance: float = 0.35


@dataclass(frozen=True)
class ServingConfig:
    """How candidates are scored through the model server (paper section 4.3)."""

    batch_size: int = 50
    parallelism: int = 4
    timeout_s: float = 5.0
    retries: int = 3


@dataclass(frozen=True)
class AnomalySeverity:
    """The severity of each kind of anomaly data validation finds (see ``pipeline.anomalies``).

    Attributes:
      column_missing: A column the config reads is not in the input.
      column_retyped: A column holds another type than in the reference (ids that became
        strings, numbers that became integers).
      all_missing: Every value of a column is missing.
      missing_rate: The share of missing values rose by more than ``missing_rate_increase``.
      label_rate: The label rate is 0 or 1, or left the band around the reference's.
      too_few_rows: Fewer rows than ``min_rows``, or than ``min_rows_ratio`` of the reference's.
      categorical_drift: The top tokens' shares moved (L-infinity distance).
      numeric_drift: The distribution over the reference's quantile buckets moved
        (Jensen-Shannon divergence).
      unknown_tokens: Too many values are tokens the reference never saw.
    """

    column_missing: Severity = Severity.BLOCK
    column_retyped: Severity = Severity.BLOCK
    all_missing: Severity = Severity.BLOCK
    missing_rate: Severity = Severity.BLOCK
    label_rate: Severity = Severity.BLOCK
    too_few_rows: Severity = Severity.BLOCK
    categorical_drift: Severity = Severity.WARN
    numeric_drift: Severity = Severity.WARN
    unknown_tokens: Severity = Severity.WARN


@dataclass(frozen=True)
class DriftThresholds:
    """One feature's thresholds, overriding those of ``data_validation`` (None: the default)."""

    name: str
    missing_rate_increase: float | None = None
    linf_distance: float | None = None
    js_divergence: float | None = None
    unknown_token_share: float | None = None


THRESHOLD_KEYS = ("missing_rate_increase", "linf_distance", "js_divergence", "unknown_token_share")
"""The settings a feature may override under ``data_validation.features.NAME``."""


@dataclass(frozen=True)
class DataValidationConfig:
    """How each datagen input is checked against a reference (the previous day's).

    Attributes:
      min_rows: Fewer rows than this is an anomaly.
      min_rows_ratio: Fewer rows than this share of the reference's is an anomaly.
      label_rate_change: Largest relative change of the label rate from the reference's
        (0.5: a reference rate of 0.10 allows 0.05 to 0.15). A rate of 0 or 1 always is one.
      missing_rate_increase: Largest rise of a column's share of missing values.
      linf_distance: Largest L-infinity distance between the shares of the top tokens of a
        categorical column (the largest change of one token's share, as TFDV measures it).
      js_divergence: Largest Jensen-Shannon divergence (base 2, 0 to 1) between a numeric
        column's distributions over the reference's quantile buckets.
      unknown_token_share: Largest share of a categorical column's values (by rows, list
        elements for lists) that are tokens the reference never saw.
      severity: ``warn`` or ``block``, by kind of anomaly.
      features: Per feature overrides of the four thresholds above, by feature name.
    """

    min_rows: int = 1
    min_rows_ratio: float = 0.1
    label_rate_change: float = 0.5
    missing_rate_increase: float = 0.1
    linf_distance: float = 0.2
    js_divergence: float = 0.1
    unknown_token_share: float = 0.3
    severity: AnomalySeverity = AnomalySeverity()
    features: tuple[DriftThresholds, ...] = ()

    def threshold(self, key: str, feature: str | None) -> float:
        """The threshold ``key`` (one of :data:`THRESHOLD_KEYS`) of a feature."""
        for f in self.features:
            if f.name == feature and getattr(f, key) is not None:
                return getattr(f, key)
        return getattr(self, key)


@dataclass(frozen=True)
class Config:
    """A whole pipeline config. Build it with :func:`load_config` or :func:`parse_config`."""

    model_name: str
    label: str
    features: tuple[Feature, ...]
    crosses: tuple[Cross, ...] = ()
    item: str = ""
    """The categorical feature that names the ranked item (the candidate); empty to infer it
    (see :attr:`item_feature`)."""
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    serving: ServingConfig = ServingConfig()
    data_validation: DataValidationConfig = DataValidationConfig()

    def feature(self, name: str) -> Feature:
        """The feature called ``name``."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def categorical_features(self) -> tuple[Feature, ...]:
        """Features with a vocabulary."""
        return tuple(f for f in self.features if f.is_categorical)

    @property
    def numeric_features(self) -> tuple[Feature, ...]:
        """Features normalised by quantiles."""
        return tuple(f for f in self.features if f.kind is Kind.NUMERIC)

    @property
    def vocabularies(self) -> dict[str, tuple[Feature, ...]]:
        """Each vocabulary name and the features that share it, in config order."""
        out: dict[str, list[Feature]] = {}
        for f in self.categorical_features:
            out.setdefault(f.vocabulary, []).append(f)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def raw_columns(self) -> tuple[str, ...]:
        """Every raw column the pipeline reads: the label and each feature's column."""
        cols = [self.label]
        for f in self.features:
            if f.column not in cols:
                cols.append(f.column)
        return tuple(cols)

    @property
    def item_feature(self) -> Feature | None:
        """The feature that names the ranked item: ``item`` when set, else inferred.

        Inferred as the single-valued categorical feature that shares its vocabulary with a
        list feature (the impression app and the installed apps, a movie and the movies liked
        before): a log records what users had and what they were shown in one id space. None
        when no feature or more than one fits.
        """
        if self.item:
            return self.feature(self.item)
        lists = {f.vocabulary for f in self.features if f.kind is Kind.CATEGORICAL_LIST}
        fits = [f for f in self.features if f.kind is Kind.CATEGORICAL and f.vocabulary in lists]
        return fits[0] if len(fits) == 1 else None

    def slice_feature(self, column: str) -> Feature | None:
        """The feature a slice column names: the feature of that name, else the first that
        reads that raw column; None when there is none."""
        for f in self.features:
            if f.name == column:
                return f
        return next((f for f in self.features if f.column == column), None)

    def slice_kind(self, spec: SliceSpec) -> SliceKind:
        """A slice's kind: its own, else ``length`` for a list column and ``value`` otherwise."""
        if spec.kind is not None:
            return spec.kind
        feature = self.slice_feature(spec.column)
        if feature is not None and feature.kind is Kind.CATEGORICAL_LIST:
            return SliceKind.LENGTH
        return SliceKind.VALUE

    def embedding_dim(self, feature: Feature) -> int:
        """Embedding size of a categorical feature in the deep tower."""
        return feature.embedding_dim or self.model.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, in the YAML layout it was loaded from."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The config as YAML text that :func:`parse_config` reads back unchanged."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, sections: tuple[str, ...] = ("label", "features", "crosses")) -> str:
        """A stable hash of some sections (by default those that shape the data)."""
        d = self.to_dict()
        payload = json.dumps({k: d[k] for k in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys, which plain YAML silently overwrites."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def preset_path(name: str) -> Path:
    """Path of a config shipped with the package (see :data:`PRESETS`)."""
    return Path(str(resources.files("transform") / "configs" / f"{name}.yaml"))


def load_config(path_or_preset: str | Path) -> Config:
    """Loads and validates a config from a YAML file, or a preset by name.

    Raises:
      ConfigError: the file is missing or not YAML, or the config is invalid; the message
        names the file and the key.
    """
    text_path = str(path_or_preset)
    path = preset_path(text_path) if text_path in PRESETS else Path(text_path)
    if not path.is_file():
        hint = f" (or one of the presets: {', '.join(PRESETS)})"
        raise ConfigError(f"{path}: config file not found{hint}")
    try:
        return parse_config(path.read_text())
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(text_or_data: str | Mapping[str, Any]) -> Config:
    """Parses and validates a config from YAML text or already-parsed data."""
    if isinstance(text_or_data, str):
        try:
            data = yaml.load(text_or_data, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}") from None
    else:
        data = text_or_data
    if not isinstance(data, Mapping):
        raise ConfigError("the config must be a mapping of keys to values")
    data = dict(data)
    features = data.pop("features", None)
    crosses = data.pop("crosses", None) or {}
    if not isinstance(features, Mapping) or not features:
        raise ConfigError("features: required, a mapping of feature name to its settings")
    if not isinstance(crosses, Mapping):
        raise ConfigError("crosses: expected a mapping of cross name to its settings")
    parsed_features = tuple(
        _build(Feature, _with_name(spec, name, f"features.{name}"), f"features.{name}")
        for name, spec in features.items()
    )
    parsed_crosses = tuple(
        _build(Cross, _with_name(spec, name, f"crosses.{name}"), f"crosses.{name}")
        for name, spec in crosses.items()
    )
    data["features"] = parsed_features
    data["crosses"] = parsed_crosses
    if "data_validation" in data:
        data["data_validation"] = _data_validation(data["data_validation"])
    if isinstance(data.get("model"), Mapping):
        data["model"] = _completed_optimizers(data["model"])
    if isinstance(data.get("validation"), Mapping) and "slices" in data["validation"]:
        data["validation"] = {
            **data["validation"],
            "slices": _slices(data["validation"]["slices"]),
        }
    config = _build(Config, data, "")
    config = dataclasses.replace(config, features=tuple(_resolve(f) for f in config.features))
    _validate(config)
    return config


def _completed_optimizers(model: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` with each tower's optimizer filled in from :data:`OPTIMIZER_DEFAULTS`."""
    model = dict(model)
    for key in ("wide_optimizer", "deep_optimizer"):
        given = model.get(key)
        if not isinstance(given, Mapping):
            continue  # absent (the default) or not a mapping (_build names the key)
        name = given.get("name", getattr(ModelConfig, key).name)
        base = OPTIMIZER_DEFAULTS.get(name) if isinstance(name, str) else None
        if base is None:
            raise ConfigError(
                f"model.{key}.name: unknown optimizer {name!r}; expected one of "
                f"{', '.join(OPTIMIZER_DEFAULTS)}"
            )
        # The named optimizer's own defaults, not the tower's: a wide tower switched to AdaGrad
        # does not inherit FTRL's L1 (which AdaGrad would refuse).
        filled = {k: v for k, v in dataclasses.asdict(base).items() if v is not None}
        model[key] = {**filled, **given}
    return model


def _with_name(spec: Any, name: Any, where: str) -> dict[str, Any]:
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {spec!r}")
    if "name" in spec:
        raise ConfigError(f"{where}.name: the name is the key; remove 'name'")
    return {"name": str(name), **spec}


def _data_validation(spec: Any) -> Any:
    """``data_validation`` with its ``features`` mapping (name -> thresholds) built."""
    where = "data_validation"
    if spec is None:
        return {}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("features") or {}, Mapping):
        if isinstance(spec, Mapping):
            where, spec = f"{where}.features", spec["features"]
        raise ConfigError(f"{where}: expected a mapping, got {spec!r}")
    spec = dict(spec)
    features = spec.pop("features", None) or {}
    spec["features"] = tuple(
        _build(
            DriftThresholds,
            _with_name(s, name, f"{where}.features.{name}"),
            f"{where}.features.{name}",
        )
        for name, s in features.items()
    )
    return spec


def _slices(spec: Any) -> Any:
    """``validation.slices`` with each column name written alone made a mapping."""
    if spec is None:
        return []
    if not isinstance(spec, list | tuple):
        raise ConfigError(
            f"validation.slices: expected a list of columns or {{column: ...}} mappings, "
            f"got {spec!r}"
        )
    return [{"column": s} if isinstance(s, str) else s for s in spec]


def _resolve(f: Feature) -> Feature:
    """Fills in the defaults that depend on other fields."""
    return dataclasses.replace(f, column=f.column or f.name, vocabulary=f.vocabulary or f.name)


REMOVED_KEYS: dict[str, str] = {
    "data.shard_rows": "it never had an effect (datagen's shards are sized by the Beam "
    "runner); remove it from the config",
}
"""Keys older configs may hold, with why they are gone: such a config still loads (a model's
saved config.yaml included), with a warning, instead of failing on an unknown key."""


def _build(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = dict(data)
    for key in list(data):
        removed = REMOVED_KEYS.get(_join(where, key))
        if removed is not None:
            log.warning(
                "config: %s is no longer a setting and is ignored: %s", _join(where, key), removed
            )
            del data[key]
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            )
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    return cls(**kwargs)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks ``value`` against the type hint ``hint`` and converts it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: unexpected value {value!r}")
    if origin is tuple:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single tower or feature may be written without brackets
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(m.value for m in hint)
            raise ConfigError(
                f"{key}: unknown value {value!r}; expected one of {allowed}"
            ) from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported value {value!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Validation: many small checks, each naming the key it refuses.


def _validate(config: Config) -> None:
    _check_name("model_name", config.model_name)
    _check_name("label", config.label)
    if config.item:
        names_ = [f.name for f in config.features]
        if config.item not in names_:
            raise ConfigError(f"item: {_unknown(config.item, names_)}")
        if config.feature(config.item).kind is not Kind.CATEGORICAL:
            raise ConfigError(
                f"item: {config.item!r} is {config.feature(config.item).kind.value}; the item is "
                "one categorical id per row"
            )
    names = [f.name for f in config.features]
    for f in config.features:
        _validate_feature(f, config)
    columns = {}
    for f in config.features:
        if f.column == config.label:
            raise ConfigError(f"features.{f.name}.column: {f.column!r} is the label column")
        if f.column in columns and config.feature(columns[f.column]).kind is not f.kind:
            raise ConfigError(
                f"features.{f.name}.column: column {f.column!r} is already read as "
                f"{config.feature(columns[f.column]).kind.value} by feature {columns[f.column]!r}"
            )
        columns.setdefault(f.column, f.name)
    _validate_vocabularies(config)
    cross_names = set()
    for c in config.crosses:
        where = f"crosses.{c.name}"
        _check_name(where, c.name)
        if c.name in names or c.name in cross_names:
            raise ConfigError(f"{where}: the name {c.name!r} is already used")
        cross_names.add(c.name)
        if len(c.features) < 2:
            raise ConfigError(f"{where}.features: a cross needs at least two features")
        if len(set(c.features)) != len(c.features):
            raise ConfigError(f"{where}.features: a feature is listed twice")
        lists = 0
        for i, name in enumerate(c.features):
            if name not in names:
                raise ConfigError(f"{where}.features[{i}]: {_unknown(name, names)}")
            kind = config.feature(name).kind
            if kind is Kind.NUMERIC:
                raise ConfigError(
                    f"{where}.features[{i}]: {name!r} is numeric; only categorical features "
                    "can be crossed"
                )
            lists += kind is Kind.CATEGORICAL_LIST
        if lists > 1:
            raise ConfigError(
                f"{where}.features: at most one categorical_list feature per cross "
                "(the cross of two lists grows with the product of their lengths)"
            )
        _bounded(f"{where}.hash_buckets", c.hash_buckets, MAX_HASH_BUCKETS)
    if not any(f.in_wide for f in config.features) and not config.crosses:
        raise ConfigError(
            "features: the wide tower has no features (no feature has tower "
            "'wide' and there are no crosses)"
        )
    if not any(f.in_deep for f in config.features):
        raise ConfigError("features: the deep tower has no features (no feature has tower 'deep')")
    _validate_sections(config)


def _validate_feature(f: Feature, config: Config) -> None:
    where = f"features.{f.name}"
    _check_name(where, f.name)
    if f.name == config.label:
        raise ConfigError(f"{where}: the label {config.label!r} cannot also be a feature")
    if not f.towers:
        raise ConfigError(f"{where}.towers: a feature must feed at least one tower")
    if len(set(f.towers)) != len(f.towers):
        raise ConfigError(f"{where}.towers: a tower is listed twice")
    _positive(f"{where}.min_count", f.min_count)
    if f.embedding_dim is not None:
        _bounded(f"{where}.embedding_dim", f.embedding_dim, MAX_EMBEDDING_DIM)
    if f.kind is Kind.NUMERIC:
        if f.quantiles < 2:
            raise ConfigError(f"{where}.quantiles: expected an integer >= 2, got {f.quantiles}")
        _bounded(f"{where}.quantiles", f.quantiles, MAX_QUANTILES)
        if f.dtype is not DType.STRING:  # dtype was given: it means nothing for numbers
            raise ConfigError(f"{where}.dtype: only categorical features take a dtype")
        if f.default is not None and isinstance(f.default, str):
            raise ConfigError(f"{where}.default: expected a number, got {f.default!r}")
    else:
        if f.default is not None:
            want = str if f.dtype is DType.STRING else int
            if not isinstance(f.default, want) or isinstance(f.default, bool):
                raise ConfigError(
                    f"{where}.default: expected a {f.dtype.value} for a {f.dtype.value} "
                    f"feature, got {f.default!r}"
                )
        _check_name(f"{where}.vocabulary", f.vocabulary)


def _validate_vocabularies(config: Config) -> None:
    for vocab, members in config.vocabularies.items():
        first = members[0]
        for f in members[1:]:
            where = f"features.{f.name}"
            if f.dtype is not first.dtype:
                raise ConfigError(
                    f"{where}.dtype: shares vocabulary {vocab!r} with {first.name!r} "
                    f"but its dtype is {f.dtype.value}, not {first.dtype.value}"
                )
            if f.min_count != first.min_count:
                raise ConfigError(
                    f"{where}.min_count: shares vocabulary {vocab!r} with {first.name!r} "
                    f"but its min_count is {f.min_count}, not {first.min_count}"
                )
        # The deep tower keeps one embedding table per vocabulary.
        deep = [f for f in members if f.in_deep]
        for f in deep[1:]:
            if config.embedding_dim(f) != config.embedding_dim(deep[0]):
                raise ConfigError(
                    f"features.{f.name}.embedding_dim: shares vocabulary {vocab!r} (and its "
                    f"embeddings) with {deep[0].name!r} but its embedding_dim is "
                    f"{config.embedding_dim(f)}, not {config.embedding_dim(deep[0])}"
                )
    for f in config.numeric_features:
        if f.vocabulary != f.name:
            raise ConfigError(f"features.{f.name}.vocabulary: numeric features have no vocabulary")


def _validate_sections(config: Config) -> None:
    m = config.model
    _bounded("model.embedding_dim", m.embedding_dim, MAX_EMBEDDING_DIM)
    if not m.hidden_units:
        raise ConfigError("model.hidden_units: the deep tower needs at least one layer")
    for i, units in enumerate(m.hidden_units):
        _bounded(f"model.hidden_units[{i}]", units, MAX_HIDDEN_UNITS)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: expected a number in [0, 1), got {m.dropout}")
    if not 0.0 <= m.unknown_id_rate < 1.0:
        raise ConfigError(
            f"model.unknown_id_rate: expected a number in [0, 1), got {m.unknown_id_rate}"
        )
    if m.embedding_stddev < 0:
        raise ConfigError(f"model.embedding_stddev: must be >= 0, got {m.embedding_stddev}")
    if m.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"model.compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, "
            f"got {m.compute_dtype!r}"
        )
    for key, opt in (
        ("model.wide_optimizer", m.wide_optimizer),
        ("model.deep_optimizer", m.deep_optimizer),
    ):
        if opt.name not in OPTIMIZER_DEFAULTS:
            raise ConfigError(
                f"{key}.name: unknown optimizer {opt.name!r}; expected one of "
                f"{', '.join(OPTIMIZER_DEFAULTS)}"
            )
        if opt.learning_rate <= 0:
            raise ConfigError(f"{key}.learning_rate: must be > 0, got {opt.learning_rate}")
        for attr in FTRL_ONLY:
            if opt.name != "ftrl" and getattr(opt, attr):
                raise ConfigError(
                    f"{key}.{attr}: only FTRL reads it, and this tower's optimizer is "
                    f"{opt.name!r}; remove it or use name: ftrl"
                )
        if opt.name not in ACCUMULATING and opt.initial_accumulator_value is not None:
            raise ConfigError(
                f"{key}.initial_accumulator_value: only FTRL and AdaGrad read it, and this "
                f"tower's optimizer is {opt.name!r}; remove it"
            )
        for attr in ("l1_regularization", "l2_regularization", "initial_accumulator_value"):
            if (getattr(opt, attr) or 0) < 0:
                raise ConfigError(f"{key}.{attr}: must be >= 0, got {getattr(opt, attr)}")
    t = config.training
    _positive("training.batch_size", t.batch_size)
    _positive("training.epochs", t.epochs)
    _positive("training.evals_per_epoch", t.evals_per_epoch)
    e = t.early_stopping
    if e.metric not in EARLY_STOPPING_METRICS:
        raise ConfigError(
            f"training.early_stopping.metric: expected one of {', '.join(EARLY_STOPPING_METRICS)}, "
            f"got {e.metric!r}"
        )
    if e.patience < 0:
        raise ConfigError(f"training.early_stopping.patience: must be >= 0, got {e.patience}")
    if e.min_delta < 0:
        raise ConfigError(f"training.early_stopping.min_delta: must be >= 0, got {e.min_delta}")
    _positive("training.steps_per_checkpoint", t.steps_per_checkpoint)
    _positive("training.shuffle_buffer", t.shuffle_buffer)
    d = config.data
    _positive("data.window_days", d.window_days)
    if d.window_days > MAX_WINDOW_DAYS:
        raise ConfigError(
            f"data.window_days: {d.window_days:,} is more than a year of days "
            f"({MAX_WINDOW_DAYS}); the analyzer cache keeps one folder a day of the window"
        )
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: expected a number in (0, 1), got {d.eval_fraction}")
    if d.split_by and d.split_by == config.label:
        raise ConfigError("data.split_by: cannot split by the label")
    if len(d.csv_delimiter) != 1:
        raise ConfigError(f"data.csv_delimiter: expected one character, got {d.csv_delimiter!r}")
    if not d.list_delimiter or d.list_delimiter == d.csv_delimiter:
        raise ConfigError("data.list_delimiter: must be non-empty and differ from csv_delimiter")
    v = config.validation
    for attr in (
        "auc_tolerance",
        "log_loss_tolerance",
        "popularity_margin",
        "slice_auc_tolerance",
        "calibration_error_tolerance",
        "calibration_ratio_tolerance",
    ):
        if getattr(v, attr) < 0:
            raise ConfigError(f"validation.{attr}: must be >= 0, got {getattr(v, attr)}")
    _positive("validation.num_candidates", v.num_candidates)
    _positive("validation.num_requests", v.num_requests)
    _positive("validation.slice_min_rows", v.slice_min_rows)
    _bounded(
        "validation.bootstrap_resamples",
        v.bootstrap_resamples,
        MAX_BOOTSTRAP_RESAMPLES,
        why="the gate holds a weight for every eval row in every resample (4 bytes each), "
        "which past this would not fit in memory for a large eval split",
    )
    if v.latency_budget_ms <= 0 or v.load_timeout_s <= 0:
        raise ConfigError("validation: latency_budget_ms and load_timeout_s must be > 0")
    _validate_slices(config)
    _validate_data_validation(config)
    s = config.serving
    _positive("serving.batch_size", s.batch_size)
    _positive("serving.parallelism", s.parallelism)
    if s.timeout_s <= 0 or s.retries < 0:
        raise ConfigError("serving: timeout_s must be > 0 and retries >= 0")


def _validate_slices(config: Config) -> None:
    seen = set()
    for i, spec in enumerate(config.validation.slices):
        where = f"validation.slices[{i}]"
        feature = config.slice_feature(spec.column)
        if feature is None:
            known = sorted({f.name for f in config.features} | {f.column for f in config.features})
            close = difflib.get_close_matches(spec.column, known, n=1)
            raise ConfigError(
                f"{where}.column: unknown column {spec.column!r}; a slice column is a feature "
                "or its raw column" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        kind = config.slice_kind(spec)
        allowed = {
            Kind.CATEGORICAL: (SliceKind.VALUE, SliceKind.IN_VOCABULARY),
            Kind.NUMERIC: (SliceKind.VALUE,),
            Kind.CATEGORICAL_LIST: (SliceKind.LENGTH,),
        }[feature.kind]
        if kind not in allowed:
            raise ConfigError(
                f"{where}.kind: {kind.value!r} does not apply to {feature.kind.value} column "
                f"{spec.column!r}; expected one of {', '.join(k.value for k in allowed)}"
            )
        if (spec.column, kind) in seen:
            raise ConfigError(f"{where}: {spec.column!r} is sliced by {kind.value} twice")
        seen.add((spec.column, kind))
        if not 2 <= spec.buckets <= MAX_SLICE_BUCKETS:
            raise ConfigError(
                f"{where}.buckets: expected an integer from 2 to {MAX_SLICE_BUCKETS}, "
                f"got {spec.buckets}"
            )
        if spec.tolerance is not None and not 0.0 <= spec.tolerance <= 1.0:
            raise ConfigError(
                f"{where}.tolerance: expected an AUC drop in [0, 1], got {spec.tolerance}"
            )
        if spec.min_rows is not None:
            _positive(f"{where}.min_rows", spec.min_rows)


def _validate_data_validation(config: Config) -> None:
    dv = config.data_validation
    where = "data_validation"
    if dv.min_rows < 0:
        raise ConfigError(f"{where}.min_rows: must be >= 0, got {dv.min_rows}")
    if not 0.0 <= dv.min_rows_ratio <= 1.0:
        raise ConfigError(
            f"{where}.min_rows_ratio: expected a number in [0, 1], got {dv.min_rows_ratio}"
        )
    if dv.label_rate_change < 0:
        raise ConfigError(f"{where}.label_rate_change: must be >= 0, got {dv.label_rate_change}")
    names = [f.name for f in config.features]
    seen = set()
    for f in dv.features:
        key = f"{where}.features.{f.name}"
        if f.name not in names:
            raise ConfigError(f"{key}: {_unknown(f.name, names)}")
        if f.name in seen:
            raise ConfigError(f"{key}: listed twice")
        seen.add(f.name)
    for owner, key in [(dv, where), *((f, f"{where}.features.{f.name}") for f in dv.features)]:
        for attr in THRESHOLD_KEYS:
            value = getattr(owner, attr)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{attr}: expected a number in [0, 1], got {value}")


def _check_name(key: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{key}: {name!r} is not a valid name (letters, digits and '_', not starting "
            "with a digit)"
        )


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}: expected an integer >= 1, got {value}")


def _bounded(
    key: str, value: int, largest: int, why: str = "a model that large would not fit in memory"
) -> None:
    """An integer >= 1 and at most `largest`; ``why`` says what past it would do."""
    _positive(key, value)
    if value > largest:
        raise ConfigError(f"{key}: {value:,} is more than the largest allowed, {largest:,}; {why}")


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown feature {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Config):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "features":
                out["features"] = {x.name: _strip_name(_to_plain(x)) for x in value}
            elif f.name == "crosses":
                out["crosses"] = {x.name: _strip_name(_to_plain(x)) for x in value}
            elif f.name == "validation":
                out[f.name] = _to_plain(value)
                out[f.name]["slices"] = [
                    {k: v for k, v in _to_plain(x).items() if v is not None} for x in value.slices
                ]
            elif f.name == "data_validation":
                out[f.name] = _to_plain(value)
                out[f.name]["features"] = {
                    x.name: {k: v for k, v in _strip_name(_to_plain(x)).items() if v is not None}
                    for x in value.features
                }
            else:
                out[f.name] = _to_plain(value)
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    return obj


def _strip_name(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "name"}
