"""The config: presets load, round-trip, and every bad config is refused naming its key."""

from __future__ import annotations

import re
import textwrap

import pytest

from transform.config import (
    PRESETS,
    ConfigError,
    Kind,
    Tower,
    load_config,
    parse_config,
)

BASE = """
model_name: m
label: y
features:
  app: {kind: categorical, vocabulary: apps, towers: [wide, deep]}
  installed: {kind: categorical_list, vocabulary: apps}
  score: {kind: numeric, quantiles: 4}
crosses:
  installed_x_app: {features: [installed, app], hash_buckets: 100}
"""


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name: str) -> None:
    config = load_config(name)
    assert parse_config(config.to_yaml()) == config
    assert config.features and config.crosses


def test_app_store_preset_mirrors_the_paper() -> None:
    config = load_config("app_store")
    assert config.model.embedding_dim == 32
    assert config.model.hidden_units == (1024, 512, 256)
    assert config.model.wide_optimizer.name == "ftrl"
    assert config.model.wide_optimizer.l1_regularization > 0
    assert config.model.deep_optimizer.name == "adagrad"
    cross = config.crosses[0]
    assert set(cross.features) == {"installed_apps", "impression_app"}
    # The impression app and the installed apps share one id space.
    apps = config.vocabularies["apps"]
    assert {f.name for f in apps} == {"installed_apps", "impression_app"}
    assert config.feature("installed_apps").kind is Kind.CATEGORICAL_LIST


def test_defaults_and_derived_fields() -> None:
    config = parse_config(BASE)
    app = config.feature("app")
    assert app.column == "app" and app.vocabulary == "apps"
    assert app.towers == (Tower.WIDE, Tower.DEEP)
    assert config.feature("score").towers == (Tower.DEEP,)
    assert config.raw_columns == ("y", "app", "installed", "score")
    assert config.embedding_dim(app) == 32
    assert config.fingerprint() == parse_config(BASE).fingerprint()
    changed = parse_config(BASE.replace("quantiles: 4", "quantiles: 5"))
    assert changed.fingerprint() != config.fingerprint()


def test_a_single_tower_may_be_written_without_brackets() -> None:
    config = parse_config(BASE.replace("towers: [wide, deep]", "towers: wide"))
    assert config.feature("app").towers == (Tower.WIDE,)


BAD = [
    # (change to BASE, expected words in the message)
    (
        ("{kind: categorical, v", "{min_cout: 3, kind: categorical, v"),
        ["features.app.min_cout", "did you mean 'min_count'"],
    ),
    (("kind: numeric", "kind: numerical"), ["features.score.kind", "numerical"]),
    (
        ("[installed, app]", "[installed, score]"),
        ["crosses.installed_x_app.features[1]", "numeric"],
    ),
    (
        ("[installed, app]", "[installed, ap]"),
        ["crosses.installed_x_app.features[1]", "unknown feature 'ap'", "did you mean 'app'"],
    ),
    (("[installed, app]", "[installed]"), ["crosses.installed_x_app.features", "two"]),
    (("label: y", "label: app"), ["features.app", "label"]),
    (("quantiles: 4", "quantiles: 1"), ["features.score.quantiles"]),
    (("quantiles: 4", "quantiles: four"), ["features.score.quantiles", "integer"]),
    (("model_name: m", "model_name: my model"), ["model_name", "not a valid name"]),
    (("vocabulary: apps}", "vocabulary: apps, dtype: int}"), ["dtype", "shares vocabulary"]),
    (("towers: [wide, deep]", "towers: []"), ["features.app.towers"]),
    (("towers: [wide, deep]", "towers: [wide, tall]"), ["features.app.towers[1]", "tall"]),
    (
        ("vocabulary: apps}", "vocabulary: apps, embedding_dim: 8}"),
        ["features.installed.embedding_dim", "shares vocabulary 'apps'", "8, not 32"],
    ),
    (("label: y", "label: y\nitem: appp"), ["item", "unknown feature 'appp'", "'app'"]),
    (("label: y", "label: y\nitem: installed"), ["item", "categorical_list"]),
]


