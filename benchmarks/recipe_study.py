"""Measure training-recipe options on validation data: weight averaging (EMA, SWA), mixup, CutMix.

The shipped model's recipe (the cnn 32-64-128-256, dropout 0.1, random erasing 0.25, SGD Nesterov
at 0.05 with weight decay 0.005, one epoch of warm-up then cosine, label smoothing 0.1, batch 64)
takes about six hours on two CPU cores, so options are compared here in one script that runs on any
Keras 3 backend (JAX on a GPU: `KERAS_BACKEND=jax`), on the cleaned train/val split the shipped
model was trained on. Only validation accuracy is measured; PublicTest is never read.

Each run records, every epoch, the validation accuracy of its weights and of an exponential moving
average of them (all variables, batch-norm statistics too, decay `--ema-decay` per step), and at the
end that of SWA: the mean of the weights at the end of each of the last quarter of the epochs.

    KERAS_BACKEND=jax python benchmarks/recipe_study.py --data trainval.npz --mix none --seed 0 \
        --out runs/base-0.jsonl --epochs 100

`--deadline` (a Unix time) with `--probe-dir` makes the runs started together time a few steps,
wait for each other, and then all train for the same number of epochs that ends before it.
"""

from __future__ import annotations

import argparse
import json
import lzma
import time
from pathlib import Path

import keras
import numpy as np

from fer_mlflow.data.dataset import model_input
from fer_mlflow.learning.models import build_cnn

ERASE_FILL = 128.0  # as fer_mlflow.learning.inputs: mid-grey on the 0..255 scale
BATCH_SIZE = 64


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images, val labels) from an npz (optionally .xz) holding
    `images` (N x 48 x 48 uint8), `labels` and a boolean `val`."""
    raw = lzma.open(path) if path.suffix == ".xz" else path.open("rb")
    with raw, np.load(raw) as data:
        images, labels, val = data["images"], data["labels"].astype(np.int64), data["val"]
    inputs = model_input(images)
    return inputs[~val], labels[~val], inputs[val], labels[val]


def augmentation(seed: int) -> keras.Sequential:
    """The training augmentation of the shipped recipe (fer_mlflow.learning.inputs.augmenter's layers)."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1),
        keras.layers.RandomRotation(10.0 / 360.0, fill_mode="nearest", seed=seed + 2),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 3),
        keras.layers.RandomErasing((0.25, 0.25), fill_value=ERASE_FILL, seed=seed + 4),
    ], name="augmentation")


class Batches(keras.utils.PyDataset):
    """Shuffled one-hot batches, mixed by mixup or CutMix (each batch with a permutation of itself)."""

    def __init__(self, images, labels, mix: str, alpha: float, seed: int):
        super().__init__()
        self.images, self.targets = images, np.eye(7, dtype=np.float32)[labels]
        self.mix, self.alpha, self.rng = mix, alpha, np.random.default_rng(seed)
        self.order = self.rng.permutation(len(images))

    def __len__(self):
        return -(-len(self.images) // BATCH_SIZE)

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.images))

    def __getitem__(self, index):
        chosen = self.order[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]
        x, y = self.images[chosen].copy(), self.targets[chosen].copy()
        if self.mix == "none":
            return x, y
        other = self.rng.permutation(len(x))
        share = self.rng.beta(self.alpha, self.alpha)
        if self.mix == "mixup":
            return share * x + (1 - share) * x[other], share * y + (1 - share) * y[other]
        # CutMix: a box of (1 - share) of the area taken from the partner, labels by area.
        side = np.sqrt(1 - share)
        height, width = int(48 * side), int(48 * side)
        top, left = self.rng.integers(0, 48 - height + 1), self.rng.integers(0, 48 - width + 1)
        x[:, top:top + height, left:left + width] = x[other, top:top + height, left:left + width]
        kept = 1 - height * width / 48**2
        return x, kept * y + (1 - kept) * y[other]


