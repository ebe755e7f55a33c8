"""Validation before a model reaches the servers (paper, section 4.2): a dry run and a quality check.

- **Dry run**: the model is loaded by a model server in a separate process, waited for with a
  deadline until AVAILABLE, sent its own warmup requests and requests of real eval examples;
  answers must be finite probabilities equal to the in-process scores, and the p99 latency of a
  request of ``validation.num_candidates`` candidates must stay within the latency budget.
- **Quality check**: eval AUC and log loss of the new model against the baseline (the version
  being served from the base path, or a model given explicitly) on the same raw eval examples.
  Each model transforms them with its own vocabularies, so models of different days compare.
- **Training/serving skew** (with a request log): the features of the requests the model
  server logged against the training statistics (:mod:`serving.release.skew`); reported, and
  failing the model only when ``validation.skew_severity`` is ``block``.
- **Model analysis** (:mod:`serving.release.analysis`): the same comparison on each slice of
  ``validation.slices`` with bootstrap intervals, and the calibration of the probabilities.

The verdict (every number, and the fingerprint of the model it judged) is written as JSON
beside the model; ``deploy`` accepts only a model with a passing verdict.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf

from serving.release import analysis
from serving.release.deploy import fingerprint
from serving.release.server_client import ModelServerClient, ModelServerError, ServerState
from serving.release.server_process import ServerProcess, ServerProcessError
from transform import artifacts
from transform.artifacts import (
    ANALYSIS_MD,
    ANALYSIS_PNG,
    EXAMPLES_INPUT,
    PROBABILITIES_OUTPUT,
    SERVING_SIGNATURE,
    VERDICT_FILE,
    export_dir,
    predict_request,
    read_warmup_requests,
    versions,
    warmup_path,
)
from transform.config import Config
from transform.errors import ArtifactError, WidedeepError
from transform.features import recorded_raw_spec, serving_feature_spec
from transform.metrics import auc, log_loss

MAX_QUALITY_EXAMPLES = 200_000
POPULARITY_PRIOR = 10.0
"""Impressions of pseudo-evidence at the overall label rate added to each item's own, so an
item seen twice is not scored 0 or 1."""
SCORE_TOLERANCE = 1e-4
"""How far a served score may differ from the in-process one (float32 arithmetic)."""


class ValidationError(WidedeepError, RuntimeError):
    """Validation could not run (as opposed to a model that failed it)."""


@dataclass
class Verdict:
    """The outcome of ``validate``: passed or not, why, and every number measured."""

    model: str
    fingerprint: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    dry_run: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    baseline_fingerprint: str | None = None
    """Fingerprint of the baseline: a deploy checks it is still the version served."""
    data: str | None = None
    """The datagen output whose eval split was used (for a later re-validation)."""
    skew: dict[str, Any] = field(default_factory=dict)
    """Training/serving skew of the logged requests (empty without a request log)."""
    analysis: dict[str, Any] = field(default_factory=dict)
    """Slices and calibration (see :func:`serving.release.analysis.analyse`)."""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    def to_json(self) -> str:
        """The verdict as indented JSON."""
        return json.dumps(asdict(self), indent=2)


# --------------------------------------------------------------------------------------------
# Examples and metrics


def read_raw_eval_examples(
    data_dir: str | Path, label: str, limit: int = MAX_QUALITY_EXAMPLES
) -> tuple[list[bytes], np.ndarray]:
    """Raw eval tf.Examples of a datagen output (label included) and their labels.

    Raises:
      ValidationError: the folder has no raw eval examples, or they lack the label.
    """
    records = artifacts.read_raw_eval_examples(data_dir, limit)
    if not records:
        raise ValidationError(
            f"{Path(data_dir) / artifacts.EVAL_RAW_DIR}: no raw eval examples; is {data_dir} a "
            "datagen output with a non-empty eval split?"
        )
    labels = np.zeros(len(records), dtype=np.float64)
    for i, r in enumerate(records):
        feature = tf.train.Example.FromString(r).features.feature
        if label not in feature:
            raise ValidationError(f"{data_dir}: a raw eval example has no label {label!r}")
        labels[i] = feature[label].int64_list.value[0]
    return records, labels


def _check_data_fits(data_dir: str | Path, config: Config) -> None:
    """Refuses a datagen output whose raw examples lack a column the model reads.

    Raises:
      ValidationError: naming the columns, when ``data_dir`` was made with a config that does
        not read them (its examples could not be parsed by the model).
    """
    recorded = recorded_raw_spec(data_dir)
    if recorded is None:
        return  # not a datagen output: read_raw_eval_examples says so
    missing = [c for c in config.raw_columns if c not in recorded]
    if missing:
        raise ValidationError(
            f"{data_dir}: its examples have no column {', '.join(map(repr, missing))}, which "
            f"the model reads: it was made with another config; validate against a datagen "
            f"output of the model's config ({config.model_name!r})"
        )


def score_in_process(
    model_dir: str | Path, examples: Sequence[bytes], batch_size: int = 4096
) -> np.ndarray:
    """Probabilities of raw examples from a SavedModel loaded in this process."""
    loaded = tf.saved_model.load(str(export_dir(model_dir)))
    fn = loaded.signatures[SERVING_SIGNATURE]
    out = []
    for i in range(0, len(examples), batch_size):
        batch = tf.constant(list(examples[i : i + batch_size]), dtype=tf.string)
        out.append(fn(**{EXAMPLES_INPUT: batch})[PROBABILITIES_OUTPUT].numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------------------------
# Dry run


class DryRunServer:
    """A model server in its own process, serving one model from a private base path."""

    def __init__(self, model_dir: str | Path, model_name: str):
        self.model_name = model_name
        self._base = Path(tempfile.mkdtemp(prefix="widedeep-dryrun-"))
        (self._base / model_name).mkdir()
        os.symlink(
            export_dir(model_dir).absolute(), artifacts.version_dir(self._base, model_name, 1)
        )
        self._server = ServerProcess(
            self._base / model_name, model_name, log_path=self._base / "server.log"
        )

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT`` of the server's gRPC API, once it has reported its port."""
        return self._server.target

    def start(self) -> None:
        """Starts ``widedeep serve`` (the real binary when installed, else built-in)."""
        self._server.start()

    def wait_until_ready(self, timeout_s: float) -> float:
        """Seconds until READY; raises ValidationError if unavailable or past the deadline."""
        try:
            return self._server.wait_for_version(None, timeout_s)
        except ServerProcessError as e:
            raise ValidationError(f"the model server could not serve the model: {e}") from None

    def state(self) -> ServerState:
        """NOT_READY while loading, READY once version 1 is AVAILABLE, UNAVAILABLE if dead."""
        if not self._server.running:
            return ServerState.UNAVAILABLE
        try:
            target = self.target
        except ServerProcessError:
            return ServerState.NOT_READY
        with ModelServerClient(target, self.model_name) as client:
            return client.state()

    def log(self, lines: int = 20) -> str:
        """The last lines the server printed."""
        return self._server.log(lines)

    def stop(self) -> None:
        """Stops the server gracefully (SIGTERM) and removes its base path."""
        self._server.stop()
        shutil.rmtree(self._base, ignore_errors=True)


