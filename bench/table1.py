"""Table 1 of the paper on simulated data: offline AUC and online acquisition gain of the models.

Simulates a few days of the app store, runs datagen on all but the last, trains wide, deep and
wide & deep from the same config, scores the last day's logged rows offline and runs an A/B
test on the day after (see :mod:`tools.experiment`). Results go to
``bench/results/table1.{json,md,png}``.

    python bench/table1.py [--days 4] [--rows-per-day 350000] [--queries 40000] [--k 3 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from tools.experiment import (
    CONTROL,
    ORACLE,
    RANDOM,
    ExperimentResult,
    ExperimentSettings,
    run_experiment,
)
from transform.config import load_config

NAME = "table1"
LABELS = {
    "wide": "Wide (control)",
    "deep": "Deep",
    "wide_deep": "Wide & Deep",
    ORACLE: "Oracle (true probability)",
    RANDOM: "Random ranking",
}
PAPER = {  # Table 1 of Cheng et al. (2016): offline AUC, online acquisition gain
    "wide": ("0.726", "0%"),
    "deep": ("0.722", "+2.9%"),
    "wide_deep": ("0.728", "+3.9%"),
}


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.1%}"


def _ci(ci: tuple[float, float] | list[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def markdown(result: ExperimentResult, machine: dict[str, Any], minutes: float) -> str:
    """The results as Markdown: the table, the settings, the paper's numbers."""
    s = result.settings
    head = result.headline
    rows = []
    for arm in (*result.arms, ORACLE, RANDOM):
        o = head.arms[arm]
        off = result.offline.get(arm)
        auc = f"{off.auc:.4f}" if off else "0.5"
        query_auc = f"{off.query_auc:.4f}" if off else "0.5"
        loss = f"{off.log_loss:.4f}" if off else ""
        gain = "0% (control)" if arm == CONTROL else f"{_pct(o.gain)} {_ci(o.gain_ci)}"
        expected = "0%" if arm == CONTROL else f"{_pct(o.expected_gain)} {_ci(o.expected_gain_ci)}"
        rows.append(
            f"| {LABELS.get(arm, arm)} | {auc} | {query_auc} | {loss} | {gain} | {expected} | "
            f"{o.installs_per_query:.4f} | {o.installs_per_impression:.2%} |"
        )
    lines = []
    for k in s.top_k:
        outcome = result.online[k]
        cells = [
            f"{LABELS.get(a, a)} {_pct(o.gain)} {_ci(o.gain_ci)} (expected "
            f"{_pct(o.expected_gain)} {_ci(o.expected_gain_ci)})"
            for a, o in outcome.arms.items()
            if a in result.arms and a != CONTROL
        ]
        for name, c in outcome.comparisons.items():
            a, b = name.split("_vs_")
            cells.append(
                f"{LABELS.get(a, a)} over {LABELS.get(b, b)} {_pct(c.gain)} {_ci(c.gain_ci)} "
                f"(expected {_pct(c.expected_gain)} {_ci(c.expected_gain_ci)})"
            )
        lines.append(
            f"- top {k} shown: wide {outcome.arms[CONTROL].installs_per_query:.4f} installs a "
            f"query, oracle {outcome.arms[ORACLE].installs_per_query:.4f}; "
            + "; ".join(cells)
            + "."
        )
        shares = ", ".join(
            f"{LABELS.get(a, a)} {o.companion_share:.1%}" for a, o in outcome.arms.items()
        )
        lines.append(
            f"  Shown apps whose install a companion app of the user raises (a memorisation "
            f"pair): {shares}."
        )
    eval_split = ", ".join(
        f"{LABELS[a]} {result.offline[a].eval_split_auc:.4f}"
        for a in result.arms
        if result.offline[a].eval_split_auc is not None
    )
    paper = "\n".join(
        f"| {LABELS[a]} | {auc} | {gain} |" for a, (auc, gain) in PAPER.items() if a in result.arms
    )
    train_days = f"1-{result.offline_day - 1}" if result.offline_day > 2 else "1"
    secs = result.seconds
    train_s = sum(v for k, v in secs.items() if k.startswith("train_"))
    scoring_s = secs.get("offline_encode", 0) + secs.get("online_draw_encode", 0)
    scoring_s += secs.get("score", 0)
    return f"""\
| Model | Offline AUC | Offline AUC within queries | Offline log loss | Online acquisition gain (95% CI) | Expected gain (95% CI) | Installs / query | Installs / impression |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Offline: day {result.offline_day}'s {result.offline_rows:,} logged impressions (label rate \
{result.offline_label_rate:.4f}), a day no model was trained on, scored through each exported \
SavedModel; "within queries" is the mean AUC among each query's own candidates, the only order \
the ranking uses. Online: an A/B test on day {result.online_day}: {head.queries:,} queries, the \
same for every arm, {result.candidates_per_query:.1f} retrieved candidates a query on average; \
each arm shows its top {head.k} and each shown app is installed with the simulator's true \
probability, with the same uniform draw per (query, app) in every arm. Gains are relative to \
the wide model, with {s.confidence:.0%} paired-bootstrap intervals over queries \
({s.bootstrap_samples:,} resamples); "expected" is the gain in the sum of the shown apps' true \
probabilities (the installs without their Bernoulli noise).

{chr(10).join(lines)}

Settings: simulator seed {s.seed}, default world ({s.world.num_users:,} users, \
{s.world.num_apps:,} apps on day 1), {s.days} days x {s.rows_per_day:,} impressions; datagen \
and training on days {train_days} ({result.train_rows:,} train rows, {result.eval_rows:,} eval \
rows), each model trained once from the `{result.config_name}` preset with `--towers` as \
named. AUC on datagen's eval split of the training days: {eval_split}.

Paper (Table 1, Google Play, 3-week live A/B test):

| Model | Offline AUC | Online acquisition gain |
|---|---|---|
{paper}

Measured {machine["date"]} on {machine["cpus"]} cores, {machine["memory_gib"]} GiB, Python \
{machine["python"]}: {minutes:.1f} min in all (simulate {secs.get("simulate", 0):.0f} s, datagen \
{secs.get("datagen", 0):.0f} s, training {train_s:.0f} s, encoding and scoring {scoring_s:.0f} s, \
A/B analysis {secs.get("online", 0):.0f} s).
"""


