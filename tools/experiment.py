"""Table 1 of Cheng et al. (2016) on the app-store simulator: offline AUC and an online A/B test.

The paper compares its three models, wide only (the control), deep only and wide & deep, trained
on the same data with the same features, by the AUC on a held-out set (offline) and by the app
acquisition rate in a live A/B experiment (online). :func:`run_experiment` does the same on
simulated logs, where the ground truth is known:

1. ``simulate`` writes ``days`` days of impression logs of one seeded world.
2. ``run_datagen`` (the ``app_store`` preset, or the config given) runs on days 1 .. days-1.
3. :func:`trainer.train.train` trains each of the three models from the same config and data.
4. Offline: every exported SavedModel scores the logged rows of the last day, which no model
   was trained on, in this process (raw tf.Examples built by the scoring client's
   :class:`transform.examples.ExampleEncoder`); AUC and log loss against the logged labels. The
   simulator's true probability of the same rows gives the ceiling (the oracle AUC).
5. Online: on the next day, ``online_queries`` users open the store; the simulator's retrieval
   gives each query its candidate apps (5-20 by default). Each arm ranks the candidates, shows
   its top k, and each shown app is installed with the simulator's true probability of that
   (query, app) pair. Arms share the queries and the uniform draw of every (query, app), so an
   app shown by two arms is installed in both or in neither (common random numbers). Besides
   the models, two reference arms: ``oracle`` ranks by the true probability (no ranker can do
   better in expectation) and ``random`` ranks at random.

Acquisition rate is installs per query; a gain is an arm's rate over the control's, minus one,
with a percentile confidence interval from a paired bootstrap over queries (every arm's
installs of a query are resampled together). The expected rate (sum of the true probabilities
of the apps shown, without the Bernoulli noise of installs) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tools.simulator import (
    METADATA_FILE,
    AppStoreWorld,
    SimulatorSettings,
    ragged_gather,
    simulate,
)
from transform import artifacts
from transform.config import Config
from transform.errors import UsageError
from transform.metrics import auc, log_loss, query_auc
from transform.paths import remove_paths

__all__ = [
    "ARMS",
    "CONTROL",
    "ORACLE",
    "RANDOM",
    "ArmOutcome",
    "ExperimentResult",
    "ExperimentSettings",
    "OfflineOutcome",
    "OnlineOutcome",
    "QuerySample",
    "bootstrap_means",
    "draw_queries",
    "encode_rows",
    "installs_per_query",
    "online_outcome",
    "ratio_interval",
    "run_experiment",
    "top_k_mask",
]

ARMS: tuple[str, ...] = ("wide", "deep", "wide_deep")
"""The paper's three models, by the ``towers`` value that trains them."""
CONTROL = "wide"
"""The control arm of the paper's A/B test: the wide-only model."""
ORACLE = "oracle"
RANDOM = "random"

LOGS_DIR = "logs"
DATA_DIR = "data"
MODELS_DIR = "models"
SETTINGS_FILE = "experiment.json"

# Independent random streams of the experiment (the simulator has its own).
_STREAM_QUERIES = 101
_STREAM_INSTALLS = 102
_STREAM_RANDOM_ARM = 103
_STREAM_TIES = 104
_STREAM_BOOTSTRAP = 105


