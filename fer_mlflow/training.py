"""Pieces of the train stage that are not the training loop: data, optimiser, logging, figures."""

from __future__ import annotations

import math
import time

import keras
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from fer_mlflow import interrupts  # noqa: E402
from fer_mlflow.dataset import Dataset  # noqa: E402
from fer_mlflow.errors import ConfigError  # noqa: E402
from fer_mlflow.sources import is_artifact, read_source  # noqa: E402

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def load_training_data(data: str, val_fraction: float, seed: int) -> tuple[Dataset, str]:
    """The cleaned dataset for `data` and the URI it was read from.

    A clean run's artifact is used as it is; a raw source is cleaned with the default rules in a
    nested clean run first, so the training run links to a full record of the cleaning.
    """
    if is_artifact(data):
        return read_source(data)[0], data
    from fer_mlflow import clean

    outcome = clean.run(data, val_fraction=val_fraction, seed=seed, nested=True)
    return outcome.result.dataset, outcome.dataset_uri


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights, n / (classes * count): each class then carries the same total weight."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return {c: float(len(labels) / (num_classes * counts[c])) if counts[c] else 0.0
            for c in range(num_classes)}


def optimizer(name: str, schedule: str, learning_rate: float, weight_decay: float, steps: int, warmup_steps: int):
    """The optimizer `name` ("adamw", or "sgd": Nesterov momentum 0.9) for `learning_rate`.

    With `schedule` "cosine" the rate warms up linearly over `warmup_steps`, then decays to zero by
    `steps`; else it stays constant. Keras decouples `weight_decay` from the gradient in both
    optimizers: each step shrinks the weights by learning rate x weight_decay.
    """
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else learning_rate, max(steps - warmup_steps, 1),
            warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps,
        )
    else:
        rate = learning_rate
    if name == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return keras.optimizers.AdamW(rate, weight_decay=weight_decay)


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

    def progress(self) -> float:
        """How much of the budget is spent, 0..1: the larger of the time and the step fractions."""
        elapsed = time.perf_counter() - self.started
        return min(1.0, max(elapsed / self.seconds, self.step / self.total_steps))

    def rate(self) -> float:
        warmup = min(1.0, self.step / self.warmup_steps) if self.warmup_steps else 1.0
        return self.peak * warmup * 0.5 * (1.0 + math.cos(math.pi * self.progress()))

    def on_train_begin(self, logs=None):
        self.step, self.started = 0, time.perf_counter()

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
    """`default`, or `mirrored`: one replica per visible GPU (per logical CPU device if none)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
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
