"""Validation accuracy of averages of networks, an ensemble's members taken one by one: which networks
to ship together, chosen before the test split is scored.

    python benchmarks/member_mix.py --data <clean run's dataset.npz> --cache <folder> \\
        --member shipped=runs:/<pair's pretrained run>/model#0 --member wide=runs:/<pair's pretrained run>/model#1 \\
        --member new=runs:/<train run>/model \\
        --mix shipped,wide --mix wide,new --mix shipped,wide,new

Each member's probabilities on the validation split, on the face alone and with the ten default views
(`views.probabilities`, as served; untempered, as `ensemble` averages them), kept in `--cache` so a
member costs its minutes once; then, for each `--mix`, the accuracy of the members' mean (equal weights
per network), plain and with ten views, and of their geometric mean; for a mix of two, what a weight
other than equal, chosen on half the split, gains on the other half. ``URI#k`` names the k-th network
of an `ensemble` model (its members in the order they were given); an ensemble named whole counts as
one member.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from fer_mlflow.data.dataset import model_input
from fer_mlflow.data.sources import read_source
from fer_mlflow.learning.teaching import logged_network
from fer_mlflow.serving.views import Settings, probabilities


def member_probabilities(uri: str, images: np.ndarray, cache: Path) -> dict[str, np.ndarray]:
    """`uri`'s validation probabilities, plain and with ten views, from `cache` when there."""
    path = cache / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        return dict(np.load(path))
    keras_model, pixels = logged_network(uri), model_input(images)
    found = {"plain": probabilities(keras_model, pixels, Settings()),
             "views": probabilities(keras_model, pixels, Settings(tta=True))}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **found)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the members' clean dataset (dataset.npz or its runs:/ URI)")
    parser.add_argument("--cache", type=Path, required=True, help="folder for each member's probabilities")
    parser.add_argument("--member", action="append", required=True, help="NAME=URI[#k]")
    parser.add_argument("--mix", action="append", default=[], help="NAME,NAME[,...]: members averaged")
    args = parser.parse_args()

    dataset, _ = read_source(args.data)
    val = dataset.split("val")
    members = dict(each.split("=", 1) for each in args.member)
    found = {name: member_probabilities(uri, val.images, args.cache) for name, uri in members.items()}
    print(f"{len(val)} validation faces of data {dataset.digest()}")
    for names in [[name] for name in members] + [mix.split(",") for mix in args.mix]:
        scores = [float(np.mean(np.mean([found[name][kind] for name in names], axis=0).argmax(1) == val.labels))
                  for kind in ("plain", "views")]
        line = f"{' + '.join(names):40s} plain {scores[0]:.4f}  ten views {scores[1]:.4f}"
        if len(names) > 1:  # the members' geometric mean (log-probabilities averaged) instead
            logs = {kind: np.sum([np.log(np.clip(found[name][kind], 1e-12, None)) for name in names], axis=0)
                    for kind in ("plain", "views")}
            geometric = [float(np.mean(logs[kind].argmax(1) == val.labels)) for kind in ("plain", "views")]
            line += f"  (geometric mean: plain {geometric[0]:.4f}  ten views {geometric[1]:.4f})"
        print(line)
        if len(names) == 2:
            gains = [100 * weight_gain(found[names[0]][kind], found[names[1]][kind], val.labels)
                     for kind in ("plain", "views")]
            print(f"{'':40s} a weight chosen on half the split, on the other half: plain {gains[0]:+.2f} points, "
                  f"ten views {gains[1]:+.2f} (mean of {HALVINGS} halvings, both ways)")


HALVINGS = 50
WEIGHTS = np.linspace(0.2, 0.8, 13)  # the first member's weight; the second's is one less it


def weight_gain(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> float:
    """What weighting two members other than equally gains on faces it was not chosen on: for random
    halvings of the split, the weight (of `WEIGHTS`) most accurate on one half, scored on the other
    against equal weights; the mean difference in accuracy."""
    def accuracy(weight, faces):
        return np.mean((weight * first[faces] + (1 - weight) * second[faces]).argmax(1) == labels[faces])

    rng, gains = np.random.default_rng(0), []
    for _ in range(HALVINGS):
        order = rng.permutation(len(labels))
        halves = order[:len(labels) // 2], order[len(labels) // 2:]
        for fitted, scored in (halves, halves[::-1]):
            # of weights as accurate, the one nearest equal: a tie is no reason to move away from it
            chosen = max(WEIGHTS, key=lambda weight: (accuracy(weight, fitted), -abs(weight - 0.5)))
            gains.append(accuracy(chosen, scored) - accuracy(0.5, scored))
    return float(np.mean(gains))


if __name__ == "__main__":
    main()
