"""The `sweep` stage: search train's parameters with Optuna, a nested `train` run per trial.

One sweep is one parent run (a `worker`) and its trials. The search space is written once, below,
per model family (`search_space`), and a YAML file replaces it; train parameters
given as fixed values pass through to every trial and leave the space. Optuna's TPE sampler picks
each trial's values; a median pruner, fed each epoch's ``val_accuracy``, stops trials that trail
the median of earlier trials at the same epoch (their runs end KILLED, no model logged). A trial
that fails is recorded (run FAILED, trial FAIL) and the sweep goes on. A new study's first trial is
the default recipe (`baseline`), so that the sweep says what it found against the defaults.

`trials` is the study's total. Workers share a study through its `storage`: Optuna's RDB storage
(``postgresql://...``, ``sqlite:///...``) or a journal file (a plain path); taking a trial happens
under a lock (`studies.TrialLock`), so that any number of workers, on any machines, make exactly `trials`
trials. ``workers=N`` starts N-1 more worker processes on this machine, on the same study (a journal
file in a temporary folder unless `storage` is given); each worker has its own parent run. Those
workers share the launcher's one deadline (`time_budget` from when it started), so their start-up
counts against it; a worker started by hand elsewhere counts its `time_budget` from its own start.

At its end a worker logs the study as it then stands: ``trials.csv``, Optuna's figures (optimisation
history, parameter importances, parallel coordinates) and the best value, and (with `evaluate`)
scores the best trial's model in a nested `evaluate` run, ready for `promote`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
import yaml
from mlflow import MlflowClient
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from fer_mlflow.stages import evaluate, train
from fer_mlflow.learning import search_space, studies
from fer_mlflow.errors import ConfigError
from fer_mlflow.data.sources import is_artifact, read_source
from fer_mlflow.tracking.runs import Stopped, data_context, log_params, param_text, stage_run
from fer_mlflow.stages.clean import load_training_data
from fer_mlflow.tracking.names import DATA_TAG, MODEL_TAG, SOURCE_RUN_TAG

log = logging.getLogger(__name__)

# The median pruner: trials to finish before it prunes, and epochs each trains before it may be pruned.
PRUNER_STARTUP_TRIALS = 5
# TPE's random trials before it models the results (Optuna's default, 10, is most of a 12-trial sweep).
SAMPLER_STARTUP_TRIALS = 5
# How trial states read in tags (fer.trial_state) and metrics (trials_<state>).
STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running"}


class Pruned(Stopped):
    """A trial the pruner stopped: its train run ends KILLED."""


@dataclass
class SweepOutcome:
    run_id: str
    study: str
    storage: str
    counts: dict[str, int]
    best_value: float | None = None
    best_run_id: str | None = None
    best_params: dict = field(default_factory=dict)
    evaluation_run_id: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """Everything `sweep` takes besides train's own parameters (`fixed`, as given)."""

    model: str = "cnn"
    data: str = "demo"
    trials: int = 20
    workers: int = 1
    storage: str = ""  # Optuna storage: an RDB URL or a journal file's path; "": in memory (one worker)
    study: str = ""  # "": a new study, named after the model, the data and the time
    space: str = ""  # a YAML file: {parameter: {low, high[, log, step]} | {choices: [...]}}
    time_budget: float = 0.0  # minutes for the whole sweep; no trial starts that could not end in it
    trial_time_budget: float = 0.0  # minutes of training per trial (train's time_budget); 0: epochs
    prune_warmup: int = 3  # epochs a trial trains before the pruner may stop it
    sampler_seed: int | None = None  # None: 0 in memory, fresh entropy when workers share a storage
    baseline: bool = True  # a new study's first trial is the default recipe
    evaluate: bool = True  # score the best trial's model on the test split (nested evaluate run)
    worker_index: int = 0  # 0: this process; 1..N-1: the workers it starts
    deadline: float | None = None  # the launcher's end of time_budget (epoch seconds), handed to its workers


