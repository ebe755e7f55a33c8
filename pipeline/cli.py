"""The ``widedeep`` command line: one verb per pipeline stage.

The CLI only parses arguments and calls the stage's function; no argument namespace travels
into pipeline or model code.
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
from pathlib import Path

EXIT_USAGE = 2

_VERBS: dict[str, tuple[str, str]] = {}


def _verb(name: str, summary: str, examples: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        _VERBS[name] = (summary, textwrap.dedent(examples).strip())
        fn.verb = name
        return fn

    return register


def _quiet_tensorflow(verbose: bool) -> None:
    # tf.Transform's Keras layer is a tf_keras model; say so before TF is imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if verbose:
        return
    # TF's C++ logs (cuInit on machines without a GPU, oneDNN notices) drown the CLI's output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Some are printed while TF loads, before its log level is read: hide stderr for the import.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("pipeline", "transform", "trainer", "serving"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        for name in ("absl", "apache_beam", "tensorflow", "tensorflow_transform"):
            logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Verbs


@_verb(
    "simulate",
    "write synthetic app-store impression logs (Parquet, one folder a day)",
    """
    widedeep simulate --out logs/ --days 3 --rows-per-day 200000 --seed 7

    Writes logs/day=001/part-*.parquet, ... and logs/simulation.json (settings and per-day
    statistics). The column true_probability is the simulator's ground truth; no feature
    of the app_store config reads it.
    """,
)
def _simulate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from pipeline.simulator import simulate

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


@_verb(
    "datagen",
    "the Beam + tf.Transform job: vocabularies, quantiles, crosses, train/eval TFRecords",
    """
    widedeep datagen --config app_store --input 'logs/day=001/*.parquet' --out data/day1
    widedeep datagen --config my.yaml --input logs.csv --out data/ --overwrite
    widedeep datagen --config app_store --input logs/ --out data/ \\
        --runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK

    Options the command does not know are Beam pipeline options (--runner, --project,
    --direct_num_workers, ...).
    """,
)
def _datagen(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from pipeline.datagen import run_datagen
    from pipeline.sources import InputFormat
    from transform.config import load_config

    config = load_config(args.config)
    beam_args = _beam_args(extra)
    run_datagen(
        config,
        args.input,
        args.out,
        input_format=InputFormat(args.input_format) if args.input_format else None,
        overwrite=args.overwrite,
        beam_args=beam_args,
        wait=args.wait,
    )
    return 0


@_verb(
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
)
def _train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from trainer.train import format_result, train
    from transform.config import load_config

    config = load_config(args.config)
    result = train(
        config,
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


@_verb(
    "serve",
    "start a model server on a TF Serving model base path (gRPC, and REST on a second port)",
    """
    widedeep serve --port 8500 --rest_api_port 8501 --model_name app_ranker \\
        --model_base_path serving/app_ranker
    widedeep serve --port 8500 --model_config_file /srv/models/models.config

    Takes tensorflow_model_server's own flags. Runs tensorflow_model_server when it is on PATH
    (writing a model config file for --model_name/--model_base_path), else the built-in server
    that speaks the same gRPC and REST API. --builtin forces the built-in one.
    """,
)
def _serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving import tfserving

    binary = None if args.builtin else tfserving.find_binary()
    if binary:
        ignored = tfserving.builtin_only_flags(extra)
        if ignored:
            print(
                "widedeep serve: tensorflow_model_server has no "
                + ", ".join(a.split("=", 1)[0] for a in ignored)
                + "; they apply to the built-in server only (--builtin)",
                file=sys.stderr,
            )
        argv = tfserving.binary_argv(binary, extra)
        print("widedeep serve: running " + " ".join(argv), flush=True)
        os.execv(binary, argv)
    from serving.server import main as server_main

    return server_main(list(extra))


@_verb(
    "validate",
    "dry run in a model server and quality check against the served model; writes a verdict",
    """
    widedeep validate --model models/day2 --data data/day2 --model_base_path serving
    widedeep validate --model models/day2 --data data/day2 --baseline models/day1

    Exit status 0 when the model passed, 1 when it failed; the verdict is in
    MODEL/verdict.json either way.
    """,
)
def _validate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving.validate import format_verdict, validate

    config = _model_config(args.config, args.model)
    verdict = validate(
        args.model,
        args.data,
        config,
        baseline=args.baseline,
        model_base_path=args.model_base_path,
        skip_dry_run=args.skip_dry_run,
    )
    print(format_verdict(verdict))
    return 0 if verdict.passed else 1


@_verb(
    "deploy",
    "push a validated model into a TF Serving model base path as the next version, atomically",
    """
    widedeep deploy --model models/day2 --model_base_path serving --server localhost:8500
    widedeep deploy --rollback --model_base_path serving --model_name app_ranker \\
        --server localhost:8500
    widedeep deploy --model models/day3 --model_base_path serving --revalidate --wait

    A model is deployed only on a current verdict: one that compared it with the version
    served now (validate --model_base_path), made after any rollback of it. --revalidate
    validates it again when it is not. Deploys and rollbacks of one base path take turns:
    a second one fails naming the first one's PID, or waits for it with --wait.
    """,
)
def _deploy(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from serving.deploy import deploy, rollback

    if args.rollback:
        name = args.model_name or _model_config(args.config, args.model).model_name
        done = rollback(
            args.model_base_path, name, server=args.server, timeout_s=args.timeout, wait=args.wait
        )
        print(
            f"deploy: rolled back {name} from version {done.previous} to {done.version}"
            + (" (confirmed AVAILABLE)" if done.confirmed else "")
        )
        return 0
    if not args.model:
        raise ValueError("--model: required unless --rollback")
    name = args.model_name or _model_config(args.config, args.model).model_name

    def revalidate(baseline: Path | None) -> None:
        from serving.deploy import DeployError, check_verdict
        from serving.validate import format_verdict, validate

        config = _model_config(args.config, args.model)

        data = args.data or check_verdict(args.model).get("data")
        if not data:
            raise DeployError(
                f"{args.model}: --revalidate needs --data (its verdict does not say which "
                "datagen output it was validated on)"
            )
        print(f"deploy: the verdict is not current; validating {args.model} again", flush=True)
        print(format_verdict(validate(args.model, data, config, baseline=baseline)))

    done = deploy(
        args.model,
        args.model_base_path,
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


@_verb(
    "query",
    "score and rank one query's candidates through the gRPC (or REST) endpoint",
    """
    widedeep query --server localhost:8500 --model_name app_ranker --config app_store \\
        --query query.json
    widedeep query --server http://localhost:8501 --model_name app_ranker --config app_store \\
        --query query.json --model_version 3
    echo '{"query": {...}, "candidates": [{...}, ...]}' | widedeep query \\
        --server localhost:8500 --model_name app_ranker

    --server HOST:PORT speaks TF Serving's gRPC API (port 8500 by default); an http:// or
    https:// URL speaks its REST API (port 8501 by default), POSTing the candidates to
    /v1/models/NAME[/versions/V]:predict. Both score the same way: batches of --batch-size
    candidates, --parallelism at a time, retried when the server is unavailable, all within
    --timeout seconds.

    The JSON holds "query" (features shared by every candidate: user and context) and
    "candidates" (a list of each candidate's features). Features are typed as the model
    parses them (read from its raw_features signature); for a model without one, as --config
    says, else as the JSON values are.

    --request says what a request carries: "examples" (default) is Predict on
    serving_default with one tf.Example a candidate, the query's features merged in;
    "classify" is Classify with the query's features once, as the context example
    (example_list_with_context); "raw" is Predict on the raw_features signature, one input
    per column, the query's columns once (REST: the columnar "inputs" format).
    """,
)
def _query(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import json

    from serving.client import ClientSettings, RankingClient, format_ranking
    from transform.config import load_config

    text = sys.stdin.read() if args.query in (None, "-") else Path(args.query).read_text()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--query: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("candidates"), list):
        raise ValueError('--query: expected {"query": {...}, "candidates": [{...}, ...]}')
    config = load_config(args.config) if args.config else None
    base = ClientSettings.from_config(config) if config else ClientSettings()
    settings = ClientSettings(
        batch_size=args.batch_size or base.batch_size,
        parallelism=args.parallelism or base.parallelism,
        timeout_s=args.timeout or base.timeout_s,
        retries=base.retries,
        request=args.request,
    )
    with RankingClient(
        args.server, args.model_name, settings, config=config, version=args.model_version
    ) as client:
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


@_verb(
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
)
def _run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from pipeline.run import RunOptions, run
    from transform.config import load_config

    config = load_config(args.config)
    beam_args = _beam_args(extra)
    options = RunOptions(
        input=args.input,
        days=args.days,
        rows_per_day=args.rows_per_day,
        seed=args.seed,
        epochs=args.epochs,
        port=args.port,
        rest_api_port=args.rest_api_port,
        query=args.query,
        top=args.top,
        beam_args=tuple(beam_args),
        verbose=0 if args.quiet else 1,
    )

    def keep_serving(target: str) -> None:
        print(
            f"serving {config.model_name} at {target}; try: widedeep query --server {target} "
            f"--model_name {config.model_name} --query {Path(args.out) / 'query.json'}\n"
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


def _beam_args(extra: Sequence[str]) -> list[str]:
    """The Beam options given, with the DirectRunner unless a runner is named."""
    beam_args = list(extra)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args.append("--runner=DirectRunner")
    return beam_args


def _model_config(config: str | None, model_dir: str | None):
    """The config given, or the one a training output folder saved beside its model."""
    from transform.config import load_config

    if config:
        return load_config(config)
    if model_dir:
        for candidate in (Path(model_dir) / "config.yaml", Path(model_dir).parent / "config.yaml"):
            if candidate.exists():
                return load_config(candidate)
    raise ValueError("--config: required (the model folder holds no config.yaml)")


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

    def add(name: str) -> argparse.ArgumentParser:
        summary, examples = _VERBS[name]
        return sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="examples:\n" + textwrap.indent(examples, "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("simulate")
    p.add_argument("--out", required=True, help="output folder (one sub-folder a day)")
    p.add_argument("--days", type=int, default=1, help="days of logs (default 1)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions a day")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated world")
    p.add_argument("--overwrite", action="store_true", help="replace existing day folders")
    p.set_defaults(run=_simulate)

    p = add("datagen")
    _config_arg(p)
    p.add_argument(
        "--input",
        required=True,
        help="file glob(s), comma-separated, or a folder of Parquet, CSV or TFRecord",
    )
    p.add_argument(
        "--input_format",
        "--input-format",
        choices=["parquet", "csv", "tfrecord"],
        help="input format (default: from the file names)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that holds results (kept until the new output is complete)",
    )
    _wait_arg(p, "the output folder")
    p.set_defaults(run=_datagen)

    p = add("train")
    _config_arg(p)
    p.add_argument("--data", required=True, help="datagen output folder")
    p.add_argument("--out", required=True, help="model folder")
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
    p.set_defaults(run=_train)

    p = add("serve")
    p.add_argument(
        "--builtin",
        action="store_true",
        help="use the built-in server even if tensorflow_model_server is on PATH",
    )
    p.set_defaults(run=_serve)

    p = add("validate")
    p.add_argument("--model", required=True, help="training output folder (or its SavedModel)")
    p.add_argument("--data", required=True, help="datagen output whose eval split is used")
    p.add_argument("--config", help="pipeline config (default: the model's config.yaml)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--baseline", help="compare with this model")
    group.add_argument(
        "--model_base_path",
        "--model-base-path",
        help="compare with the newest version served from this base path",
    )
    p.add_argument("--skip-dry-run", action="store_true", help="quality check only")
    p.set_defaults(run=_validate)

    p = add("deploy")
    p.add_argument("--model", help="training output folder with a passing verdict")
    p.add_argument(
        "--model_base_path",
        "--model-base-path",
        required=True,
        help="TF Serving model base path (holds MODEL_NAME/VERSION/)",
    )
    p.add_argument("--model_name", "--model-name", help="name on the server (default: config)")
    p.add_argument("--config", help="pipeline config (default: the model's config.yaml)")
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
    _wait_arg(p, "the model base path")
    p.set_defaults(run=_deploy)

    p = add("query")
    p.add_argument(
        "--server",
        required=True,
        help="HOST:PORT of the gRPC endpoint, or http://HOST:PORT of the REST endpoint",
    )
    p.add_argument("--model_name", "--model-name", required=True, help="the model's name")
    p.add_argument(
        "--model_version",
        "--model-version",
        type=int,
        help="score with this version (default: the one the server serves)",
    )
    p.add_argument("--query", help="JSON file with the query and its candidates (default stdin)")
    p.add_argument("--config", help="pipeline config (feature types, list delimiter)")
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
    p.add_argument("--id-key", help="candidate feature to show (default: its first key)")
    p.add_argument("--top", type=int, help="show only the best N")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    p.set_defaults(run=_query)

    p = add("run")
    _config_arg(p)
    p.add_argument("--out", required=True, help="the run's folder")
    p.add_argument("--input", help="impression logs (default: simulate them)")
    p.add_argument(
        "--days", type=int, help="days to play (default: 1, or every day folder of --input)"
    )
    p.add_argument("--rows-per-day", type=int, default=100_000, help="simulated impressions a day")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated world")
    p.add_argument("--epochs", type=int, help="training epochs a day (default: config)")
    p.add_argument("--port", type=int, default=0, help="gRPC port of the server (default: free)")
    p.add_argument("--rest_api_port", "--rest-api-port", type=int, help="also serve REST here")
    p.add_argument("--query", help="JSON query to rank at the end (default: from the log)")
    p.add_argument("--top", type=int, default=10, help="candidates shown of the ranking")
    p.add_argument(
        "--keep-serving", action="store_true", help="keep the server up at the end until Ctrl-C"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard an earlier run in --out and start over"
    )
    p.add_argument("--quiet", action="store_true", help="one line a stage")
    p.set_defaults(run=_run)
    return parser


def _wait_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help=f"when another process is writing {what}, wait for it instead of failing",
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="pipeline config: a YAML file, or a preset name (app_store, movies)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``widedeep`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_USAGE
    if extra and args.verb not in ("datagen", "serve", "run"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_tensorflow(args.verbose)
    _setup_logging(args.verbose)
    from pipeline.errors import USER_ERRORS

    try:
        return int(args.run(args, extra) or 0)
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        print(f"widedeep {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"widedeep {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
