"""``widedeep run``: every stage on one config, and the daily retraining loop.

One day is datagen -> train -> validate -> deploy. Day 1 trains cold; each later day
warm-starts from the model being served, is validated against it on the new day's eval data,
and is deployed to the server that is running, which keeps answering queries meanwhile (paper,
section 4.2: "every time a new set of training data arrives, the model needs to be re-trained").
A day whose model fails validation is not deployed; the loop says so and goes on. Before
training, each day's data is validated against the last day whose data was accepted (its
``statistics.json``); a day with a blocking anomaly is not trained on: the loop names the
feature and why, keeps serving the current model and goes on with the next day. The run ends
with one query ranked through the gRPC endpoint and the offline metrics of the served model.

Layout of the output folder::

    run.json                    the run's settings and the result of every finished stage
    config.yaml                 the config the run used
    logs/day=NNN/               simulated impression logs (when no --input is given)
    data/day=NNN/               datagen output of each day (with statistics.json,
                                anomalies.json and, when columns moved, anomalies.png)
    models/day=NNN/             training output of each day (model, verdict.json)
    serving/<model>/<version>/  the TF Serving model base path
    analyzer_cache/day-NNN/     tf.Transform's analyzer cache, one dataset key a day (only
                                with a window of more than one day, see below)
    server.log                  what the model server printed
    query.json, ranking.json    the example query and its ranking through the endpoint
    days.md                     one row per day: rows, vocabularies, warm start, AUC, the
                                worst slice's AUC change, verdict

With a window of N days (``--window N``, else the config's ``data.window_days``), a day's
vocabularies and quantile boundaries are computed over the training rows of the day and of the
N-1 days before it (days not trained on for a blocking anomaly left out), so a token stays known
while it appears anywhere in the window; the model still trains on the new day's rows. Each
day's analyzer accumulators are kept in ``analyzer_cache/``: a day's datagen reads only its own
rows, and a restarted run reuses them.

A run that stops midway continues from its last finished stage when started again with the
same arguments (an interrupted training run resumes from its own checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transform import artifacts
from transform.config import MAX_WINDOW_DAYS, Config
from transform.errors import UsageError
from transform.paths import remove_paths

log = logging.getLogger(__name__)

STATE_FILE = "run.json"
"""The run's own state (another file than a model folder's ``run.json``, see
:data:`transform.artifacts.TRAINING_STATE_FILE`)."""
CONFIG_FILE = artifacts.CONFIG_YAML
LOGS_DIR = "logs"
DATA_DIR = "data"
MODELS_DIR = "models"
SERVING_DIR = "serving"
ANALYZER_CACHE_DIR = "analyzer_cache"
"""tf.Transform's analyzer cache of the run's window: one folder a day (its dataset key)."""

SETTINGS_BEFORE_THEY_EXISTED: dict[str, Any] = {"window": 1}
"""Settings a stopped run's ``run.json`` may lack: the value it ran with, so it can continue."""
SERVER_LOG = "server.log"
QUERY_FILE = "query.json"
RANKING_FILE = "ranking.json"
DAYS_FILE = "days.md"
_OWNED = (STATE_FILE, CONFIG_FILE, LOGS_DIR, DATA_DIR, MODELS_DIR, SERVING_DIR, SERVER_LOG,
          QUERY_FILE, RANKING_FILE, DAYS_FILE, ANALYZER_CACHE_DIR)  # fmt: skip

SAMPLE_ROWS = 20_000
"""Rows read from a day's log to build the example query."""
SERVER_LOAD_TIMEOUT_S = 300.0


class RunError(UsageError):
    """A run that cannot start or continue as asked; the message says why."""


@dataclass(frozen=True)
class RunOptions:
    """What ``widedeep run`` was asked to do."""

    input: str | None = None
    """Impression logs: a folder with one sub-folder a day, or files of one day. None simulates."""
    days: int | None = None
    """Days to play; default 1 when simulating, every day folder of ``input`` otherwise."""
    rows_per_day: int = 100_000
    """Simulated impressions a day."""
    seed: int = 0
    """Seed of the simulated world."""
    epochs: int | None = None
    """Training epochs a day; default: the config's."""
    port: int = 0
    """gRPC port of the model server; 0 picks a free one."""
    rest_api_port: int | None = None
    """REST port of the model server; None serves no REST."""
    query: str | None = None
    """JSON file with the query to rank at the end; default: built from the last day's log."""
    top: int = 10
    """Candidates shown of the final ranking."""
    window: int | None = None
    """Days the vocabularies and quantile boundaries are computed over; default: the config's
    ``data.window_days``."""
    beam_args: tuple[str, ...] = ("--runner=DirectRunner",)
    verbose: int = 1
    """0: one line a stage; 1: stage summaries and Keras progress."""

    def key(self, config: Config) -> dict[str, Any]:
        """What must match for a stopped run to be continued."""
        return {
            "config": config.fingerprint(),
            "input": str(Path(self.input).absolute()) if self.input else None,
            "days": self.days,
            "rows_per_day": self.rows_per_day if self.input is None else None,
            "seed": self.seed if self.input is None else None,
            "epochs": self.epochs,
            "window": self.window_days(config),
        }

    def window_days(self, config: Config) -> int:
        """The window in days: ``window``, else the config's ``data.window_days``."""
        return self.window if self.window is not None else config.data.window_days


