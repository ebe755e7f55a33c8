"""What slices add to the quality gate's time: ``validate`` without slices and with four.

One simulated day (300,000 rows by default) through datagen and training (``--epochs``
passes), then the same model validated on the same eval split, against itself as the baseline
(the baseline is scored as in a daily run), alternately without ``validation.slices`` and with
four (country, device, whether the impression app is in the training vocabulary, buckets of
the installed apps' count), for several rounds; the median of each is compared. The dry run is
skipped (``--skip-dry-run``): it starts a model server in a process of its own and its time
varies by more than the whole analysis takes; ``--dry-run`` includes it.

    python bench/slices_bench.py [--rows 300000] [--rounds 5] [--dry-run]

Writes ``bench/results/slices.{md,json}``; the data and model are kept in
``bench/out/slices/`` and reused by a later run with the same ``--rows``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, python_cmd, run_child, write_results

SLICES = [
    "country",
    "device",
    {"column": "impression_app", "kind": "in_vocabulary"},
    "installed_apps",
]
TARGET = 1.2


def prepare(rows: int, epochs: int) -> tuple[Path, Path]:
    """The day's datagen output and a model trained on it (made once per ``rows``)."""
    out = WORK / "slices"
    stamp = out / "rows.json"
    data, model = out / "data", out / "model"
    made = stamp.exists() and json.loads(stamp.read_text()) == {"rows": rows, "epochs": epochs}
    if made and (model / "metrics.json").exists():
        return data, model
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cli = ("-m", "pipeline.cli")
    run_child(python_cmd(*cli, "simulate", "--out", str(out / "logs"), "--rows-per-day", str(rows)))
    run_child(
        python_cmd(*cli, "datagen", "--config", "app_store", "--input",
                   str(out / "logs" / "day=001"), "--out", str(data))
    )  # fmt: skip
    run_child(
        python_cmd(*cli, "train", "--config", "app_store", "--data", str(data), "--out",
                   str(model), "--epochs", str(epochs), "--quiet")
    )  # fmt: skip
    stamp.write_text(json.dumps({"rows": rows, "epochs": epochs}))
    return data, model


def time_analysis(model: Path, data: Path, variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds of the analysis step alone (and its report), for each config, on the
    scores of one model and its baseline (itself) computed once."""
    import tempfile

    from serving.release import analysis
    from serving.release.validate import (
        item_popularity,
        read_raw_eval_examples,
        score_in_process,
        validate,
    )

    config = next(iter(variants.values()))
    examples, labels = read_raw_eval_examples(data, config.label)
    scores = score_in_process(model, examples)
    base = score_in_process(model, examples)
    popularity = item_popularity(data, config, examples)["scores"]
    verdict = validate(model, data, config, baseline=model, skip_dry_run=True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                started = time.perf_counter()
                result = analysis.analyse(
                    variants[name], data, examples, labels, scores, base, popularity
                )
                Path(tmp, "analysis.md").write_text(analysis.markdown(verdict, result))
                analysis.plot(result, Path(tmp, "analysis.png"), True)
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="include the dry run")
    args = parser.parse_args()
    data, model = prepare(args.rows, args.epochs)

    from serving.release.validate import validate
    from transform.config import load_config, parse_config

    plain = load_config("app_store")  # the config the model was trained with, as it is now
    spec = plain.to_dict()
    spec["validation"]["slices"] = SLICES
    sliced = parse_config(spec)
    variants = {"without slices": plain, "with 4 slices": sliced}
    skip = not args.dry_run
    validate(model, data, plain, baseline=model, skip_dry_run=skip)  # warm caches and imports
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    verdicts = {}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]  # alternate the order
        for name in names:
            started = time.perf_counter()
            verdicts[name] = validate(
                model, data, variants[name], baseline=model, skip_dry_run=skip
            )
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    ratio = median["with 4 slices"] / median["without slices"]
    analysis_seconds = time_analysis(model, data, variants, args.rounds * 2)
    extra = analysis_seconds["with 4 slices"] - analysis_seconds["without slices"]
    v = verdicts["with 4 slices"]
    cal = v.analysis["calibration"]
    slices = [
        {
            "slice": row["slice"],
            "rows": row["rows"],
            "auc": (row["model"] or {}).get("auc"),
            "calibration": (row["model"] or {}).get("calibration"),
            "judged": row["judged"],
        }
        for row in v.analysis["slices"]
    ]
    results = {
        "machine": machine(),
        "rows": args.rows,
        "eval_rows": v.quality["examples"],
        "epochs": args.epochs,
        "rounds": args.rounds,
        "dry_run": args.dry_run,
        "bootstrap_resamples": sliced.validation.bootstrap_resamples,
        "slice_specs": SLICES,
        "slices": len(v.analysis["slices"]) - 1,
        "seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "median_seconds": {name: round(x, 3) for name, x in median.items()},
        "with_over_without": round(ratio, 3),
        "analysis_median_seconds": {k: round(x, 4) for k, x in analysis_seconds.items()},
        "slices_extra_seconds": round(extra, 4),
        "slices_extra_over_gate": round(extra / median["without slices"], 4),
        "target": TARGET,
        "met": ratio <= TARGET,
        "passed": {name: verdicts[name].passed for name in variants},
        "eval_auc": v.quality["auc"],
        "ece": cal["ece"],
        "ece_interval": cal["ece_interval"],
        "mean_prediction_over_label_rate": cal["ratio"],
        "ratio_interval": cal["ratio_interval"],
        "slice_table": slices,
    }
    dry = "with the dry run" if args.dry_run else "dry run skipped (`--skip-dry-run`)"
    md = [
        "### Slices in the quality gate (`bench/slices_bench.py`)",
        "",
        f"`validate` of one model on one simulated day ({args.rows:,} rows, "
        f"{results['eval_rows']:,} eval rows; model trained {args.epochs} epochs at most), "
        f"against itself as the baseline, {dry}; {args.rounds} alternating rounds, median; "
        f"{results['bootstrap_resamples']} bootstrap resamples:",
        "",
        "| validate | median seconds | rounds (s) |",
        "|---|---:|---|",
    ]
    for name in variants:
        md.append(
            f"| {name} | {median[name]:.2f} | {', '.join(f'{x:.2f}' for x in seconds[name])} |"
        )
    md += [
        "",
        f"With 4 slices ({results['slices']} slices in all) / without: **{ratio:.3f}x** "
        f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'not met'}). Both include the "
        "calibration check and the report (analysis.md, analysis.png).",
        "",
        "The analysis alone (bootstrap, slices, calibration, Markdown and PNG; the same scores, "
        f"{args.rounds * 2} alternating rounds, median): "
        + ", ".join(f"{n} {x:.3f} s" for n, x in analysis_seconds.items())
        + f"; the 4 slices add {extra:.3f} s, {100 * extra / median['without slices']:.1f}% of "
        "the gate's median time without them.",
        "",
        f"Calibration of this model: ECE {cal['ece']:.4f} (95% interval "
        f"{cal['ece_interval'][0]:.4f} to {cal['ece_interval'][1]:.4f}), mean prediction / "
        f"label rate {cal['ratio']:.3f} ({cal['ratio_interval'][0]:.3f} to "
        f"{cal['ratio_interval'][1]:.3f}); eval AUC {v.quality['auc']:.4f}; verdicts: "
        + ", ".join(f"{n} {'passed' if verdicts[n].passed else 'FAILED'}" for n in variants),
    ]
    write_results("slices", results, "\n".join(md))


if __name__ == "__main__":
    main()
