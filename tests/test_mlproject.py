"""MLproject and the CLI define the same parameters with the same defaults."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from fer_mlflow.cli import cli

MLPROJECT = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
ENTRY_POINTS = MLPROJECT["entry_points"]


def as_text(value) -> str:
    """How MLflow passes a value on the command line: booleans as true/false."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_parameters_match_the_cli_options(name):
    entry = ENTRY_POINTS[name]
    command = cli.commands[name]
    options = {p.name: p for p in command.params if isinstance(p, click.Option) and not p.hidden}
    assert set(entry["parameters"]) == set(options), f"{name}: MLproject and CLI parameters differ"
    for param, spec in entry["parameters"].items():
        option = options[param]
        assert "default" in spec, f"{name}.{param} has no default in MLproject"
        # MLflow hands the default to the CLI as text: it must parse to the CLI's own default.
        context = click.Context(command)
        parsed = option.type_cast_value(context, as_text(spec["default"]))
        assert parsed == option.type_cast_value(context, option.default), f"{name}.{param}: MLproject {spec['default']!r} vs CLI {option.default!r}"
        assert f"{{{param}}}" in entry["command"], f"{name}: the command does not pass {param}"
        assert f"--{param.replace('_', '-')} {{{param}}}" in " ".join(entry["command"].split())


def test_every_cli_stage_has_an_entry_point():
    assert set(ENTRY_POINTS) == set(cli.commands)


def test_mlproject_names_the_conda_environment():
    assert MLPROJECT["conda_env"] == "conda.yaml"
    assert (Path(__file__).resolve().parents[1] / MLPROJECT["conda_env"]).exists()


def test_cli_defaults_are_the_stage_defaults():
    """A default is defined by the stage; the CLI (and so MLproject) repeats it and must agree."""
    import dataclasses
    import inspect

    from fer_mlflow.stages import evaluate, predict, promote, sweep, train

    context = click.Context(cli.commands["train"])
    for field in dataclasses.fields(train.TrainConfig):
        option = next(p for p in cli.commands["train"].params if p.name == field.name)
        assert option.type_cast_value(context, option.default) == field.default, field.name
    context = click.Context(cli.commands["sweep"])
    for field in dataclasses.fields(sweep.SweepConfig):
        option = next(p for p in cli.commands["sweep"].params if p.name == field.name)
        assert option.type_cast_value(context, option.default) == field.default, field.name
    for command, stage in (("evaluate", evaluate.run), ("promote", promote.run), ("predict", predict.run)):
        signature = inspect.signature(stage)
        context = click.Context(cli.commands[command])
        for option in cli.commands[command].params:
            if option.name in signature.parameters and option.name not in ("run_id", "data") and \
                    (command, option.name) != ("evaluate", "model_uri"):
                default = signature.parameters[option.name].default
                assert option.type_cast_value(context, option.default) == default, (command, option.name)


def test_the_conda_environment_pins_the_project_dependencies():
    """`mlflow run` with conda builds its environment from conda.yaml alone: every dependency of
    pyproject.toml must be there, at the same version, and the `spark` extra that `score` needs."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["spark"]
    conda = yaml.safe_load((root / "conda.yaml").read_text())["dependencies"]
    pip = next(entry["pip"] for entry in conda if isinstance(entry, dict))
    assert sorted(pip) == sorted(wanted)