def dry_run(
    model_dir: str | Path, config: Config, examples: Sequence[bytes], expected: np.ndarray
) -> dict[str, Any]:
    """Loads the model in a separate server process and checks its answers and latency."""
    v = config.validation
    server = DryRunServer(model_dir, config.model_name)
    result: dict[str, Any] = {"problems": []}
    try:
        server.start()
        result["load_seconds"] = round(server.wait_until_ready(v.load_timeout_s), 2)
        with ModelServerClient(server.target, config.model_name) as client:
            result["warmup_requests"] = _replay_warmup(client, model_dir, result)
            latencies, worst = [], 0.0
            n = min(v.num_candidates, len(examples))
            for r in range(v.num_requests):
                start = (r * n) % max(1, len(examples) - n + 1)
                batch = examples[start : start + n]
                request = predict_request(config.model_name, batch)
                began = time.perf_counter()
                response = client.predict(request)
                latencies.append((time.perf_counter() - began) * 1000)
                served = tf.make_ndarray(response.outputs[PROBABILITIES_OUTPUT]).reshape(-1)
                if not np.all(np.isfinite(served)) or served.min() < 0 or served.max() > 1:
                    result["problems"].append("a served score is not a probability in [0, 1]")
                    break
                worst = max(worst, float(np.abs(served - expected[start : start + n]).max()))
        result.update(
            requests=len(latencies),
            candidates_per_request=n,
            p50_ms=round(float(np.percentile(latencies, 50)), 3),
            p99_ms=round(float(np.percentile(latencies, 99)), 3),
            latency_budget_ms=v.latency_budget_ms,
            max_score_difference=worst,
        )
        if worst > SCORE_TOLERANCE:
            result["problems"].append(
                f"served scores differ from in-process scores by up to {worst:.2e}"
            )
        if result["p99_ms"] > v.latency_budget_ms:
            result["problems"].append(
                f"p99 latency {result['p99_ms']:.1f} ms over the budget of "
                f"{v.latency_budget_ms:.0f} ms for {n} candidates"
            )
    except (ValidationError, ModelServerError, grpc.RpcError) as e:
        detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
        result["problems"].append(f"dry run failed: {detail}")
    finally:
        server.stop()
    result["passed"] = not result["problems"]
    return result