@dataclass
class DayResult:
    """One day of the loop."""

    day: int
    rows: int
    vocabularies: dict[str, int]
    vocabulary_growth: dict[str, int]
    warm_started: bool
    rows_carried: int
    rows_new: int
    auc: float | None
    log_loss: float | None
    served_auc: float | None
    passed: bool
    reasons: list[str]
    version: int | None
    """Version the day's model was deployed as (None: not deployed)."""
    blocked: list[str] = field(default_factory=list)
    """The blocking anomalies of the day's data (then nothing was trained): what and why."""
    warnings: int = 0
    """Anomalies of the day's data that did not block it."""
    worst_slice: dict[str, Any] | None = None
    """The judged slice whose AUC fell most against the served model (``slice``,
    ``auc_difference``); None without slices or without a served model."""

    @property
    def worst_slice_text(self) -> str | None:
        """``name change``, e.g. ``country=US -0.0123``; None when there is none."""
        w = self.worst_slice
        return None if not w else f"{w['slice']} {w['auc_difference']:+.4f}"

    def line(self, days: int) -> str:
        """The day as one line."""
        if self.blocked:
            return (
                f"day {self.day}/{days}: {self.rows:,} rows, NOT TRAINED, the data has "
                f"{len(self.blocked)} blocking anomal{'y' if len(self.blocked) == 1 else 'ies'}: "
                + "; ".join(self.blocked)
            )
        grew = ", ".join(f"{k} +{v:,}" for k, v in self.vocabulary_growth.items() if v) or "none"
        vocab = sum(self.vocabularies.values())
        warm = (
            f"warm start {self.rows_carried:,} rows carried, {self.rows_new:,} new"
            if self.warm_started
            else "cold start"
        )
        served = f" vs served {self.served_auc:.4f}" if self.served_auc is not None else ""
        verdict = (
            f"PASSED -> version {self.version}"
            if self.passed
            else "FAILED, not deployed: " + "; ".join(self.reasons)
        )
        warned = f", {self.warnings} data warning(s)" if self.warnings else ""
        worst = f", worst slice {self.worst_slice_text}" if self.worst_slice else ""
        return (
            f"day {self.day}/{days}: {self.rows:,} rows{warned}, vocabularies {vocab:,} "
            f"(growth: {grew}), {warm}, AUC {self.auc:.4f}{served}{worst}, {verdict}"
        )


@dataclass
class RunResult:
    """What a run did."""

    out_dir: Path
    days: list[DayResult]
    served_version: int | None
    served_model: Path | None
    metrics: dict[str, Any]
    """Offline metrics of the served model."""
    ranking: list[dict[str, Any]]
    probe_queries: int = 0
    """Queries the server answered while the loop ran."""
    probe_failures: list[str] = field(default_factory=list)
    server_target: str | None = None


# --------------------------------------------------------------------------------------------
# The run's state on disk


