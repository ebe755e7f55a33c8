"""Validate, deploy, serve and query a trained model: the path from training to users.

Everything is real: a model trained on the movies log, a model server in its own process for
the dry run, the built-in server watching a base path, and the standard TF Serving client.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

from serving import tfserving
from serving.client import ClientSettings, RankingClient, ScoringError
from serving.release.deploy import LOCK_FILE, DeployError, deploy, rollback
from serving.release.server_client import ModelServerClient
from serving.release.validate import (
    ValidationError,
    read_raw_eval_examples,
    score_in_process,
    validate,
)
from serving.server import ModelServer, ServerSettings
from transform.artifacts import (
    WARMUP_DIR,
    check_models_dir,
    export_dir,
    model_server_config,
    versions,
)
from transform.errors import ArtifactError
from transform.paths import InUseError

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def config(movies_small_config):
    return movies_small_config


@pytest.fixture(scope="module")
def trained(movies_model: Path) -> Path:
    return movies_model


@pytest.fixture(scope="module")
def undertrained(movies_data: Path, config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.train import train

    out = tmp_path_factory.mktemp("model") / "bad"
    train(config, movies_data, out, towers="wide", max_steps=1, verbose=0)
    return out


@pytest.fixture(scope="module")
def validated(trained: Path, movies_data: Path, config) -> Path:
    verdict = validate(trained, movies_data, config)
    assert verdict.passed, verdict.reasons
    return trained


def test_verdict_holds_every_number(validated: Path) -> None:
    verdict = json.loads((validated / "verdict.json").read_text())
    assert verdict["passed"] and verdict["fingerprint"]
    dry = verdict["dry_run"]
    assert dry["warmup_requests"] >= 1 and dry["requests"] >= 1
    assert dry["max_score_difference"] <= 1e-4
    assert 0 < dry["p50_ms"] <= dry["p99_ms"]
    assert 0.5 < verdict["quality"]["auc"] <= 1.0
    assert verdict["baseline"] is None


def test_quality_check_fails_a_worse_model(
    undertrained: Path, trained: Path, movies_data: Path, config
) -> None:
    verdict = validate(undertrained, movies_data, config, baseline=trained, skip_dry_run=True)
    assert not verdict.passed
    assert any("worse than the baseline" in r for r in verdict.reasons)
    assert verdict.quality["baseline_auc"] > verdict.quality["auc"]
    with pytest.raises(DeployError, match="validation failed"):
        deploy(undertrained, movies_data.parent / "never", config.model_name)


def test_deploy_refuses_unvalidated_or_changed_models(
    validated: Path, tmp_path: Path, config
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(validated, copy)
    (copy / "verdict.json").unlink()
    with pytest.raises(DeployError, match="run 'widedeep validate'"):
        deploy(copy, tmp_path / "base", config.model_name)
    shutil.copy(validated / "verdict.json", copy / "verdict.json")
    _own_content(copy, "changed")
    with pytest.raises(DeployError, match="changed after it was validated"):
        deploy(copy, tmp_path / "base", config.model_name)
    assert versions(tmp_path / "base", config.model_name) == []


def test_deploy_serve_query_and_rollback(
    validated: Path, movies_data: Path, tmp_path: Path, config
) -> None:
    base = tmp_path / "base"
    first = deploy(validated, base, config.model_name)
    assert first.version == 1 and (base / config.model_name / "1" / "saved_model.pb").exists()
    settings = ServerSettings(
        model_name=config.model_name,
        model_base_path=str(base / config.model_name),
        port=0,
        file_system_poll_wait_seconds=0.2,
    )
    with ModelServer(settings) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        server.wait_until_available(config.model_name, 1, timeout=60)
        # Scores through gRPC equal the in-process ones, however the candidates are split.
        examples, _ = read_raw_eval_examples(movies_data, config.label, limit=120)
        expected = score_in_process(validated, examples)
        for batch_size, parallelism in ((120, 1), (25, 4), (7, 3)):
            client_settings = ClientSettings(batch_size=batch_size, parallelism=parallelism)
            with RankingClient(target, config.model_name, client_settings) as client:
                got = client.score_examples(examples)
            np.testing.assert_allclose(got, expected, atol=1e-5)
        # A query and its candidates, as a user sends them: ranked by score.
        query = {
            "user_id": 3,
            "occupation": "writer",
            "user_age": 31,
            "recent_movies": ["m1", "m2"],
        }
        candidates = [
            {
                "movie_id": f"m{i}",
                "genres": ["drama"],
                "release_year": 1990 + i,
                "popularity": 0.1 * i,
            }
            for i in range(30)
        ]
        with RankingClient(target, config.model_name, config=config) as client:
            ranked = client.rank(query, candidates)
        assert [r.rank for r in ranked] == list(range(1, 31))
        assert all(a.score >= b.score for a, b in itertools.pairwise(ranked))
        # A verdict made when nothing was served does not hold once version 1 is served.
        with pytest.raises(DeployError, match="no model was served"):
            deploy(validated, base, config.model_name)
        # The next model, validated against version 1, is deployed and confirmed, then
        # rolled back.
        model = tmp_path / "next"
        shutil.copytree(validated, model)
        verdict = validate(model, movies_data, config, models_dir=base, skip_dry_run=True)
        assert verdict.passed and verdict.baseline == str(base / config.model_name / "1")
        second = deploy(model, base, config.model_name, server=target, timeout_s=60)
        assert second.version == 2 and second.confirmed and second.previous == 1
        back = rollback(base, config.model_name, server=target, timeout_s=60)
        assert back.version == 1 and back.confirmed
        with ModelServerClient(target, config.model_name) as status:
            assert status.serving_version() == 1
        assert versions(base, config.model_name) == [1]
        # The rolled-back model comes back only on a verdict made after the rollback; a
        # third deploy never reuses the retired version's number.
        with pytest.raises(DeployError, match="rolled back at"):
            deploy(model, base, config.model_name)
        baselines = []

        def revalidate(baseline: Path | None) -> None:
            baselines.append(baseline)
            validate(model, movies_data, config, baseline=baseline, skip_dry_run=True)

        third = deploy(model, base, config.model_name, revalidate=revalidate)
        assert third.version == 3 and baselines == [base / config.model_name / "1"]
        with pytest.raises(ScoringError, match="NOT_FOUND"):
            RankingClient(target, "no_such_model").score_examples(examples[:2])


def test_rollback_needs_a_previous_version(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="needs a previous version"):
        rollback(tmp_path, "m")


def test_one_models_folder_is_refused_as_the_folder_of_every_model(
    validated: Path, movies_data: Path, tmp_path: Path, config
) -> None:
    base = tmp_path / "base"
    assert deploy(validated, base, config.model_name).version == 1
    own = base / config.model_name  # what serve --model-base-path takes
    expected = rf"holds version 1 of a model.*pass {re.escape(str(base))}$"
    with pytest.raises(ArtifactError, match=expected):
        deploy(validated, own, config.model_name)
    with pytest.raises(ArtifactError, match=expected):
        rollback(own, config.model_name)
    with pytest.raises(ArtifactError, match=expected):
        validate(validated, movies_data, config, models_dir=own, skip_dry_run=True)
    # Nothing was written where no server would look, and the served version is untouched.
    assert not (own / config.model_name).exists()
    assert versions(base, config.model_name) == [1]
    # A folder of every model that holds this model, or none yet, is what it should be.
    check_models_dir(base, config.model_name)
    check_models_dir(tmp_path / "empty", config.model_name)


# --------------------------------------------------------------------------------------------
# The real binary's command line (docker/ itself: test_docker.py).


def test_serve_generates_a_config_file_for_the_real_binary(tmp_path: Path) -> None:
    argv = tfserving.binary_argv(
        "/usr/bin/tensorflow_model_server",
        ["--port=8500", "--model_name", "m", "--model_base_path", str(tmp_path)],
    )
    assert argv[:2] == ["/usr/bin/tensorflow_model_server", "--port=8500"]
    config_flag = next(a for a in argv if a.startswith("--model_config_file="))
    parsed = tfserving.read_model_config_file(config_flag.split("=", 1)[1])
    assert parsed == model_server_config("m", str(tmp_path), num_versions=1)


def test_the_image_copies_every_package_the_distribution_installs() -> None:
    """What `pip install .` installs in the image is what pyproject.toml packages: a package
    added to the distribution and not copied into the image would be missing from it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packaged = {p.rstrip("*") for p in patterns}
    assert packaged == {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    copied = {
        line.split()[1]
        for line in (DOCKER / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert packaged <= copied


# --------------------------------------------------------------------------------------------
# Deploys at once, killed deploys, verdicts that no longer hold


@pytest.fixture()
def served_base(validated: Path, tmp_path: Path, config) -> Path:
    """A base path serving version 1 (the validated model)."""
    base = tmp_path / "base"
    deploy(validated, base, config.model_name)
    return base


def _own_content(model: Path, note: str) -> None:
    """Gives a model folder content of its own (a note beside the export's warm-up requests):
    the same weights, another fingerprint, so a verdict or a deploy tells it apart."""
    (export_dir(model) / WARMUP_DIR / "note.txt").write_text(note)


def _validated_copy(
    validated: Path, folder: Path, movies_data: Path, config, base: Path | None
) -> Path:
    shutil.copytree(validated, folder)
    _own_content(folder, folder.name)
    verdict = validate(folder, movies_data, config, models_dir=base, skip_dry_run=True)
    assert verdict.passed, verdict.reasons
    return folder


def _deploy_at(
    start: threading.Barrier, outcomes: list, model: Path, base: Path, name: str, wait: bool
) -> None:
    """Deploy once every thread is ready; the version, or the error, goes to `outcomes`."""
    start.wait(60)
    try:
        outcomes.append(deploy(model, base, name, wait=wait).version)
    except (DeployError, InUseError) as error:
        outcomes.append(error)


@pytest.mark.timeout(300)
def test_two_deploys_at_once_get_one_version_each_or_a_clear_error(
    validated: Path, served_base: Path, movies_data: Path, tmp_path: Path, config
) -> None:
    models = [
        _validated_copy(validated, tmp_path / f"m{i}", movies_data, config, served_base)
        for i in range(2)
    ]
    for wait in (True, False):
        start = threading.Barrier(2)
        outcomes: list[object] = []
        threads = [
            threading.Thread(
                target=_deploy_at, args=(start, outcomes, m, served_base, config.model_name, wait)
            )
            for m in models
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        deployed = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if not isinstance(o, int)]
        # Both were validated against the same served version: once one is deployed, the
        # other's verdict no longer holds (or it found the base path busy).
        assert len(deployed) == 1 and len(refused) == 1, outcomes
        assert re.search(
            r"is served now|is in use by (PID \d+|another process)", str(refused[0])
        ), refused
        assert versions(served_base, config.model_name)[-1] == deployed[0]
        # The next round compares with the version now served, with models that differ from
        # it: a verdict made against a model identical to the one served holds after a
        # redeploy of that same model (the fingerprints agree), so both could then deploy.
        for model in models:
            _own_content(model, f"{model.name} after {deployed[0]}")
            verdict = validate(
                model, movies_data, config, models_dir=served_base, skip_dry_run=True
            )
            assert verdict.passed
    assert versions(served_base, config.model_name) == [1, 2, 3]
    assert not list((served_base / config.model_name).glob(".staging-*"))


@pytest.mark.timeout(300)
def test_deploy_while_another_holds_the_base_path_and_after_one_was_killed(
    validated: Path, served_base: Path, movies_data: Path, tmp_path: Path, config
) -> None:
    from transform.paths import locked

    model = _validated_copy(validated, tmp_path / "next", movies_data, config, served_base)
    folder = served_base / config.model_name
    # A deploy killed while copying left its staging folder; the next deploy removes it.
    (folder / ".staging-2-99999").mkdir()
    (folder / ".staging-2-99999" / "half").write_bytes(b"half a model")
    with locked(folder / LOCK_FILE, "the model base path"):
        with pytest.raises(InUseError, match=rf"is in use by PID {os.getpid()}.*--wait"):
            deploy(model, served_base, config.model_name)
        assert (folder / ".staging-2-99999").exists()
    assert deploy(model, served_base, config.model_name).version == 2
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "1", "2"]


@pytest.mark.timeout(300)
def test_a_verdict_against_another_model_than_the_served_one_is_refused(
    validated: Path, served_base: Path, movies_data: Path, trained: Path, tmp_path: Path, config
) -> None:
    model = tmp_path / "next"
    shutil.copytree(validated, model)
    other = tmp_path / "other_baseline"
    shutil.copytree(validated, other)
    _own_content(other, "another model")
    assert validate(model, movies_data, config, baseline=other, skip_dry_run=True).passed
    with pytest.raises(DeployError, match=r"compared it with .*other_baseline.*is served now"):
        deploy(model, served_base, config.model_name)
    assert versions(served_base, config.model_name) == [1]
    # Compared with a copy of the served model (same fingerprint), it holds.
    same = tmp_path / "same_as_served"
    shutil.copytree(validated, same)
    assert validate(model, movies_data, config, baseline=same, skip_dry_run=True).passed
    assert deploy(model, served_base, config.model_name).version == 2


def test_the_gate_fails_a_model_that_ranks_worse_than_popularity(
    undertrained: Path, trained: Path, movies_data: Path, config
) -> None:
    """Item popularity from the training split is the least a model must beat."""
    verdict = validate(undertrained, movies_data, config, skip_dry_run=True)
    pop = verdict.quality["popularity"]
    assert pop["item"] == "movie_id"
    assert not verdict.passed
    assert any("does not beat item popularity" in r for r in verdict.reasons), verdict.reasons
    assert verdict.quality["auc"] <= pop["auc"]
    # The popularity AUC is that of each eval row's movie like rate in the train split.
    examples, labels = read_raw_eval_examples(movies_data, config.label)
    movie = [_raw_value(e, "movie_id") for e in examples]
    train_movies, train_labels = _train_rows(movies_data)
    rate = train_labels.mean()
    prior = 10.0
    stats: dict[str, list[float]] = {}
    for m, y in zip(train_movies, train_labels, strict=True):
        stats.setdefault(m, [0.0, 0.0])
        stats[m][0] += y
        stats[m][1] += 1
    scores = np.array(
        [
            (stats[m][0] + prior * rate) / (stats[m][1] + prior) if m in stats else rate
            for m in movie
        ]
    )
    from transform.metrics import auc

    assert pop["auc"] == pytest.approx(auc(labels, scores), abs=1e-9)
    # A model that learned something beats it: the gate does not fail every model.
    assert validate(trained, movies_data, config, skip_dry_run=True).passed


def test_the_gate_fails_a_model_no_better_than_chance_and_refuses_data_it_cannot_read(
    tmp_path: Path,
) -> None:
    """No item (so no popularity) and no baseline: a model that ranks the eval rows worse than
    a random order still fails. Trained where a high price means a purchase, it is judged on
    a log where a low one does."""
    import pyarrow as pa

    from pipeline.datagen import run_datagen
    from tests import logs
    from trainer.train import train
    from transform.config import parse_config

    config = parse_config(
        "model_name: shop\nlabel: bought\n"
        "features:\n  shop: {kind: categorical, towers: [wide]}\n"
        "  price: {kind: numeric, quantiles: 4, towers: [wide, deep]}\n"
        "model: {hidden_units: [8], embedding_dim: 4}\ntraining: {epochs: 2, batch_size: 64}\n"
    )
    rng = np.random.default_rng(0)
    price = rng.random(2000) * 10
    data = {}
    for name, bought in (("high", price > 5), ("low", price <= 5)):
        table = pa.table({"shop": ["s"] * 2000, "price": price, "bought": bought.astype(int)})
        log = logs.write_parquet(table, tmp_path / f"log_{name}", shards=1)
        data[name] = tmp_path / f"data_{name}"
        run_datagen(config, str(log), data[name], echo=None)
    train(config, data["high"], tmp_path / "model", verbose=0)
    verdict = validate(tmp_path / "model", data["low"], config, skip_dry_run=True)
    assert verdict.quality["popularity"] is None and verdict.baseline is None
    assert verdict.quality["auc"] < 0.5 and not verdict.passed
    assert any("does not beat chance (0.5)" in r for r in verdict.reasons), verdict.reasons
    # Eval examples made with a config that reads no price cannot be scored by this model.
    shop_only = dataclasses.replace(
        config, features=tuple(f for f in config.features if f.name != "price")
    )
    run_datagen(shop_only, str(tmp_path / "log_high"), tmp_path / "data_shop", echo=None)
    with pytest.raises(ValidationError, match=r"data_shop: its examples have no column 'price'"):
        validate(tmp_path / "model", tmp_path / "data_shop", config, skip_dry_run=True)


def _raw_value(serialized: bytes, name: str) -> str:
    import tensorflow as tf

    return (
        tf.train.Example.FromString(serialized).features.feature[name].bytes_list.value[0].decode()
    )


def _train_rows(data_dir: Path) -> tuple[list[str], np.ndarray]:
    """The train split's movie tokens and labels, read back through the vocabulary."""
    import tensorflow_transform as tft

    from trainer import data as data_lib

    tft_output = tft.TFTransformOutput(str(data_dir))
    spec = tft_output.transformed_feature_spec()
    vocab = [t.decode() for t in tft_output.vocabulary_by_name("movies")]
    files = sorted(str(p) for p in (data_dir / "train").glob("part-*"))
    wanted = {"movie_id": spec["movie_id"], "liked": spec["liked"]}
    movies: list[str] = []
    labels = []
    for features, y in data_lib.eval_dataset(files, wanted, "liked", 4096):
        movies += [vocab[i] if i < len(vocab) else "<oov>" for i in features["movie_id"].numpy()]
        labels.append(y.numpy().ravel())
    return movies, np.concatenate(labels)
