"""Pieces of the train stage that are not the training loop: data, optimiser, logging, figures,
checkpoints."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from fer_mlflow.learning import interrupts  # noqa: E402
from fer_mlflow.errors import ConfigError  # noqa: E402

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
CHECKPOINT = "checkpoint"  # the run's artifact folder of the latest training state
# With `ema`, each epoch the average's batch-norm statistics are recomputed from this many training
# images, in batches of this size (`AveragedWeights`): on FER2013 1,024 scored as 8,192 did, within
# 0.3 points, in an eighth of the time (about 4 s; BENCHMARKS.md).
STATISTICS_IMAGES = 1024
STATISTICS_BATCH = 256


def soft_targets(labels: np.ndarray, teacher: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """Distillation targets (N x classes, float32, rows summing to 1): `alpha` of the `teacher`'s
    probabilities softened by `temperature` (`calibration.tempered`), 1 - `alpha` of the one-hot label."""
    from fer_mlflow.serving.calibration import tempered

    one_hot = np.eye(teacher.shape[1], dtype=np.float64)[labels]
    return ((1 - alpha) * one_hot + alpha * tempered(teacher, temperature)).astype(np.float32)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights, n / (classes * count): each class then carries the same total weight."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return {c: float(len(labels) / (num_classes * counts[c])) if counts[c] else 0.0
            for c in range(num_classes)}


def optimizer(name: str, schedule: str, learning_rate: float, weight_decay: float, steps: int, warmup_steps: int,
              ema: float = 0.0):
    """The optimizer `name` ("adamw", or "sgd": Nesterov momentum 0.9) for `learning_rate`.

    With `schedule` "cosine" the rate warms up linearly over `warmup_steps`, then decays to zero by
    `steps`; else it stays constant. Keras decouples `weight_decay` from the gradient in both
    optimizers: each step shrinks the weights by learning rate x weight_decay. With `ema` (a
    momentum, 0 < ema < 1) the optimizer also keeps an exponential moving average of the trainable
    weights, updated every step (Keras' own ``use_ema``; `AveragedWeights` validates it).
    """
    averaging = {"use_ema": True, "ema_momentum": ema} if ema else {}
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else learning_rate, max(steps - warmup_steps, 1),
            warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps,
        )
    else:
        rate = learning_rate
    if name == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=weight_decay, **averaging)
    return keras.optimizers.AdamW(rate, weight_decay=weight_decay, **averaging)


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `minutes` of it have passed (checked after every step).

    With `cosine`, it also sets the learning rate before every step: a linear warm-up over
    `warmup_steps`, then cosine decay driven by whichever runs out first, the time or the
    `total_steps`, so the rate reaches zero as the budget ends on a slow machine and a fast one alike.
    The optimizer must have been made with a constant rate (`optimizer(name, "constant", ...)`).
    """

    def __init__(self, minutes: float, peak: float, total_steps: int, warmup_steps: int, cosine: bool):
        super().__init__()
        self.seconds, self.peak, self.cosine = minutes * 60.0, peak, cosine
        self.total_steps, self.warmup_steps = max(total_steps, 1), warmup_steps
        self.step, self.started = 0, 0.0
        self.used_seconds, self.used_steps = 0.0, 0  # before a resume (`restore`)

    def progress(self) -> float:
        """How much of the budget is spent, 0..1: the larger of the time and the step fractions."""
        elapsed = time.perf_counter() - self.started
        return min(1.0, max(elapsed / self.seconds, self.step / self.total_steps))

    def rate(self) -> float:
        warmup = min(1.0, self.step / self.warmup_steps) if self.warmup_steps else 1.0
        return self.peak * warmup * 0.5 * (1.0 + math.cos(math.pi * self.progress()))

    def on_train_begin(self, logs=None):
        # A resumed run (`restore`) counts the time and steps it had used before it stopped.
        self.step, self.started = self.used_steps, time.perf_counter() - self.used_seconds

    def restore(self, state: TrainingState) -> None:
        self.used_seconds, self.used_steps = state.budget_seconds, state.budget_steps

    def on_train_batch_begin(self, batch, logs=None):
        if self.cosine:
            self.model.optimizer.learning_rate = self.rate()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if time.perf_counter() - self.started >= self.seconds:
            self.model.stop_training = True


class StopOnSignal(keras.callbacks.Callback):
    """Ends the fit after the current batch once SIGINT or SIGTERM has come (`interrupts.deferred`);
    Keras then validates that epoch and early stopping restores the best weights, as at a normal end."""

    def on_train_batch_end(self, batch, logs=None):
        if interrupts.pending():
            self.model.stop_training = True


class AveragedWeights(keras.callbacks.Callback):
    """Validates the optimizer's moving average of the weights (``use_ema``) instead of the weights
    being trained: the average goes in as validation begins and stays through the epoch's end, so
    early stopping keeps it as the best weights (and restores it at the end); then the trained
    weights come back, for the next epoch and for the checkpoint (which holds the average among
    the optimizer's variables). Place it after early stopping and before the checkpointer.

    Keras averages the trainable weights only: the batch-normalization statistics belong to the
    weights being trained, and with the average they mislead it (after 9 epochs of a CutMix run, the
    average scored 0.2386 on FER2013's validation faces with them, naming nearly every face one
    class, and 0.5458 with its own; BENCHMARKS.md). So, before validating, `recompute_statistics`
    gives the average its own from `batches` (training inputs, or (inputs, targets[, weights])
    pairs); the trained statistics come back with the trained weights.

    At the end of the fit Keras itself puts the average in (`finalize_variable_values`), before
    early stopping restores the best epoch's average, statistics included."""

    def __init__(self, batches=None):
        super().__init__()
        self.batches = batches
        self.trained: list | None = None

    def _variables(self) -> tuple[list, list]:
        averages = self.model.optimizer._model_variables_moving_average  # Keras keeps no public name for them
        return self.model.trainable_variables, averages

    def on_test_begin(self, logs=None):
        if self.trained is None and self.model.optimizer.built:
            variables, averages = self._variables()
            self.trained = self.model.get_weights()  # the statistics too
            for variable, average in zip(variables, averages, strict=True):
                variable.assign(average)
            if self.batches is not None:
                recompute_statistics(self.model, self.batches)

    def on_epoch_end(self, epoch, logs=None):
        if self.trained is not None:
            self.model.set_weights(self.trained)
            self.trained = None


def recompute_statistics(model: keras.Model, batches) -> None:
    """Sets the moving mean and variance of each of `model`'s trainable BatchNormalization layers
    to the mean of its batch statistics over `batches` (training inputs, or tuples whose first item
    is), as ``torch.optim.swa_utils.update_bn`` does for averaged weights: each batch goes through
    the model in training mode with the layers' momentum set so that batch k weighs 1/k."""
    norms = list(_batch_norms(model))
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    try:
        for step, batch in enumerate(batches):
            for norm in norms:
                norm.momentum = step / (step + 1)
            model(batch[0] if isinstance(batch, tuple | list) else batch, training=True)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


def _batch_norms(layer):
    """The BatchNormalization layers inside `layer` (nested models included) that training updates."""
    for inner in getattr(layer, "layers", []):
        if isinstance(inner, keras.layers.BatchNormalization):
            if inner.trainable:
                yield inner
        else:
            yield from _batch_norms(inner)


class ImageCounter(keras.callbacks.Callback):
    """Counts the training images the model has stepped through, a cut last epoch included.

    Keras reports steps, not images: every batch is `batch_size` images except an epoch's last,
    which holds what is left of the `images`.
    """

    def __init__(self, images: int, batch_size: int):
        super().__init__()
        self.images, self.batch_size = images, batch_size
        self.seen, self.in_epoch = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.in_epoch = 0

    def on_train_batch_end(self, batch, logs=None):
        step = min(self.batch_size, self.images - self.in_epoch)
        self.in_epoch += step
        self.seen += step


def make_strategy(name: str):
    """`default`; `mirrored`: one replica per visible GPU (per logical CPU device if none);
    `multi_worker`: data-parallel over the workers of ``TF_CONFIG`` (`workers`)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        raise ConfigError(
            f"strategy=mirrored needs two or more devices and this machine has {len(devices)}; "
            "use -P strategy=default"
        )
    return tf.distribute.MirroredStrategy(devices)


class EpochLogger(keras.callbacks.Callback):
    """Logs the epoch metrics and the learning rate to the active MLflow run with step = epoch.

    One point per epoch per metric, steps counting on from `offset` across training phases, so the
    UI's charts have epochs on their x-axis (MLflow's own Keras autologging also logs validation
    metrics at step 0 each epoch, which garbles them).
    """

    offset = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        metrics = {k: float(logs[k]) for k in EPOCH_METRICS if k in logs}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        mlflow.log_metrics(metrics, step=self.offset + epoch)


def curves_figure(history: dict[str, list[float]], title: str):
    """Accuracy and loss per epoch, train and validation, with the best validation epoch marked."""
    epochs = np.arange(len(history["loss"]))
    best = int(np.argmax(history["val_accuracy"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, history[metric], label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], label=f"val {metric}")
        ax.axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(f"{title}: training curves")
    return fig


@dataclass
class TrainingState:
    """Where training stands after an epoch, besides the weights: what a checkpoint holds to go on
    as if it had never stopped (`Checkpointer`, `ResumableEarlyStopping`, `TimeBudget.restore`)."""

    phase: int = 1  # pretrained ResNets: 1 (head) or 2 (fine-tuning); else 1
    epoch: int = 0  # epochs done in this phase: the next one's index
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in EPOCH_METRICS})
    best: float | None = None  # early stopping: the best val_accuracy, its epoch, epochs since
    best_epoch: int = 0
    wait: int = 0
    budget_seconds: float = 0.0  # of the time budget, and the steps it counted
    budget_steps: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # all sessions of this run together
    phase_one: dict[str, list[float]] | None = None  # in phase 2: phase 1's history
    slot: str = ""  # which of checkpoint/a/ and checkpoint/b/ holds the arrays of the logged state

    def save(self, folder: Path, model: keras.Model, best_weights: list | None) -> None:
        """Write the model's and optimizer's variables and the best weights to `folder`; the state
        itself is logged by `Checkpointer.flush`."""
        folder.mkdir(parents=True, exist_ok=True)
        save_arrays(folder / "weights.npz", model.get_weights())
        save_arrays(folder / "optimizer.npz", [v.numpy() for v in model.optimizer.variables])
        save_arrays(folder / "best_weights.npz", best_weights if best_weights is not None else model.get_weights())


def save_arrays(path: Path, arrays: list) -> None:
    np.savez(path, *[np.asarray(array) for array in arrays])


def load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return [saved[f"arr_{index}"] for index in range(len(saved.files))]


def fitting_arrays(path: Path, variables: list, owner: str = "model") -> list[np.ndarray]:
    """The arrays of the checkpoint file `path`, one per variable of `variables` (the `owner`'s) and of
    its shape; ConfigError naming the first that differs (a file changed or taken from another run's
    checkpoint, or written by another Keras version), before any is assigned: Keras' own error would
    come later, or at the end of training for the best weights."""
    arrays = load_arrays(path)
    if len(arrays) != len(variables):
        raise ConfigError(f"the checkpoint's {path.name} holds {len(arrays)} arrays where the {owner} has "
                          f"{len(variables)}: it is not this run's (or another Keras version wrote it); start it "
                          "again as a new run")
    for index, (array, variable) in enumerate(zip(arrays, variables)):
        if tuple(array.shape) != tuple(variable.shape):
            raise ConfigError(f"the checkpoint's {path.name} array {index} is {tuple(array.shape)} where the {owner}'s "
                              f"{variable.path} is {tuple(variable.shape)}: it is not this run's; start it again "
                              "as a new run")
    return arrays


def model_arrays(folder: Path, model: keras.Model, owner: str = "model") -> tuple[list, list | None]:
    """A checkpoint's weights and best weights (None where it has none), each checked against `model`
    (`fitting_arrays`)."""
    saved_best = folder / "best_weights.npz"
    return (fitting_arrays(folder / "weights.npz", model.weights, owner),
            fitting_arrays(saved_best, model.weights, owner) if saved_best.exists() else None)


def restore_model(model: keras.Model, folder: Path) -> list[np.ndarray] | None:
    """Put a checkpoint's model and optimizer variables back into `model` (compiled as it was), each
    file checked against the model first (`fitting_arrays`); returns its best weights, None where the
    checkpoint has none."""
    weights, best = model_arrays(folder, model)
    model.optimizer.build(model.trainable_variables)
    averages = fitting_arrays(folder / "optimizer.npz", model.optimizer.variables, "optimizer")
    model.set_weights(weights)
    for variable, value in zip(model.optimizer.variables, averages, strict=True):
        variable.assign(value)
    return best


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on val_accuracy, best weights restored, that can start from a checkpoint's
    best, its epoch and its patience used (`state`, `best_weights`)."""

    def __init__(self, patience: int, state: TrainingState | None = None, best_weights: list | None = None):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True)
        self.state, self.saved_best = state, best_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state is not None and self.state.best is not None:
            self.best, self.best_epoch, self.wait = self.state.best, self.state.best_epoch, self.state.wait
            self.best_weights = self.saved_best