class _State:
    """``run.json``: the settings and the result of every finished stage, saved after each."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def open(cls, out: Path, key: dict[str, Any], overwrite: bool) -> _State:
        path = out / STATE_FILE
        if path.exists() and not overwrite:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RunError(
                    f"{path}: unreadable ({e}); pass --overwrite to start over"
                ) from None
            # A run started before a setting existed ran with that setting's old behaviour.
            saved = {**SETTINGS_BEFORE_THEY_EXISTED, **data.get("settings", {})}
            differs = [k for k in key if saved.get(k) != key[k]]
            if differs:
                raise RunError(
                    f"{out}: holds a run with other settings ({', '.join(differs)} differ); "
                    "rerun with the same arguments to continue it, give another --out, or pass "
                    "--overwrite to start over"
                )
            return cls(path, data)
        if overwrite:
            remove_paths(out / name for name in _OWNED)
        elif out.exists() and any(out.iterdir()):
            raise RunError(
                f"{out}: holds files but no {STATE_FILE}; give an empty or new folder, or pass "
                "--overwrite"
            )
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"settings": key, "stages": {}, "served": None})
        state.save()
        return state

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, result: dict[str, Any]) -> None:
        self.data["stages"][stage] = result
        self.save()

    @property
    def served(self) -> dict[str, Any] | None:
        return self.data.get("served")

    @served.setter
    def served(self, value: dict[str, Any]) -> None:
        self.data["served"] = value
        self.save()

    def save(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


# --------------------------------------------------------------------------------------------
# The example query


def build_query(
    config: Config, rows: Sequence[dict[str, Any]], num_candidates: int
) -> dict[str, Any]:
    """One query and up to ``num_candidates`` distinct items to rank for it, from raw log rows.

    The item is ``config.item_feature`` (the ``item`` the config names, or the one it infers).
    A candidate is an item with its item-level columns: those that take one value for each
    item wherever it appears in the rows, and differ between items (a category, a genre list);
    every other column (user, context, history) is the query's, from one impression: the
    first of the query with the most impressions when ``data.split_by`` names a query column,
    else the first row. Candidates are the distinct items in the order the rows first show
    them, so the same rows always give the same query. Without an item feature, every distinct
    combination of the non-query columns is a candidate. The result names the item column
    (``"item"``).
    """
    columns = list(dict.fromkeys(f.column for f in config.features))
    if not rows:
        raise RunError("no rows to build an example query from")
    item = config.item_feature
    if item is None:
        return _build_query_without_item(config, columns, rows, num_candidates)
    key = item.column
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        raise RunError(f"no row of the log has a value for the item column {key!r}")
    by_item: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        by_item.setdefault(_hashable(row[key]), []).append(row)
    seen_twice = [group for group in by_item.values() if len(group) > 1]
    # A column is the item's when each item seen more than once keeps one value of it, and
    # items differ in it (a column the same everywhere is sent once, with the query).
    item_columns = [key] + [
        c
        for c in columns
        if c != key
        and seen_twice
        and all(_same(r.get(c) for r in g) for g in seen_twice)
        and not _same(r.get(c) for r in rows)
    ]
    impression = _query_rows(config, rows)[0]
    query = {c: impression.get(c) for c in columns if c not in item_columns}
    candidates = [{c: group[0].get(c) for c in item_columns} for group in by_item.values()][
        :num_candidates
    ]
    return {"item": key, "query": query, "candidates": candidates}


def _query_rows(config: Config, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The impressions of the query with the most of them (the first such), or the first row."""
    split_by = config.data.split_by
    if not split_by or split_by not in rows[0]:
        return list(rows[:1])
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_hashable(row.get(split_by)), []).append(row)
    return max(groups.values(), key=len)


def _build_query_without_item(
    config: Config, columns: list[str], rows: Sequence[dict[str, Any]], num_candidates: int
) -> dict[str, Any]:
    """With no item feature: columns constant within every query are the query's."""
    split_by = config.data.split_by
    groups: dict[Any, list[dict[str, Any]]] = {}
    if split_by and split_by in rows[0]:
        for row in rows:
            groups.setdefault(_hashable(row.get(split_by)), []).append(row)
    multi = [g for g in groups.values() if len(g) > 1]
    query_columns = (
        [c for c in columns if all(_same(r.get(c) for r in group) for group in multi)]
        if multi
        else []
    )
    candidate_columns = [c for c in columns if c not in query_columns] or columns
    if candidate_columns == columns:
        query_columns = []
    impression = _query_rows(config, rows)[0]
    query = {c: impression.get(c) for c in query_columns}
    seen: set[Any] = set()
    candidates = []
    for row in rows:
        candidate = {c: row.get(c) for c in candidate_columns}
        key = tuple(_hashable(v) for v in candidate.values())
        if key in seen:
            continue
        seen.add(key)
        candidates.append(candidate)
        if len(candidates) >= num_candidates:
            break
    return {"item": None, "query": query, "candidates": candidates}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _same(values: Any) -> bool:
    it = iter(values)
    first = _hashable(next(it))
    return all(_hashable(v) == first for v in it)


# --------------------------------------------------------------------------------------------
# Queries while the loop runs


class _Probe:
    """Ranks the example query again and again while the loop runs, counting failures."""

    def __init__(self, target: str, config: Config, query: dict[str, Any], interval_s: float):
        self._target = target
        self._config = config
        self._query = query
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="widedeep-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        from serving.client import ClientSettings, RankingClient, ScoringError

        settings = ClientSettings.from_config(self._config)
        with RankingClient(self._target, self._config.model_name, settings, self._config) as c:
            while not self._stop.is_set():
                try:
                    c.rank(self._query["query"], self._query["candidates"])
                    self.answered += 1
                except ScoringError as e:
                    self.failures.append(str(e))
                self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------------------------
# The run


