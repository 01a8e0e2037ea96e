"""The `sweep` stage: search train's parameters with Optuna, a nested `train` run per trial.

One sweep is one parent run (a `worker`) and its trials. The search space is written once, below,
per model family (`default_space`), and a YAML file (`load_space`) replaces it; train parameters
given as fixed values pass through to every trial and leave the space. Optuna's TPE sampler picks
each trial's values; a median pruner, fed each epoch's ``val_accuracy``, stops trials that trail
the median of earlier trials at the same epoch (their runs end KILLED, no model logged). A trial
that fails is recorded (run FAILED, trial FAIL) and the sweep goes on. A new study's first trial is
the default recipe (`baseline`), so that the sweep says what it found against the defaults.

`trials` is the study's total. Workers share a study through its `storage`: Optuna's RDB storage
(``postgresql://...``, ``sqlite:///...``) or a journal file (a plain path); taking a trial happens
under a lock (`_TrialLock`), so that any number of workers, on any machines, make exactly `trials`
trials. ``workers=N`` starts N-1 more worker processes on this machine, on the same study (a journal
file in a temporary folder unless `storage` is given); each worker has its own parent run.

At its end a worker logs the study as it then stands: ``trials.csv``, Optuna's figures (optimisation
history, parameter importances, parallel coordinates) and the best value, and (with `evaluate`)
scores the best trial's model in a nested `evaluate` run, ready for `promote`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
import yaml
from mlflow import MlflowClient
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fer_mlflow import evaluate, models, train
from fer_mlflow.errors import ConfigError
from fer_mlflow.sources import is_artifact
from fer_mlflow.tracking import Stopped, data_context, log_params, param_text, stage_run

log = logging.getLogger(__name__)

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
SEARCHABLE = tuple(name for name in train.TrainConfig.__dataclass_fields__ if name not in NOT_SEARCHED)
INTEGERS = ("epochs", "batch_size", "patience", "image_size", "fine_tune_epochs", "fine_tune_layers")
# The median pruner: trials to finish before it prunes, and epochs each trains before it may be pruned.
PRUNER_STARTUP_TRIALS = 5
# TPE's random trials before it models the results (Optuna's default, 10, is most of a 12-trial sweep).
SAMPLER_STARTUP_TRIALS = 5
RDB_SCHEMES = ("sqlite", "postgresql")
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


def default_space(model: str, optimizer: str, weights: str = "auto") -> dict[str, dict]:
    """The space searched for `model` trained with `optimizer` (see `LEARNING_SPACE`)."""
    family = "resnet" if model in models.RESNET_NAMES else model
    space = {**LEARNING_SPACE[optimizer], **COMMON_SPACE, **FAMILY_SPACE[family]}
    if weights == "none":
        space = {name: spec for name, spec in space.items() if name not in FINE_TUNING}
    return space


def load_space(path: str) -> dict[str, dict]:
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
    distributions(space)
    return space


def distributions(space: dict) -> dict[str, BaseDistribution]:
    """Optuna distributions for `space`, each bound checked as train's command line checks it."""
    from fer_mlflow.cli import check_train_value

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
                    check_train_value(name, choice)
                found[name] = CategoricalDistribution(choices)
                continue
            low, high = spec["low"], spec["high"]
            check_train_value(name, low)
            check_train_value(name, high)
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


