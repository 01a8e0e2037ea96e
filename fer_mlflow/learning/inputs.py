"""The tf.data input pipeline: in-memory images to cached, shuffled, augmented, batched tensors.

Augmentation (train split only) runs on whole batches inside the pipeline with Keras preprocessing
layers, so it overlaps with the training step and never reaches the saved model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


ERASE_FILL = 128.0  # mid-grey on the 0..255 pixel scale


@dataclass(frozen=True)
class Augmentation:
    """Random transforms of a training batch; zero (or False) turns one off."""

    shift: float = 0.1  # fraction of the image size, both axes
    flip: bool = True  # horizontal: a mirrored smile is still a smile
    rotation: float = 10.0  # degrees, either way
    zoom: float = 0.1  # fraction, in or out
    erase: float = 0.0  # probability of painting a random rectangle mid-grey (random erasing)
    mixup: float = 0.0  # MixUp's alpha: each face blended with another of its batch, targets alike
    cutmix: float = 0.0  # CutMix's factor: a rectangle of another face of the batch pasted in, targets by area

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.flip or self.rotation or self.zoom or self.erase or self.mixes)

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (MixUp, CutMix): these change the targets too."""
        return bool(self.mixup or self.cutmix)


def augmenter(augmentation: Augmentation, seed: int) -> keras.Sequential | None:
    """The Keras layers applying `augmentation`, or None when it is all off."""
    steps = []
    if augmentation.flip:
        steps.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augmentation.shift:
        steps.append(keras.layers.RandomTranslation(
            augmentation.shift, augmentation.shift, fill_mode="nearest", seed=seed + 1))
    if augmentation.rotation:
        steps.append(keras.layers.RandomRotation(
            augmentation.rotation / 360.0, fill_mode="nearest", seed=seed + 2))
    if augmentation.zoom:
        steps.append(keras.layers.RandomZoom(augmentation.zoom, fill_mode="nearest", seed=seed + 3))
    if augmentation.erase:
        # Rectangles of 14-57% of each side (Keras' default scale), after the geometric transforms.
        steps.append(keras.layers.RandomErasing(
            (augmentation.erase, augmentation.erase), fill_value=ERASE_FILL, seed=seed + 4))
    return keras.Sequential(steps, name="augmentation") if steps else None


def mixer(augmentation: Augmentation, seed: int):
    """A function mixing a batch's images and targets (Keras' `MixUp`, `CutMix`), or None when both
    are off. With both on, each batch is mixed by one of them, either with equal chance."""
    layers = []
    if augmentation.mixup:
        layers.append(keras.layers.MixUp(alpha=augmentation.mixup, seed=seed + 5))
    if augmentation.cutmix:
        layers.append(keras.layers.CutMix(factor=augmentation.cutmix, seed=seed + 6))
    if not layers:
        return None

    def mix(images, targets):
        if len(layers) == 1:
            mixed = layers[0]({"images": images, "labels": targets}, training=True)
        else:
            mixed = tf.cond(tf.random.uniform([], seed=seed + 7) < 0.5,
                            lambda: layers[0]({"images": images, "labels": targets}, training=True),
                            lambda: layers[1]({"images": images, "labels": targets}, training=True))
        return mixed["images"], tf.cast(mixed["labels"], targets.dtype)

    return mix


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def train_dataset(
    inputs: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    augmentation: Augmentation | None,
    seed: int,
    sample_weights: np.ndarray | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Cache, shuffle (anew each epoch), batch, augment (if given), prefetch.

    `inputs` are model inputs (images or cached features), `targets` one-hot labels (or soft
    targets); MixUp and CutMix mix both, after the other transforms. Several replicas
    need `drop_remainder`: a last batch split unevenly across them fails in TensorFlow.
    """
    parts = (inputs, targets) if sample_weights is None else (inputs, targets, sample_weights)
    data = tf.data.Dataset.from_tensor_slices(parts).cache()
    data = data.shuffle(len(inputs), seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=drop_remainder)
    layers = augmenter(augmentation, seed) if augmentation else None
    if layers is not None:
        data = data.map(
            lambda x, *rest: (layers(x, training=True), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    mix = mixer(augmentation, seed) if augmentation else None
    if mix is not None:  # after the other transforms, as in the papers; a sample weight stays its own face's
        data = data.map(lambda x, y, *rest: (*mix(x, y), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def eval_dataset(inputs: np.ndarray, targets: np.ndarray, batch_size: int, replicas: int = 1) -> tf.data.Dataset:
    """Batched, cached and prefetched, in order: for validation and prediction.

    A batch split unevenly across several replicas fails in TensorFlow, so with replicas the data
    is padded to whole batches with repeated images of sample weight 0: every image counts once.
    """
    if replicas == 1:
        return tf.data.Dataset.from_tensor_slices((inputs, targets)).cache().batch(batch_size).prefetch(
            tf.data.AUTOTUNE
        )
    if batch_size % replicas:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {replicas} replicas")
    padded = np.arange(len(inputs) + (-len(inputs) % batch_size)) % len(inputs)
    weights = (np.arange(len(padded)) < len(inputs)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((inputs[padded], targets[padded], weights))
    return data.cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)
