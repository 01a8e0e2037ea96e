"""The `evaluate` stage: score a trained model on test data and log the numbers that matter.

The evaluation is its own run, nested under the training run in the UI (tag ``mlflow.parentRunId``)
and tagged ``fer.stage=evaluate``, ``fer.model_uri``, ``fer.source_run`` and ``fer.test_digest``, so a
model can be evaluated on several test sets and `promote` compares like with like.

Logged: ``test_accuracy``; ``test_precision|recall|f1_macro`` and ``_weighted``; per class, a table
``per_class_metrics.csv`` (precision, recall, F1, support); the confusion matrix as counts and
row-normalised (``confusion_matrix.json``, ``figures/confusion_matrix*.png``); ``predictions.csv``
(id, true, predicted, one probability per class); ``figures/confident_mistakes.png``; the test data as
a run input with its digest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fer_mlflow import figures
from fer_mlflow.dataset import Dataset
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.sources import read_source
from fer_mlflow.tracking import log_params, log_split_inputs, source_label, stage_run

# The extra test-time views, each also mirrored (chosen on validation data: BENCHMARKS.md): the face
# rotated TTA_ROTATION degrees either way, zoomed TTA_ZOOM in and out, and shifted TTA_SHIFT pixels
# up, down, left and right; 0 turns a kind off.
TTA_ROTATION = 10.0
TTA_ZOOM = 0.1
TTA_SHIFT = 0


@dataclass
class EvaluateOutcome:
    """The evaluation run and its headline numbers."""

    run_id: str
    metrics: dict[str, float]
    test_digest: str


def run(run_id: str | None = None, model_uri: str | None = None, data: str | None = None,
        tta: bool = False, batch_size: int = 256, tta_shift: int = TTA_SHIFT,
        tta_rotation: float = TTA_ROTATION, tta_zoom: float = TTA_ZOOM) -> EvaluateOutcome:
    """Evaluate the model of training run `run_id` (or `model_uri`) on the test split of `data`.

    `data` defaults to the data the training run used; any source `clean` reads works.
    """
    model_uri, source_run, data = _resolve(run_id, model_uri, data)
    test = _test_split(data)
    label = source_label(data)
    tags = {"fer.model_uri": model_uri, "fer.data": label, "fer.test_digest": test.digest()}
    if source_run:
        tags.update({"fer.source_run": source_run, "mlflow.parentRunId": source_run})
        source = mlflow.get_run(source_run)
        for key in ("fer.model", "fer.model_family"):
            if key in source.data.tags:
                tags[key] = source.data.tags[key]
    name = f"evaluate-{tags.get('fer.model', 'model')}-{label}"
    with stage_run("evaluate", name, tags) as active:
        views = tta_views(tta_shift, tta_rotation, tta_zoom) if tta else [IDENTITY]
        log_params({"run_id": run_id or "", "model_uri": model_uri, "data": data, "tta": tta,
                    "tta_shift": tta_shift, "tta_rotation": tta_rotation, "tta_zoom": tta_zoom,
                    "tta_views": 2 * len(views) if tta else 1, "test_images": len(test)})
        log_split_inputs(test, data, label, splits=("test",))
        probabilities = predict_probabilities(model_uri, test.images, tta, batch_size, tta_shift,
                                              tta_rotation, tta_zoom)
        metrics = _log_results(test, probabilities)
        outcome = EvaluateOutcome(active.info.run_id, metrics, test.digest())
    return outcome


def _resolve(run_id, model_uri, data) -> tuple[str, str | None, str]:
    if bool(run_id) == bool(model_uri):
        raise ConfigError("give exactly one of run_id (a training run) and model_uri")
    source_run = run_id
    if model_uri and model_uri.startswith("runs:/"):
        source_run = model_uri.split("/")[1]
    if run_id:
        model_uri = f"runs:/{run_id}/model"
    training = None
    if source_run:
        try:
            training = mlflow.get_run(source_run)
        except MlflowException as error:
            raise ConfigError(f"run {source_run} not found in {mlflow.get_tracking_uri()}; "
                              "pass the id of a training run of this tracking store") from error
    if data is None:
        data = training.data.params.get("data_uri") if training else None
        if not data:
            raise ConfigError("no data given and the model's training data is unknown; pass -P data=...")
    return model_uri, source_run, data


def _test_split(data: str) -> Dataset:
    dataset, _ = read_source(data)
    test = dataset.split("test")
    if len(test) == 0:
        raise DataError(f"data {data} has no test split; pass a source with test/<class>/ folders, "
                        "a folder of <class>/ folders, or a fer2013.csv with PrivateTest rows")
    return test


def predict_probabilities(model_uri: str, images: np.ndarray, tta: bool, batch_size: int,
                          tta_shift: int = TTA_SHIFT, tta_rotation: float = TTA_ROTATION,
                          tta_zoom: float = TTA_ZOOM) -> np.ndarray:
    """Class probabilities (N x classes) of the logged model.

    With `tta`, the mean over views of each face (`tta_views`), each view also mirrored: with the
    defaults, the face rotated 10 degrees either way and zoomed 10% in and out, 10 views in all;
    with every knob at 0, the face and its mirror alone.
    """
    model = mlflow.pyfunc.load_model(model_uri)
    keras_model = model.unwrap_python_model().keras_model
    inputs = images.astype(np.float32)[..., None]
    if not tta:
        return keras_model.predict(inputs, batch_size=batch_size, verbose=0)
    views = tta_views(tta_shift, tta_rotation, tta_zoom)
    total = 0.0
    for view in views:
        moved = transformed(inputs, *view)
        for flipped in (moved, moved[:, :, ::-1]):
            total = total + keras_model.predict(flipped, batch_size=batch_size, verbose=0)
    return total / (2 * len(views))


# A view: (pixels down, pixels right, degrees anticlockwise, magnification).
IDENTITY = (0, 0, 0.0, 1.0)


def tta_views(shift: int, rotation: float, zoom: float) -> list[tuple[int, int, float, float]]:
    """The test-time views before mirroring: the face, then each kind whose knob is not 0."""
    views = [IDENTITY]
    if shift:
        views += [(shift, 0, 0.0, 1.0), (-shift, 0, 0.0, 1.0), (0, shift, 0.0, 1.0), (0, -shift, 0.0, 1.0)]
    if rotation:
        views += [(0, 0, rotation, 1.0), (0, 0, -rotation, 1.0)]
    if zoom:
        views += [(0, 0, 0.0, 1.0 + zoom), (0, 0, 0.0, 1.0 - zoom)]
    return views


def transformed(images: np.ndarray, dy: int = 0, dx: int = 0, degrees: float = 0.0,
                scale: float = 1.0) -> np.ndarray:
    """`images` (N x H x W x C) rotated `degrees` anticlockwise and magnified `scale` times about
    their centre (bilinear), then moved down `dy` and right `dx` pixels; edge pixels are repeated in.
    """
    if degrees or scale != 1.0:
        height, width = images.shape[1:3]
        cy, cx = (height - 1) / 2, (width - 1) / 2
        # keras' transform maps each output pixel (x, y) to the input point it samples.
        angle = np.deg2rad(degrees)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        transform = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
        images = np.asarray(keras.ops.image.affine_transform(
            images, np.array([transform] * len(images), np.float32), interpolation="bilinear",
            fill_mode="nearest"))
    return shifted(images, dy, dx)


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`images` (N x H x W x C) moved down `dy` and right `dx` pixels, the edge rows repeated in."""
    pad = max(abs(dy), abs(dx))
    if not pad:
        return images
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, pad - dy:pad - dy + height, pad - dx:pad - dx + width]


def scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro / weighted precision, recall and F1 (sklearn, zero_division=0)."""
    result = {"test_accuracy": float(np.mean(labels == predicted))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=range(num_classes),
                                                     average=average, zero_division=0)
        result.update({f"test_precision_{average}": p, f"test_recall_{average}": r,
                       f"test_f1_{average}": f})
    return {k: float(v) for k, v in result.items()}


def _log_results(test: Dataset, probabilities: np.ndarray) -> dict[str, float]:
    classes = list(test.class_names)
    predicted = probabilities.argmax(axis=1)
    metrics = scores(test.labels, predicted, len(classes))
    mlflow.log_metrics(metrics)

    p, r, f, support = precision_recall_fscore_support(test.labels, predicted, labels=range(len(classes)),
                                                       zero_division=0)
    per_class = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": support})
    counts = confusion_matrix(test.labels, predicted, labels=range(len(classes)))
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    mlflow.log_dict({"classes": classes, "counts": counts.tolist(), "normalised": normalised.round(4).tolist()},
                    "confusion_matrix.json")
    predictions = pd.DataFrame({"id": test.ids, "true": [classes[c] for c in test.labels],
                                "predicted": [classes[c] for c in predicted]})
    for c, name in enumerate(classes):
        predictions[f"prob_{name}"] = probabilities[:, c].round(5)
    with tempfile.TemporaryDirectory() as tmp:
        per_class.to_csv(Path(tmp) / "per_class_metrics.csv", index=False)
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        mlflow.log_artifacts(tmp)
    for fig, name in (
        (figures.confusion(counts, classes, "Confusion matrix (counts)"), "confusion_matrix.png"),
        (figures.confusion(normalised, classes, "Confusion matrix (row-normalised)"),
         "confusion_matrix_normalised.png"),
        (figures.confident_mistakes(test, predicted, probabilities), "confident_mistakes.png"),
    ):
        mlflow.log_figure(fig, f"figures/{name}")
        plt.close(fig)
    return metrics
