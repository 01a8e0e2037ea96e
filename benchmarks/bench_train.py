"""Training speed on this machine, each comparison measured side by side in one process.

1. Input pipeline cost: a cnn epoch through `inputs.train_dataset` (augmentation on) against the
   same steps fed from prepared in-memory tensors.
2. Frozen-backbone caching: a resnet50 head epoch on cached features against the naive epoch that
   runs the frozen backbone on every image again.
3. Training images per second of each model at its default input size.

Usage: python benchmarks/bench_train.py [--repeats 3] [--images 2048] [--only pipeline,caching,throughput]
Timings are medians of `repeats` runs; ratios are taken from those medians. To see what oneDNN
gives, run `--only throughput` once with TF_ENABLE_ONEDNN_OPTS=0 and once as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import fer_mlflow  # noqa: F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
import keras
import numpy as np

from fer_mlflow.learning import models
from fer_mlflow.data.dataset import model_input
from fer_mlflow.learning.inputs import Augmentation, one_hot, train_dataset


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def compiled(model: keras.Model) -> keras.Model:
    model.compile(keras.optimizers.AdamW(1e-3), keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    return model


def pipeline_overhead(images, labels, repeats, batch_size=64) -> dict:
    model = compiled(models.build_model("cnn", weights="none"))
    x, y = model_input(images), one_hot(labels, 7)
    data = train_dataset(x, y, batch_size, Augmentation(), seed=0)
    tensors = timed(lambda: model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0), repeats)
    piped = timed(lambda: model.fit(data, epochs=1, verbose=0), repeats)
    return {"tensors_s": tensors, "pipeline_s": piped, "ratio": piped / tensors}


def backbone_caching(images, labels, repeats, batch_size=64) -> dict:
    parts = models.build_resnet("resnet50", models.DEFAULT_IMAGE_SIZE["resnet50"], "none")
    parts.backbone.trainable = False
    x, y = model_input(images), one_hot(labels, 7)
    naive = compiled(parts.model)
    naive_s = timed(lambda: naive.fit(x, y, batch_size=batch_size, epochs=1, verbose=0), repeats)
    started = time.perf_counter()
    features = parts.features.predict(x, batch_size=batch_size, verbose=0)
    caching_s = time.perf_counter() - started
    head = compiled(parts.head)
    head_s = timed(lambda: head.fit(features, y, batch_size=batch_size, epochs=1, verbose=0), repeats)
    return {"naive_epoch_s": naive_s, "cached_head_epoch_s": head_s, "one_time_feature_pass_s": caching_s,
            "ratio": naive_s / head_s}


def throughput(images, labels, repeats, names, batch_size=64) -> dict:
    result = {}
    x, y = model_input(images), one_hot(labels, 7)
    for name in names:
        model = compiled(models.build_model(name, weights="none"))
        count = len(x) if name in ("cnn", "cnn_shallow") else min(len(x), 2 * batch_size)
        seconds = timed(lambda: model.fit(x[:count], y[:count], batch_size=batch_size, epochs=1, verbose=0),
                        repeats)
        result[name] = {"image_size": models.DEFAULT_IMAGE_SIZE[name], "params": model.count_params(),
                        "images_per_second": count / seconds}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--out", default="")
    parser.add_argument("--only", default="pipeline,caching,throughput")
    parser.add_argument("--models", default=",".join(models.MODEL_NAMES))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 48, 48), dtype=np.uint8)
    labels = rng.integers(0, 7, args.images)
    only = args.only.split(",")
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "repeats": args.repeats, "images": args.images,
    }
    if "pipeline" in only:
        results["pipeline"] = pipeline_overhead(images, labels, args.repeats)
    if "caching" in only:
        results["resnet50_caching"] = backbone_caching(images[:512], labels[:512], args.repeats)
    if "throughput" in only:
        results["throughput"] = throughput(images, labels, args.repeats, args.models.split(","))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
