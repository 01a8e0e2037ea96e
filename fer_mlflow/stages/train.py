"""The `train` stage: fit one model on a cleaned dataset and log everything about it to MLflow.

`data` is a clean run's dataset artifact, used as it is, or any raw source, which is first cleaned
with the default rules in a nested ``clean`` run (so the cleaning is recorded in full).

Logged to the run: every resolved parameter; per epoch, with ``step`` = epoch (0-based, continuing
across the ResNets' two phases), ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and
``learning_rate``; at the end ``best_val_accuracy``, ``best_epoch``, ``epochs_trained``,
``train_seconds`` and ``train_images_per_second``, the fitted ``temperature`` with ``val_ece_untempered``
and ``val_ece``; ``figures/training_curves.png``; ``model_summary.txt``; the model (pyfunc, under
``model``) with signature and input example; the train and val splits as inputs;
``checkpoint/``, the whole training state (`loop.TrainingState`), at most every
``checkpoint_minutes`` and at the end of a run stopped or failed, from which ``resume`` goes on in
the same run (a run that ends FINISHED drops it). SIGINT and SIGTERM stop training after the
current batch; the best model so far is logged and the run ends KILLED.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import tensorflow as tf
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fer_mlflow.serving import calibration, pyfunc_model, views
from fer_mlflow.learning import interrupts, models, teaching
from fer_mlflow.errors import ConfigError
from fer_mlflow.data.dataset import model_input
from fer_mlflow.learning.inputs import eval_dataset, one_hot, train_dataset
from fer_mlflow.tracking.runs import (
    Stopped, param_text, data_context, log_params, log_split_inputs, run_params, stage_run,
)
from fer_mlflow.stages.clean import load_training_data
from fer_mlflow.learning.config import (  # noqa: F401  (train.TrainConfig and its defaults: their old home)
    DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE, DEFAULT_OPTIMIZER, DEFAULT_WEIGHT_DECAY, MAX_EPOCHS, TrainConfig,
)
from fer_mlflow.learning.loop import (
    CHECKPOINT, STATISTICS_BATCH, STATISTICS_IMAGES, AveragedWeights, CheckpointPlan, Checkpointer, EpochLogger,
    ImageCounter, ResumableEarlyStopping, StopOnSignal, TimeBudget, TrainingState, save_arrays, class_weights,
    curves_figure, fitting_arrays, keep_best_of_phases, make_strategy, model_arrays, optimizer, restore_model,
)
from fer_mlflow.tracking.names import (
    DATA_DIGEST_TAG,
    DATA_TAG,
    DATA_URI_TAG,
    MODEL_FAMILY_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    STAGE_TAG,
)

log = logging.getLogger(__name__)

INTERRUPTED_TAG = "fer.interrupted"  # the signal that stopped the run, while it stays stopped
TRAINER_TAG = "fer.trainer"  # "<host>:<pid>" of the process training the run (the latest to resume it)

@dataclass
class TrainOutcome:
    """The training run, its logged model and the figures a caller may want to print."""

    run_id: str
    model_uri: str
    best_val_accuracy: float
    epochs_trained: int
    data_uri: str


def run(config: TrainConfig = TrainConfig(), nested: bool = False, tags: dict[str, str] | None = None,
        callbacks: tuple[keras.callbacks.Callback, ...] = ()) -> TrainOutcome:
    """Train `config.model` on `config.data` and log the run (see the module docstring); with
    `config.resume`, go on with that stopped run from its last checkpoint, in the same run.

    `tags` are added to the run's; `callbacks` join every phase's fit (a sweep's pruning: one that
    raises `tracking.Stopped` ends the run KILLED, no model logged).

    With ``strategy=multi_worker`` every worker of ``TF_CONFIG`` runs this; the chief logs the run
    and the others train alike against a throw-away store (`learning.distribution`)."""
    config = config.resolved()
    strategy = None
    if config.strategy == "multi_worker":
        from fer_mlflow.learning import distribution

        cluster = distribution.cluster()
        strategy = make_strategy(config.strategy)  # first: collective ops are set up at program start
        with distribution.keras_mended(strategy):
            if not distribution.is_chief(cluster):
                with distribution.throwaway_store(config.data) as data:
                    return _run(replace(config, data=data), nested, tags, callbacks, strategy)
            return _run(config, nested, tags, callbacks, strategy)
    return _run(config, nested, tags, callbacks, strategy)


def _run(config: TrainConfig, nested: bool, tags: dict[str, str] | None, callbacks: tuple,
         strategy=None) -> TrainOutcome:
    """One process's part of `run` (`config` resolved): open the stage run (going on with
    `config.resume`'s when given), log the params and the data, fit under the signal guard, then
    log the results and the model. A signal received meanwhile ends the run KILLED once the best
    model so far is logged; a run that ends FINISHED drops its logged checkpoint."""
    family = "resnet" if config.model in models.RESNET_NAMES else "cnn"
    data_tags, experiment = data_context(config.data)
    label = data_tags[DATA_TAG]
    tags = {**data_tags, MODEL_TAG: config.model, MODEL_FAMILY_TAG: family, **(tags or {})}
    with tempfile.TemporaryDirectory(prefix="fer-checkpoint-") as folder:
        plan = CheckpointPlan(Path(folder) / CHECKPOINT, config.checkpoint_minutes, 0.0)
        previous = _resumable(config, plan) if config.resume else None
        taught = (teaching.logged_probabilities(previous.info.run_id, Path(folder))
                  if config.teacher and previous is not None else None)
        # a bad URI: before any run; a resumed run learns from what its teacher answered before
        teacher = teaching.load_teacher(config.teacher) if config.teacher and taught is None else None
        initial = teaching.initial_weights(config) if config.init and not config.resume else None
        with stage_run("train", run_name(config, label), tags, nested=nested, experiment=experiment,
                       resume=config.resume or None) as active:
            mlflow.set_tag(TRAINER_TAG, _this_process())
            if previous is not None:
                _record_resume(previous, plan.resumed)
            log_params({k: v for k, v in asdict(config).items()})
            keras.utils.set_random_seed(config.seed)
            dataset, data_uri, train, val = _read_data(config, previous, label)
            strategy = strategy or make_strategy(config.strategy)
            _log_replicas(config, strategy)
            targets = teaching.teacher_targets(config, teacher, taught, dataset, train) if config.teacher else None
            model, history, seen, seconds = _fit_until_stopped(config, train, val, strategy, plan,
                                                               tuple(callbacks), targets, initial)
            run_id = active.info.run_id
            if interrupts.pending():
                log.warning("%s: logging the best model so far, then ending the run KILLED; go on with "
                            "-P resume=%s", interrupts.pending().signal_name, run_id)
                mlflow.set_tag(INTERRUPTED_TAG, interrupts.pending().signal_name)
            best = _log_results(config, history, seen, seconds)
            _log_model(model, dataset, val)
            if not interrupts.pending():
                drop_checkpoint(run_id)
            interrupts.raise_pending()
    return TrainOutcome(run_id, f"runs:/{run_id}/model", history["val_accuracy"][best],
                        len(history["val_accuracy"]), data_uri)


def _read_data(config: TrainConfig, previous, label: str):
    """The dataset this run trains on (a resumed run's own ``data_uri``, else `config.data`, cleaned
    first when raw), its URI, and its train and val splits; ConfigError when either split is empty.
    A new run logs the splits as inputs, the tags ``fer.data_digest`` and ``fer.data_uri``, and the
    params ``data_uri``, ``data_digest``, ``train_images``, ``val_images``, ``train_digest`` and
    ``val_digest``; a resumed run has them already."""
    data = run_params(previous)["data_uri"] if previous is not None else config.data
    dataset, data_uri = load_training_data(data, config.val_fraction, config.seed)
    train, val = dataset.split("train"), dataset.split("val")
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(f"data {config.data} has {len(train)} train and {len(val)} val images; "
                          "training needs both")
    if previous is None:
        digests = log_split_inputs(dataset, data_uri, label, splits=("train", "val"))
        mlflow.set_tags({DATA_DIGEST_TAG: dataset.digest(), DATA_URI_TAG: data_uri})
        mlflow.log_params({"data_uri": data_uri, "data_digest": dataset.digest(),
                           "train_images": len(train), "val_images": len(val),
                           "train_digest": digests["train"], "val_digest": digests["val"]})
    return dataset, data_uri, train, val


def _log_replicas(config: TrainConfig, strategy) -> None:
    """Log the ``replicas`` param (`log_machine_params`); ConfigError when `config.batch_size`
    does not split evenly over them."""
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the "
                          f"{strategy.num_replicas_in_sync} replicas of strategy={config.strategy}")
    log_machine_params({"replicas": strategy.num_replicas_in_sync})


def _fit_until_stopped(config: TrainConfig, train, val, strategy, plan: CheckpointPlan, extra: tuple,
                       teaching: np.ndarray | None,
                       initial: list[np.ndarray] | None) -> tuple[keras.Model, dict, int, float]:
    """`_fit` within `strategy`'s scope, SIGINT and SIGTERM deferred: either ends the fit after the
    current batch (`interrupts.pending()` then says which). Returns what `_fit` does and the
    training seconds, earlier sessions' included.

    The last state is logged for a run that can be resumed: one stopped or failed. A run that ends
    FINISHED cannot be, so its final state (several copies of every weight) is not logged, and what
    was logged on the way is deleted (`drop_checkpoint`); nor is a pruned sweep trial's logged
    (`tracking.Stopped`), which is never resumed."""
    plan.started = time.perf_counter() - (plan.resumed.train_seconds if plan.resumed else 0.0)
    try:
        with strategy.scope(), interrupts.deferred():
            model, history, seen = _fit(config, train, val, strategy.num_replicas_in_sync, plan, extra, teaching,
                                        initial)
    except Stopped:
        raise
    except BaseException:
        plan.flush()
        raise
    if interrupts.pending():
        plan.flush()
    return model, history, seen, time.perf_counter() - plan.started


def _log_results(config: TrainConfig, history: dict, seen: int, seconds: float) -> int:
    """Log the metrics ``best_val_accuracy``, ``best_epoch``, ``epochs_trained``, ``train_seconds``
    and ``train_images_per_second``, and ``figures/training_curves.png``; returns the best epoch."""
    best = int(np.argmax(history["val_accuracy"]))
    mlflow.log_metrics({
        "best_val_accuracy": history["val_accuracy"][best], "best_epoch": best,
        "epochs_trained": len(history["val_accuracy"]), "train_seconds": seconds,
        "train_images_per_second": seen / seconds,
    })
    figure = curves_figure(history, config.model)
    mlflow.log_figure(figure, "figures/training_curves.png")
    plt.close(figure)
    return best


def _log_model(model: keras.Model, dataset, val) -> None:
    """Log ``model_summary.txt``, the temperature fitted on `val` (`_fit_temperature`), and the
    model (pyfunc, under ``model``, with `dataset`'s class names and a val image as input example),
    its URI also as the tag ``fer.model_uri``."""
    mlflow.log_text(_summary_text(model), "model_summary.txt")
    temperature = _fit_temperature(model, val)
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    logged, resumes = run_params(run).get("temperature"), run.data.tags.get("fer.resumes")
    info = pyfunc_model.log_model(model, name="model", class_names=dataset.class_names,
                                  example_image=val.images[0], temperature=temperature)
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    if logged is not None and resumes:
        # MLflow logs the model config as params; the model logged when the run stopped set
        # `temperature`, which MLflow never changes: the served one goes to a tag, as machine params do
        # (each resume's, so the last resume's tag is the served one even where it equals the param).
        mlflow.set_tag(f"fer.resume_{resumes}.temperature", param_text(float(temperature)))


def _fit_temperature(model, val) -> float:
    """The temperature the logged model divides its log-probabilities by, fitted on the validation
    split by log-loss (`calibration`); logged with the validation ECE before and after it."""
    probabilities = views.probabilities(model, model_input(val.images), views.Settings())
    temperature = calibration.fit_temperature(probabilities, val.labels)
    mlflow.log_metrics({
        "temperature": temperature,
        "val_ece_untempered": calibration.expected_calibration_error(probabilities, val.labels),
        "val_ece": calibration.expected_calibration_error(calibration.tempered(probabilities, temperature),
                                                          val.labels),
    })
    return temperature


# Params that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "checkpoint_minutes")


def _resumable(config: TrainConfig, plan: CheckpointPlan):
    """The stopped training run `config.resume`, its checkpoint downloaded into `plan.folder` and
    read into `plan.resumed`; ConfigError when it finished, was trained otherwise, or has none."""
    client = MlflowClient()
    try:
        run = client.get_run(config.resume)
    except MlflowException as error:
        raise ConfigError(f"resume={config.resume}: no such run in {mlflow.get_tracking_uri()}; "
                          "pass the id of a stopped training run") from error
    if run.data.tags.get(STAGE_TAG) != "train":
        raise ConfigError(f"resume={config.resume} is not a training run; pass the id of a stopped training run")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {config.resume} finished; there is nothing to resume (evaluate its model, "
                          "or start a new run)")
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(f"run {config.resume} was deleted; restore it first (mlflow runs restore --run-id "
                          f"{config.resume}), then resume it")
    logged = run_params(run)
    for key, value in asdict(config).items():
        theirs = logged.get(f"{key}_resolved", logged.get(key))
        if key not in _RESUME_FREE and theirs is not None and not _same(theirs, param_text(value)):
            raise ConfigError(f"run {config.resume} was trained with {key}={theirs}, not {param_text(value)}; "
                              "resume it with the parameters it was started with")
    try:
        state = mlflow.artifacts.load_dict(f"runs:/{config.resume}/{CHECKPOINT}/state.json")
        staging = plan.folder.parent / "download"
        arrays = mlflow.artifacts.download_artifacts(run_id=config.resume, dst_path=str(staging),
                                                     artifact_path=f"{CHECKPOINT}/{state['slot']}")
        plan.folder.mkdir(parents=True, exist_ok=True)
        for path in Path(arrays).glob("*.npz"):
            path.replace(plan.folder / path.name)
    except (MlflowException, OSError, KeyError) as error:
        raise ConfigError(f"run {config.resume} has no checkpoint to resume from (it stopped before one was "
                          "logged); start it again as a new run") from error
    try:
        plan.resumed = TrainingState(**state)
        for path in plan.folder.glob("*.npz"):  # a truncated file has no zip directory: its listing fails
            with np.load(path, allow_pickle=False) as saved:
                saved.files
    except (TypeError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise ConfigError(f"run {config.resume}'s checkpoint is damaged ({str(error).splitlines()[0][:120]}); "
                          "start it again as a new run") from error
    _claim(run)
    return run


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim(run) -> None:
    """Make this process the one to resume `run`, unless another process of this machine still trains
    it (ConfigError): its ``fer.trainer`` tag names a live one. Read again after a moment, so of two
    resumes at once only the later writer goes on. A RUNNING run last trained on another machine cannot
    be checked: warned."""
    client = MlflowClient()
    trainer = client.get_run(run.info.run_id).data.tags.get(TRAINER_TAG, "")
    _refuse_live(run, trainer)
    if run.info.status == "RUNNING" and not trainer.startswith(f"{socket.gethostname()}:"):
        log.warning("run %s is still marked RUNNING (a process killed outright cannot end it), last trained "
                    "on %s; make sure nothing trains it any more", run.info.run_id,
                    trainer.rpartition(":")[0] or "a machine it does not record")
    client.set_tag(run.info.run_id, TRAINER_TAG, _this_process())
    time.sleep(1.0)  # a resume begun at the same moment writes its own meanwhile
    _refuse_live(run, client.get_run(run.info.run_id).data.tags.get(TRAINER_TAG, ""))


def _refuse_live(run, trainer: str) -> None:
    if (pid := _live_trainer(trainer)) is not None:
        raise ConfigError(f"run {run.info.run_id} is being trained by process {pid} of this machine; stop it "
                          f"first (kill -TERM {pid}: it logs its best model and checkpoint, then ends KILLED), "
                          "then resume")


def _live_trainer(trainer: str) -> int | None:
    """The pid of `trainer` (a ``fer.trainer`` tag) when it is another live MLflow process of this
    machine (a process killed outright leaves its run RUNNING and its pid free: not that)."""
    host, _, pid = trainer.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return int(pid)
    return int(pid) if b"mlflow" in command else None  # the pid reused by another program: free


# Params that tell which machine trained, not how: a run resumed elsewhere may see them otherwise.
MACHINE_PARAMS = ("replicas", "weights_used")


def log_machine_params(params: dict) -> None:
    """Log `params` to the active run, skipping those already logged (`tracking.log_params`). In
    a resumed run, a `MACHINE_PARAMS` value this machine sees otherwise (its replica count, where its
    ImageNet weights are cached) goes to the tag ``fer.resume_<n>.<name>`` instead: MLflow never
    changes a logged param, and would refuse the resume."""
    params = dict(params)
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    logged, resumes = run_params(run), run.data.tags.get("fer.resumes")
    for key in MACHINE_PARAMS:
        if key in params and key in logged and resumes and logged[key] != param_text(params[key]):
            mlflow.set_tag(f"fer.resume_{resumes}.{key}", param_text(params.pop(key)))
    log_params(params)


def drop_checkpoint(run_id: str) -> None:
    """Delete the run's logged ``checkpoint/`` (the slots and state.json): a run about to end
    FINISHED cannot be resumed, and its slots hold several copies of every weight. A store that
    cannot delete artifacts keeps them, with a warning naming the folder."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(mlflow.get_run(run_id).info.artifact_uri)
    try:
        if repository.list_artifacts(CHECKPOINT):
            repository.delete_artifacts(CHECKPOINT)
    except (MlflowException, NotImplementedError, OSError) as error:
        log.warning("run %s keeps its checkpoint/ (this artifact store cannot delete it: %s)", run_id, error)


def _same(logged: str, given: str) -> bool:
    """Whether a logged param and a value given now say the same (0.10 and 0.1, True and true)."""
    try:
        return float(logged) == float(given)
    except ValueError:
        return logged.strip().lower() == given.strip().lower()


def _record_resume(run, state: TrainingState) -> None:
    count = int(run.data.tags.get("fer.resumes", "0")) + 1
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stopped = run.data.tags.get(INTERRUPTED_TAG)
    mlflow.set_tags({"fer.resumes": str(count),
                     f"fer.resume_{count}": f"from epoch {state.epoch} of phase {state.phase} at {when}"
                                            + (f", stopped by {stopped}" if stopped else "")})
    if stopped:  # the run goes on: the signal that stopped it is history, kept in the resume tag
        MlflowClient().delete_tag(run.info.run_id, INTERRUPTED_TAG)
    log.info("resuming run %s from epoch %d (phase %d)", run.info.run_id, state.epoch, state.phase)


def run_name(config: TrainConfig, label: str) -> str:
    """`<model>-<data>` and the settings that tell runs apart in the runs table, e.g.
    ``cnn-fer2013.zip sgd lr=0.05 55min`` (`config` resolved)."""
    length = f"{config.time_budget:g}min" if config.time_budget else f"{config.epochs}ep"
    extras = [config.optimizer, f"lr={config.learning_rate:g}", length]
    if config.model == "cnn" and config.widths != models.CNN_WIDTHS:
        extras.append("widths=" + ",".join(map(str, config.widths)))
    if config.model == "cnn" and set(config.convs) != {2}:
        extras.append("convs=" + ",".join(map(str, config.convs)))
    if config.model in models.RESNET_NAMES:
        extras.append(f"weights={Path(config.weights).name}")
    return f"{config.model}-{label} " + " ".join(extras)


@dataclass(frozen=True)
class _Fitting:
    """What every phase of one fit shares: the settings, the checkpoint plan, the callbacks that
    log the epochs and count the images (one each, across phases), the caller's `extra` callbacks,
    and both splits' inputs, targets and the train split's sample weights."""

    config: TrainConfig
    plan: CheckpointPlan
    replicas: int
    extra: tuple
    logger: EpochLogger
    counter: ImageCounter
    x_train: np.ndarray
    x_val: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    sample_weights: np.ndarray | None

    @classmethod
    def of(cls, config: TrainConfig, train, val, replicas: int, plan: CheckpointPlan, extra: tuple,
           teaching: np.ndarray | None) -> _Fitting:
        """The fit of `train` against `val`: one-hot targets (`teaching` instead for train when
        given), sample weights with ``class_weight=balanced``, a fresh logger and image counter."""
        x_train, x_val = model_input(train.images), model_input(val.images)
        y_train, y_val = one_hot(train.labels, 7) if teaching is None else teaching, one_hot(val.labels, 7)
        weights = class_weights(train.labels, 7) if config.class_weight == "balanced" else None
        return cls(config, plan, replicas, extra, EpochLogger(), ImageCounter(len(x_train), config.batch_size),
                   x_train, x_val, y_train, y_val, _sample(weights, train.labels))

    def datasets(self, train_inputs, val_inputs, augmentation) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        """The train and val datasets of these inputs (images, or a frozen backbone's features)
        with the fit's targets; train shuffled, augmented with `augmentation`, batches whole when
        replicated; val padded to the replicas (`inputs.eval_dataset`)."""
        config = self.config
        return (train_dataset(train_inputs, self.y_train, config.batch_size, augmentation, config.seed,
                              self.sample_weights, drop_remainder=self.replicas > 1),
                eval_dataset(val_inputs, self.y_val, config.batch_size, self.replicas))


def _fit(config: TrainConfig, train, val, replicas: int, plan: CheckpointPlan,
         extra: tuple = (), teaching: np.ndarray | None = None,
         initial: list[np.ndarray] | None = None) -> tuple[keras.Model, dict, int]:
    """Build and fit the model (from `plan.resumed` on, if given), with the caller's `extra`
    callbacks in every phase; returns it with the weights of its best validation epoch (over both
    phases of a pretrained ResNet), the merged history and the images seen. `teaching`: the
    train split's targets mixed with a teacher's (`teaching.teacher_targets`), else the labels alone.
    `initial`: the weights to start from (``init``), trained in one phase."""
    fitting = _Fitting.of(config, train, val, replicas, plan, extra, teaching)
    model, pretrained = _build_network(config, resuming=plan.resumed is not None, initial=initial)
    if pretrained is None:
        history = _fit_in_one_phase(fitting, model)
    else:
        history = _fit_in_two_phases(fitting, pretrained)
    return model, history, fitting.counter.seen


def _build_network(config: TrainConfig, resuming: bool,
                   initial: list[np.ndarray] | None = None) -> tuple[keras.Model, models.ResNetParts | None]:
    """The network `config` names, and its parts when it is a ResNet with pretrained weights (to
    train in two phases), else None. Logs the params ``weights_used`` and ``num_params``
    (`log_machine_params`); warns when a ResNet starts from scratch (not again on resuming).
    With `initial` (or on resuming a run that had it) the network starts from `config.init`'s
    weights, in one phase; ConfigError when that network's shapes differ from this one's."""
    if config.init:
        model = models.build_model(config.model, image_size=config.image_size, widths=config.widths,
                                   convs=config.convs, dropout=config.dropout, weights="none")
        if initial is not None:
            model.set_weights(initial)
        log_machine_params({"weights_used": f"{config.init} (init)", "num_params": model.count_params()})
        return model, None
    if config.model in models.RESNET_NAMES:
        with warnings.catch_warnings():  # the fallback to random weights is logged below, once
            warnings.filterwarnings("ignore", message="weights=auto", category=UserWarning)
            parts = models.build_resnet(config.model, config.image_size, config.weights, dropout=config.dropout)
        model, described = parts.model, parts.weights
    else:
        parts = None
        model = models.build_model(config.model, image_size=config.image_size, widths=config.widths,
                                   convs=config.convs, dropout=config.dropout,
                                   weights="none" if config.weights == "auto" else config.weights)
        described = "none (trained from scratch)"
    log_machine_params({"weights_used": described, "num_params": model.count_params()})
    if parts is None or described.startswith("none"):
        if parts is not None and not resuming:
            log.warning("training %s from scratch (weights: %s)", config.model, described)
        return model, None
    return model, parts


def _fit_in_one_phase(fitting: _Fitting, model: keras.Model) -> dict:
    """Fit the whole `model` on the augmented images (a CNN, or a ResNet from scratch); returns
    the history."""
    config = fitting.config
    return _phase(fitting, model, config.learning_rate, config.epochs, 0,
                  *fitting.datasets(fitting.x_train, fitting.x_val, config.augmentation), minutes=config.time_budget)


def _fit_in_two_phases(fitting: _Fitting, parts: models.ResNetParts) -> dict:
    """A pretrained ResNet: phase 1 trains the head on the frozen backbone's features; phase 2
    (with ``fine_tune_epochs``, unless a signal came) fine-tunes the top of the backbone with it,
    from step `len(phase 1)` on, and `parts.model` keeps the best of both phases. Returns the
    history, phase 2's epochs after phase 1's. A run resumed in phase 2 takes phase 1's history
    from the checkpoint's state and its best weights from the slot ``phase_one_best.npz``."""
    config, plan = fitting.config, fitting.plan
    resumed_phase = plan.resumed.phase if plan.resumed else 1
    if plan.resumed is not None and resumed_phase == 1:
        # The head's arrays checked now, not once the backbone's features are computed (minutes on CPU).
        model_arrays(plan.folder, parts.head, "head")
    history = _fit_head(fitting, parts) if resumed_phase == 1 else plan.resumed.phase_one
    if config.fine_tune_epochs <= 0 or interrupts.pending():
        return history
    if resumed_phase == 1:
        head_best = parts.model.get_weights()  # phase 1's best, restored by its early stopping
        save_arrays(plan.folder / "phase_one_best.npz", head_best)
    else:
        head_best = fitting_arrays(plan.folder / "phase_one_best.npz", parts.model.weights)
    models.unfreeze_top(parts.backbone, config.fine_tune_layers)
    tuned = _phase(fitting, parts.model, config.fine_tune_learning_rate, config.fine_tune_epochs,
                   len(history["loss"]), *fitting.datasets(fitting.x_train, fitting.x_val, config.augmentation),
                   phase=2, phase_one=history)
    keep_best_of_phases(parts.model, head_best, history, tuned)
    return {k: history[k] + tuned[k] for k in history}


def _fit_head(fitting: _Fitting, parts: models.ResNetParts) -> dict:
    """Phase 1: the backbone is frozen, so it runs once per image (no augmentation); the head
    trains on its features. Returns the phase's history."""
    config = fitting.config
    parts.backbone.trainable = False
    features = [parts.features.predict(x, batch_size=config.batch_size, verbose=0)
                for x in (fitting.x_train, fitting.x_val)]
    return _phase(fitting, parts.head, config.learning_rate, config.epochs, 0, *fitting.datasets(*features, None),
                  minutes=config.time_budget)


def _phase(fitting: _Fitting, model: keras.Model, learning_rate: float, epochs: int, first_epoch: int,
           train: tf.data.Dataset, val: tf.data.Dataset, minutes: float = 0.0, phase: int = 1,
           phase_one: dict | None = None) -> dict:
    """Compile and fit `model` for `epochs`, logging from step `first_epoch`; best weights restored.
    Returns the phase's history (its earlier sessions' epochs included when resumed).

    `fitting.logger` logs the epochs to MLflow, `fitting.counter` counts the images trained on,
    `fitting.extra` joins the callbacks. The state after each epoch goes to `fitting.plan`
    (`loop.Checkpointer`); when `plan.resumed` is this phase's, training goes on from it:
    weights, optimizer (its step, so the schedule), epoch, early stopping, budget.

    With `minutes`, training also stops once that much time has passed, and the cosine schedule
    follows whichever of the time and the epochs runs out first (`loop.TimeBudget`).
    """
    config, plan, counter = fitting.config, fitting.plan, fitting.counter
    resumed = plan.resumed if plan.resumed is not None and plan.resumed.phase == phase else None
    state = resumed or TrainingState(phase=phase, phase_one=phase_one, slot=plan.logged_slot())
    steps = int(train.cardinality()) * epochs
    warmup_steps = min(steps // 10, int(train.cardinality()))
    callbacks = [fitting.logger, counter, StopOnSignal(), *fitting.extra]
    budget = None
    if minutes:
        budget = TimeBudget(minutes, learning_rate, steps, warmup_steps, config.schedule == "cosine")
        callbacks.append(budget)
    _compile(model, config, "constant" if minutes else config.schedule, learning_rate, steps, warmup_steps)
    best_weights = None
    if resumed is not None:
        saved_best = restore_model(model, plan.folder)
        best_weights = saved_best if resumed.best is not None else None
        counter.seen = resumed.images_seen
        if budget is not None:
            budget.restore(resumed)
    fitting.logger.offset = first_epoch
    stop = ResumableEarlyStopping(config.patience, resumed, best_weights)
    plan.current = Checkpointer(plan.folder, plan.minutes, state, stop, counter, budget, plan.started)
    verbose = 1 if sys.stdout.isatty() else 2  # progress bars in a terminal, a line per epoch in logs
    # shuffle=False: `train` shuffles itself (learning/inputs.py); Keras would ignore True, with a warning.
    # Between early stopping and the checkpoint; the average's batch-norm statistics from training batches.
    averaged = ([AveragedWeights(train.unbatch().batch(STATISTICS_BATCH).take(STATISTICS_IMAGES // STATISTICS_BATCH))]
                if config.ema else [])
    model.fit(train, validation_data=val, epochs=epochs, initial_epoch=state.epoch, shuffle=False,
              callbacks=[*callbacks, stop, *averaged, plan.current], verbose=verbose)
    return state.history


def _compile(model: keras.Model, config: TrainConfig, schedule: str, learning_rate: float, steps: int,
             warmup_steps: int) -> None:
    """Compile `model` with `config`'s optimizer on `schedule`, its label-smoothed cross-entropy and
    accuracy. Several replicas: validation is padded with zero-weight images
    (`inputs.eval_dataset`), so accuracy and loss honour sample weights there."""
    replicated = tf.distribute.get_strategy().num_replicas_in_sync > 1
    model.compile(
        optimizer=optimizer(config.optimizer, schedule, learning_rate, config.weight_decay, steps, warmup_steps,
                            config.ema),
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=config.label_smoothing,
            reduction="mean_with_sample_weight" if replicated else "sum_over_batch_size"),
        **({"weighted_metrics": ["accuracy"]} if replicated else {"metrics": ["accuracy"]}),
    )


def _sample(weights: dict | None, labels: np.ndarray) -> np.ndarray | None:
    return None if weights is None else np.array([weights[int(c)] for c in labels], np.float32)


def _summary_text(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), expand_nested=True)
    return "\n".join(lines)
