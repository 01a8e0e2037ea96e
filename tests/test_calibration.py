"""Calibration: the expected calibration error, temperature scaling, and the temperature a trained
model serves with."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from fer_mlflow.data import dataset as ds
from fer_mlflow.serving import pyfunc_model, views
from fer_mlflow.stages import train
from fer_mlflow.serving.calibration import expected_calibration_error, fit_temperature, reliability, tempered


def softmax(logits: np.ndarray) -> np.ndarray:
    exponents = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponents / exponents.sum(axis=1, keepdims=True)


def overconfident(count: int = 4000, true_temperature: float = 2.0, seed: int = 0):
    """Probabilities twice as sharp as the process that drew the labels: softmax(z), labels from softmax(z / 2)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(count, 7)) * 3
    truth = softmax(logits / true_temperature)
    labels = np.array([rng.choice(7, p=row) for row in truth])
    return softmax(logits), labels


def test_the_ece_is_the_count_weighted_gap_between_confidence_and_accuracy():
    # Two bins hit: 0.95 confidence (2 faces, 1 right) and 0.55 (2 faces, both right).
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx((2 * 0.45 + 2 * 0.45) / 4)
    confidence, accuracy, counts = reliability(probabilities, labels)
    assert counts.sum() == 4 and counts[14] == 2 and accuracy[14] == 0.5


def test_temperature_scaling_finds_the_temperature_that_drew_the_labels_and_keeps_every_argmax():
    probabilities, labels = overconfident()
    temperature = fit_temperature(probabilities, labels)
    assert temperature == pytest.approx(2.0, rel=0.1)
    calibrated = tempered(probabilities, temperature)
    assert np.array_equal(calibrated.argmax(axis=1), probabilities.argmax(axis=1))
    assert np.allclose(calibrated.sum(axis=1), 1)
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(probabilities, labels) / 3
    assert np.allclose(tempered(calibrated, 1 / temperature), probabilities, atol=1e-9)


@pytest.mark.slow
def test_a_trained_model_serves_probabilities_tempered_by_the_temperature_fitted_on_val(tiny_npz):
    outcome = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32))
    metrics = MlflowClient().get_run(outcome.run_id).data.metrics
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    temperature = pyfunc_model.temperature_of(model)
    assert temperature == pytest.approx(metrics["temperature"]) and temperature != 1.0
    val = ds.load(outcome.data_uri).split("val")
    raw = views.probabilities(pyfunc_model.keras_model_of(model), val.images.astype(np.float32)[..., None],
                              views.Settings())
    assert temperature == pytest.approx(fit_temperature(raw, val.labels), rel=1e-3)
    served = model.predict(val.images)
    served = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(served, tempered(raw, temperature), atol=1e-5)
    assert np.array_equal(served.argmax(axis=1), raw.argmax(axis=1))  # accuracy unchanged
    assert metrics["val_ece"] == pytest.approx(expected_calibration_error(served, val.labels), abs=1e-4)
    assert metrics["val_ece_untempered"] == pytest.approx(expected_calibration_error(raw, val.labels), abs=1e-4)