class Averages(keras.callbacks.Callback):
    """EMA of all of the network's variables every `every` steps; SWA of epoch ends from `swa_from`;
    the validation accuracy of the EMA weights each epoch, written with the epoch's logs."""

    def __init__(self, network, val, decay: float, swa_from: int, out: Path, every: int = 10):
        super().__init__()
        self.network, self.val, self.decay, self.every = network, val, decay ** every, every
        self.swa_from, self.out, self.ema, self.swa, self.swa_count, self.step = swa_from, out, None, None, 0, 0

    def on_train_begin(self, logs=None):
        self.ema = [w.astype(np.float64) for w in self.network.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every:
            return
        for average, w in zip(self.ema, self.network.get_weights()):
            average *= self.decay
            average += (1 - self.decay) * w

    def accuracy(self, weights) -> float:
        current = self.network.get_weights()
        self.network.set_weights([w.astype(c.dtype) for w, c in zip(weights, current)])
        probabilities = self.network.predict(self.val[0], batch_size=512, verbose=0)
        self.network.set_weights(current)
        return float(np.mean(probabilities.argmax(1) == self.val[1]))

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                  "ema_val_accuracy": self.accuracy(self.ema), "time": time.time()}
        if epoch + 1 >= self.swa_from:
            weights = self.network.get_weights()
            self.swa = [w.astype(np.float64) for w in weights] if self.swa is None else [
                s + w for s, w in zip(self.swa, weights)]
            self.swa_count += 1
        with self.out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, logs=None):
        final = {"final": True, "swa_epochs": self.swa_count,
                 "swa_val_accuracy": self.accuracy([s / self.swa_count for s in self.swa]),
                 "ema_val_accuracy": self.accuracy(self.ema),
                 "val_accuracy": self.accuracy(self.network.get_weights())}
        with self.out.open("a") as f:
            f.write(json.dumps(final) + "\n")


def trainer(network, seed: int, epochs: int, steps_per_epoch: int) -> keras.Model:
    """The network behind the augmentation, compiled with the shipped recipe's optimizer and loss."""
    inputs = keras.Input((48, 48, 1))
    model = keras.Model(inputs, network(augmentation(seed)(inputs)))
    steps = epochs * steps_per_epoch
    rate = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - steps_per_epoch, 1), warmup_target=0.05, warmup_steps=steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=0.005),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    return model


def agreed_epochs(args, batches, model) -> int:
    """Time a few steps, wait for the runs started together, and agree on the epochs that fit."""
    x, y = batches[0]
    model.train_on_batch(x, y)  # compiles
    start = time.time()
    for index in range(1, 41):
        model.train_on_batch(*batches[index % len(batches)])
    step = (time.time() - start) / 40
    probe = Path(args.probe_dir)
    (probe / f"{args.out.name}.step").write_text(str(step))
    while len(list(probe.glob("*.step"))) < args.runs_together:
        time.sleep(1)
    slowest = max(float(p.read_text()) for p in probe.glob("*.step"))
    epoch_seconds = slowest * len(batches) * 1.25  # validation, the averages, the slack
    return max(1, min(args.epochs, int((args.deadline - time.time()) / epoch_seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mix", choices=("none", "mixup", "cutmix"), default="none")
    parser.add_argument("--alpha", type=float, default=0.2, help="Beta(alpha, alpha) share of the mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--limit", type=int, default=0, help="use only this many images of each split")
    parser.add_argument("--deadline", type=float, default=0.0)
    parser.add_argument("--probe-dir", default="")
    parser.add_argument("--runs-together", type=int, default=1)
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    train_x, train_y, val_x, val_y = load(args.data)
    if args.limit:
        train_x, train_y, val_x, val_y = train_x[:args.limit], train_y[:args.limit], val_x[:args.limit], val_y[:args.limit]
    batches = Batches(train_x, train_y, args.mix, args.alpha, args.seed)
    epochs = args.epochs
    if args.deadline:
        epochs = agreed_epochs(args, batches, trainer(build_cnn((32, 64, 128, 256), 0.1), args.seed, 1, len(batches)))
    network = build_cnn((32, 64, 128, 256), 0.1)
    model = trainer(network, args.seed, epochs, len(batches))
    args.out.write_text(json.dumps({"config": vars(args) | {"data": str(args.data), "out": str(args.out)},
                                    "epochs": epochs, "backend": keras.backend.backend()}) + "\n")
    swa_from = epochs - max(epochs // 4, 1) + 1
    model.fit(batches, epochs=epochs, validation_data=(val_x, np.eye(7, dtype=np.float32)[val_y]),
              verbose=0, callbacks=[Averages(network, (val_x, val_y), args.ema_decay, swa_from, args.out)])


if __name__ == "__main__":
    main()