def plot(result: ExperimentResult, path: Path) -> None:
    """Online gains of the models (left), installs per query of every arm (middle), offline
    AUC (right)."""
    from matplotlib.figure import Figure

    s = result.settings
    head = result.headline
    fig = Figure(figsize=(14, 4.8), dpi=100)
    gain_ax, rate_ax, auc_ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [4, 3, 3]})

    # Gains of the models over wide, realised (bars) and expected (diamonds), at each k.
    groups: list[tuple[str, dict[int, Any]]] = [
        (LABELS[a], {k: result.online[k].arms[a] for k in s.top_k})
        for a in result.arms
        if a != CONTROL
    ]
    for name, label in (("wide_deep_vs_deep", "Wide & Deep\nover Deep"),):
        if name in head.comparisons:
            groups.append((label, {k: result.online[k].comparisons[name] for k in s.top_k}))
    width = 0.8 / len(s.top_k)
    shades = ["#4c72b0", "#8fb0de", "#c9d8ee"]
    for j, k in enumerate(s.top_k):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        outs = [g[k] for _, g in groups]
        gains = [100 * o.gain for o in outs]
        err = [
            [100 * (o.gain - o.gain_ci[0]) for o in outs],
            [100 * (o.gain_ci[1] - o.gain) for o in outs],
        ]
        gain_ax.bar(
            xs, gains, width, yerr=err, capsize=4, color=shades[j % 3], label=f"top {k} shown"
        )
        gain_ax.plot(
            xs,
            [100 * o.expected_gain for o in outs],
            "D",
            color="black",
            markersize=4,
            label="expected (no install noise)" if j == 0 else None,
        )
    gain_ax.axhline(0, color="black", linewidth=0.8)
    gain_ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=9)
    gain_ax.set_ylabel("acquisition gain (%)")
    gain_ax.set_title(
        f"Online gain vs wide, day {result.online_day} ({head.queries:,} queries, "
        f"{s.confidence:.0%} CI)",
        fontsize=10,
    )
    gain_ax.legend(fontsize=8)

    arms = [RANDOM, *result.arms, ORACLE]
    rates = [head.arms[a].installs_per_query for a in arms]
    rate_ax.barh(
        range(len(arms)),
        rates,
        color=["#4c72b0" if a in result.arms else "#999999" for a in arms],
    )
    for i, v in enumerate(rates):
        rate_ax.annotate(f"{v:.3f}", (v, i), textcoords="offset points", xytext=(3, -3), fontsize=9)
    rate_ax.set_yticks(range(len(arms)), [LABELS[a] for a in arms], fontsize=9)
    rate_ax.set_xlim(0, max(rates) * 1.2)
    rate_ax.set_xlabel(f"installs per query (top {head.k} shown)")
    rate_ax.set_title("Acquisition rate, with the references", fontsize=10)

    scorers = [*result.arms, ORACLE]
    xs = range(len(scorers))
    for j, (attr, label, color) in enumerate(
        (("auc", "AUC", "#4c72b0"), ("query_auc", "AUC within queries", "#dd8452"))
    ):
        values = [getattr(result.offline[a], attr) for a in scorers]
        pos = [x - 0.2 + 0.4 * j for x in xs]
        auc_ax.bar(pos, values, 0.4, color=color, label=label)
        for x, v in zip(pos, values, strict=True):
            auc_ax.annotate(
                f"{v:.3f}",
                (x, v),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=7,
            )
    top = max(max(result.offline[a].auc, result.offline[a].query_auc) for a in scorers)
    auc_ax.set_ylim(0.5, min(1.0, top + 0.05))
    auc_ax.set_xticks(list(xs), [LABELS[a].replace(" (", "\n(") for a in scorers], fontsize=8)
    auc_ax.set_title(f"Offline: day {result.offline_day}'s logged impressions", fontsize=10)
    auc_ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Table 1 on the simulated app store: wide, deep and wide & deep", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def report(result: ExperimentResult, minutes: float) -> dict[str, Any]:
    """Writes ``table1.json``, ``table1.md`` and ``table1.png`` under ``bench/results``."""
    machine = common.machine()
    data = {"machine": machine, "minutes": round(minutes, 1), **result.to_dict()}
    common.write_results(NAME, data, markdown(result, machine, minutes))
    plot(result, common.RESULTS / f"{NAME}.png")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=4, help="days simulated (last: held out)")
    parser.add_argument("--rows-per-day", type=int, default=350_000)
    parser.add_argument("--queries", type=int, default=40_000, help="queries of the A/B test")
    parser.add_argument(
        "--k", type=int, nargs="+", default=[3, 1], help="apps shown (first: headline)"
    )
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="app_store")
    parser.add_argument("--work", type=Path, default=common.WORK / "table1")
    parser.add_argument(
        "--reuse", action="store_true", help="keep logs, data and models of the same settings"
    )
    args = parser.parse_args(argv)
    settings = ExperimentSettings(
        days=args.days,
        rows_per_day=args.rows_per_day,
        seed=args.seed,
        online_queries=args.queries,
        top_k=tuple(args.k),
        bootstrap_samples=args.bootstrap,
    )
    started = time.monotonic()
    result = run_experiment(
        args.work,
        load_config(args.config),
        settings,
        config_name=args.config,
        reuse=args.reuse,
        progress=lambda line: print(line, flush=True),
    )
    report(result, (time.monotonic() - started) / 60)


if __name__ == "__main__":
    main()