@pytest.mark.parametrize(("change", "words"), BAD, ids=[w[0] for _, w in BAD])
def test_bad_config_is_refused_naming_the_key(change: tuple[str, str], words: list[str]) -> None:
    old, new = change
    assert old in BASE
    with pytest.raises(ConfigError) as e:
        parse_config(BASE.replace(old, new, 1))
    for word in words:
        assert word in str(e.value)


def test_a_tower_with_no_features_is_refused() -> None:
    no_deep = (
        BASE.replace("vocabulary: apps}", "vocabulary: apps, towers: [wide]}")
        .replace("quantiles: 4}", "quantiles: 4, towers: [wide]}")
        .replace("towers: [wide, deep]", "towers: [wide]")
    )
    with pytest.raises(ConfigError, match=r"deep tower has no features"):
        parse_config(no_deep)
    no_wide = BASE.replace("towers: [wide, deep]", "towers: [deep]").split("crosses:")[0]
    with pytest.raises(ConfigError, match=r"wide tower has no features"):
        parse_config(no_wide)


def test_duplicate_keys_are_refused() -> None:
    text = BASE.replace("  score:", "  app: {kind: categorical}\n  score:")
    with pytest.raises(ConfigError, match=r"duplicate key 'app'"):
        parse_config(text)


def test_a_removed_setting_still_loads_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A config written when data.shard_rows existed (a model's saved config.yaml too) loads."""
    with caplog.at_level("WARNING", logger="transform.config"):
        config = parse_config(BASE + "data: {shard_rows: 200000, eval_fraction: 0.2}\n")
    assert config.data.eval_fraction == 0.2 and not hasattr(config.data, "shard_rows")
    assert "data.shard_rows is no longer a setting" in caplog.text
    assert "shard_rows" not in config.to_yaml()


def test_sections_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"model.hidden_units"):
        parse_config(BASE + "model: {hidden_units: []}\n")
    with pytest.raises(ConfigError, match=r"model.compute_dtype: expected one of auto, float32"):
        parse_config(BASE + "model: {compute_dtype: float16}\n")
    assert parse_config(BASE + "model: {compute_dtype: bfloat16}\n").model.compute_dtype == (
        "bfloat16"
    )
    with pytest.raises(ConfigError, match=r"model.wide_optimizer.name"):
        parse_config(BASE + "model: {wide_optimizer: {name: lbfgs, learning_rate: 0.1}}\n")
    with pytest.raises(ConfigError, match=r"data.eval_fraction"):
        parse_config(BASE + "data: {eval_fraction: 1.5}\n")
    with pytest.raises(ConfigError, match=r"training.batch_size"):
        parse_config(BASE + "training: {batch_size: 0}\n")
    with pytest.raises(ConfigError, match=r"training.bacth_size.*did you mean 'batch_size'"):
        parse_config(BASE + "training: {bacth_size: 10}\n")
    with pytest.raises(ConfigError, match=r"training.early_stopping.metric: expected one of auc"):
        parse_config(BASE + "training: {early_stopping: {metric: accuracy}}\n")
    with pytest.raises(ConfigError, match=r"training.early_stopping.patience: must be >= 0"):
        parse_config(BASE + "training: {early_stopping: {patience: -1}}\n")
    with pytest.raises(ConfigError, match=r"model.unknown_id_rate: expected a number in \[0, 1\)"):
        parse_config(BASE + "model: {unknown_id_rate: 1.0}\n")
    with pytest.raises(ConfigError, match=r"model.embedding_stddev: must be >= 0"):
        parse_config(BASE + "model: {embedding_stddev: -0.1}\n")


def test_the_item_is_named_or_inferred() -> None:
    # The single id that shares its vocabulary with a list: what users had vs were shown.
    assert parse_config(BASE).item_feature.name == "app"
    assert load_config("app_store").item_feature.name == "impression_app"
    assert load_config("movies").item_feature.name == "movie_id"
    no_list = BASE.replace("vocabulary: apps}", "vocabulary: other}")
    assert parse_config(no_list).item_feature is None
    named = parse_config(no_list.replace("label: y", "label: y\nitem: app"))
    assert named.item_feature.name == "app"