def _replay_warmup(client: ModelServerClient, model_dir: str | Path, result: dict) -> int:
    """Sends the model's own warmup requests; each answer must be finite."""
    path = warmup_path(export_dir(model_dir))
    if not path.exists():
        result["problems"].append(f"the model has no {path.relative_to(path.parent.parent)}")
        return 0
    requests = read_warmup_requests(path)
    for count, request in enumerate(requests):
        response = client.predict(request)
        for name, proto in response.outputs.items():
            if not np.all(np.isfinite(tf.make_ndarray(proto))):
                result["problems"].append(f"warmup request {count}: output {name} not finite")
    return len(requests)


# --------------------------------------------------------------------------------------------
# Item popularity: the least a ranking model must beat

CHANCE_AUC = 0.5
"""The AUC of a random order: a model at or below it fails whatever it is compared with."""


def item_popularity(
    data_dir: str | Path, config: Config, examples: Sequence[bytes]
) -> dict[str, Any] | None:
    """Each eval example's item scored by that item's label rate in the training split.

    The rates come from the datagen output's train split (transformed: the item's vocabulary
    id and the label), shrunk towards the overall rate by :data:`POPULARITY_PRIOR`
    impressions; an item the training split did not have gets the overall rate. None when the
    config names no item and none can be inferred.
    """
    import tensorflow_transform as tft

    item = config.item_feature
    if item is None:
        return None
    data_dir = Path(data_dir)
    tft_output = tft.TFTransformOutput(str(data_dir))
    spec = tft_output.transformed_feature_spec()
    wanted = {item.name: spec[item.name], config.label: spec[config.label]}
    size = int(tft_output.vocabulary_size_by_name(item.vocabulary)) + 1  # + the OOV id
    shown = np.zeros(size)
    liked = np.zeros(size)
    for batch in artifacts.transformed_batches(data_dir, artifacts.TRAIN_DIR, wanted):
        ids = batch[item.name].numpy().ravel()
        labels = batch[config.label].numpy().ravel().astype(np.float64)
        shown += np.bincount(ids, minlength=size)
        liked += np.bincount(ids, weights=labels, minlength=size)
    rate = liked.sum() / max(shown.sum(), 1.0)
    scores = (liked + POPULARITY_PRIOR * rate) / (shown + POPULARITY_PRIOR)
    tokens = tft_output.vocabulary_by_name(item.vocabulary)
    index = {t: i for i, t in enumerate(tokens)}
    unknown = size - 1
    raw = tf.io.parse_example(
        tf.constant(list(examples)),
        # As the log typed it (string ids may be stored as integers).
        {item.column: serving_feature_spec(config, recorded_raw_spec(data_dir))[item.column]},
    )[item.column].numpy()
    as_token = (lambda v: v) if raw.dtype == object else (lambda v: str(int(v)).encode())
    ids = np.array([index.get(as_token(v), unknown) for v in raw])
    # Items the training split did not have score the overall rate, not the OOV bucket's.
    return {
        "item": item.name,
        "scores": np.where(ids == unknown, rate, scores[ids]),
        "items_in_training": int((shown[:-1] > 0).sum()),
        "eval_rows_with_known_item": float((ids != unknown).mean()),
    }


# --------------------------------------------------------------------------------------------
# The whole validation


def resolve_baseline(
    config: Config,
    baseline: str | Path | None,
    models_dir: str | Path | None,
    echo: Callable[[str], None] | None = None,
) -> Path | None:
    """The baseline model: the one given, or the newest version under the base path.

    ``echo`` is told when ``models_dir`` holds no version of the model (right before a first
    deploy, or a misspelt folder).

    Raises:
      ArtifactError: ``models_dir`` is one model's folder, not the folder of every model.
    """
    if baseline is not None:
        return Path(baseline)
    if models_dir is not None:
        artifacts.check_models_dir(models_dir, config.model_name)
        found = versions(models_dir, config.model_name)
        if found:
            return artifacts.version_dir(models_dir, config.model_name, found[-1])
        if echo is not None:
            echo(
                f"validate: no version of {config.model_name!r} in "
                f"{Path(models_dir) / config.model_name}: the model is judged without a baseline"
            )
    return None


