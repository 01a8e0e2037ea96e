"""The `evaluate` stage: score a model as it is served on one split of data, and log the numbers.

What is scored is what is served: the model is loaded with `mlflow.pyfunc.load_model` and its own
`predict` gives the probabilities, called with no params. Its predict settings (test-time views,
`views.Settings`) are the model's own unless `tta*` says otherwise; then the model is logged again
under this run as ``served_model``, with those settings as its defaults, and that copy is scored and
is what `promote` registers. An evaluation records what it scored with: tags ``fer.settings`` (a
canonical text), ``fer.split``, ``fer.test_digest``, ``fer.served_model_uri``, ``fer.source_run``.

The evaluation is its own run, nested under the training run in the UI (tag ``mlflow.parentRunId``),
or under the run that started it (`promote` evaluating a champion), and tagged ``fer.stage=evaluate``.

Logged, with ``<split>`` = ``test`` or ``val``: ``<split>_accuracy``;
``<split>_precision|recall|f1_macro`` and ``_weighted``; per class, a table ``per_class_metrics.csv``
(precision, recall, F1, support); the confusion matrix as counts and row-normalised
(``confusion_matrix.json``, ``figures/confusion_matrix*.png``); ``predictions.csv`` (id, true,
predicted, one probability per class); ``figures/confident_mistakes.png``; the data as a run input
with its digest. Calibration (`calibration`): ``<split>_ece`` of the probabilities as served and
``<split>_ece_untempered`` before the model's temperature (``<split>_temperature``, fitted on
validation data when it was trained), and ``figures/reliability.png`` showing both.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fer_mlflow.serving import calibration, pyfunc_model
from fer_mlflow.tracking import figures
from fer_mlflow.data.dataset import Dataset
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.data.limits import check_params
from fer_mlflow.data.sources import read_source
from fer_mlflow.tracking.runs import (
    DEMO_TAG, data_context, log_params, log_split_inputs, run_params, stage_run,
)
from fer_mlflow.serving.views import BATCH_SIZE, Settings
from fer_mlflow.tracking.registry import load_model, registered_version
from fer_mlflow.tracking.names import (
    DATA_DIGEST_TAG,
    DATA_TAG,
    EVALUATED_SPLITS,
    MODEL_FAMILY_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    MODEL_VERSION_TAG,
    SERVED_MODEL_URI_TAG,
    SETTINGS_TAG,
    SOURCE_RUN_TAG,
    SPLIT_TAG,
    TEST_DIGEST_TAG,
    TRAINED_ON_DEMO_TAG,
    TRAIN_DATA_DIGEST_TAG,
    TRAIN_DATA_TAG,
)



@dataclass
class EvaluateOutcome:
    """The evaluation run and its headline numbers."""

    run_id: str
    metrics: dict[str, float]
    test_digest: str
    settings: Settings
    served_model_uri: str


@dataclass
class _Target:
    """What is evaluated: the model, the training run behind it, and its registered version."""

    model_uri: str
    source_run: str | None
    data: str
    version: str | None  # "<name>/<version>" when the URI names a registered version


def run(run_id: str | None = None, model_uri: str | None = None, data: str | None = None,
        tta: bool | None = None, batch_size: int = BATCH_SIZE, tta_shift: int | None = None,
        tta_rotation: float | None = None, tta_zoom: float | None = None, split: str = "test",
        nested: bool = False) -> EvaluateOutcome:
    """Evaluate the model of training run `run_id` (or `model_uri`) on the `split` of `data`.

    `data` defaults to the data the training run used; any source `clean` reads works. The `tta*`
    settings default (None) to the model's own. `nested` makes it a child of the active run.
    """
    if split not in EVALUATED_SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(EVALUATED_SPLITS)}")
    check_params({"tta": tta, "tta_shift": tta_shift, "tta_rotation": tta_rotation, "tta_zoom": tta_zoom,
                  "batch_size": batch_size})  # the served model's ranges, before the run starts
    target = _resolve(run_id, model_uri, data)
    part = _split(target.data, split)
    model = load_model(target.model_uri)
    own = pyfunc_model.settings_of(model)
    settings = Settings.from_mapping({"tta": tta, "tta_shift": tta_shift, "tta_rotation": tta_rotation,
                                      "tta_zoom": tta_zoom}, base=own)
    tags, experiment = data_context(target.data)
    label = tags[DATA_TAG]
    tags.update({MODEL_URI_TAG: target.model_uri, TEST_DIGEST_TAG: part.digest(), SPLIT_TAG: split,
                 SETTINGS_TAG: settings.key})
    if target.version:
        tags[MODEL_VERSION_TAG] = target.version
    if target.source_run:
        tags[SOURCE_RUN_TAG] = target.source_run
        source = mlflow.get_run(target.source_run)
        experiment = MlflowClient().get_experiment(source.info.experiment_id).name
        if not nested:
            tags["mlflow.parentRunId"] = target.source_run
        copied = {MODEL_TAG: MODEL_TAG, MODEL_FAMILY_TAG: MODEL_FAMILY_TAG,
                  DATA_DIGEST_TAG: TRAIN_DATA_DIGEST_TAG, DATA_TAG: TRAIN_DATA_TAG,
                  DEMO_TAG: TRAINED_ON_DEMO_TAG}
        tags.update({ours: source.data.tags[theirs] for theirs, ours in copied.items()
                     if theirs in source.data.tags})
    name = f"evaluate {tags.get('fer.model', 'model')}-{label} {split} {settings.describe()}"
    with stage_run("evaluate", name, tags, nested=nested, experiment=experiment) as active:
        # `data` keeps what the user gave (empty under `mlflow run`: the training data); `data_uri`
        # is what was read, as train and ensemble record it, so promote can score others on it.
        log_params({"run_id": run_id or "", "model_uri": target.model_uri, "data": target.data,
                    "data_uri": target.data, "split": split, "tta": settings.tta, "tta_shift": settings.tta_shift,
                    "tta_rotation": settings.tta_rotation, "tta_zoom": settings.tta_zoom,
                    "tta_views": settings.view_count, "images": len(part)})
        log_split_inputs(part, target.data, label, splits=(split,))
        # A registered version is named by number: an alias may move before promote reads this.
        served_uri = f"models:/{target.version}" if target.version else target.model_uri
        if settings != own:
            served_uri = _relogged(model, settings, part.images[0])
            model = load_model(served_uri)
        mlflow.set_tag(SERVED_MODEL_URI_TAG, served_uri)
        # No params, so the served model's own settings: batch size changes memory, not the answer.
        probabilities = _probabilities(model, part.images,
                                       None if batch_size == BATCH_SIZE else {"batch_size": batch_size})
        metrics = _log_results(part, probabilities, split)
        metrics.update(_log_calibration(part, probabilities, split, pyfunc_model.temperature_of(model)))
        outcome = EvaluateOutcome(active.info.run_id, metrics, part.digest(), settings, served_uri)
    return outcome


def _relogged(model, settings: Settings, example_image) -> str:
    """`model` logged again to the active run as ``served_model``, predicting with `settings`: the
    same network (an 8-bit one included), class names and temperature."""
    fer_model = model.unwrap_python_model()
    with tempfile.TemporaryDirectory(prefix="fer-served-") as folder:
        int8 = pyfunc_model.int8_onnx_of(model, Path(folder))
        return pyfunc_model.log_model(fer_model.keras_model, name="served_model", class_names=fer_model.class_names,
                                      example_image=example_image, settings=settings,
                                      temperature=pyfunc_model.temperature_of(model), int8_onnx=int8).model_uri


def _probabilities(model: mlflow.pyfunc.PyFuncModel, images: np.ndarray, params: dict | None = None) -> np.ndarray:
    """The model's probabilities (N x classes) from its own `predict` (its own settings unless
    `params` say otherwise), in requests within its work budget."""
    frame = pyfunc_model.predict_crops(model, images, params)
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


def predict_probabilities(model_uri: str, images: np.ndarray, settings: Settings | None = None,
                          batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Class probabilities (N x classes) of the logged model at `model_uri`, predicting with
    `settings` (None: the model's own), exactly as the served model does."""
    params = {"batch_size": batch_size}
    if settings is not None:
        params.update(tta=settings.tta, tta_shift=settings.tta_shift, tta_rotation=settings.tta_rotation,
                      tta_zoom=settings.tta_zoom)
    return _probabilities(load_model(model_uri), images, params)


