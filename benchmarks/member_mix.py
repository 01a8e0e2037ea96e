"""Validation accuracy of averages of networks, an ensemble's members taken one by one: which networks
to ship together, chosen before the test split is scored.

    python benchmarks/member_mix.py --data <clean run's dataset.npz> --cache <folder> \\
        --member shipped=runs:/<pair's pretrained run>/model#0 --member wide=runs:/<pair's pretrained run>/model#1 \\
        --member new=runs:/<train run>/model --mix shipped,wide --mix wide,new --mix shipped,wide,new

Each member's probabilities on the validation split, on the face alone and with the ten default views
(`views.probabilities`, as served; untempered, as `ensemble` averages them), kept in `--cache` so a
member costs its minutes once; then, for each `--mix`, the accuracy of the members' mean (equal weights
per network), plain and with ten views. ``URI#k`` names the k-th network of an `ensemble` model (its
members in the order they were given); an ensemble named whole counts as one member.
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
        print(f"{' + '.join(names):40s} plain {scores[0]:.4f}  ten views {scores[1]:.4f}")


if __name__ == "__main__":
    main()