def validate(
    model_dir: str | Path,
    data_dir: str | Path,
    config: Config,
    baseline: str | Path | None = None,
    models_dir: str | Path | None = None,
    skip_dry_run: bool = False,
    request_log: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> Verdict:
    """Runs the dry run and the quality check and writes ``<model_dir>/verdict.json``.

    With ``request_log`` (a request log folder or file of the model server), the logged
    requests' features are compared with the training statistics of ``data_dir`` too.
    ``echo`` gets the notes worth a line before the long parts (see :func:`resolve_baseline`).

    Raises:
      ValidationError: validation could not run (e.g. an unreadable request log).
    """
    # First, as the other checks of what was given: before the long parts.
    base = resolve_baseline(config, baseline, models_dir, echo)
    skew_section: dict[str, Any] = {}
    skew_found: list[Any] = []
    if request_log is not None:
        # First: a request log that cannot be read stops validation before the long parts.
        from serving.release.skew import RequestLogError, skew_report

        try:
            skew_section, skew_found = skew_report(config, request_log, data_dir)
        except (RequestLogError, ArtifactError) as error:
            raise ValidationError(str(error)) from None
    _check_data_fits(data_dir, config)
    examples, labels = read_raw_eval_examples(data_dir, config.label)
    scores = score_in_process(model_dir, examples)
    verdict = Verdict(
        model=str(Path(model_dir).absolute()),
        fingerprint=fingerprint(model_dir),
        passed=False,
        data=str(Path(data_dir).absolute()),
    )
    quality: dict[str, Any] = {
        "examples": len(examples),
        "label_rate": float(labels.mean()),
        "auc": auc(labels, scores),
        "log_loss": log_loss(labels, scores),
        "auc_tolerance": config.validation.auc_tolerance,
        "log_loss_tolerance": config.validation.log_loss_tolerance,
    }
    if quality["auc"] <= CHANCE_AUC:
        # Whatever else is measured, no baseline or item to compare with included.
        verdict.reasons.append(
            f"eval AUC {quality['auc']:.4f} does not beat chance ({CHANCE_AUC}): the model ranks "
            "the eval rows no better than a random order"
        )
    popularity = item_popularity(data_dir, config, examples)
    if popularity is None:
        quality["popularity"] = None
    else:
        pop_auc = auc(labels, popularity["scores"])
        margin = config.validation.popularity_margin
        quality["popularity"] = {
            "item": popularity["item"],
            "auc": pop_auc,
            "margin": margin,
            "eval_rows_with_known_item": popularity["eval_rows_with_known_item"],
        }
        if quality["auc"] <= pop_auc + margin:
            verdict.reasons.append(
                f"eval AUC {quality['auc']:.4f} does not beat item popularity "
                f"({popularity['item']}'s label rate in the training split: AUC {pop_auc:.4f} on "
                f"the same eval rows" + (f", margin {margin}" if margin else "") + ")"
            )
    base_scores = None
    if base is not None:
        verdict.baseline = str(base.absolute())
        verdict.baseline_fingerprint = fingerprint(base)
        base_scores = score_in_process(base, examples)
        quality["baseline_auc"] = auc(labels, base_scores)
        quality["baseline_log_loss"] = log_loss(labels, base_scores)
        if quality["auc"] < quality["baseline_auc"] - config.validation.auc_tolerance:
            verdict.reasons.append(
                f"eval AUC {quality['auc']:.4f} is worse than the baseline's "
                f"{quality['baseline_auc']:.4f} by more than {config.validation.auc_tolerance}"
            )
        if (
            quality["log_loss"]
            > quality["baseline_log_loss"] + config.validation.log_loss_tolerance
        ):
            verdict.reasons.append(
                f"eval log loss {quality['log_loss']:.4f} is worse than the baseline's "
                f"{quality['baseline_log_loss']:.4f} by more than "
                f"{config.validation.log_loss_tolerance}"
            )
    if not np.all(np.isfinite(scores)):
        verdict.reasons.append("the model gives non-finite scores in process")
    else:
        verdict.analysis = analysis.analyse(
            config,
            data_dir,
            examples,
            labels,
            scores,
            base_scores=base_scores,
            popularity=None if popularity is None else popularity["scores"],
        )
        verdict.reasons.extend(verdict.analysis["problems"])
        overall = verdict.analysis["slices"][0]
        quality["auc_difference_interval"] = overall["auc_difference_interval"]
    verdict.quality = quality
    verdict.skew = skew_section
    verdict.reasons.extend(
        f"training/serving skew: {a.description}" for a in skew_found if a.blocks
    )
    if not skip_dry_run:
        verdict.dry_run = dry_run(model_dir, config, examples, scores)
        verdict.reasons.extend(verdict.dry_run["problems"])
    verdict.passed = not verdict.reasons
    if verdict.analysis:
        (Path(model_dir) / ANALYSIS_MD).write_text(analysis.markdown(verdict, verdict.analysis))
        analysis.plot(verdict.analysis, Path(model_dir) / ANALYSIS_PNG, base is not None)
    target = Path(model_dir) / VERDICT_FILE
    target.write_text(verdict.to_json() + "\n")
    return verdict


def format_verdict(verdict: Verdict) -> str:
    """The verdict as the lines a person reads."""
    q, d = verdict.quality, verdict.dry_run
    lines = [
        f"validate: {'PASSED' if verdict.passed else 'FAILED'}  {verdict.model}",
        f"  fingerprint  {verdict.fingerprint}",
        f"  eval         {q['examples']:,} examples, AUC {q['auc']:.4f}, "
        f"log loss {q['log_loss']:.4f}",
    ]
    pop = q.get("popularity")
    if pop:
        lines.append(
            f"  popularity   AUC {pop['auc']:.4f}  (each {pop['item']}'s label rate in training)"
        )
    elif "popularity" in q:
        lines.append(
            "  popularity   not compared: the config names no item (set `item` to the column "
            "of the ranked item)"
        )
    if verdict.baseline:
        lines.append(
            f"  baseline     AUC {q['baseline_auc']:.4f}, log loss "
            f"{q['baseline_log_loss']:.4f}  ({verdict.baseline})"
        )
    else:
        lines.append("  baseline     none (no model is being served)")
    a = verdict.analysis
    if a:
        c = a["calibration"]
        lines.append(
            f"  calibration  ECE {c['ece']:.4f} (tolerance {c['ece_tolerance']}), mean prediction"
            f" / label rate {analysis.format_number(c['ratio'], 3)} (tolerance 1 ± {c['ratio_tolerance']})"
        )
        if len(a["slices"]) > 1:
            lines.extend("  " + line for line in _slice_lines(a["slices"], verdict.baseline))
    if d:
        lines.append(
            f"  dry run      loaded in {d.get('load_seconds', float('nan'))} s, "
            f"{d.get('warmup_requests', 0)} warmup requests, {d.get('requests', 0)} requests of "
            f"{d.get('candidates_per_request', 0)} candidates: p50 {d.get('p50_ms', 'n/a')} ms, "
            f"p99 {d.get('p99_ms', 'n/a')} ms (budget {d.get('latency_budget_ms', 'n/a')} ms)"
        )
    if verdict.skew:
        from serving.release.skew import format_skew

        lines.extend(format_skew(verdict.skew))
    lines.extend(f"  reason       {r}" for r in verdict.reasons)
    return "\n".join(lines)


def _slice_lines(rows: list[dict[str, Any]], baseline: str | None) -> list[str]:
    """The slice table, compact: one line per slice."""
    width = min(32, max(len(r["slice"]) for r in rows))
    head = f"{'slice':<{width}} {'rows':>8} {'label':>6} {'AUC':>7}"
    head += (
        f" {'base':>7} {'change':>8} {'95% interval':>18} {'cal.':>6}  gate"
        if baseline
        else (f" {'cal.':>6}")
    )
    lines = [head]
    for r in rows:
        model = r["model"] or {}
        line = (
            f"{r['slice'][:width]:<{width}} {r['rows']:>8,} {analysis.format_number(r['label_rate'], 3):>6} "
            f"{analysis.format_number(model.get('auc')):>7}"
        )
        if baseline:
            span = r["auc_difference_interval"]
            diff = r["auc_difference"]
            gate = "pass" if r["passed"] else "FAIL"
            if r["slice"] == "all":
                gate = ""
            elif not r["judged"]:
                gate = "-"
            line += (
                f" {analysis.format_number((r['baseline'] or {}).get('auc')):>7} "
                f"{'-' if diff is None else f'{diff:+.4f}':>8} "
                f"{'-' if span is None else f'{span[0]:+.4f} {span[1]:+.4f}':>18} "
                f"{analysis.format_number(model.get('calibration'), 3):>6}  {gate}"
            )
        else:
            line += f" {analysis.format_number(model.get('calibration'), 3):>6}"
        lines.append(line.rstrip())
    return lines