def run(config: SweepConfig, fixed: dict | None = None, fixed_args: tuple[str, ...] = (), *,
        check: search_space.Check) -> SweepOutcome:
    """Run one sweep worker (and, with ``workers`` > 1, start the others); see the module docstring.

    `fixed`: train parameters every trial takes as given (TrainConfig field names, parsed values);
    `fixed_args`: the same as command-line options, handed to the workers this one starts;
    `check`: how a train parameter's value is parsed and checked (the CLI's `check_train_value`).
    """
    fixed = dict(fixed or {})
    if "resume" in fixed:
        raise ConfigError("a sweep does not resume its trials; run it again with the same --study and --storage "
                          "to go on with that study")
    for name in ("model", "data", "time_budget"):
        if name in fixed:
            raise ConfigError(f"{name} is the sweep's own parameter; give it as --{name.replace('_', '-')}")
    if config.time_budget and config.trial_time_budget > config.time_budget:
        raise ConfigError(f"trial_time_budget={config.trial_time_budget:g} minutes is longer than the sweep's "
                          f"time_budget={config.time_budget:g}: no trial could start; give each trial less time, or "
                          "the sweep more")
    base = train.TrainConfig(model=config.model, data=config.data, time_budget=config.trial_time_budget,
                             **fixed).resolved()
    if config.space:
        space = search_space.load_space(config.space, check)
    else:
        space = search_space.default_space(config.model, base.optimizer, base.weights)
    space = {name: spec for name, spec in space.items() if name not in fixed}
    if not space:
        raise ConfigError("nothing left to search: every parameter of the space is given a fixed value")
    searched = search_space.distributions(space, check)
    if config.workers > 1 and not config.storage:
        with tempfile.TemporaryDirectory(prefix="fer-sweep-") as folder:
            return run(replace(config, storage=str(Path(folder) / "study.journal")), fixed, fixed_args, check=check)
    storage = studies.open_storage(config.storage)
    tags, experiment = data_context(config.data)
    label = tags[DATA_TAG]
    study_name = config.study or f"{config.model}-{label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    tags.update({MODEL_TAG: config.model, "fer.study": study_name, "fer.sweep_worker": str(config.worker_index)})
    name = f"sweep {config.model}-{label} {study_name}" + (f" worker {config.worker_index}" if config.worker_index else "")
    recipe = {"model": config.model,  # the data apart (`_check_data`): workers are handed the cleaned copy
              "fixed": " ".join(f"{k}={param_text(v)}" for k, v in sorted(fixed.items())) or "none"}
    read = _check_joinable(storage, study_name, recipe, searched, config.data) if config.storage else None
    started = time.perf_counter()
    deadline = config.deadline or (time.time() + config.time_budget * 60 if config.time_budget else None)
    with stage_run("sweep", name, tags, experiment=experiment) as parent:
        seed = config.sampler_seed
        if seed is None and not config.storage:
            seed = 0
        sampler = optuna.samplers.TPESampler(n_startup_trials=SAMPLER_STARTUP_TRIALS,
                                             seed=None if seed is None else seed + config.worker_index)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                             n_warmup_steps=config.prune_warmup)
        log_params({**{k: v for k, v in asdict(config).items()
                       if k not in ("storage", "worker_index", "sampler_seed", "deadline")},
                    "deadline": "none" if deadline is None else
                    datetime.fromtimestamp(deadline, timezone.utc).isoformat(timespec="seconds"),
                    "sampler_seed": "auto" if config.sampler_seed is None else config.sampler_seed,
                    "storage": studies.masked(config.storage) or "in memory", "study": study_name,
                    "search_space": json.dumps(space, separators=(",", ":")), "sampler": f"TPESampler(n_startup_trials={SAMPLER_STARTUP_TRIALS}, seed={seed})",
                    "pruner": f"MedianPruner(n_startup_trials={PRUNER_STARTUP_TRIALS}, "
                              f"n_warmup_steps={config.prune_warmup})",
                    "fixed": recipe["fixed"]})
        mlflow.log_text(yaml.safe_dump(space, sort_keys=False), "space.yaml")
        # A raw source is cleaned once, in a nested clean run, not once per trial; an artifact read
        # to join a study is not read again.
        dataset, data = (read, base.data) if read is not None else load_training_data(base.data, base.val_fraction,
                                                                                     base.seed)
        base = replace(base, data=data)
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
        _check_data(study, dataset.digest())
        if "recipe" not in study.user_attrs:
            study.set_user_attr("recipe", recipe)
        others = _start_workers(replace(config, deadline=deadline), study_name, data, fixed_args,
                                parent.info.experiment_id)
        worker = _Worker(study, config, base, searched, check, parent.info.run_id, label, deadline)
        try:
            worker.work(studies.TrialLock(config.storage, study_name))
            _wait(others)
        except BaseException:  # stopped or failed: the workers it started stop too
            _stop(others)
            raise
        outcome = _summarise(study, config, worker, parent.info.run_id, started)
    return outcome


