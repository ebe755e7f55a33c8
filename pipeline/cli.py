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
from collections.abc import Callable, Sequence

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
    beam_args = list(extra)
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args.append("--runner=DirectRunner")
    run_datagen(
        config,
        args.input,
        args.out,
        input_format=InputFormat(args.input_format) if args.input_format else None,
        overwrite=args.overwrite,
        beam_args=beam_args,
    )
    return 0


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
    p.set_defaults(run=_datagen)
    return parser


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
    if extra and args.verb != "datagen":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_tensorflow(args.verbose)
    _setup_logging(args.verbose)
    from pipeline.errors import USER_ERRORS

    try:
        return int(args.run(args, extra) or 0)
    except USER_ERRORS as e:
        print(f"widedeep {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"widedeep {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