class _Run:
    def __init__(
        self,
        config: Config,
        out: Path,
        options: RunOptions,
        overwrite: bool,
        echo: Callable[[str], None],
        on_serving: Callable[[str], None] | None,
    ):
        self.config = config
        self.out = out
        self.options = options
        self.echo = echo
        self.on_serving = on_serving
        self.state = _State.open(out, options.key(config), overwrite)
        (out / CONFIG_FILE).write_text(config.to_yaml())
        self.base = out / SERVING_DIR
        self.server: Any = None
        self.probe: _Probe | None = None
        self.query: dict[str, Any] | None = None
        self.day_inputs: list[str] = []

    # ---------------------------------------------------------------- stages

    def stage(self, name: str, fn: Callable[[], dict[str, Any]], line: Callable) -> dict:
        """Runs a stage unless it finished before; prints its one-line summary."""
        done = self.state.done(name)
        if done is not None:
            self.echo(f"[{name}] done before: {line(done)}")
            return done
        self.echo(f"[{name}] ...")
        started = time.monotonic()
        result = fn()
        result["seconds"] = round(time.monotonic() - started, 1)
        self.state.finish(name, result)
        self.echo(f"[{name}] {line(result)} ({result['seconds']:.0f} s)")
        return result

    def simulate(self) -> None:
        from tools.simulator import simulate

        days = self.options.days or 1
        logs = self.out / LOGS_DIR

        def go() -> dict[str, Any]:
            s = simulate(
                logs,
                days=days,
                rows_per_day=self.options.rows_per_day,
                seed=self.options.seed,
                overwrite=True,
                progress=self.echo if self.options.verbose else None,
            )
            return {"rows": s.rows, "days": s.days, "label_rate": s.label_rate}

        self.stage(
            "simulate",
            go,
            lambda r: (
                f"{r['rows']:,} rows over {r['days']} day(s), label rate "
                f"{r['label_rate']:.4f} -> {logs}"
            ),
        )
        self.day_inputs = [str(logs / f"day={d:03d}") for d in range(1, days + 1)]

    def resolve_days(self) -> None:
        """One input per day: the sub-folders of a folder, or the input itself."""
        self.day_inputs = _day_inputs(self.options)

    def day(self, d: int, previous: dict[str, int] | None) -> DayResult:
        from pipeline.anomalies import blocking
        from serving.release.deploy import deploy, fingerprint
        from serving.release.validate import format_verdict, validate
        from trainer.train import train

        tag = f"day {d}"
        data = self.out / DATA_DIR / f"day={d:03d}"
        model = self.out / MODELS_DIR / f"day={d:03d}"
        verbose = self.options.verbose

        accepted = self.state.data.get("accepted")
        reference = accepted["data"] if accepted else None
        g = self.stage(
            f"{tag} datagen",
            lambda: self.datagen(d, data, reference),
            lambda r: (
                f"{r['rows']:,} rows ({r['train_rows']:,} train, {r['eval_rows']:,} eval), "
                "vocabularies "
                + ", ".join(f"{k} {v:,}" for k, v in r["vocabularies"].items())
                + _window_text(r)
                + f", {_anomaly_count(r)} -> {data}"
            ),
        )
        anomalies = [_read_anomaly(a) for a in g.get("anomalies", [])]
        blocks = blocking(anomalies)
        if blocks:
            served = self.state.served
            self.echo(
                f"[{tag}] not trained on: the data has a blocking anomaly ("
                + "; ".join(f"{a.subject}: {a.kind}" for a in blocks)
                + "); still serving "
                + (f"version {served['version']}" if served else "nothing")
                + (f"; the next day is compared with day {accepted['day']}" if accepted else "")
            )
            return DayResult(
                day=d, rows=g["rows"], vocabularies={}, vocabulary_growth={},
                warm_started=False, rows_carried=0, rows_new=0, auc=None, log_loss=None,
                served_auc=None, passed=False, reasons=[], version=None,
                blocked=[f"{a.subject}: {a.description}" for a in blocks],
                warnings=len(anomalies) - len(blocks),
            )  # fmt: skip
        # The next day's data is compared with this one's.
        self.state.data["accepted"] = {"day": d, "data": str(data)}
        self.state.save()

        served = self.state.served
        warm_from = served["model"] if served else None

        def train_stage() -> dict[str, Any]:
            if not artifacts.training_complete(
                model
            ):  # else an earlier attempt finished it just before being stopped
                train(
                    self.config,
                    data,
                    model,
                    warm_start_from=warm_from,
                    epochs=self.options.epochs,
                    verbose=verbose,
                )
            metrics = artifacts.read_metrics(model)
            carried = new = 0
            report = artifacts.read_json(model / artifacts.WARM_START_FILE)
            if warm_from and report:
                for rows in report.get("rows", {}).values():
                    carried += rows["carried"]
                    new += rows["new"]
            return {
                "auc": metrics["auc"],
                "log_loss": metrics["log_loss"],
                "step": metrics["step"],
                "steps_trained": metrics.get("steps_trained", metrics["step"]),
                "examples_per_second": metrics.get("train_examples_per_second"),
                "warm_start_from": warm_from,
                "rows_carried": carried,
                "rows_new": new,
            }

        t = self.stage(
            f"{tag} train",
            train_stage,
            lambda r: (
                f"eval AUC {r['auc']:.4f}, log loss {r['log_loss']:.4f} at step {r['step']:,} of "
                f"{r.get('steps_trained', r['step']):,} trained"
                + (
                    f", warm-started ({r['rows_carried']:,} rows carried, {r['rows_new']:,} new)"
                    if r["warm_start_from"]
                    else ", cold start"
                )
                + f" -> {model}"
            ),
        )

        def validate_stage() -> dict[str, Any]:
            verdict = validate(model, data, self.config, models_dir=self.base)
            if verbose:
                self.echo(format_verdict(verdict))
            return {
                "passed": verdict.passed,
                "reasons": verdict.reasons,
                "auc": verdict.quality["auc"],
                "baseline_auc": verdict.quality.get("baseline_auc"),
                "baseline": verdict.baseline,
                "p99_ms": (verdict.dry_run or {}).get("p99_ms"),
                "worst_slice": verdict.analysis.get("worst_slice"),
            }

        v = self.stage(
            f"{tag} validate",
            validate_stage,
            lambda r: (
                ("PASSED" if r["passed"] else "FAILED: " + "; ".join(r["reasons"]))
                + f", AUC {r['auc']:.4f}"
                + (f" vs served {r['baseline_auc']:.4f}" if r["baseline_auc"] is not None else "")
                + (
                    f", worst slice {r['worst_slice']['slice']} "
                    f"{r['worst_slice']['auc_difference']:+.4f}"
                    if r.get("worst_slice")
                    else ""
                )
                + (f", dry-run p99 {r['p99_ms']} ms" if r["p99_ms"] is not None else "")
            ),
        )

        version = None
        if v["passed"]:

            def deploy_stage() -> dict[str, Any]:
                name = self.config.model_name
                existing = artifacts.versions(self.base, name)
                # Deployed just before an earlier attempt was stopped: do not copy it again.
                if existing and fingerprint(
                    artifacts.version_dir(self.base, name, existing[-1])
                ) == fingerprint(artifacts.export_dir(model)):
                    version = existing[-1]
                else:
                    server = self.server.target if self.server else None
                    version = deploy(model, self.base, name, server=server).version
                self.ensure_server(version)
                return {"version": version, "model": str(model)}

            r = self.stage(
                f"{tag} deploy",
                deploy_stage,
                lambda r: (
                    f"version {r['version']} serving at {self.server.target}"
                    if self.server
                    else f"version {r['version']} -> {self.base}"
                ),
            )
            version = r["version"]
            self.state.served = {"version": version, "model": str(model), "day": d}
        else:
            self.echo(f"[{tag} deploy] skipped: the model failed validation; still serving "
                      + (f"version {served['version']}" if served else "nothing"))  # fmt: skip

        sizes = g["vocabularies"]
        return DayResult(
            day=d,
            rows=g["rows"],
            vocabularies=sizes,
            vocabulary_growth={
                k: sizes[k] - (previous or {}).get(k, sizes[k]) for k in sizes if previous
            },
            warm_started=bool(t["warm_start_from"]),
            rows_carried=t["rows_carried"],
            rows_new=t["rows_new"],
            auc=t["auc"],
            log_loss=t["log_loss"],
            served_auc=v["baseline_auc"],
            passed=v["passed"],
            reasons=v["reasons"],
            version=version,
            warnings=len(anomalies),
            worst_slice=v.get("worst_slice"),  # absent from a stage saved before slices existed
        )

    def window(self, d: int) -> list[int]:
        """The earlier days of day ``d``'s window, oldest first: the days before it within
        the window whose data was not refused for a blocking anomaly."""
        from pipeline.anomalies import blocking

        days = []
        for e in range(max(1, d - self.options.window_days(self.config) + 1), d):
            done = self.state.done(f"day {e} datagen")
            if done is not None and blocking([_read_anomaly(a) for a in done["anomalies"]]):
                continue
            days.append(e)
        return days

    def datagen(self, d: int, data: Path, reference: str | None) -> dict[str, Any]:
        """The day's datagen, validated against ``reference`` (a datagen output).

        With a window of more than one day, the analyzers also see the window's earlier days
        (from the analyzer cache, where the day's own accumulators are kept for the next).
        An input that lacks a column or holds one in an unusable type cannot be read at all:
        that is the day's blocking anomaly, written alone to its ``anomalies.json``.
        """
        from pipeline import anomalies as data_validation
        from pipeline.datagen import WindowDay, run_datagen
        from pipeline.sources import ColumnError, MissingColumnError

        windowed = self.options.window_days(self.config) > 1
        earlier = self.window(d)
        try:
            result = run_datagen(
                self.config,
                self.day_inputs[d - 1],
                data,
                overwrite=True,  # not recorded as finished: whatever is there is ours, unused
                beam_args=list(self.options.beam_args),
                echo=self.echo if self.options.verbose else None,
                reference=reference,
                window=[
                    WindowDay(_cache_key(e), self.day_inputs[e - 1], split_salt=_cache_key(e))
                    for e in earlier
                ],
                cache_dir=self.out / ANALYZER_CACHE_DIR if windowed else None,
                cache_key=_cache_key(d) if windowed else None,
                # Each day holds out its own share of users (or queries): the same key in
                # every day's eval split would never be trained on, in any day's model.
                split_salt=_cache_key(d),
            )
        except ColumnError as e:
            kind = (
                data_validation.COLUMN_MISSING
                if isinstance(e, MissingColumnError)
                else data_validation.COLUMN_RETYPED
            )
            anomaly = data_validation.column_error_anomaly(self.config, kind, e.column, str(e))
            if not anomaly.blocks:
                raise  # a warning cannot make an unreadable input readable
            remove_paths([data])
            data.mkdir(parents=True)
            data_validation.write_report(
                data / artifacts.ANOMALIES_JSON, data_validation.report([anomaly], {}, reference)
            )
            return {"rows": 0, "train_rows": 0, "eval_rows": 0, "vocabularies": {},
                    "anomalies": [anomaly.to_dict()]}  # fmt: skip
        s = result.summary
        return {
            "rows": s["rows"],
            "train_rows": s["splits"][artifacts.TRAIN_DIR]["rows"],
            "eval_rows": s["splits"][artifacts.EVAL_DIR]["rows"],
            "vocabularies": {k: v["size"] for k, v in s["vocabularies"].items()},
            "anomalies": [a.to_dict() for a in result.anomalies],
            "window": [*earlier, d],
        }

    # ---------------------------------------------------------------- the server

    def ensure_server(self, version: int | None) -> None:
        """Starts the model server over the base path (once) and waits for ``version``."""
        from serving.release.server_process import ServerProcess

        if self.server is not None:
            return
        self.server = ServerProcess(
            self.base / self.config.model_name,
            self.config.model_name,
            log_path=self.out / SERVER_LOG,
            port=self.options.port,
            rest_api_port=self.options.rest_api_port,
        )
        self.server.start()
        seconds = self.server.wait_for_version(version, SERVER_LOAD_TIMEOUT_S)
        self.echo(
            f"[serve] {self.config.model_name} version {version} AVAILABLE at "
            f"{self.server.target} (gRPC)"
            + (f" and {self.server.rest_url} (REST)" if self.server.rest_url else "")
            + f" after {seconds:.1f} s; log: {self.out / SERVER_LOG}"
        )
        self.query = self.load_query()
        if self.on_serving is not None:
            self.on_serving(self.server.target)
        if (self.options.days or len(self.day_inputs)) > 1:
            self.probe = _Probe(self.server.target, self.config, self.query, interval_s=0.5)
            self.probe.start()

    def load_query(self) -> dict[str, Any]:
        """The query ranked at the end: the one given, or one built from the last day's log.

        A built query is kept in ``query.json``: a run that stops and continues ranks the same
        query (the same rows give the same query, and the file is not written again).
        """
        from pipeline import sources

        if self.options.query:
            try:
                query = json.loads(Path(self.options.query).read_text())
            except json.JSONDecodeError as e:
                raise RunError(f"--query: not valid JSON ({e})") from None
            if not isinstance(query, dict) or not isinstance(query.get("candidates"), list):
                raise RunError('--query: expected {"query": {...}, "candidates": [{...}, ...]}')
            return query
        path = self.out / QUERY_FILE
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                query = json.loads(path.read_text())
                if isinstance(query, dict) and isinstance(query.get("candidates"), list):
                    self.echo(f"[query] {len(query['candidates'])} candidates from {path}")
                    return query
        self.echo(self.item_line())
        files = sources.resolve_input(self.day_inputs[-1])
        rows = sources.read_rows(self.config, files, SAMPLE_ROWS)
        query = build_query(self.config, rows, self.config.validation.num_candidates)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(query, indent=2, default=str) + "\n")
        os.replace(partial, path)
        return query

    def item_line(self) -> str:
        """Which feature names the ranked items, and whether the config said so."""
        item = self.config.item_feature
        if item is None:
            return (
                "[query] no item feature (set 'item' in the config to the feature that names "
                "the ranked item): candidates are the log's distinct non-query values"
            )
        if self.config.item:
            return f"[query] candidates are distinct {item.name!r} items (the config's 'item')"
        return (
            f"[query] candidates are distinct {item.name!r} items (inferred: it shares its "
            "vocabulary with a list feature; set 'item' in the config to choose another)"
        )

    def stop_server(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        if self.server is not None:
            self.server.stop()


def _window_text(datagen: dict[str, Any]) -> str:
    days = datagen.get("window") or []
    if len(days) < 2:
        return ""
    return " (over days " + ", ".join(str(e) for e in days) + ")"


def _cache_key(d: int) -> str:
    """Day ``d``'s key: its dataset key (and folder) in the run's analyzer cache, and the salt
    of its train/eval split."""
    return f"day-{d:03d}"


def _day_inputs(options: RunOptions) -> list[str]:
    """``--input``'s days: the sub-folders of a folder, or the input itself."""
    assert options.input is not None
    path = Path(options.input)
    subs = (
        sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        if path.is_dir()
        else []
    )
    inputs = [str(p) for p in subs] or [options.input]
    days = options.days
    if days is not None and days > len(inputs):
        raise RunError(
            f"--days {days}: --input {options.input} holds {len(inputs)} day(s) "
            "(a folder with one sub-folder a day plays each as a day)"
        )
    return inputs[:days] if days else inputs


def check_columns(config: Config, options: RunOptions) -> None:
    """Refuses, before anything is written, a config that reads a column the first day lacks.

    A later day without one of the config's columns is a bad day of data (blocked, and the
    loop goes on); the first day without one means the config does not fit the logs.

    Raises:
      RunError: the simulated log (no ``--input``) has no such column.
      sources.InputError: the first day of ``--input`` has no such column, or holds it in a
        type the config cannot read (naming the file and the column).
    """
    if options.input is None:
        from tools.simulator import IMPRESSION_SCHEMA

        split = config.data.split_by
        wanted = [*config.raw_columns, *([split] if split else [])]
        missing = [c for c in wanted if c not in IMPRESSION_SCHEMA.names]
        if missing:
            raise RunError(
                f"the simulated app-store log has no column {missing[0]!r}, which the config "
                f"reads; its columns are {', '.join(IMPRESSION_SCHEMA.names)}; pass --input "
                "to run on your own logs"
            )
        return
    from pipeline import sources

    sources.preflight(config, sources.resolve_input(_day_inputs(options)[0]))


def run(
    config: Config,
    out_dir: str | Path,
    options: RunOptions | None = None,
    *,
    overwrite: bool = False,
    keep_serving: Callable[[str], None] | None = None,
    on_serving: Callable[[str], None] | None = None,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Runs every stage on one config; see the module docstring.

    Args:
      config: The pipeline config.
      out_dir: The run's folder (layout in the module docstring).
      options: What to run; defaults to one simulated day.
      overwrite: Discard what an earlier run wrote into ``out_dir`` and start over.
      keep_serving: Called with the server's address once the run is done; the server keeps
        running until it returns (e.g. waits for Ctrl-C). None stops the server at the end.
      on_serving: Called with the server's gRPC address as soon as it serves a model.
      echo: Where progress and summaries go.

    Raises:
      RunError: settings that do not match the run in ``out_dir``, an input without the days
        asked for, or no model that passed validation.
    """
    options = options or RunOptions()
    if options.window is not None and not 1 <= options.window <= MAX_WINDOW_DAYS:
        raise RunError(f"--window {options.window}: expected 1 to {MAX_WINDOW_DAYS} days")
    out = Path(out_dir).absolute()
    if overwrite or not (out / STATE_FILE).exists():
        # A run being continued was checked when it started, and its settings cannot change.
        check_columns(config, options)
    r = _Run(config, out, options, overwrite, echo, on_serving)
    started = time.monotonic()
    try:
        if options.input is None:
            r.simulate()
        else:
            r.resolve_days()
        days: list[DayResult] = []
        previous = None
        for d in range(1, len(r.day_inputs) + 1):
            result = r.day(d, previous)
            days.append(result)
            if not result.blocked:
                previous = result.vocabularies
            echo(result.line(len(r.day_inputs)))
        (out / DAYS_FILE).write_text(format_days(days) + "\n")
        served = r.state.served
        if served is None:
            raise RunError("no model passed validation: nothing is served (see the verdicts)")
        r.ensure_server(served["version"])
        probe = (r.probe.answered, list(r.probe.failures)) if r.probe else (0, [])
        if r.probe is not None:
            r.probe.stop()
        ranking = _final_query(r, served)
        metrics = artifacts.read_metrics(served["model"])
        result = RunResult(
            out_dir=out,
            days=days,
            served_version=served["version"],
            served_model=Path(served["model"]),
            metrics=metrics,
            ranking=ranking,
            probe_queries=probe[0],
            probe_failures=probe[1],
            server_target=r.server.target,
        )
        echo(format_run(result, r.query, top=options.top, seconds=time.monotonic() - started))
        if keep_serving is not None:
            keep_serving(r.server.target)
        return result
    finally:
        r.stop_server()


def _final_query(r: _Run, served: dict[str, Any]) -> list[dict[str, Any]]:
    from serving.client import ClientSettings, RankingClient

    query = r.query
    settings = ClientSettings.from_config(r.config)
    with RankingClient(r.server.target, r.config.model_name, settings, r.config) as client:
        ranked = client.rank(query["query"], query["candidates"])
    ranking = [{"rank": x.rank, "score": x.score, "candidate": x.candidate} for x in ranked]
    (r.out / RANKING_FILE).write_text(
        json.dumps(
            {"model_name": r.config.model_name, "version": served["version"], "query":
             query["query"], "ranking": ranking}, indent=2, default=str,
        ) + "\n"
    )  # fmt: skip
    return ranking


def format_days(days: Sequence[DayResult]) -> str:
    """The days as a Markdown table."""
    lines = [
        "| day | rows | vocabulary entries | growth | rows carried | eval AUC | served AUC | "
        "worst slice (AUC change) | log loss | verdict | version |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for d in days:
        if d.blocked:
            lines.append(
                f"| {d.day} | {d.rows:,} | - | - | - | - | - | - | - | not trained: "
                + "; ".join(x.replace("|", "\\|") for x in d.blocked)
                + " | - |"
            )
            continue
        served = f"{d.served_auc:.4f}" if d.served_auc is not None else "-"
        worst = (d.worst_slice_text or "-").replace("|", "\\|")
        lines.append(
            f"| {d.day} | {d.rows:,} | {sum(d.vocabularies.values()):,} | "
            f"+{sum(d.vocabulary_growth.values()):,} | "
            f"{d.rows_carried:,} | {d.auc:.4f} | {served} | "
            f"{worst} | {d.log_loss:.4f} | "
            f"{'passed' if d.passed else 'failed'} | {d.version or '-'} |"
        )
    return "\n".join(lines)


def _anomaly_count(stage: dict[str, Any]) -> str:
    found = stage.get("anomalies", [])
    blocks = sum(a["severity"] == "block" for a in found)
    return f"{len(found)} data anomal{'y' if len(found) == 1 else 'ies'} ({blocks} blocking)"


def _read_anomaly(d: dict[str, Any]) -> Any:
    from pipeline.anomalies import read_anomalies

    return read_anomalies({"anomalies": [d]})[0]


def format_run(
    result: RunResult, query: dict[str, Any] | None, top: int = 10, seconds: float | None = None
) -> str:
    """The run's ending: the ranked list through the endpoint and the served model's metrics."""
    from serving.client import Ranked, format_ranking

    m = result.metrics
    id_key = None
    if query and query.get("candidates"):
        id_key = query.get("item") or next(iter(query["candidates"][0]), None)
    ranked = [Ranked(x["rank"], x["score"], x["candidate"]) for x in result.ranking]
    shown_query = ", ".join(f"{k}={v}" for k, v in (query or {}).get("query", {}).items())
    lines = [
        "",
        f"ranking of {len(ranked)} candidates through {result.server_target} (gRPC), version "
        f"{result.served_version}" + (f"; query: {shown_query}" if shown_query else ""),
        format_ranking(ranked, id_key=id_key, top=top),
        "",
        f"offline metrics of the served model ({result.served_model}):",
        f"  {'eval AUC':<22} {m['auc']:.4f}",
        f"  {'eval log loss':<22} {m['log_loss']:.4f}",
        f"  {'eval label rate':<22} {m['label_rate']:.4f}",
        f"  {'mean prediction':<22} {m['mean_prediction']:.4f}",
        f"  {'eval examples':<22} {m['examples']:,}",
        f"  {'towers':<22} {m.get('towers', 'wide_deep')}",
        f"  {'training steps':<22} {m['step']:,}",
    ]
    if len(result.days) > 1:
        lines += ["", format_days(result.days)]
        lines.append(
            f"while the loop ran, the server answered {result.probe_queries:,} queries; "
            f"{len(result.probe_failures)} failed"
        )
    if seconds is not None:
        lines.append(f"run finished in {seconds:.0f} s -> {result.out_dir}")
    return "\n".join(lines)