@dataclass
class _Worker:
    """Takes trials from `study` until it has `config.trials` (or time runs out) and runs each."""

    study: optuna.Study
    config: SweepConfig
    base: train.TrainConfig  # resolved; each trial replaces the searched values
    searched: dict[str, BaseDistribution]
    check: search_space.Check  # parses a trial's values as train's options
    parent_id: str
    label: str
    deadline: float | None  # epoch seconds: no trial starts that could not end by then; None: no budget
    fit_seconds: float = 0.0  # the trials' own training time
    ran: list[int] = field(default_factory=list)  # numbers of the trials this worker ran

    def work(self, lock: studies.TrialLock) -> None:
        while True:
            with lock:
                trials = self.study.get_trials(deepcopy=False)
                if len(trials) >= self.config.trials:
                    return
                minutes = self._minutes_left()
                if minutes is not None and minutes <= 0:
                    log.info("sweep time budget spent: no more trials")
                    return
                if self.config.baseline and not trials:
                    self.study.enqueue_trial(self._baseline(), skip_if_exists=True)
                trial = self.study.ask()
            self.ran.append(trial.number)
            self._trial(trial, minutes)

    def _minutes_left(self) -> float | None:
        """Minutes a new trial may train: None without a sweep budget; 0 when none should start."""
        if self.deadline is None:
            return None
        left = (self.deadline - time.time()) / 60
        if self.base.time_budget and left < self.base.time_budget:
            return 0.0  # a whole trial no longer fits
        return max(left, 0.0)

    def _baseline(self) -> dict:
        """The default recipe's value of each searched parameter that its range holds."""
        defaults = {name: getattr(self.base, name) for name in self.searched}
        defaults = {name: param_text(value) if name == "widths" else value for name, value in defaults.items()}
        return {name: value for name, value in defaults.items() if search_space.holds(self.searched[name], value)}

    def _trial(self, trial: optuna.Trial, minutes: float | None) -> None:
        values = {name: search_space.suggest(trial, name, distribution) for name, distribution in self.searched.items()}
        config = replace(self.base, **search_space.as_config(values, self.check))
        if minutes is not None and (not config.time_budget or minutes < config.time_budget):
            config = replace(config, time_budget=minutes)  # the sweep's budget ends it
        tags = {"fer.sweep_run": self.parent_id, "fer.study": self.study.study_name, "fer.trial": str(trial.number),
                "mlflow.runName": f"trial {trial.number} " + train.run_name(config, self.label)}
        report = _Report(trial)
        state, value, error = TrialState.COMPLETE, None, None
        keras.backend.clear_session()  # the last trial's model and graphs go: memory stays flat
        try:
            value = train.run(config, nested=True, tags=tags, callbacks=(report,)).best_val_accuracy
        except Pruned as pruned:
            log.info("%s", pruned)
            state = TrialState.PRUNED
        except Exception as failure:  # recorded, and the sweep goes on
            log.warning("trial %d failed: %s", trial.number, failure)
            state, error = TrialState.FAIL, f"{type(failure).__name__}: {failure}"
        except BaseException:  # stopped (SIGINT, SIGTERM): the trial fails, the sweep stops
            self._tell(trial, report, TrialState.FAIL, None, "stopped", tag="stopped")
            raise
        finally:
            self.fit_seconds += report.fit_seconds
        self._tell(trial, report, state, value, error)

    def _tell(self, trial, report, state, value, error, tag: str = "") -> None:
        run_id = report.run_id or _trial_run(self.parent_id, trial.number)
        if run_id:
            trial.set_user_attr("run_id", run_id)
            MlflowClient().set_tag(run_id, "fer.trial_state", tag or STATE_NAMES[state])
        if error:
            trial.set_user_attr("error", error[:1000])
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