def run(config: SweepConfig, fixed: dict | None = None, fixed_args: tuple[str, ...] = ()) -> SweepOutcome:
    """Run one sweep worker (and, with ``workers`` > 1, start the others); see the module docstring.

    `fixed`: train parameters every trial takes as given (TrainConfig field names, parsed values);
    `fixed_args`: the same as command-line options, handed to the workers this one starts.
    """
    fixed = dict(fixed or {})
    for name in ("model", "data", "time_budget", "resume"):
        if name in fixed:
            raise ConfigError(f"{name} is the sweep's own parameter; give it as --{name.replace('_', '-')}")
    base = train.TrainConfig(model=config.model, data=config.data, time_budget=config.trial_time_budget,
                             **fixed).resolved()
    if config.space:
        space = load_space(config.space)
    else:
        space = default_space(config.model, base.optimizer, base.weights)
    space = {name: spec for name, spec in space.items() if name not in fixed}
    if not space:
        raise ConfigError("nothing left to search: every parameter of the space is given a fixed value")
    searched = distributions(space)
    if config.workers > 1 and not config.storage:
        with tempfile.TemporaryDirectory(prefix="fer-sweep-") as folder:
            return run(replace(config, storage=str(Path(folder) / "study.journal")), fixed, fixed_args)
    storage = open_storage(config.storage)
    study_name = config.study or _study_name(config)

    tags, experiment = data_context(config.data)
    label = tags["fer.data"]
    tags.update({"fer.model": config.model, "fer.study": study_name, "fer.sweep_worker": str(config.worker_index)})
    name = f"sweep {config.model}-{label} {study_name}" + (f" worker {config.worker_index}" if config.worker_index else "")
    started = time.perf_counter()
    with stage_run("sweep", name, tags, experiment=experiment) as parent:
        seed = config.sampler_seed
        if seed is None and not config.storage:
            seed = 0
        sampler = optuna.samplers.TPESampler(n_startup_trials=SAMPLER_STARTUP_TRIALS,
                                             seed=None if seed is None else seed + config.worker_index)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                             n_warmup_steps=config.prune_warmup)
        log_params({**{k: v for k, v in asdict(config).items() if k not in ("storage", "worker_index", "sampler_seed")},
                    "sampler_seed": "auto" if config.sampler_seed is None else config.sampler_seed,
                    "storage": _masked(config.storage) or "in memory", "study": study_name,
                    "space": json.dumps(space, separators=(",", ":")), "sampler": f"TPESampler(n_startup_trials={SAMPLER_STARTUP_TRIALS}, seed={seed})",
                    "pruner": f"MedianPruner(n_startup_trials={PRUNER_STARTUP_TRIALS}, "
                              f"n_warmup_steps={config.prune_warmup})",
                    "fixed": " ".join(f"{k}={param_text(v)}" for k, v in sorted(fixed.items())) or "none"})
        mlflow.log_text(yaml.safe_dump(space, sort_keys=False), "space.yaml")
        data = base.data
        if not is_artifact(data):
            data = _cleaned(data, base)  # once, not per trial
            base = replace(base, data=data)
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
        others = _start_workers(config, study_name, data, fixed_args, parent.info.experiment_id)
        worker = _Worker(study, config, base, searched, parent.info.run_id, label, started)
        try:
            worker.work(_TrialLock(config.storage, study_name))
        except BaseException:
            _stop(others)
            raise
        _wait(others)
        outcome = _summarise(study, config, worker, parent.info.run_id, started)
    return outcome


@dataclass
class _Worker:
    """Takes trials from `study` until it has `config.trials` (or time runs out) and runs each."""

    study: optuna.Study
    config: SweepConfig
    base: train.TrainConfig  # resolved; each trial replaces the searched values
    searched: dict[str, BaseDistribution]
    parent_id: str
    label: str
    started: float
    fit_seconds: float = 0.0  # the trials' own training time
    ran: list[int] = field(default_factory=list)  # numbers of the trials this worker ran

    def work(self, lock: _TrialLock) -> None:
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
        if not self.config.time_budget:
            return None
        left = self.config.time_budget - (time.perf_counter() - self.started) / 60
        if self.base.time_budget and left < self.base.time_budget:
            return 0.0  # a whole trial no longer fits
        return max(left, 0.0)

    def _baseline(self) -> dict:
        """The default recipe's value of each searched parameter that its range holds."""
        defaults = {name: getattr(self.base, name) for name in self.searched}
        defaults = {name: param_text(value) if name == "widths" else value for name, value in defaults.items()}
        return {name: value for name, value in defaults.items() if _holds(self.searched[name], value)}

    def _trial(self, trial: optuna.Trial, minutes: float | None) -> None:
        values = {name: _suggest(trial, name, distribution) for name, distribution in self.searched.items()}
        config = replace(self.base, **_as_config(values))
        if minutes is not None and (not config.time_budget or minutes < config.time_budget):
            config = replace(config, time_budget=minutes)  # the sweep's budget ends it
        tags = {"fer.sweep_run": self.parent_id, "fer.study": self.study.study_name, "fer.trial": str(trial.number),
                "mlflow.runName": f"trial {trial.number} " + train.run_name(config, self.label)}
        report = _Report(trial)
        state, value, error = TrialState.COMPLETE, None, None
        try:
            value = train.run(config, nested=True, tags=tags, callbacks=(report,)).best_val_accuracy
        except Pruned as pruned:
            log.info("%s", pruned)
            state = TrialState.PRUNED
        except Exception as failure:  # recorded, and the sweep goes on
            log.warning("trial %d failed: %s", trial.number, failure)
            state, error = TrialState.FAIL, f"{type(failure).__name__}: {failure}"
        except BaseException:  # stopped (SIGINT, SIGTERM): the trial fails, the sweep stops
            self._tell(trial, report, TrialState.FAIL, None, "stopped")
            raise
        finally:
            self.fit_seconds += report.fit_seconds
        self._tell(trial, report, state, value, error)

    def _tell(self, trial, report, state, value, error) -> None:
        run_id = report.run_id or _trial_run(self.parent_id, trial.number)
        if run_id:
            trial.set_user_attr("run_id", run_id)
            MlflowClient().set_tag(run_id, "fer.trial_state", STATE_NAMES[state])
        if error:
            trial.set_user_attr("error", error[:1000])
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