@dataclass(frozen=True)
class ExperimentSettings:
    """What :func:`run_experiment` simulates and measures.

    Attributes:
        days: days simulated; models train on days 1 .. days-1, the offline test is day
            ``days`` and the online test day ``days + 1``.
        rows_per_day: impressions logged per day.
        seed: seed of the world, the logs and the experiment's own draws.
        simulator: the world (its ``seed`` is replaced by ``seed``).
        online_queries: queries of the online experiment.
        top_k: apps shown per query; the first is the headline, the others are also reported.
        bootstrap_samples: resamples of the paired bootstrap.
        confidence: level of the confidence intervals.
        max_offline_rows: most logged rows of the held-out day scored offline (None: all).
    """

    days: int = 3
    rows_per_day: int = 300_000
    seed: int = 0
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    online_queries: int = 30_000
    top_k: tuple[int, ...] = (3, 1)
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    max_offline_rows: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k", tuple(int(k) for k in self.top_k))
        if self.days < 2:
            raise UsageError(f"days must be >= 2 (train days and a held-out day), got {self.days}")
        for name in ("rows_per_day", "online_queries", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.top_k or any(k < 1 for k in self.top_k):
            raise UsageError(f"top_k must be one or more integers >= 1, got {self.top_k}")
        if not 0.0 < self.confidence < 1.0:
            raise UsageError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.max_offline_rows is not None and self.max_offline_rows < 1:
            raise UsageError(f"max_offline_rows must be >= 1, got {self.max_offline_rows}")

    @property
    def world(self) -> SimulatorSettings:
        """The simulator settings with this experiment's seed."""
        return dataclasses.replace(self.simulator, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["simulator"] = self.world.to_dict()
        out["top_k"] = list(self.top_k)
        return out


@dataclass(frozen=True)
class OfflineOutcome:
    """Offline metrics of one scorer on the held-out day's logged rows."""

    auc: float
    query_auc: float
    """Mean AUC within a query (see :func:`query_auc`)."""
    log_loss: float
    mean_prediction: float
    eval_split_auc: float | None = None
    """AUC on datagen's eval split of the training days (the trainer's own number)."""


@dataclass(frozen=True)
class ArmOutcome:
    """One arm of the online experiment at one k."""

    installs_per_query: float
    installs_per_impression: float
    expected_installs_per_query: float
    gain: float
    """Acquisition rate over the control's, minus one."""
    gain_ci: tuple[float, float]
    """Paired-bootstrap percentile interval of ``gain``."""
    gain_ci_delta: tuple[float, float]
    """The same interval by the delta method (a cross-check of the bootstrap)."""
    expected_gain: float
    """Gain in expected installs (true probabilities of the apps shown; no install noise)."""
    expected_gain_ci: tuple[float, float]
    companion_share: float = math.nan
    """Share of the impressions shown whose install probability a companion app the user
    has raises (a positive memorisation pair): what the wide tower's cross can learn."""


@dataclass(frozen=True)
class OnlineOutcome:
    """The online experiment at one k."""

    k: int
    queries: int
    impressions_per_query: float
    arms: dict[str, ArmOutcome]
    comparisons: dict[str, ArmOutcome]
    """Further pairs, e.g. ``wide_deep_vs_deep``: the first arm's gain over the second."""


@dataclass(frozen=True)
class ExperimentResult:
    """Everything :func:`run_experiment` measured."""

    out_dir: Path
    settings: ExperimentSettings
    config_name: str
    arms: tuple[str, ...]
    train_rows: int
    eval_rows: int
    offline_day: int
    offline_rows: int
    offline_label_rate: float
    offline: dict[str, OfflineOutcome]
    """Per model arm, and ``oracle`` (the simulator's true probability)."""
    online_day: int
    candidates_per_query: float
    online: dict[int, OnlineOutcome]
    train: dict[str, dict[str, Any]]
    """Per model arm: steps, examples per second, seconds."""
    seconds: dict[str, float]
    """Wall time of each step."""

    @property
    def headline(self) -> OnlineOutcome:
        """The online outcome at the first of ``settings.top_k``."""
        return self.online[self.settings.top_k[0]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "out_dir": str(self.out_dir),
            "settings": self.settings.to_dict(),
            "config": self.config_name,
            "arms": list(self.arms),
            "control": CONTROL,
            "train_days": list(range(1, self.offline_day)),
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "offline_day": self.offline_day,
            "offline_rows": self.offline_rows,
            "offline_label_rate": self.offline_label_rate,
            "offline": {k: dataclasses.asdict(v) for k, v in self.offline.items()},
            "online_day": self.online_day,
            "candidates_per_query": self.candidates_per_query,
            "online": {
                str(k): {
                    "k": v.k,
                    "queries": v.queries,
                    "impressions_per_query": v.impressions_per_query,
                    "arms": {a: _plain(o) for a, o in v.arms.items()},
                    "comparisons": {a: _plain(o) for a, o in v.comparisons.items()},
                }
                for k, v in self.online.items()
            },
            "train": self.train,
            "seconds": self.seconds,
        }


def _plain(outcome: ArmOutcome) -> dict[str, Any]:
    out = dataclasses.asdict(outcome)
    for key, value in out.items():
        if isinstance(value, tuple):
            out[key] = list(value)
    return out


# ------------------------------------------------------------------------------ building blocks


def encode_rows(rows: pa.Table, config: Config) -> list[bytes]:
    """Serialized raw tf.Examples of logged rows: the config's feature columns, no label.

    Built with the scoring client's :class:`~transform.examples.ExampleEncoder`, as a client of the
    model server would; the encoded features of repeated values are reused.
    """
    import tensorflow as tf

    from transform.examples import ExampleEncoder
    from transform.features import can_be_int

    columns = list(dict.fromkeys(f.column for f in config.features))
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"rows lack the config's columns: {', '.join(missing)}")
    # Typed as data generation typed the log: a column it holds as integers stays int64.
    int_columns = [
        f.column
        for f in config.features
        if can_be_int(f) and pa.types.is_integer(rows.schema.field(f.column).type)
    ]
    encoder = ExampleEncoder(config, dict.fromkeys(int_columns, "int64"))
    values = [rows.column(c).to_pylist() for c in columns]
    cache: dict[tuple[str, Any], Any] = {}
    out = []
    for row in zip(*values, strict=True):
        feats = {}
        for name, value in zip(columns, row, strict=True):
            if value is None:
                continue
            key = (name, tuple(value) if isinstance(value, list) else value)
            feature = cache.get(key)
            if feature is None:
                feature = cache[key] = encoder.feature(name, value)
            feats[name] = feature
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
        if len(cache) > 1_000_000:
            cache.clear()
    return out


@dataclass(frozen=True)
class QuerySample:
    """Whole queries of one day with their retrieved candidates, one row per (query, app).

    ``query`` numbers the queries 0 .. n-1 and rows of one query are contiguous.
    """

    day: int
    rows: pa.Table
    query: np.ndarray
    probability: np.ndarray
    """The simulator's true install probability of each (query, app)."""
    memorisation: np.ndarray
    """The logit the world's companion pairs add to each (query, app): the effects of the
    memorisation pairs whose companion the user has installed (0 when none)."""

    @property
    def num_queries(self) -> int:
        return int(self.query[-1]) + 1 if len(self.query) else 0


def draw_queries(
    world: AppStoreWorld, day: int, num_queries: int, seed: int, chunk_rows: int = 65_536
) -> QuerySample:
    """``num_queries`` queries of ``day`` as the simulator's retrieval produces them.

    The candidates of a query are all the impressions the simulator logs for it (its retrieval
    output). The last query of each generated chunk may have been cut by the chunk boundary
    and is left out, so every query keeps its full candidate set. Installed sets are the
    world's current ones (the start of ``day``); nothing in ``world`` changes.
    """
    if num_queries < 1:
        raise UsageError(f"num_queries must be >= 1, got {num_queries}")
    rng = np.random.default_rng([seed, _STREAM_QUERIES, day])
    s = world.settings
    bound = 2 * num_queries * s.max_candidates + chunk_rows
    tables, queries, probabilities, memorisation = [], [], [], []
    target, companion, effect = world.memorisation_pairs(day)
    n_apps = world.num_apps_on(day)
    pair_keys = target * n_apps + companion
    pair_order = np.argsort(pair_keys)
    pair_keys, pair_effect = pair_keys[pair_order], effect[pair_order]
    got = 0
    for chunk in world.iter_impressions(day, bound, rng, chunk_rows):
        ids = chunk.query
        keep = ids != ids[-1]
        needed = num_queries - got
        # Dense query numbers, in order, for the kept rows.
        kept_ids = ids[keep]
        if not len(kept_ids):
            continue
        _, dense = np.unique(kept_ids, return_inverse=True)
        n_new = int(dense.max()) + 1
        if n_new > needed:
            cut = dense < needed
            keep_idx = np.flatnonzero(keep)[cut]
            dense, n_new = dense[cut], needed
        else:
            keep_idx = np.flatnonzero(keep)
        offsets, installed = ragged_gather(chunk.installed_offsets, chunk.installed_apps, keep_idx)
        app = chunk.app[keep_idx]
        probability = world.true_probability(
            day,
            chunk.user[keep_idx],
            app,
            chunk.hour[keep_idx],
            chunk.device[keep_idx],
            offsets,
            installed,
        )
        row = np.repeat(np.arange(len(app)), np.diff(offsets))
        keys = app[row] * n_apps + installed
        pos = np.minimum(np.searchsorted(pair_keys, keys), max(len(pair_keys) - 1, 0))
        hit = pair_keys[pos] == keys if len(pair_keys) else np.zeros(len(keys), bool)
        memorisation.append(
            np.bincount(row, weights=np.where(hit, pair_effect[pos], 0.0), minlength=len(app))
        )
        tables.append(pa.Table.from_batches([world.to_record_batch(chunk)]).take(keep_idx))
        queries.append(dense + got)
        probabilities.append(probability)
        got += n_new
        if got >= num_queries:
            break
    return QuerySample(
        day=day,
        rows=pa.concat_tables(tables),
        query=np.concatenate(queries).astype(np.int64),
        probability=np.concatenate(probabilities),
        memorisation=np.concatenate(memorisation),
    )


def top_k_mask(query: np.ndarray, scores: np.ndarray, k: int, tiebreak: np.ndarray) -> np.ndarray:
    """Which rows are among the ``k`` best-scored of their query (ties broken by ``tiebreak``).

    ``query`` holds non-negative query numbers; rows of a query need not be contiguous.
    """
    query = np.asarray(query)
    order = np.lexsort((tiebreak, -np.asarray(scores, np.float64), query))
    sorted_query = query[order]
    first = np.searchsorted(sorted_query, sorted_query, side="left")
    rank = np.arange(len(order)) - first
    mask = np.zeros(len(order), bool)
    mask[order[rank < k]] = True
    return mask


def installs_per_query(
    query: np.ndarray,
    shown: np.ndarray,
    probability: np.ndarray,
    uniforms: np.ndarray,
    num_queries: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Realised installs (``uniform < probability`` among shown rows) and expected installs
    (sum of the shown rows' probabilities), per query."""
    realised = np.bincount(
        query, weights=(shown & (uniforms < probability)).astype(np.float64), minlength=num_queries
    )
    expected = np.bincount(query, weights=np.where(shown, probability, 0.0), minlength=num_queries)
    return realised, expected


def bootstrap_means(
    values: np.ndarray, samples: int, rng: np.random.Generator, block: int = 50
) -> np.ndarray:
    """Column means of ``samples`` resamples of the rows of ``values`` (n x m); (samples, m).

    Rows are resampled whole, so columns measured on the same unit (a query) stay paired.
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    out = np.empty((samples, values.shape[1]))
    for start in range(0, samples, block):
        b = min(block, samples - start)
        idx = rng.integers(0, n, (b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ values / n
    return out


def ratio_interval(
    values: np.ndarray, means: np.ndarray, a: int, b: int, confidence: float
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Gain of column ``a`` over column ``b`` (mean ratio minus one) with its bootstrap
    percentile interval (from ``means``, see :func:`bootstrap_means`) and its delta-method
    interval."""
    x, y = values[:, a], values[:, b]
    mx, my = float(x.mean()), float(y.mean())
    gain = mx / my - 1.0 if my > 0 else math.nan
    ratios = means[:, a] / means[:, b] - 1.0
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    n = len(x)
    if my > 0 and n > 1:
        cov = np.cov(x, y)
        var = (cov[0, 0] / my**2 - 2 * mx * cov[0, 1] / my**3 + mx**2 * cov[1, 1] / my**4) / n
        z = _normal_quantile(1.0 - tail)
        half = z * math.sqrt(max(var, 0.0))
        delta = (gain - half, gain + half)
    else:
        delta = (math.nan, math.nan)
    return gain, (float(lo), float(hi)), delta


def _normal_quantile(p: float) -> float:
    """Quantile of the standard normal distribution (bisection on erf; p in (0, 1))."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def online_outcome(
    sample: QuerySample,
    scores: Mapping[str, np.ndarray],
    k: int,
    *,
    seed: int,
    control: str = CONTROL,
    comparisons: Sequence[tuple[str, str]] = (),
    bootstrap_samples: int = 2000,
    confidence: float = 0.95,
) -> OnlineOutcome:
    """The A/B experiment at one k: each arm shows the top ``k`` of every query by its scores.

    Every arm sees the same queries, the same tie-break and the same uniform draw per row.
    """
    arms = list(scores)
    if control not in scores:
        raise ValueError(f"the control arm {control!r} has no scores")
    n_q = sample.num_queries
    rows = len(sample.query)
    uniforms = np.random.default_rng([seed, _STREAM_INSTALLS, sample.day]).random(rows)
    tiebreak = np.random.default_rng([seed, _STREAM_TIES, sample.day]).random(rows)
    realised, expected, companion = [], [], []
    shown_per_query = None
    for arm in arms:
        arm_scores = np.asarray(scores[arm])
        if arm_scores.shape != (rows,):
            raise ValueError(f"arm {arm!r}: expected {rows} scores, got {arm_scores.shape}")
        shown = top_k_mask(sample.query, arm_scores, k, tiebreak)
        r, e = installs_per_query(sample.query, shown, sample.probability, uniforms, n_q)
        realised.append(r)
        expected.append(e)
        companion.append(float((sample.memorisation[shown] > 0).mean()) if shown.any() else 0.0)
        if shown_per_query is None:
            shown_per_query = float(shown.sum()) / n_q
    values = np.column_stack(realised + expected)
    rng = np.random.default_rng([seed, _STREAM_BOOTSTRAP, sample.day, k])
    means = bootstrap_means(values, bootstrap_samples, rng)
    m = len(arms)

    def outcome(a: str, b: str) -> ArmOutcome:
        ia, ib = arms.index(a), arms.index(b)
        gain, ci, delta = ratio_interval(values, means, ia, ib, confidence)
        e_gain, e_ci, _ = ratio_interval(values, means, m + ia, m + ib, confidence)
        rate = float(values[:, ia].mean())
        return ArmOutcome(
            installs_per_query=rate,
            installs_per_impression=rate / shown_per_query,
            expected_installs_per_query=float(values[:, m + ia].mean()),
            gain=gain,
            gain_ci=ci,
            gain_ci_delta=delta,
            expected_gain=e_gain,
            expected_gain_ci=e_ci,
            companion_share=companion[ia],
        )

    return OnlineOutcome(
        k=k,
        queries=n_q,
        impressions_per_query=float(shown_per_query),
        arms={a: outcome(a, control) for a in arms},
        comparisons={
            f"{a}_vs_{b}": outcome(a, b) for a, b in comparisons if a in scores and b in scores
        },
    )


# ------------------------------------------------------------------------------ the experiment


def run_experiment(
    out_dir: str | Path,
    config: Config,
    settings: ExperimentSettings | None = None,
    *,
    arms: Sequence[str] = ARMS,
    config_name: str = "app_store",
    reuse: bool = False,
    beam_args: Sequence[str] = (),
    progress: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """Simulates, runs datagen, trains the three models and measures them offline and online.

    Args:
        out_dir: working folder: ``logs/`` (simulated days), ``data/`` (datagen output of the
            training days), ``models/<arm>/`` (one trained model per arm), ``experiment.json``.
        config: the pipeline config every arm is trained with.
        settings: sizes and seeds; defaults to :class:`ExperimentSettings`.
        arms: the models, as ``towers`` values; ``wide`` (the control) must be one of them.
        config_name: how the config is named in the results.
        reuse: keep the simulated logs, datagen output and trained models a previous run with
            the same settings and config left in ``out_dir`` (anything else is redone).
        beam_args: Beam pipeline options of the datagen job.
        progress: called with a line of text per step; None for silence.
    """
    from pipeline.datagen import run_datagen
    from serving.release.validate import score_in_process
    from trainer.train import train

    settings = settings if settings is not None else ExperimentSettings()
    arms = tuple(arms)
    if CONTROL not in arms:
        raise ValueError(f"arms must include the control {CONTROL!r}, got {arms}")
    say = progress or (lambda _line: None)
    out = Path(out_dir).absolute()
    logs, data, models = out / LOGS_DIR, out / DATA_DIR, out / MODELS_DIR
    identity = {"settings": settings.to_dict(), "config": config.to_dict()}
    if not (reuse and _same_identity(out / SETTINGS_FILE, identity)):
        remove_paths((logs, data, models, out / SETTINGS_FILE))
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(identity, indent=2, default=str) + "\n")
    seconds: dict[str, float] = {}
    D = settings.days

    started = time.perf_counter()
    if (logs / METADATA_FILE).is_file():
        say(f"simulate: reusing {logs}")
    else:
        say(f"simulate: {D} days x {settings.rows_per_day:,} rows")
        simulate(
            logs,
            days=D,
            rows_per_day=settings.rows_per_day,
            settings=settings.world,
            overwrite=True,
            progress=lambda line: say("  " + line),
        )
    seconds["simulate"] = time.perf_counter() - started

    started = time.perf_counter()
    if (data / artifacts.SUMMARY_JSON).is_file():
        say(f"datagen: reusing {data}")
    else:
        say(f"datagen: days 1..{D - 1} with the {config_name} config")
        run_datagen(
            config,
            [str(logs / f"day={d:03d}") for d in range(1, D)],
            data,
            overwrite=True,
            beam_args=beam_args,
            echo=None,
        )
    summary = artifacts.read_summary(data)
    train_rows, eval_rows = _split_rows(summary)
    seconds["datagen"] = time.perf_counter() - started
    say(f"  train {train_rows:,} rows, eval {eval_rows:,} rows ({seconds['datagen']:.0f} s)")

    trained: dict[str, dict[str, Any]] = {}
    for arm in arms:
        started = time.perf_counter()
        model_dir = models / arm
        metrics = artifacts.read_json(model_dir / artifacts.METRICS_FILE)
        if (model_dir / artifacts.EXPORT_DIR).is_dir() and metrics is not None:
            trained[arm] = {"reused": True, "eval_split_auc": metrics.get("auc")}
            say(f"train {arm}: reusing {model_dir}")
        else:
            result = train(config, data, model_dir, towers=arm, overwrite=True, verbose=0)
            metrics = result.metrics or {}
            trained[arm] = {
                "steps": result.step,
                "examples_per_second": round(result.examples_per_second, 1),
                "seconds": round(time.perf_counter() - started, 1),
                "eval_split_auc": metrics.get("auc"),
            }
            say(
                f"train {arm}: {result.step:,} steps, {result.examples_per_second:,.0f} ex/s, "
                f"eval-split AUC {metrics.get('auc', math.nan):.4f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
        seconds[f"train_{arm}"] = time.perf_counter() - started

    # The world after the last simulated day: day D's logs are held out, day D+1 is online.
    world = AppStoreWorld.from_dir(logs)
    started = time.perf_counter()
    held_out = pq.read_table(logs / f"day={D:03d}")
    if settings.max_offline_rows is not None and held_out.num_rows > settings.max_offline_rows:
        held_out = held_out.slice(0, settings.max_offline_rows)
    truth = world.true_probability_of_rows(held_out, D)
    logged_truth = held_out.column("true_probability").to_numpy()
    if not np.allclose(truth, logged_truth, rtol=0, atol=1e-9):
        raise RuntimeError("the simulator's true probability does not reproduce its own log")
    labels = held_out.column(config.label).to_numpy().astype(np.float64)
    _, held_out_query = np.unique(held_out.column("query_id").to_numpy(), return_inverse=True)
    offline_examples = encode_rows(held_out, config)
    seconds["offline_encode"] = time.perf_counter() - started

    started = time.perf_counter()
    sample = draw_queries(world, D + 1, settings.online_queries, settings.seed)
    online_examples = encode_rows(sample.rows, config)
    seconds["online_draw_encode"] = time.perf_counter() - started
    candidates = len(sample.query) / sample.num_queries
    say(
        f"held out: day {D}, {held_out.num_rows:,} logged rows; online: day {D + 1}, "
        f"{sample.num_queries:,} queries, {candidates:.1f} candidates a query"
    )

    started = time.perf_counter()
    offline: dict[str, OfflineOutcome] = {}
    scores: dict[str, np.ndarray] = {}
    n_off = len(offline_examples)
    for arm in arms:
        p = score_in_process(models / arm, offline_examples + online_examples)
        offline[arm] = OfflineOutcome(
            auc=auc(labels, p[:n_off]),
            query_auc=query_auc(held_out_query, labels, p[:n_off]),
            log_loss=log_loss(labels, p[:n_off]),
            mean_prediction=float(p[:n_off].mean()),
            eval_split_auc=trained[arm]["eval_split_auc"],
        )
        scores[arm] = p[n_off:]
        say(
            f"offline {arm}: AUC {offline[arm].auc:.4f}, within queries "
            f"{offline[arm].query_auc:.4f}, log loss {offline[arm].log_loss:.4f}"
        )
    offline[ORACLE] = OfflineOutcome(
        auc=auc(labels, truth),
        query_auc=query_auc(held_out_query, labels, truth),
        log_loss=log_loss(labels, truth),
        mean_prediction=float(truth.mean()),
    )
    say(
        f"offline {ORACLE}: AUC {offline[ORACLE].auc:.4f}, within queries "
        f"{offline[ORACLE].query_auc:.4f}"
    )
    seconds["score"] = time.perf_counter() - started

    started = time.perf_counter()
    scores[ORACLE] = sample.probability
    scores[RANDOM] = np.random.default_rng([settings.seed, _STREAM_RANDOM_ARM]).random(
        len(sample.query)
    )
    pairs = [(a, b) for a, b in (("wide_deep", "deep"),) if a in arms and b in arms]
    online: dict[int, OnlineOutcome] = {}
    for k in settings.top_k:
        result = online_outcome(
            sample,
            scores,
            k,
            seed=settings.seed,
            comparisons=pairs,
            bootstrap_samples=settings.bootstrap_samples,
            confidence=settings.confidence,
        )
        online[k] = result
        for arm, o in result.arms.items():
            say(
                f"online k={k} {arm}: {o.installs_per_query:.4f} installs/query, gain "
                f"{o.gain:+.2%} [{o.gain_ci[0]:+.2%}, {o.gain_ci[1]:+.2%}]"
            )
    seconds["online"] = time.perf_counter() - started

    return ExperimentResult(
        out_dir=out,
        settings=settings,
        config_name=config_name,
        arms=arms,
        train_rows=train_rows,
        eval_rows=eval_rows,
        offline_day=D,
        offline_rows=held_out.num_rows,
        offline_label_rate=float(labels.mean()),
        offline=offline,
        online_day=D + 1,
        candidates_per_query=candidates,
        online=online,
        train=trained,
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )


def _same_identity(path: Path, identity: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(identity, default=str))
    except ValueError:
        return False


def _split_rows(summary: dict[str, Any]) -> tuple[int, int]:
    """Train and eval rows of a datagen summary."""
    splits = summary.get("splits", {})
    return int(splits["train"]["rows"]), int(splits["eval"]["rows"])
