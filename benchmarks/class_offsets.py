"""Would a per-class offset on a model's log-probabilities, chosen on validation data to maximise its
accuracy (a prior correction), carry over to faces it was not chosen on?

    python benchmarks/class_offsets.py --model-uri <model URI> --data <clean run's dataset.npz> [--halvings 20]

The model's probabilities on the validation split (plain and with its ten views, as served); then,
for each of `--halvings` random halvings of that split, offsets fitted on one half (coordinate search
over -1..1 per class, three rounds) and scored on the other, both ways. Prints the accuracy without
offsets, with offsets fitted on the whole split (in-sample) and the mean held-out gain.
"""

from __future__ import annotations

import argparse

import numpy as np

from fer_mlflow.data import dataset as ds
from fer_mlflow.serving.views import Settings
from fer_mlflow.stages.evaluate import predict_probabilities

GRID = np.linspace(-1.0, 1.0, 41)


def fit_offsets(log_probabilities: np.ndarray, labels: np.ndarray, rounds: int = 3) -> np.ndarray:
    offsets = np.zeros(log_probabilities.shape[1])
    for _ in range(rounds):
        for column in range(len(offsets)):
            scores = []
            for value in GRID:
                trial = offsets.copy()
                trial[column] = value
                scores.append(np.mean((log_probabilities + trial).argmax(1) == labels))
            offsets[column] = GRID[int(np.argmax(scores))]
    return offsets - offsets.mean()


def accuracy(log_probabilities: np.ndarray, labels: np.ndarray, offsets: np.ndarray | float = 0.0) -> float:
    return float(np.mean((log_probabilities + offsets).argmax(1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--data", required=True, help="a clean dataset.npz")
    parser.add_argument("--halvings", type=int, default=20)
    args = parser.parse_args()

    val = ds.load(args.data).split("val")
    rng = np.random.default_rng(0)
    for tta in (False, True):
        log_p = np.log(predict_probabilities(args.model_uri, val.images, Settings(tta=tta)) + 1e-9)
        gains = []
        for _ in range(args.halvings):
            order = rng.permutation(len(val.labels))
            for fit, held in ((order[::2], order[1::2]), (order[1::2], order[::2])):
                offsets = fit_offsets(log_p[fit], val.labels[fit])
                gains.append(accuracy(log_p[held], val.labels[held], offsets) - accuracy(log_p[held], val.labels[held]))
        print(f"tta={tta}: {accuracy(log_p, val.labels):.4f} without offsets, "
              f"{accuracy(log_p, val.labels, fit_offsets(log_p, val.labels)):.4f} with offsets fitted in-sample, "
              f"held-out gain {np.mean(gains):+.4f} (sd {np.std(gains):.4f}, {len(gains)} halves)")


if __name__ == "__main__":
    main()