class Checkpointer(keras.callbacks.Callback):
    """After every whole epoch, the whole training state (`TrainingState`, variables, best weights)
    in `folder`; logged to the active run under ``checkpoint/`` when `minutes` have passed since the
    last time (0: every epoch), and by `flush`. Runs after early stopping, whose state it reads.

    An epoch cut short (a signal or the time budget stops the fit after a batch) is added to
    `state.history`, for the caller's figures, but never saved: the checkpoint stays at the last
    whole epoch, so a resumed run trains the cut epoch again, in full."""

    def __init__(self, folder: Path, minutes: float, state: TrainingState, stop: ResumableEarlyStopping,
                 counter: ImageCounter, budget: TimeBudget | None, started: float):
        super().__init__()
        self.folder, self.seconds, self.state = folder, minutes * 60.0, state
        self.stop, self.counter, self.budget, self.started = stop, counter, budget, started
        self.logged_at, self.unlogged = time.monotonic(), False
        self.saved = copy.deepcopy(state)  # the state of the arrays in `folder`: what `flush` logs
        self.batches = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        state = self.state
        for key in EPOCH_METRICS:
            state.history[key].append(float((logs or {}).get(key, float("nan"))))
        steps = self.params.get("steps")
        if steps and self.batches < steps:
            return
        state.epoch = epoch + 1
        state.best = None if self.stop.best is None else float(self.stop.best)
        state.best_epoch, state.wait = int(self.stop.best_epoch), int(self.stop.wait)
        if self.budget is not None:
            state.budget_seconds = time.perf_counter() - self.budget.started
            state.budget_steps = self.budget.step
        state.images_seen = self.counter.seen
        state.train_seconds = time.perf_counter() - self.started
        state.save(self.folder, self.model, self.stop.best_weights)
        self.saved = copy.deepcopy(state)
        self.unlogged = True
        if time.monotonic() - self.logged_at >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Log the latest saved state to the run, if it changed since it was last logged.

        The arrays go to the slot (checkpoint/a/ or b/) not named by the logged state.json, and
        state.json, naming the new slot, goes last: a process killed while logging leaves the last
        complete checkpoint in place, never new state beside old arrays. The slot counts as taken
        only once state.json names it, so a flush that failed half-way writes to the same free slot
        when tried again."""
        if self.unlogged:
            slot = other_slot(self.state.slot)
            for path in sorted(self.folder.glob("*.npz")):
                mlflow.log_artifact(str(path), f"{CHECKPOINT}/{slot}")
            mlflow.log_dict({**asdict(self.saved), "slot": slot}, f"{CHECKPOINT}/state.json")
            self.state.slot = self.saved.slot = slot
            self.logged_at, self.unlogged = time.monotonic(), False


def other_slot(slot: str) -> str:
    """The checkpoint slot to write next when the logged state.json names `slot` ('' : none yet)."""
    return "b" if slot == "a" else "a"


@dataclass
class CheckpointPlan:
    """Where this run keeps its training state (`Checkpointer`): a local `folder`, logged
    every `minutes`; the state it resumes from, if any; the callback of the phase now training."""

    folder: Path
    minutes: float
    started: float  # perf_counter() at this session's start, less earlier sessions' training time
    resumed: TrainingState | None = None
    current: Checkpointer | None = None

    def flush(self) -> None:
        if self.current is not None:
            self.current.flush()

    def logged_slot(self) -> str:
        """The slot the run's logged state.json names ('' before any): a new phase's first
        checkpoint must go to the other one, or it would overwrite the only whole checkpoint."""
        if self.current is not None:
            return self.current.state.slot
        return self.resumed.slot if self.resumed is not None else ""


def keep_best_of_phases(model: keras.Model, phase_one_best: list, phase_one: dict, phase_two: dict) -> bool:
    """Put phase 1's best weights back into `model` (holding phase 2's best) when fine-tuning peaked
    no higher on val_accuracy, so that the model logged is the best of both phases, as
    ``best_val_accuracy`` and ``best_epoch`` (argmax over the merged history) say; True if it did."""
    if max(phase_two["val_accuracy"]) <= max(phase_one["val_accuracy"]):
        model.set_weights(phase_one_best)
        return True
    return False
