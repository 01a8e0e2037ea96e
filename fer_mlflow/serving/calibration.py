"""Probabilities a user can threshold: how far a model's confidence is from its accuracy, and one
temperature that brings them together.

A network trained with label smoothing on noisy labels (FER2013) is not calibrated: among faces it
calls "happy" with probability 0.8, the share that are happy is not 0.8. The expected calibration
error (`expected_calibration_error`, 15 equal-width confidence bins, as Guo et al. 2017 measure it)
says by how much. Temperature scaling divides the log-probabilities by one number `T` fitted on
validation data by log-loss (`fit_temperature`): the argmax, so accuracy, does not change.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss

BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # the search's bounds; a fitted T at a bound says the data is degenerate
_EPSILON = 1e-12  # probabilities are clipped here before their logarithm


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """`probabilities` (N x classes, rows summing to 1) with their log-probabilities divided by
    `temperature`: softmax(log p / T). T > 1 softens, T < 1 sharpens; T = 1 returns them as they are."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(probabilities, _EPSILON, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponents = np.exp(logits)
    return exponents / exponents.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature (within `TEMPERATURE_RANGE`) that minimises the log-loss of
    ``tempered(probabilities, T)`` on `labels`."""
    classes = np.arange(probabilities.shape[1])

    def loss(log_temperature: float) -> float:
        return log_loss(labels, tempered(probabilities, float(np.exp(log_temperature))), labels=classes)

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS):
    """Per equal-width confidence bin (of the top class's probability): (mean confidence, accuracy,
    count), each an array of `bins`; empty bins have NaN means and count 0."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """The expected calibration error: over `bins` equal-width confidence bins, the gap between mean
    confidence and accuracy, weighted by the share of faces in the bin (0: calibrated)."""
    mean_confidence, accuracy, counts = reliability(probabilities, labels, bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(mean_confidence[filled] - accuracy[filled])) / counts.sum())
