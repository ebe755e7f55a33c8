"""Benchmark of data generation: rows per second and peak memory on 1M simulated rows.

Runs ``widedeep datagen`` on the DirectRunner over one simulated day, and beside it, in the
same run, a single-process pyarrow/numpy computation of the same vocabularies and quantile
boundaries: what the job would cost without Beam's portability (and without writing
anything). Results go to ``bench/results/datagen.{json,md}``.

    python bench/datagen_bench.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, python_cmd, run_child, write_results
from transform.config import Kind, load_config

TARGET_ROWS_PER_S = 15_000
TARGET_PEAK_GIB = 4.0


def reference_analysis(log_dir: Path) -> float:
    """Seconds a single pyarrow process takes for the same vocabularies and quantiles."""
    config = load_config("app_store")
    started = time.monotonic()
    files = sorted(log_dir.glob("day=*/*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=list(config.raw_columns)) for f in files)
    for _vocab, members in config.vocabularies.items():
        parts = []
        for f in members:
            col = table[f.column].combine_chunks()
            parts.append(col.flatten() if f.kind is Kind.CATEGORICAL_LIST else col)
        tokens = pa.chunked_array(parts) if len(parts) > 1 else parts[0]
        counts = pc.value_counts(tokens)
        kept = counts.filter(pc.greater_equal(counts.field("counts"), members[0].min_count))
        order = np.argsort(-kept.field("counts").to_numpy(), kind="stable")
        _ = kept.field("values").take(pa.array(order))
    for f in config.numeric_features:
        values = table[f.column].to_numpy().astype(np.float64)
        _ = np.quantile(values, np.linspace(0, 1, f.quantiles + 1)[1:-1])
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    logs, out = WORK / "datagen_logs", WORK / "datagen_out"
    shutil.rmtree(logs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    sim_s, _ = run_child(
        python_cmd(
            "-m",
            "pipeline.cli",
            "simulate",
            "--out",
            str(logs),
            "--days",
            "1",
            "--rows-per-day",
            str(args.rows),
        )
    )
    datagen_s, peak_gib = run_child(
        python_cmd(
            "-m",
            "pipeline.cli",
            "datagen",
            "--config",
            "app_store",
            "--input",
            str(logs),
            "--out",
            str(out),
            "--runner=DirectRunner",
        )
    )
    reference_s = reference_analysis(logs)
    rows_per_s = args.rows / datagen_s
    data = {
        "machine": machine(),
        "rows": args.rows,
        "simulate_seconds": round(sim_s, 1),
        "datagen_seconds": round(datagen_s, 1),
        "datagen_rows_per_second": round(rows_per_s),
        "datagen_peak_rss_gib": round(peak_gib, 2),
        "pyarrow_reference_seconds": round(reference_s, 2),
        "beam_over_reference": round(datagen_s / reference_s, 1),
        "targets": {"rows_per_second": TARGET_ROWS_PER_S, "peak_rss_gib": TARGET_PEAK_GIB},
        "meets_targets": rows_per_s >= TARGET_ROWS_PER_S and peak_gib < TARGET_PEAK_GIB,
    }
    m = data["machine"]
    markdown = f"""\
| measure ({args.rows:,} simulated rows, DirectRunner) | value | target |
|---|---|---|
| `widedeep datagen`, end to end (process start to summary) | {datagen_s:.1f} s | |
| rows per second | {rows_per_s:,.0f} | >= {TARGET_ROWS_PER_S:,} |
| peak memory (RSS) | {peak_gib:.2f} GiB | < {TARGET_PEAK_GIB:.0f} GiB |
| same vocabularies and quantiles, one pyarrow process, nothing written | {reference_s:.1f} s | |
| Beam + tf.Transform time / pyarrow time | {datagen_s / reference_s:.1f}x | |

Measured {m["date"]} on {m["cpus"]} cores, {m["memory_gib"]} GiB, Python {m["python"]}.
"""
    write_results("datagen", data, markdown)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