class _Report(keras.callbacks.Callback):
    """Reports each epoch's val_accuracy to the trial, and stops the trial when it is pruned."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial, self.step = trial, 0
        self.run_id: str | None = None
        self.fit_seconds, self._began = 0.0, None

    def on_train_begin(self, logs=None):
        self.run_id = mlflow.active_run().info.run_id
        self._began = time.perf_counter()

    def on_train_end(self, logs=None):
        self._stopped()

    def _stopped(self) -> None:
        if self._began is not None:
            self.fit_seconds += time.perf_counter() - self._began
            self._began = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is None:
            return
        self.trial.report(float(value), self.step)
        self.step += 1
        if self.trial.should_prune():
            self._stopped()
            raise Pruned(f"trial {self.trial.number} pruned after {self.step} epochs: "
                         f"val_accuracy {float(value):.4f} is below the median of earlier trials")


class _TrialLock:
    """Makes 'count the study's trials, then ask for one' one step across all workers of a study:
    a file lock beside a journal or SQLite file, a PostgreSQL advisory lock, nothing in memory."""

    def __init__(self, storage: str, study: str):
        self.storage, self.study = storage, study
        self._release = None

    def __enter__(self):
        if not self.storage:
            return self
        if self.storage.startswith("postgresql"):
            import sqlalchemy

            engine = sqlalchemy.create_engine(self.storage, poolclass=sqlalchemy.pool.NullPool)
            connection = engine.connect()
            key = int.from_bytes(hashlib.sha256(self.study.encode()).digest()[:8], "big", signed=True)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})

            def release():
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.close()
                engine.dispose()
        else:
            from optuna.storages.journal import JournalFileOpenLock

            path = self.storage.split("sqlite:///", 1)[1] if self.storage.startswith("sqlite:///") else self.storage
            lock = JournalFileOpenLock(f"{path}.{self.study}.trials")
            lock.acquire()
            release = lock.release
        self._release = release
        return self

    def __exit__(self, *exc):
        if self._release is not None:
            self._release()
            self._release = None


def open_storage(url: str):
    """Optuna storage for `url`: None (in memory) for "", RDB storage for a URL, else a journal file."""
    if not url:
        return None
    if "://" in url:
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme not in RDB_SCHEMES:
            raise ConfigError(f"storage {_masked(url)}: use postgresql://user@host:port/database, "
                              "sqlite:///path/to/file.db or a journal file's path")
        if url.startswith("postgresql://"):  # SQLAlchemy 2.1 reads it as psycopg 3; psycopg2 is what ships
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as error:  # SQLAlchemy's and the driver's errors differ by database
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "no longer compatible with the table schema" in first:  # another program's Alembic table
                raise ConfigError(f"storage {_masked(url)} holds another program's tables (MLflow's?): both keep "
                                  "Alembic's alembic_version table, so give the study a database of its own "
                                  "(e.g. createdb optuna)") from None
            raise ConfigError(f"storage {_masked(url)} cannot be opened ({first}); "
                              "check that the database server runs and the URL names it") from None
    folder = Path(url).expanduser().resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"storage {url}: folder {folder} does not exist; create it or give another path")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(url))


def _masked(url: str) -> str:
    """`url` without its password."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url


def _study_name(config: SweepConfig) -> str:
    label = Path(config.data.rstrip("/")).name if not config.data.startswith("runs:/") else config.data.split("/")[1][:8]
    return f"{config.model}-{label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _cleaned(data: str, base: train.TrainConfig) -> str:
    """Clean raw `data` once, in a nested clean run; the cleaned dataset's URI, for every trial."""
    from fer_mlflow import clean
    from fer_mlflow.cleaning import CleanConfig

    return clean.run(data, CleanConfig(), val_fraction=base.val_fraction, seed=base.seed, nested=True).dataset_uri


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def _holds(distribution: BaseDistribution, value) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def _as_config(values: dict) -> dict:
    """Trial values as TrainConfig fields (widths "16,32,128,256" as a tuple)."""
    from fer_mlflow.cli import check_train_value

    return {name: check_train_value(name, value) for name, value in values.items()}


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
    outcome = SweepOutcome(parent_id, study.study_name, _masked(config.storage) or "in memory", counts)
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
        filter_string=f"tags.`fer.stage` = 'evaluate' and tags.`fer.source_run` = '{run_id}' "
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

