"""The command line: help, errors as one line with exit status 2, and the stages it runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("simulate", "datagen", "train", "validate", "deploy", "serve", "query", "run"):
        assert verb in out


@pytest.mark.parametrize(
    "verb", ["simulate", "datagen", "train", "validate", "deploy", "serve", "query", "run"]
)
def test_each_verb_has_help_with_examples(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"widedeep {verb}" in out


def test_serve_help_lists_every_server_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from serving.server import build_parser

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    server_flags = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    assert len(server_flags) > 40  # each flag with dashes and as TF Serving spells it
    for flag in server_flags:
        assert flag in out, flag


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args, extra) -> int:
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(
        cli.VERBS, "simulate", dataclasses.replace(cli.VERBS["simulate"], run=broken)
    )
    assert main(["simulate", "--out", str(tmp_path)]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: an internal invariant broke" in err
    assert "this is a bug in widedeep" in err and "report it" in err


def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model_name: m\nlabel: y\nfeatures:\n  a: {kind: categorial}\n")
    code = main(
        [
            "datagen",
            "--config",
            str(config),
            "--input",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("widedeep datagen: error:") and "features.a.kind" in err


@pytest.mark.parametrize("verb", ["simulate", "datagen", "train", "run"])
def test_an_output_folder_with_a_wildcard_is_refused(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What datagen, train and run write is found again by file patterns, which a '[' in the
    folder's name would break after the work (an internal error at datagen's end)."""
    out = tmp_path / "run[1]"
    flags = {"datagen": ["--config", "movies", "--input", str(tmp_path)]}
    flags["train"] = ["--config", "movies", "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([verb, *flags.get(verb, []), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --out: '{out}': '[' and ']' would be read as wildcards" in err
    assert not out.exists()


def test_simulate_then_datagen_through_the_console_script(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it, on a tiny simulated day."""
    exe = Path(sys.executable).with_name("widedeep")
    logs, data = tmp_path / "logs", tmp_path / "data"
    # As a user's shell has it: TensorFlow's log level is the CLI's to choose.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    sim = subprocess.run(
        [str(exe), "simulate", "--out", str(logs), "--rows-per-day", "3000", "--seed", "1"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "simulate finished" in sim.stdout
    run = subprocess.run(
        [str(exe), "datagen", "--config", "app_store", "--input", str(logs), "--out", str(data)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "datagen finished" in run.stdout and "vocabularies" in run.stdout
    assert json.loads((data / "summary.json").read_text())["rows"] == 3000
    model = tmp_path / "model"
    run = subprocess.run(
        [
            str(exe),
            "train",
            "--config",
            "app_store",
            "--data",
            str(data),
            "--out",
            str(model),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "cuInit" not in run.stderr, run.stderr
    assert "eval        AUC" in run.stdout and (model / "export" / "saved_model.pb").exists()
    served = tmp_path / "serving_models"  # nothing deployed yet: said, not an error
    run = subprocess.run(
        [str(exe), "validate", "--model", str(model), "--data", str(data), "--skip-dry-run",
         "--models-dir", str(served)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "validate: PASSED" in run.stdout and (model / "verdict.json").exists()
    assert f"no version of 'app_ranker' in {served / 'app_ranker'}" in run.stderr, run.stderr
    # A second run into the same folder is refused and leaves it as it was.
    again = subprocess.run(
        [str(exe), "datagen", "--config", "app_store", "--input", str(logs), "--out", str(data)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert json.loads((data / "summary.json").read_text())["rows"] == 3000


def test_the_sample_query_fits_the_app_store_config() -> None:
    """The query file the README ranks: every feature a column of the config, and every
    column the model reads given, for the query or each candidate."""
    from transform.config import load_config
    from transform.examples import ExampleEncoder

    config = load_config("app_store")
    payload = json.loads((REPO / "examples" / "app_store_query.json").read_text())
    columns = {f.column for f in config.features}
    assert len(payload["candidates"]) > 1
    for candidate in payload["candidates"]:
        assert set(payload["query"]) | set(candidate) == columns
    examples = ExampleEncoder(config).encode_query(payload["query"], payload["candidates"])
    assert len(examples) == len(payload["candidates"])


def _readme_commands() -> list[list[str]]:
    """Every `widedeep ...` command of the README's shell blocks, as argument lists."""
    lines, block = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```sh", "```bash")
        elif block:
            lines.append(line)
    return _commands(lines)


def _commands(lines: list[str]) -> list[list[str]]:
    """The `widedeep ...` commands of shell lines (continued lines joined), as argument lists."""
    import shlex

    commands, pending = [], ""
    for line in lines:
        pending += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        try:
            words, pending = shlex.split(pending, comments=True), ""
        except ValueError:  # a quoted argument goes on on the next line (curl -d '{...')
            continue
        if "widedeep" in words:
            words = words[words.index("widedeep") + 1 :]
            for end in ("|", "&", "&&", ";"):
                words = words[: words.index(end)] if end in words else words
            commands.append([w for w in words if w != "&"])
    return commands


def test_every_documented_command_parses_as_written() -> None:
    """The README's commands, and each verb's own examples, are accepted by the command line
    they document."""
    commands = _readme_commands()
    assert len(commands) > 15
    for v in cli.VERBS.values():
        examples = _commands(v.examples.splitlines())
        assert examples and all(argv[0] == v.name for argv in examples), v.name
        commands += examples
    parser = cli.build_parser()
    for argv in commands:
        args, extra = parser.parse_known_args(argv)
        assert args.verb in cli.VERBS, argv
        assert not extra or cli.VERBS[args.verb].passes_on_unknown, (argv, extra)