class _Report(keras.callbacks.Callback):
    """Reports each epoch's val_accuracy to the trial; a pruned trial's fit is stopped like an early
    stop (``stop_training``), so Keras ends its epoch loop and lets its iterators go as usual, and
    `Pruned` is raised once the fit has ended."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial, self.step = trial, 0
        self.run_id: str | None = None
        self.fit_seconds, self._began = 0.0, None
        self.pruned: str | None = None

    def on_train_begin(self, logs=None):
        self.run_id = mlflow.active_run().info.run_id
        self._began = time.perf_counter()

    def on_train_end(self, logs=None):
        if self._began is not None:
            self.fit_seconds += time.perf_counter() - self._began
            self._began = None
        if self.pruned:
            raise Pruned(self.pruned)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is None or self.pruned:
            return
        self.trial.report(float(value), self.step)
        self.step += 1
        if self.trial.should_prune():
            self.pruned = (f"trial {self.trial.number} pruned after {self.step} epochs: "
                           f"val_accuracy {float(value):.4f} is below the median of earlier trials")
            self.model.stop_training = True



def _check_joinable(storage, study_name: str, recipe: dict, searched: dict, data: str):
    """Refuse, before any run, to go on with a study of `storage` that trained another model or with
    other fixed options (its ``recipe``), searched a parameter over another kind of range, or trained on
    other data than the dataset artifact `data` (a raw source is cleaned, and checked, inside the run:
    `_check_data`): its trials and these would not compare (and Optuna fails on a range mid-trial).
    Returns the dataset it read to compare (an artifact, for a study that records its data), else None."""
    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None  # a new study
    read = None
    if "data_digest" in existing.user_attrs and is_artifact(data):
        read = read_source(data)[0]
        _check_data(existing, read.digest())
    theirs = existing.user_attrs.get("recipe")
    if theirs is not None and theirs != recipe:
        differs = ", ".join(f"{key}={theirs.get(key)} there, {value} here" for key, value in recipe.items()
                            if theirs.get(key) != value)
        raise ConfigError(f"study {study_name} was run with another recipe ({differs}); give the same options to "
                          "go on with it, or name a new --study")
    for trial in existing.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            if name in searched:
                try:
                    optuna.distributions.check_distribution_compatibility(distribution, searched[name])
                except ValueError as error:
                    raise ConfigError(f"study {study_name} searched {name} over another kind of range ({error}); "
                                      "give it the space it was run with, or name a new --study") from None
    return read

def _check_data(study: optuna.Study, digest: str) -> None:
    """Keep the digest of the data a study's trials train on with it (``data_digest``), and refuse data of
    another digest: a trial on other data would not compare with the others, and could be the best.
    Checked once the data is read (a raw source is cleaned inside the sweep's run first), so the run
    ends FAILED with the one line."""
    known = study.user_attrs.get("data_digest")
    if known is None:
        study.set_user_attr("data_digest", digest)
    elif known != digest:
        raise ConfigError(f"study {study.study_name}'s trials trained on data {known}, this data is {digest}; "
                          "give it the data it was run with (-P data=runs:/<clean run>/dataset/dataset.npz), "
                          "or name a new --study")


def _trial_run(parent_id: str, number: int) -> str | None:
    """The train run of trial `number` under `parent_id`, for a trial that failed before training."""
    found = mlflow.search_runs(
        experiment_ids=[mlflow.get_run(parent_id).info.experiment_id], output_format="list",
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`fer.trial` = '{number}'")
    return found[0].info.run_id if found else None


def _start_workers(config: SweepConfig, study: str, data: str, fixed_args: tuple[str, ...],
                   experiment_id: str) -> list[subprocess.Popen]:
    """Start workers 1..N-1 of a ``workers=N`` sweep: this command again, on the same study."""
    others = []
    for index in range(1, config.workers):
        command = [sys.executable, "-m", "fer_mlflow", "sweep", "--model", config.model, "--data", data,
                   "--trials", str(config.trials), "--workers", "1", "--storage", config.storage,
                   "--study", study, "--time-budget", str(config.time_budget),
                   "--trial-time-budget", str(config.trial_time_budget), "--prune-warmup", str(config.prune_warmup),
                   "--sampler-seed", "auto" if config.sampler_seed is None else str(config.sampler_seed),
                   "--baseline", str(config.baseline).lower(), "--evaluate", "false",
                   "--worker-index", str(index), *fixed_args]
        if config.deadline is not None:  # the sweep's one clock: a worker's start-up counts against it
            command += ["--deadline", repr(config.deadline)]
        if config.space:
            command += ["--space", str(Path(config.space).resolve())]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        env.update({"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_EXPERIMENT_ID": experiment_id})
        env.pop("MLFLOW_EXPERIMENT_NAME", None)
        others.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
    return others


def _wait(others: list[subprocess.Popen]) -> None:
    for process in others:
        if process.wait() != 0:
            log.warning("sweep worker (pid %d) exited with status %d; its trials are in the study as it left them",
                        process.pid, process.returncode)


def _stop(others: list[subprocess.Popen]) -> None:
    """SIGTERM the started workers (each then ends its runs KILLED) and wait for them."""
    for process in others:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in others:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def _summarise(study: optuna.Study, config: SweepConfig, worker: _Worker, parent_id: str,
               started: float) -> SweepOutcome:
    """Log the study as it stands now to the active (parent) run; evaluate its best trial."""
    trials = study.get_trials(deepcopy=False)
    counts = {name: sum(t.state == state for t in trials) for state, name in STATE_NAMES.items()}
    seconds = time.perf_counter() - started
    mlflow.log_metrics({f"trials_{state}": count for state, count in counts.items()} | {
        "sweep_seconds": seconds, "trials_run_here": len(worker.ran),
        **({"overhead_seconds_per_trial": (seconds - worker.fit_seconds) / len(worker.ran)} if worker.ran else {}),
    })
    frame = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration", "user_attrs"))
    mlflow.log_text(frame.to_csv(index=False), "trials.csv")
    _log_figures(study)
    outcome = SweepOutcome(parent_id, study.study_name, studies.masked(config.storage) or "in memory", counts)
    if not counts["complete"]:
        log.warning("no trial of study %s completed; nothing to evaluate", study.study_name)
        return outcome
    best = study.best_trial
    outcome.best_value, outcome.best_params = best.value, best.params
    outcome.best_run_id = best.user_attrs.get("run_id")
    mlflow.log_metrics({"best_value": best.value, "best_trial": best.number})
    mlflow.set_tags({"fer.best_trial": str(best.number), "fer.best_run": outcome.best_run_id or ""})
    if config.evaluate and outcome.best_run_id:
        done = _evaluation(outcome.best_run_id)
        if done is None:
            evaluated = evaluate.run(run_id=outcome.best_run_id, nested=True)
            done = (evaluated.run_id, evaluated.metrics)
        outcome.evaluation_run_id, outcome.test_metrics = done
        mlflow.set_tag("fer.best_evaluation", outcome.evaluation_run_id)
        mlflow.log_metrics({f"best_{k}": v for k, v in outcome.test_metrics.items() if k == "test_accuracy"})
    return outcome


def _evaluation(run_id: str) -> tuple[str, dict] | None:
    """An earlier worker's finished test evaluation of training run `run_id`, if any."""
    found = mlflow.search_runs(
        experiment_ids=[mlflow.get_run(run_id).info.experiment_id], output_format="list",
        filter_string=f"tags.`fer.stage` = 'evaluate' and tags.`{SOURCE_RUN_TAG}` = '{run_id}' "
                      "and tags.`fer.split` = 'test' and attributes.status = 'FINISHED'")
    return (found[0].info.run_id, dict(found[0].data.metrics)) if found else None


FIGURES = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
}


def _log_figures(study: optuna.Study) -> None:
    """Optuna's figures of the study, as PNGs under figures/; one that cannot be drawn yet (too few
    finished trials) is left out, with a log line saying why."""
    import optuna.visualization.matplotlib as plots

    for name, function in FIGURES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = getattr(plots, function)(study, target_name="val_accuracy")
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                log.info("figure %s left out: %s", name, error)
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        mlflow.log_figure(figure, f"figures/{name}.png")
        plt.close(figure)