def _resolve(run_id, model_uri, data) -> _Target:
    if bool(run_id) == bool(model_uri):
        raise ConfigError("give exactly one of run_id (a training run) and model_uri")
    source_run, version = run_id, None
    if model_uri and model_uri.startswith("runs:/"):
        source_run = model_uri.split("/")[1]
    if model_uri and model_uri.startswith("models:/"):
        source_run, version = registered_version(model_uri)
    if run_id:
        model_uri = f"runs:/{run_id}/model"
    training = None
    if source_run:
        try:
            training = mlflow.get_run(source_run)
        except MlflowException as error:
            if version:
                raise ConfigError(f"{model_uri} (version {version}) was trained in run {source_run}, which "
                                  f"{mlflow.get_tracking_uri()} no longer holds (deleted for good?); move its aliases "
                                  "to another version, or register the model again from a run of this store"
                                  ) from error
            raise ConfigError(f"run {source_run} not found in {mlflow.get_tracking_uri()}; "
                              "pass the id of a training run of this tracking store") from error
    if data is None:
        data = run_params(training).get("data_uri") if training else None
        if not data:
            raise ConfigError("no data given and the model's training data is unknown; pass -P data=...")
    return _Target(model_uri, source_run, data, version)


def _split(data: str, split: str) -> Dataset:
    dataset, _ = read_source(data)
    part = dataset.split(split)
    if len(part) == 0:
        raise DataError(f"data {data} has no {split} split; pass a source with test/<class>/ folders, "
                        "a folder of <class>/ folders, or a fer2013.csv with PrivateTest rows"
                        if split == "test" else
                        f"data {data} has no {split} split; evaluate on a clean run's dataset "
                        "(the default: the training run's data) or -P split=test")
    return part


def scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int, split: str = "test") -> dict[str, float]:
    """Accuracy and macro / weighted precision, recall and F1 (sklearn, zero_division=0), named
    ``<split>_accuracy``, ``<split>_f1_macro``, ..."""
    result = {f"{split}_accuracy": float(np.mean(labels == predicted))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=range(num_classes),
                                                     average=average, zero_division=0)
        result.update({f"{split}_precision_{average}": p, f"{split}_recall_{average}": r,
                       f"{split}_f1_{average}": f})
    return {k: float(v) for k, v in result.items()}


def _log_results(test: Dataset, probabilities: np.ndarray, split: str) -> dict[str, float]:
    classes = list(test.class_names)
    predicted = probabilities.argmax(axis=1)
    metrics = scores(test.labels, predicted, len(classes), split)
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


def _log_calibration(part: Dataset, served: np.ndarray, split: str, temperature: float) -> dict[str, float]:
    """Log the expected calibration error of the `served` probabilities and of the same before the
    model's `temperature` (undone: tempering by 1 / T), and the reliability diagram of both."""
    untempered = calibration.tempered(served, 1.0 / temperature)
    metrics = {f"{split}_ece": calibration.expected_calibration_error(served, part.labels),
               f"{split}_ece_untempered": calibration.expected_calibration_error(untempered, part.labels),
               f"{split}_temperature": temperature}
    mlflow.log_metrics(metrics)
    fig = figures.reliability({f"before scaling (T = 1), ECE {metrics[f'{split}_ece_untempered']:.3f}":
                               calibration.reliability(untempered, part.labels),
                               f"as served (T = {temperature:.2f}), ECE {metrics[f'{split}_ece']:.3f}":
                               calibration.reliability(served, part.labels)},
                              f"Reliability on {split} ({len(part)} faces)")
    mlflow.log_figure(fig, "figures/reliability.png")
    plt.close(fig)
    return metrics
