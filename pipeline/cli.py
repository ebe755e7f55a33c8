"""The ``widedeep`` command line: one verb per pipeline stage.

Each verb is declared once, in one place: its summary, examples, arguments and handler sit
together below (:func:`verb`). The CLI only parses arguments and calls the stage's function; no
argument namespace travels into pipeline or model code.

Flags are spelled with dashes (``--rows-per-day``); the flags TF Serving users know keep TF
Serving's spelling as an alias (``--model_name``, ``--model_base_path``, ``--rest_api_port``).
Errors the project raises on purpose (:class:`transform.errors.WidedeepError`) print as one line
with exit status 2; anything else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.flags import SERVE_EXAMPLES

EXIT_USAGE = 2
EXIT_ANOMALY = 1
"""``widedeep datagen --fail-on-anomaly``: the data has a blocking anomaly."""
EXIT_BUG = 70
"""Exit status of an internal error (sysexits' EX_SOFTWARE), apart from a user error's 2."""

Handler = Callable[[argparse.Namespace, Sequence[str]], int]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Verb:
    """One verb of the command line: what it does, its arguments and its handler."""

    name: str
    summary: str
    examples: str
    arguments: Arguments
    run: Handler
    passes_on_unknown: bool = False
    """Arguments the verb does not know go to the handler (Beam pipeline options)."""


VERBS: dict[str, Verb] = {}


def verb(
    name: str,
    summary: str,
    examples: str,
    *,
    arguments: Arguments,
    passes_on_unknown: bool = False,
) -> Callable[[Handler], Handler]:
    """Declares a verb: the decorated function is its handler."""

    def register(run: Handler) -> Handler:
        VERBS[name] = Verb(
            name, summary, textwrap.dedent(examples).strip(), arguments, run, passes_on_unknown
        )
        return run

    return register


def _quiet_tensorflow(verbose: bool) -> None:
    # tf.Transform's Keras layer is a tf_keras model; say so before TF is imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if verbose:
        return
    # TF's C++ logs drown the CLI's output: oneDNN notices, and on machines without a GPU
    # "failed call to cuInit", which TF logs at ERROR level (so level 3, not 2).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Some are printed while TF loads, before its log level is read: hide stderr for the import.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


OWN_PACKAGES = ("pipeline", "transform", "trainer", "serving", "tools")
"""The project's top-level packages: their loggers speak at INFO."""


class _OwnErrorsSaidOnce(logging.Filter):
    """Drops a library's log of an error this project raised on purpose.

    The command line prints such an error as its one line; Beam also logs an exception raised
    in a DoFn (a log's bad label, say) with its whole traceback first, which would bury that
    line and read like a bug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from transform.errors import WidedeepError

        error = record.exc_info[1] if record.exc_info else None
        own = record.name.split(".")[0] in OWN_PACKAGES
        return own or not isinstance(error, WidedeepError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OwnErrorsSaidOnce())
    for name in OWN_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        for name in ("absl", "apache_beam", "tensorflow", "tensorflow_transform"):
            logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Arguments several verbs share


def _output_folder(value: str) -> str:
    """An output folder's path, refused when it holds a wildcard character: what is written
    there is found again by file patterns (shards, checkpoints, days), in which '[', ']', '*'
    and '?' would match other names or none."""
    wildcards = sorted({c for c in value if c in "[]*?"})
    if wildcards:
        raise argparse.ArgumentTypeError(
            f"{value!r}: {' and '.join(repr(c) for c in wildcards)} would be read as "
            f"{'a wildcard' if len(wildcards) == 1 else 'wildcards'} "
            "when the files written there are found again: choose a folder name without them"
        )
    return value


def _out_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--out", required=True, type=_output_folder, help=help)


def _config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        help = "pipeline config: a YAML file, or a preset name (app_store, movies)"
    else:
        help = "pipeline config (default: the config.yaml saved beside the model)"
    p.add_argument("--config", required=required, help=help)


def _wait_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help=f"when another process is writing {what}, wait for it instead of failing",
    )


def _models_dir_arg(p: Any, required: bool, help: str) -> None:
    """``--models-dir`` on a parser or a group of mutually exclusive options."""
    p.add_argument(
        "--models-dir",
        "--model_base_path",
        "--model-base-path",
        dest="models_dir",
        required=required,
        metavar="DIR",
        help=help + ". The folder that holds every model (DIR/MODEL_NAME/VERSION/); "
        "--model_base_path is its old name here, with that meaning (serve's --model-base-path "
        "is one model's folder, DIR/MODEL_NAME, as in TF Serving)",
    )


def _model_name_arg(p: argparse.ArgumentParser, required: bool, help: str) -> None:
    p.add_argument("--model-name", "--model_name", dest="model_name", required=required, help=help)


def _beam_args(extra: Sequence[str]) -> list[str]:
    """The Beam options given, with the DirectRunner unless a runner is named."""
    beam_args = list(extra)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args.append("--runner=DirectRunner")
    return beam_args


def _model_config(config: str | None, model_dir: str | None):
    """The config given, or the one a training output folder saved beside its model."""
    from transform.artifacts import saved_config_path
    from transform.config import load_config
    from transform.errors import UsageError

    if config:
        return load_config(config)
    saved = saved_config_path(model_dir) if model_dir else None
    if saved is None:
        raise UsageError("--config: required (the model folder holds no config.yaml)")
    return load_config(saved)


def _read_text(flag: str, path: str) -> str:
    """A file the user named, or a one-line error naming the flag."""
    from transform.errors import UsageError

    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path} ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------------
# Verbs


def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    _out_arg(p, "output folder (one sub-folder a day)")
    p.add_argument("--days", type=int, default=1, help="days of logs (default 1)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions a day")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated world")
    p.add_argument("--overwrite", action="store_true", help="replace existing day folders")


@verb(
    "simulate",
    "write synthetic app-store impression logs (Parquet, one folder a day)",
    """
    widedeep simulate --out logs/ --days 3 --rows-per-day 200000 --seed 7

    Writes logs/day=001/part-*.parquet, ... and logs/simulation.json (settings and per-day
    statistics). The column true_probability is the simulator's ground truth; no feature
    of the app_store config reads it.
    """,
    arguments=_simulate_arguments,
)
def _simulate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from tools.simulator import simulate

    summary = simulate(
        args.out,
        days=args.days,
        rows_per_day=args.rows_per_day,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=print,
    )
    print(
        f"simulate finished in {summary.seconds:.1f} s: {summary.rows:,} rows over "
        f"{summary.days} day(s), label rate {summary.label_rate:.4f}, "
        f"{summary.apps_per_day[-1]:,} apps on the last day -> {summary.out_dir}"
    )
    return 0


def _datagen_arguments(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument(
        "--input",
        required=True,
        help="file glob(s), comma-separated, or a folder of Parquet, CSV or TFRecord",
    )
    p.add_argument(
        "--input-format",
        "--input_format",
        dest="input_format",
        choices=["parquet", "csv", "tfrecord"],
        help="input format (default: from the file names)",
    )
    _out_arg(p, "output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that holds results (kept until the new output is complete)",
    )
    p.add_argument(
        "--reference-statistics",
        "--reference_statistics",
        dest="reference_statistics",
        metavar="PATH",
        help="validate the input against these statistics: an earlier datagen output folder "
        "or its statistics.json (default: only the checks that need no reference)",
    )
    p.add_argument(
        "--fail-on-anomaly",
        action="store_true",
        help="exit with status 1 when data validation finds a blocking anomaly (the output is "
        "written all the same)",
    )
    _wait_arg(p, "the output folder")


@verb(
    "datagen",
    "the Beam + tf.Transform job: vocabularies, quantiles, crosses, train/eval TFRecords",
    """
    widedeep datagen --config app_store --input 'logs/day=001/*.parquet' --out data/day1
    widedeep datagen --config my.yaml --input logs.csv --out data/ --overwrite
    widedeep datagen --config app_store --input 'logs/day=002' --out data/day2 \\
        --reference-statistics data/day1 --fail-on-anomaly
    widedeep datagen --config app_store --input logs/ --out data/ \\
        --runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK

    Options the command does not know are Beam pipeline options (--runner, --project,
    --direct_num_workers, ...).
    """,
    arguments=_datagen_arguments,
    passes_on_unknown=True,
)
def _datagen(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from pipeline.anomalies import blocking
    from pipeline.datagen import run_datagen
    from pipeline.sources import InputFormat
    from transform.config import load_config

    result = run_datagen(
        load_config(args.config),
        args.input,
        args.out,
        input_format=InputFormat(args.input_format) if args.input_format else None,
        overwrite=args.overwrite,
        beam_args=_beam_args(extra),
        wait=args.wait,
        reference=args.reference_statistics,
    )
    blocks = blocking(result.anomalies)
    if blocks and args.fail_on_anomaly:
        print(
            f"widedeep datagen: {len(blocks)} blocking anomal{'y' if len(blocks) == 1 else 'ies'}"
            f" (--fail-on-anomaly); see {result.out_dir}",
            file=sys.stderr,
        )
        return EXIT_ANOMALY
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--data", required=True, help="datagen output folder")
    _out_arg(p, "model folder")
    p.add_argument(
        "--towers",
        choices=["wide_deep", "wide", "deep"],
        default="wide_deep",
        help="the paper's three models (default wide_deep)",
    )
    p.add_argument(
        "--warm-start-from",
        "--warm_start_from",
        dest="warm_start_from",
        help="previous model folder: embeddings and wide weights carried by token",
    )
    p.add_argument("--epochs", type=int, help="passes over the train split (default: config)")
    p.add_argument(
        "--max-steps",
        "--max_steps",
        dest="max_steps",
        type=int,
        help="stop at this global step (a later run with the same arguments resumes)",
    )
    p.add_argument(
        "--distribute",
        choices=["multi_worker"],
        help="MultiWorkerMirroredStrategy over the cluster in TF_CONFIG",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a finished model or unfinished run in --out and start over",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@verb(
    "train",
    "train wide & deep (or one tower) on datagen output, evaluate it and export a SavedModel",
    """
    widedeep train --config app_store --data data/day1 --out models/day1
    widedeep train --config app_store --data data/day2 --out models/day2 \\
        --warm-start-from models/day1
    widedeep train --config app_store --data data/day1 --out models/wide --towers wide
    TF_CONFIG='{...}' widedeep train --config app_store --data data/day1 --out models/mw \\
        --distribute multi_worker

    A run that was interrupted resumes from its last checkpoint when started again with the
    same arguments. Writes checkpoints/, export/ (the SavedModel, with its warmup requests),
    metrics.json, roc.png, logs/ (TensorBoard) and config.yaml into --out.
    """,
    arguments=_train_arguments,
)
def _train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from trainer.train import format_result, train
    from transform.config import load_config

    result = train(
        load_config(args.config),
        args.data,
        args.out,
        towers=args.towers,
        warm_start_from=args.warm_start_from,
        overwrite=args.overwrite,
        epochs=args.epochs,
        max_steps=args.max_steps,
        distribute=args.distribute,
        verbose=0 if args.quiet else 1,
    )
    if args.quiet and result.metrics is not None:
        print(format_result(result))  # otherwise the trainer has printed it with its progress
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from serving.flags import add_server_arguments

    add_server_arguments(p)


@verb(
    "serve",
    "start a model server on a TF Serving model base path (gRPC, and REST on a second port)",
    SERVE_EXAMPLES,
    arguments=_serve_arguments,
)
def _serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving.command import serve

    # The arguments as given: the real binary gets them, not the parsed values.
    return serve(args.verb_argv)


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="training output folder (or its SavedModel)")
    p.add_argument("--data", required=True, help="datagen output whose eval split is used")
    _config_arg(p, required=False)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--baseline", help="compare with this model")
    _models_dir_arg(group, False, "compare with the newest version served from this folder")
    p.add_argument("--skip-dry-run", action="store_true", help="quality check only")
    p.add_argument(
        "--request-log",
        help="the model server's request log (the folder of widedeep serve --request_log_dir, "
        "or of a logging_config's filename_prefix): compare the logged requests' features "
        "with --data's training statistics (training/serving skew)",
    )


@verb(
    "validate",
    "dry run in a model server and quality check against the served model; writes a verdict",
    """
    widedeep validate --model models/day2 --data data/day2 --models-dir serving_models
    widedeep validate --model models/day2 --data data/day2 --baseline models/day1
    widedeep validate --model models/day2 --data data/day2 --request-log request_logs

    --models-dir is the folder deploy writes into (it holds MODEL_NAME/VERSION/); the model
    compared with is the newest version there. --request-log compares the requests the
    model server logged with the training statistics of --data (skew is a warning unless the
    config's validation.skew_severity is block). Exit status 0 when the model passed, 1 when
    it failed; the verdict is in MODEL/verdict.json either way.
    """,
    arguments=_validate_arguments,
)
def _validate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving.release.validate import format_verdict, validate

    verdict = validate(
        args.model,
        args.data,
        _model_config(args.config, args.model),
        baseline=args.baseline,
        models_dir=args.models_dir,
        skip_dry_run=args.skip_dry_run,
        request_log=args.request_log,
        echo=lambda line: print(line, file=sys.stderr),
    )
    print(format_verdict(verdict))
    return 0 if verdict.passed else 1


def _deploy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="training output folder with a passing verdict")
    _models_dir_arg(p, True, "where the model is deployed as the next version")
    _model_name_arg(p, False, "name on the server (default: the config's model_name)")
    _config_arg(p, required=False)
    p.add_argument("--server", help="host:port of the server, to confirm the version is served")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="retire the newest version so the previous one is served again",
    )
    p.add_argument(
        "--revalidate",
        action="store_true",
        help="when the model's verdict is not current (made against another version than the "
        "one served now, or before a rollback of it), validate it again before deploying",
    )
    p.add_argument(
        "--data",
        help="datagen output to validate on with --revalidate (default: the verdict's)",
    )
    _wait_arg(p, "the models folder")


@verb(
    "deploy",
    "push a validated model into a TF Serving models folder as the next version, atomically",
    """
    widedeep deploy --model models/day2 --models-dir serving_models --server localhost:8500
    widedeep deploy --rollback --models-dir serving_models --model-name app_ranker \\
        --server localhost:8500
    widedeep deploy --model models/day3 --models-dir serving_models --revalidate --wait

    Writes MODELS_DIR/MODEL_NAME/VERSION/, the layout TF Serving reads; serve it with
    'widedeep serve --model-base-path MODELS_DIR/MODEL_NAME'. A model is deployed only on a
    current verdict: one that compared it with the version served now (validate
    --models-dir), made after any rollback of it. --revalidate validates it again when it is
    not. Deploys and rollbacks of one model take turns: a second one fails naming the first
    one's PID, or waits for it with --wait.
    """,
    arguments=_deploy_arguments,
)
def _deploy(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving.release.deploy import DeployError, check_verdict, deploy, rollback
    from serving.release.validate import format_verdict, validate
    from transform.errors import UsageError

    if args.rollback:
        name = args.model_name or _model_config(args.config, args.model).model_name
        done = rollback(
            args.models_dir, name, server=args.server, timeout_s=args.timeout, wait=args.wait
        )
        print(
            f"deploy: rolled back {name} from version {done.previous} to {done.version}"
            + (" (confirmed AVAILABLE)" if done.confirmed else "")
        )
        return 0
    if not args.model:
        raise UsageError("--model: required unless --rollback")
    name = args.model_name or _model_config(args.config, args.model).model_name

    def revalidate(baseline: Path | None) -> None:
        data = args.data or check_verdict(args.model).get("data")
        if not data:
            raise DeployError(
                f"{args.model}: --revalidate needs --data (its verdict does not say which "
                "datagen output it was validated on)"
            )
        print(f"deploy: the verdict is not current; validating {args.model} again", flush=True)
        config = _model_config(args.config, args.model)
        print(format_verdict(validate(args.model, data, config, baseline=baseline)))

    done = deploy(
        args.model,
        args.models_dir,
        name,
        server=args.server,
        timeout_s=args.timeout,
        wait=args.wait,
        revalidate=revalidate if args.revalidate else None,
    )
    print(
        f"deploy: {name} version {done.version} -> {done.path}"
        + (" (confirmed AVAILABLE)" if done.confirmed else "")
    )
    return 0


def _query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        required=True,
        help="HOST:PORT of the gRPC endpoint, or http://HOST:PORT of the REST endpoint",
    )
    _model_name_arg(p, True, "the model's name")
    p.add_argument(
        "--model-version",
        "--model_version",
        dest="model_version",
        type=int,
        help="score with this version (default: the one the server serves)",
    )
    p.add_argument("--query", help="JSON file with the query and its candidates (default stdin)")
    _config_arg(p, required=False)
    p.add_argument(
        "--request",
        # serving.client.REQUEST_KINDS, written out: the parser is built without TensorFlow.
        choices=("examples", "classify", "raw"),
        default="examples",
        help="what a request carries: merged tf.Examples (default), Classify with the query "
        "as context, or raw values on the raw_features signature",
    )
    p.add_argument("--batch-size", type=int, help="candidates per request")
    p.add_argument("--parallelism", type=int, help="requests in flight at once")
    p.add_argument("--timeout", type=float, help="deadline of the whole query, seconds")
    p.add_argument(
        "--wait-for-server",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the server to serve the model first (a server just "
        "started is still loading it); default 0: fail at once when it does not",
    )
    p.add_argument("--id-key", help="candidate feature to show (default: its first key)")
    p.add_argument("--top", type=int, help="show only the best N")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")


@verb(
    "query",
    "score and rank one query's candidates through the gRPC (or REST) endpoint",
    """
    widedeep query --server localhost:8500 --model-name app_ranker --config app_store \\
        --query examples/app_store_query.json
    widedeep query --server http://localhost:8501 --model-name app_ranker --config app_store \\
        --query examples/app_store_query.json --model-version 3
    echo '{"query": {...}, "candidates": [{...}, ...]}' | widedeep query \\
        --server localhost:8500 --model-name app_ranker
    widedeep query --server localhost:8500 --model-name app_ranker --config app_store \\
        --query examples/app_store_query.json --wait-for-server 60

    --server HOST:PORT speaks TF Serving's gRPC API (port 8500 by default); an http:// or
    https:// URL speaks its REST API (port 8501 by default), POSTing the candidates to
    /v1/models/NAME[/versions/V]:predict. Both score the same way: batches of --batch-size
    candidates, --parallelism at a time, retried when the server is unavailable, all within
    --timeout seconds. --wait-for-server first waits for a server that is still starting
    (e.g. just launched with 'widedeep serve ... &') until it serves the model.

    The JSON holds "query" (features shared by every candidate: user and context) and
    "candidates" (a list of each candidate's features); examples/app_store_query.json is one
    for the app_store config. Features are typed as the model parses them (read from its
    raw_features signature); for a model without one, as --config says, else as the JSON
    values are.

    --request says what a request carries: "examples" (default) is Predict on
    serving_default with one tf.Example a candidate, the query's features merged in;
    "classify" is Classify with the query's features once, as the context example
    (example_list_with_context); "raw" is Predict on the raw_features signature, one input
    per column, the query's columns once (REST: the columnar "inputs" format).
    """,
    arguments=_query_arguments,
)
def _query(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import json

    from serving.client import ClientSettings, RankingClient, format_ranking
    from transform.config import load_config
    from transform.errors import UsageError

    text = sys.stdin.read() if args.query in (None, "-") else _read_text("--query", args.query)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--query: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("candidates"), list):
        raise UsageError('--query: expected {"query": {...}, "candidates": [{...}, ...]}')
    config = load_config(args.config) if args.config else None
    base = ClientSettings.from_config(config) if config else ClientSettings()
    settings = ClientSettings(
        batch_size=args.batch_size or base.batch_size,
        parallelism=args.parallelism or base.parallelism,
        timeout_s=args.timeout or base.timeout_s,
        retries=base.retries,
        request=args.request,
    )
    if args.wait_for_server < 0:
        raise UsageError(f"--wait-for-server: expected seconds >= 0, got {args.wait_for_server}")
    with RankingClient(
        args.server, args.model_name, settings, config=config, version=args.model_version
    ) as client:
        if args.wait_for_server:
            client.wait_until_serving(
                args.wait_for_server, on_wait=lambda line: print(line, file=sys.stderr)
            )
        ranked = client.rank(payload.get("query") or {}, payload["candidates"])
    if args.json:
        print(
            json.dumps(
                [{"rank": r.rank, "score": r.score, "candidate": r.candidate} for r in ranked],
                indent=2,
            )
        )
    else:
        print(format_ranking(ranked, id_key=args.id_key, top=args.top))
    return 0


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="model folder (widedeep train --out) or a SavedModel"
    )
    p.add_argument(
        "--top", type=int, default=20, help="wide weights shown, largest first (default 20)"
    )
    p.add_argument(
        "--data",
        help="the datagen output the model was trained on (default: the one its metrics "
        "name): quantile boundaries, and where the raw log is",
    )
    p.add_argument(
        "--input",
        help="the raw log (file globs, comma-separated, or a folder) read to map hashed cross "
        "ids back to raw values (default: the input the datagen output recorded)",
    )
    p.add_argument(
        "--sample-rows",
        type=int,
        default=1_000_000,
        help="rows of the raw log read at most for the cross mapping (default 1000000; 0 reads "
        "all of it)",
    )
    p.add_argument(
        "--no-crosses", action="store_true", help="do not map cross ids (no pass over the log)"
    )
    p.add_argument(
        "--tuples", type=int, default=3, help="raw tuples shown per cross id (default 3)"
    )
    p.add_argument(
        "--neighbours",
        action="append",
        default=[],
        metavar="FEATURE=TOKEN",
        help="nearest tokens to TOKEN in the deep tower's embeddings (cosine); repeatable",
    )
    p.add_argument("--num-neighbours", type=int, default=10, help="neighbours shown (default 10)")
    p.add_argument(
        "--query",
        help="JSON query and candidates (as widedeep query takes) whose scores are split into "
        "bias, wide and deep parts; - reads stdin",
    )
    p.add_argument(
        "--server",
        help="HOST:PORT of a model server's gRPC API: explain the query with the model it "
        "serves (default: the SavedModel in process)",
    )
    _model_name_arg(p, False, "the model's name on --server (default: the config's)")
    p.add_argument(
        "--model-version", "--model_version", dest="model_version", type=int,
        help="the version on --server (default: the one it serves)",
    )  # fmt: skip
    p.add_argument("--id-key", help="candidate feature to show (default: its first key)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@verb(
    "explain",
    "what a model learned: its largest wide weights as raw values, neighbours, a query's split",
    """
    widedeep explain --model models/day1
    widedeep explain --model models/day1 --top 100 --json
    widedeep explain --model models/day1 --neighbours impression_app=a002817 \\
        --query examples/app_store_query.json
    widedeep explain --model models/day1 --query examples/app_store_query.json \\
        --server localhost:8500 --model-name app_ranker

    The wide tower's --top largest weights (by absolute value), each as the raw value it
    stands for: a token, a numeric feature's quantile range, or, for a hashed cross id, the
    raw value tuples that hash into it, found by one pass over up to --sample-rows rows of the
    raw log (with how often the tuple occurred, its label rate, and how many distinct tuples
    share the bucket). --neighbours lists the tokens whose deep embeddings are nearest.
    --query splits each candidate's score into the bias, the wide tower's and the deep tower's
    log-odds (they sum to the logit of the served probability) with the wide weights that
    fired: from the SavedModel's explain signature in process, or through --server's gRPC API.
    """,
    arguments=_explain_arguments,
)
def _explain(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import json

    from pipeline.explain import explain, format_report, read_query

    payload = None
    if args.query:
        text = sys.stdin.read() if args.query == "-" else _read_text("--query", args.query)
        payload = read_query(text)
    report = explain(
        args.model,
        top=args.top,
        data_dir=args.data,
        input_patterns=args.input,
        sample_rows=args.sample_rows or None,
        map_cross_ids=not args.no_crosses,
        tuples=args.tuples,
        neighbour_specs=args.neighbours,
        num_neighbours=args.num_neighbours,
        query=payload,
        query_source=None if args.query in (None, "-") else args.query,
        server=args.server,
        model_name=args.model_name,
        version=args.model_version,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report, id_key=args.id_key))
    return 0


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    _out_arg(p, "the run's folder")
    p.add_argument("--input", help="impression logs (default: simulate them)")
    p.add_argument(
        "--days", type=int, help="days to play (default: 1, or every day folder of --input)"
    )
    p.add_argument("--rows-per-day", type=int, default=100_000, help="simulated impressions a day")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated world")
    p.add_argument("--epochs", type=int, help="training epochs a day (default: config)")
    p.add_argument(
        "--window", type=int, metavar="N",
        help="vocabularies and quantiles over the last N days (default: data.window_days)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=0, help="gRPC port of the server (default: free)")
    p.add_argument(
        "--rest-api-port", "--rest_api_port", dest="rest_api_port", type=int,
        help="also serve REST here",
    )  # fmt: skip
    p.add_argument("--query", help="JSON query to rank at the end (default: from the log)")
    p.add_argument("--top", type=int, default=10, help="candidates shown of the ranking")
    p.add_argument(
        "--keep-serving", action="store_true", help="keep the server up at the end until Ctrl-C"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard an earlier run in --out and start over"
    )
    p.add_argument("--quiet", action="store_true", help="one line a stage")


@verb(
    "run",
    "every stage on one config: simulate, datagen, train, validate, deploy, serve, query",
    """
    widedeep run --config app_store --out runs/demo
    widedeep run --config app_store --out runs/week --days 7 --rows-per-day 200000
    widedeep run --config my.yaml --input logs/ --out runs/mine --port 8500 --keep-serving
    widedeep run --config my.yaml --input 'logs/2026-11-01/*.parquet' --out runs/one

    Without --input, simulated app-store logs are written first. With --input, a folder
    whose sub-folders each hold one day of logs plays them as days in name order; anything
    else is one day. Day 1 trains cold; each later day warm-starts from the served model, is
    validated against it and deployed to the running server (which keeps answering queries).
    The run ends with a ranked list scored through the gRPC endpoint and the served model's
    offline metrics. Started again with the same arguments, a stopped run continues from its
    last finished stage. Options it does not know are Beam pipeline options for datagen.
    """,
    arguments=_run_arguments,
    passes_on_unknown=True,
)
def _run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from pipeline.run import QUERY_FILE, RunOptions, run
    from transform.config import load_config

    config = load_config(args.config)
    options = RunOptions(
        input=args.input,
        days=args.days,
        rows_per_day=args.rows_per_day,
        seed=args.seed,
        epochs=args.epochs,
        window=args.window,
        port=args.port,
        rest_api_port=args.rest_api_port,
        query=args.query,
        top=args.top,
        beam_args=tuple(_beam_args(extra)),
        verbose=0 if args.quiet else 1,
    )

    def keep_serving(target: str) -> None:
        print(
            f"serving {config.model_name} at {target}; try: widedeep query --server {target} "
            f"--model-name {config.model_name} --query {Path(args.out) / QUERY_FILE}\n"
            "Ctrl-C stops the server."
        )
        threading.Event().wait()  # until KeyboardInterrupt

    run(
        config,
        args.out,
        options,
        overwrite=args.overwrite,
        keep_serving=keep_serving if args.keep_serving else None,
    )
    return 0


# --------------------------------------------------------------------------------------------
# The parser and the entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="widedeep",
        description="Wide & Deep ranking pipeline: data generation on Beam with tf.Transform, "
        "training, validation, deployment and serving through TensorFlow Serving's API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'widedeep VERB --help' for a verb's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log everything")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for v in VERBS.values():
        p = sub.add_parser(
            v.name,
            help=v.summary,
            description=v.summary,
            epilog="examples:\n" + textwrap.indent(v.examples, "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        v.arguments(p)
    return parser


def _verb_argv(argv: Sequence[str]) -> list[str]:
    """The arguments after the verb (the first argument that is not an option: the CLI's own
    options, -v and -h, take no value)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return list(argv[i + 1 :])
    return []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``widedeep`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_USAGE
    command = VERBS[args.verb]
    if extra and not command.passes_on_unknown:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verb_argv = _verb_argv(argv)
    _quiet_tensorflow(args.verbose)
    _setup_logging(args.verbose)
    from transform.errors import WidedeepError

    try:
        return int(command.run(args, extra) or 0)
    except WidedeepError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"widedeep {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"widedeep {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout has gone (`widedeep query ... | head`): nothing more to say.
        # Python would complain again when it flushes stdout at exit; point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        traceback.print_exc()
        print(
            f"widedeep {args.verb}: internal error ({type(e).__name__}): this is a bug in "
            "widedeep, not in what you gave it. Please report it with the command you ran and "
            "the traceback above.",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
