"""Benchmark of the rolling window: datagen time of day 8 with a 7-day window, with and without
tf.Transform's analyzer cache, against day 8 alone.

Eight days of simulated app-store logs; the cache of days 2-7 is filled first (as the daily
loop would have), then day 8's datagen is timed alone (window 1), with the cached window (reads
day 8 only) and with the uncached window (reads and analyses all seven days). All in one
process on the DirectRunner, each variant ``--rounds`` times, the fastest kept. Results go to
``bench/results/window.{json,md}``.

    python bench/window_bench.py [--rows-per-day 20000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, machine, python_cmd, run_child, write_results
from transform.config import load_config

DAYS = 8
WINDOW = 7
TARGET_CACHED_OVER_ALONE = 1.3


def main() -> None:
    from pipeline.datagen import WindowDay, run_datagen

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-day", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logs, out = WORK / "window_logs", WORK / "window_out"
    shutil.rmtree(logs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    run_child(
        python_cmd(
            "-m", "pipeline.cli", "simulate", "--out", str(logs),
            "--days", str(DAYS), "--rows-per-day", str(args.rows_per_day),
        )
    )  # fmt: skip
    config = load_config("app_store")
    day = {d: str(logs / f"day={d:03d}") for d in range(1, DAYS + 1)}
    key = {d: f"day-{d:03d}" for d in day}
    cache = out / "analyzer_cache"
    # The cache as the loop leaves it: each earlier day of the window analysed once.
    for d in range(DAYS - WINDOW + 1, DAYS):
        run_datagen(config, day[d], out / f"prime{d}", echo=None, cache_dir=cache, cache_key=key[d])
    window = [WindowDay(key[d], day[d]) for d in range(DAYS - WINDOW + 1, DAYS)]
    variants = {
        "alone": {},
        "cached": {"window": window, "cache_dir": cache, "cache_key": key[DAYS]},
        "uncached": {"window": window},
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    vocabularies = {}
    for r in range(args.rounds):
        for name, kwargs in variants.items():
            started = time.monotonic()
            result = run_datagen(
                config, day[DAYS], out / f"{name}{r}", echo=None, overwrite=True, **kwargs
            )
            seconds[name].append(time.monotonic() - started)
            vocabularies[name] = {k: v["size"] for k, v in result.summary["vocabularies"].items()}
    best = {name: min(s) for name, s in seconds.items()}
    ratio = best["cached"] / best["alone"]
    data = {
        "machine": machine(),
        "rows_per_day": args.rows_per_day,
        "day": DAYS,
        "window_days": WINDOW,
        "rounds": args.rounds,
        "seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()},
        "best_seconds": {name: round(x, 2) for name, x in best.items()},
        "cached_over_alone": round(ratio, 2),
        "uncached_over_alone": round(best["uncached"] / best["alone"], 2),
        "vocabulary_sizes": vocabularies,
        "target_cached_over_alone": TARGET_CACHED_OVER_ALONE,
        "meets_target": ratio <= TARGET_CACHED_OVER_ALONE,
    }
    m = data["machine"]
    sizes = ", ".join(f"{k} {v:,}" for k, v in vocabularies["cached"].items())
    alone_sizes = ", ".join(f"{k} {v:,}" for k, v in vocabularies["alone"].items())
    markdown = f"""\
| day {DAYS}'s datagen ({args.rows_per_day:,} simulated rows a day, DirectRunner, best of {args.rounds}) | seconds | / alone |
|---|---:|---:|
| day {DAYS} alone (window 1) | {best["alone"]:.1f} | 1.00 |
| {WINDOW}-day window, analyzer cache (reads day {DAYS} only) | {best["cached"]:.1f} | {ratio:.2f} (target <= {TARGET_CACHED_OVER_ALONE}) |
| {WINDOW}-day window, no cache (reads all {WINDOW} days) | {best["uncached"]:.1f} | {best["uncached"] / best["alone"]:.2f} |

Vocabulary sizes: window {sizes}; day {DAYS} alone {alone_sizes}.
Measured {m["date"]} on {m["cpus"]} cores, {m["memory_gib"]} GiB, Python {m["python"]}.
"""
    write_results("window", data, markdown)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
