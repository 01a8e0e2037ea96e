"""The search space of a sweep: what it searches per model, a YAML file that replaces it, and
Optuna distributions checked the way `train` checks its options.

A space is ``{train parameter: spec}``, a spec ``{low, high[, log, step]}`` or ``{choices: [...]}``,
the form both the built-in spaces below and a user's YAML file take.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Callable

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from fer_mlflow.learning import models
from fer_mlflow.errors import ConfigError
from fer_mlflow.learning.config import TrainConfig

# How a value of train parameter `name` is parsed and checked: the parsed value, or a ConfigError
# naming it. The sweep passes the CLI's `check_train_value` (train's own option types), so a space
# refuses what `fer-mlflow train` would; this layer does not import the CLI above it.
Check = Callable[[str, object], object]

# The search space, written once. Learning rate and weight decay by optimizer (each default inside
# its range), the rest by model family; `default_space` puts them together.
LEARNING_SPACE = {
    "sgd": {"learning_rate": {"low": 0.01, "high": 0.2, "log": True},
            "weight_decay": {"low": 0.001, "high": 0.02, "log": True}},
    "adamw": {"learning_rate": {"low": 1e-4, "high": 5e-3, "log": True},
              "weight_decay": {"low": 1e-5, "high": 1e-2, "log": True}},
}
COMMON_SPACE = {
    "dropout": {"low": 0.0, "high": 0.5},
    "erase": {"low": 0.0, "high": 0.5},
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "batch_size": {"choices": [32, 64, 128]},
}
FAMILY_SPACE = {
    "cnn": {"widths": {"choices": ["20,40,80,160", "16,32,128,256", "24,48,96,192", "32,64,128,256"]}},
    "cnn_shallow": {},
    "cnn_deep": {},
    # Fine-tuning (phase 2) runs only from pretrained weights.
    "resnet": {"fine_tune_epochs": {"low": 0, "high": 8},
               "fine_tune_layers": {"low": 10, "high": 60, "step": 10},
               "fine_tune_learning_rate": {"low": 1e-6, "high": 1e-4, "log": True}},
}
FINE_TUNING = ("fine_tune_epochs", "fine_tune_layers", "fine_tune_learning_rate")
# Train parameters a space may not search: what the sweep sets itself, or what changes no result.
NOT_SEARCHED = ("model", "data", "time_budget", "val_fraction", "seed", "strategy", "checkpoint_minutes", "resume")
SEARCHABLE = tuple(name for name in TrainConfig.__dataclass_fields__ if name not in NOT_SEARCHED)
INTEGERS = ("epochs", "batch_size", "patience", "image_size", "fine_tune_epochs", "fine_tune_layers")

def default_space(model: str, optimizer: str, weights: str = "auto") -> dict[str, dict]:
    """The space searched for `model` trained with `optimizer` (see `LEARNING_SPACE`)."""
    family = "resnet" if model in models.RESNET_NAMES else model
    space = {**LEARNING_SPACE[optimizer], **COMMON_SPACE, **FAMILY_SPACE[family]}
    if weights == "none":
        space = {name: spec for name, spec in space.items() if name not in FINE_TUNING}
    return space


def load_space(path: str, check: Check) -> dict[str, dict]:
    """The space in YAML file `path`, checked (`distributions`); a ConfigError saying what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"space file {path} cannot be read ({error.strerror}); give a YAML file of "
                          "parameter: {low: ..., high: ...} or {choices: [...]}") from None
    try:
        space = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"space file {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"space file {path} must map train parameters to ranges, e.g. "
                          "learning_rate: {low: 0.01, high: 0.2, log: true}")
    distributions(space, check)
    return space


def distributions(space: dict, check: Check) -> dict[str, BaseDistribution]:
    """Optuna distributions for `space`, each bound checked by `check` (as train's command line checks it)."""
    found = {}
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise ConfigError(f"space: {name} is not a train parameter a sweep searches; "
                              f"use some of {', '.join(SEARCHABLE)}")
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= spec.keys()):
            raise ConfigError(f"space: {name} needs {{low: ..., high: ...}} (optionally log: true, step: ...) "
                              f"or {{choices: [...]}}; got {spec!r}")
        unknown = set(spec) - {"choices", "low", "high", "log", "step"}
        if unknown:
            raise ConfigError(f"space: {name} has unknown keys {', '.join(sorted(unknown))}; "
                              "use low, high, log, step or choices")
        try:
            if "choices" in spec:
                choices = spec["choices"]
                if not isinstance(choices, list) or not choices:
                    raise ValueError("choices must be a non-empty list")
                for choice in choices:
                    check(name, choice)
                found[name] = CategoricalDistribution(choices)
                continue
            low, high = spec["low"], spec["high"]
            check(name, low)
            check(name, high)
            if not all(math.isfinite(float(bound)) for bound in (low, high)):
                raise ValueError("low and high must be finite numbers")
            if name in INTEGERS:
                found[name] = IntDistribution(int(low), int(high), log=bool(spec.get("log")),
                                              step=int(spec.get("step", 1)))
            else:
                found[name] = FloatDistribution(float(low), float(high), log=bool(spec.get("log")),
                                                step=spec.get("step"))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"space: {name} {spec!r} is not a valid range ({error})") from None
        except ConfigError as error:
            raise ConfigError(f"space: {error}") from None
    return found


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution):
    """The trial's value of `name`, drawn by the study's sampler from `distribution`."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def holds(distribution: BaseDistribution, value) -> bool:
    """Whether `value` is one of `distribution`'s choices or within its bounds."""
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def as_config(values: dict, check: Check) -> dict:
    """Trial values as TrainConfig fields, parsed by `check` (widths "16,32,128,256" as a tuple)."""
    return {name: check(name, value) for name, value in values.items()}
