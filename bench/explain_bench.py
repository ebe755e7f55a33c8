"""Benchmark of ``widedeep explain`` on one simulated day.

Builds (once, cached under ``bench/out/explain/<rows>/``) a day of simulated app-store logs,
its datagen output and a wide & deep model trained for one epoch, then times, each as a child
process of the ``widedeep`` CLI:

1. ``widedeep explain --model M --top 100``: the wide tower's 100 largest weights mapped back
   to raw values, the hashed cross ids by a pass over the raw log (``--sample-rows`` default);
2. the same with one query explained in process (``--query examples/app_store_query.json``)
   and the deep tower's neighbours of one app (``--neighbours``).

The target: the first under a minute on a day of 1M rows. Results go to
``bench/results/explain.{json,md}``; the text output of the second run is kept beside them as
``bench/results/explain_output.txt``.

    python bench/explain_bench.py [--rows-per-day 1000000] [--build-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, WORK, machine, python_cmd, run_child, write_results

TARGET_SECONDS = 60.0
"""``widedeep explain`` of the top 100 wide weights on a day of 1M rows."""
CONFIG_NAME = "app_store"
ROOT = Path(__file__).resolve().parent.parent
QUERY = ROOT / "examples" / "app_store_query.json"


def cli(*args: str) -> list[str]:
    """The ``widedeep`` CLI of this checkout, as a child command."""
    return python_cmd("-m", "pipeline.cli", *args)


def build(rows: int, seed: int) -> Path:
    """Simulated logs, datagen output and a one-epoch model under bench/out; reused if there."""
    import subprocess

    base = WORK / "explain" / str(rows)
    logs, data, model = base / "logs", base / "data", base / "model"
    steps = [
        (logs / "simulation.json", cli("simulate", "--out", str(logs), "--days", "1",
                                       "--rows-per-day", str(rows), "--seed", str(seed))),
        (data / "summary.json", cli("datagen", "--config", CONFIG_NAME, "--input", str(logs),
                                    "--out", str(data), "--overwrite")),
        (model / "export" / "saved_model.pb", cli("train", "--config", CONFIG_NAME, "--data",
                                                  str(data), "--out", str(model), "--epochs",
                                                  "1", "--quiet", "--overwrite")),
    ]  # fmt: skip
    for done, argv in steps:
        if done.exists():
            continue
        started = time.monotonic()
        print("$", " ".join(argv[2:]), flush=True)
        subprocess.run(argv, check=True, cwd=ROOT)
        print(f"  {time.monotonic() - started:.0f} s", flush=True)
    return model


def timed(argv: list[str], output: Path) -> float:
    """Runs one explain command, its standard output into ``output``; its wall time."""
    import subprocess

    started = time.monotonic()
    with output.open("w") as out:
        subprocess.run(argv, check=True, cwd=ROOT, stdout=out)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-per-day", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-only", action="store_true", help="only build the model")
    args = parser.parse_args()
    model = build(args.rows_per_day, args.seed)
    if args.build_only:
        return
    base = model.parent
    load_before = os.getloadavg()[0]
    top_json = base / "explain_top100.json"
    seconds_top = timed(cli("explain", "--model", str(model), "--top", "100", "--json"), top_json)
    report = json.loads(top_json.read_text())
    first_app = next(
        (w["value"] for w in report["wide"]["top"] if w["feature"] == "impression_app"), None
    )
    text_out = base / "explain_query.txt"
    argv = cli("explain", "--model", str(model), "--top", "20", "--query", str(QUERY))
    if first_app:
        argv += ["--neighbours", f"impression_app={first_app}"]
    seconds_query = timed(argv, text_out)
    # Peak memory of one more run of the first command (the only child measured this way).
    quiet = shlex.join(cli("explain", "--model", str(model), "--top", "100", "--json"))
    _, peak_gib = run_child(["sh", "-c", f"{quiet} > /dev/null"])
    load_after = os.getloadavg()[0]
    crosses: dict[str, Any] = report["wide"].get("crosses", {})
    data = {
        "machine": machine(),
        "rows_per_day": args.rows_per_day,
        "target_seconds": TARGET_SECONDS,
        "explain_top100_seconds": round(seconds_top, 1),
        "explain_query_seconds": round(seconds_query, 1),
        "explain_top100_peak_rss_gib": round(peak_gib, 2),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "crosses": crosses,
        "met": seconds_top < TARGET_SECONDS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Paths relative to the checkout, as the README quotes them.
    (RESULTS / "explain_output.txt").write_text(text_out.read_text().replace(f"{ROOT}/", ""))
    lines = [
        "# widedeep explain",
        "",
        f"One simulated day of {args.rows_per_day:,} impressions (app_store config), "
        "datagen, one epoch of training; each command timed as a child process "
        f"({data['machine']['cpus']} CPUs, shared: 1-minute load average {load_before:.1f} "
        f"before, {load_after:.1f} after).",
        "",
        "| command | wall time | target |",
        "|---|---|---|",
        f"| `explain --top 100` | {seconds_top:.1f} s (peak RSS {peak_gib:.2f} GiB) "
        f"| < {TARGET_SECONDS:.0f} s: {'met' if data['met'] else 'NOT met'} |",
        f"| `explain --top 20 --query ... --neighbours ...` | {seconds_query:.1f} s | |",
        "",
        "Cross-id mapping pass:",
        "",
        "| cross | rows read | pairs | buckets used | distinct pairs | buckets with a collision |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in crosses.items():
        lines.append(
            f"| {name} | {c['rows_read']:,} | {c['pairs']:,} | {c['buckets_used']:,} | "
            f"{c['distinct_tuples']:,} | {c['colliding_buckets']:,} "
            f"({100 * c['colliding_share']:.1f}%) |"
        )
    write_results("explain", data, "\n".join(lines))


if __name__ == "__main__":
    main()
