"""The memory a model takes to train: estimated from its spec, and refused when it cannot fit."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import memory
from trainer.errors import TrainError
from trainer.spec import Towers, build_model_spec
from trainer.train import train
from transform.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("towers", list(Towers))
def test_the_estimate_counts_every_weight_of_the_model(
    movies_data: Path, movies_small_config, towers: Towers
) -> None:
    import tensorflow_transform as tft

    from trainer.model import WideDeepModel

    spec = build_model_spec(movies_small_config, tft.TFTransformOutput(str(movies_data)), towers)
    estimate = memory.estimate(spec, movies_small_config)
    model = WideDeepModel(spec)
    assert estimate.parameters == sum(int(v.shape.num_elements()) for v in model.weights)
    # Weights, their optimizer slots and two copies, four bytes each.
    assert estimate.total > estimate.parameters * 4 * 3


def test_a_model_that_cannot_fit_is_refused_naming_the_key() -> None:
    estimate = memory.MemoryEstimate(
        (
            memory.Part("crosses.x.hash_buckets", "wide weights of 10 buckets", 10, 200),
            memory.Part("model.hidden_units", "ReLU layers", 5, 100),
        ),
        activations=50,
    )
    memory.check_fits(estimate, available=350)
    with pytest.raises(TrainError, match=r"^crosses\.x\.hash_buckets: the model needs about 350 B"):
        memory.check_fits(estimate, available=349)


@pytest.mark.timeout(300)
def test_train_refuses_a_model_larger_than_memory_before_building_it(
    movies_data: Path, movies_small_config, tmp_path: Path
) -> None:
    # Three layers of 65,536 units: 8.6 billion weights, over 100 GiB with their slots.
    model = dataclasses.replace(movies_small_config.model, hidden_units=(65_536,) * 3)
    config = dataclasses.replace(movies_small_config, model=model)
    with pytest.raises(TrainError) as caught:
        train(config, movies_data, tmp_path / "huge", verbose=0)
    message = str(caught.value)
    assert message.startswith("model.hidden_units: the model needs about")
    assert "more than the" in message and "available" in message
    assert not (tmp_path / "huge").exists()


def test_a_trillion_hash_buckets_is_one_line_at_config_load(tmp_path: Path) -> None:
    config = tmp_path / "huge.yaml"
    text = (
        load_config("movies")
        .to_yaml()
        .replace("hash_buckets: 50000", "hash_buckets: 1000000000000")
    )
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config),
         "--data", str(tmp_path / "data"), "--out", str(tmp_path / "model")],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "crosses.recent_x_movie.hash_buckets: 1,000,000,000,000 is more than the largest"
        in (lines[0])
    )


@pytest.mark.timeout(300)
def test_overwrite_keeps_the_finished_model_until_the_new_export_is_complete(
    movies_model: Path, movies_data: Path, movies_small_config, tmp_path: Path, capsys
) -> None:
    from serving.release.deploy import fingerprint

    out = tmp_path / "model"
    shutil.copytree(movies_model, out)
    before = fingerprint(out)
    seen = []

    class Probe:
        """Looks at the folder while the new model trains."""

        def set_model(self, model: object) -> None:
            pass

        def on_train_begin(self) -> None:
            seen.append(fingerprint(out))

        def on_train_batch_end(self, step: int, logs: dict) -> None:
            pass

        def on_train_end(self) -> None:
            pass

    result = train(
        movies_small_config,
        movies_data,
        out,
        overwrite=True,
        max_steps=2,
        callbacks=[Probe()],
        verbose=1,
    )
    assert seen == [before]  # the finished model was still there while training
    assert result.export_dir == out / "export" and fingerprint(out) != before
    assert not (out / "export.partial").exists() and not (out / "export.previous").exists()
    printed = capsys.readouterr().out
    assert "training needs about" in printed and "available" in printed