def test_optimizer_accumulators_default_by_optimizer() -> None:
    config = parse_config(BASE + "model: {deep_optimizer: {name: adagrad, learning_rate: 0.3}}\n")
    assert config.model.deep_optimizer.initial_accumulator == 0.001
    assert config.model.wide_optimizer.initial_accumulator == 0.1
    given = parse_config(
        BASE + "model: {deep_optimizer: {name: adagrad, learning_rate: 0.3, "
        "initial_accumulator_value: 0.2}}\n"
    )
    assert given.model.deep_optimizer.initial_accumulator == 0.2


def test_an_optimizer_given_in_part_keeps_its_other_defaults() -> None:
    model = parse_config(BASE + "model: {wide_optimizer: {learning_rate: 0.3}}\n").model
    # Changing FTRL's learning rate keeps the paper's L1 (and the name) rather than dropping it.
    assert (model.wide_optimizer.name, model.wide_optimizer.learning_rate) == ("ftrl", 0.3)
    assert model.wide_optimizer.l1_regularization == 0.001
    assert parse_config(BASE + "model: {wide_optimizer: {name: ftrl}}\n").model == (
        parse_config(BASE).model
    )
    # Another optimizer brings its own defaults, not the tower's.
    adam = parse_config(BASE + "model: {deep_optimizer: {name: adam}}\n").model.deep_optimizer
    assert (adam.learning_rate, adam.l1_regularization) == (0.001, 0.0)
    switched = parse_config(BASE + "model: {wide_optimizer: {name: adagrad}}\n").model
    assert switched.wide_optimizer.l1_regularization == 0.0
    assert switched.wide_optimizer.initial_accumulator == 0.001


def test_an_optimizer_refuses_settings_it_would_ignore() -> None:
    with pytest.raises(ConfigError, match=r"model.deep_optimizer.l1_regularization: only FTRL"):
        parse_config(BASE + "model: {deep_optimizer: {name: adagrad, l1_regularization: 0.1}}\n")
    with pytest.raises(
        ConfigError, match=r"model.deep_optimizer.initial_accumulator_value: only FTRL and AdaGrad"
    ):
        parse_config(
            BASE + "model: {deep_optimizer: {name: sgd, initial_accumulator_value: 0.1}}\n"
        )
    with pytest.raises(ConfigError, match=r"model.deep_optimizer.name: unknown optimizer 'lbfgs'"):
        parse_config(BASE + "model: {deep_optimizer: {name: lbfgs}}\n")


def test_missing_required_keys() -> None:
    with pytest.raises(ConfigError, match=r"^label: required"):
        parse_config("model_name: m\nfeatures: {a: {kind: categorical}}\n")
    with pytest.raises(ConfigError, match=r"^features: required"):
        parse_config("model_name: m\nlabel: y\n")
    with pytest.raises(ConfigError, match=r"features.a.kind: required"):
        parse_config("model_name: m\nlabel: y\nfeatures: {a: {towers: [deep]}}\n")


def test_load_config_names_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(BASE).replace("kind: numeric", "kind: number"))
    with pytest.raises(ConfigError, match=f"^{path}: features.score.kind"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("features: [unclosed")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("hash_buckets: 100", "hash_buckets: 1000000000000"), "crosses.installed_x_app.hash_buckets"),
        (("quantiles: 4}", "quantiles: 100000}"), "features.score.quantiles"),
        (("vocabulary: apps}", "vocabulary: apps, embedding_dim: 100000}"),
         "features.installed.embedding_dim"),
    ],
)  # fmt: skip
def test_sizes_that_decide_memory_are_bounded(change: tuple[str, str], key: str) -> None:
    old, new = change
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: [\d,]+ is more than the largest"):
        parse_config(BASE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=r"^model.hidden_units\[1\]: 1,000,000 is more than"):
        parse_config(BASE + "model: {hidden_units: [64, 1000000]}\n")
    with pytest.raises(ConfigError, match=r"^model.embedding_dim: 5,000 is more than"):
        parse_config(BASE + "model: {embedding_dim: 5000}\n")


def test_window_days_is_checked_on_load() -> None:
    assert parse_config(BASE).data.window_days == 1
    assert parse_config(BASE + "data: {window_days: 7}\n").data.window_days == 7
    for bad in ("0", "-2", "400", "1.5", "seven"):
        with pytest.raises(ConfigError, match=r"data.window_days"):
            parse_config(BASE + f"data: {{window_days: {bad}}}\n")
