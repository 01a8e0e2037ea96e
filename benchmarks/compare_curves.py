"""Validation curves of training runs side by side, epoch by epoch: is a new recipe ahead of the
shipped network at the same epoch, before it finishes?

    python benchmarks/compare_curves.py --runs <run id>[,<run id>] [--shipped accurate] [--every 10]

(with MLFLOW_TRACKING_URI pointing at the runs' store). Epochs count from 1. A run resumed from a
checkpoint logs the epochs after that checkpoint again: the value logged last for an epoch is the
one its training went on from. Single epochs swing by a point or two, so each row also gives the
mean over the five epochs that end there and the best so far.
"""

from __future__ import annotations

import argparse

import numpy as np
from mlflow import MlflowClient

from fer_mlflow import pretrained
from fer_mlflow.tracking.runs import metric_by_epoch

WINDOW = 5  # epochs a row's mean covers


def shipped_curve(variant: str) -> np.ndarray:
    """The shipped `variant`'s recorded validation accuracy an epoch (its one network)."""
    return np.array(pretrained.networks(pretrained.record(variant))[0]["history"]["val_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="training run ids, comma-separated")
    parser.add_argument("--shipped", default="accurate", help="a shipped variant to compare with, or ''")
    parser.add_argument("--every", type=int, default=1, help="print every Nth epoch (and the last)")
    args = parser.parse_args()

    client = MlflowClient()
    curves = {run_id[:8]: np.array(metric_by_epoch(client, run_id, "val_accuracy"))
              for run_id in args.runs.split(",") if run_id.strip()}
    if args.shipped:
        curves[f"shipped {args.shipped}"] = shipped_curve(args.shipped)
    longest = max(len(curve) for curve in curves.values())
    print("epoch  " + "  ".join(f"{name:>26}" for name in curves))
    print("       " + "  ".join(f"{' value   mean5    best':>26}" for _ in curves))
    for epoch in range(1, longest + 1):
        if epoch % args.every and epoch != longest:
            continue
        cells = []
        for curve in curves.values():
            if epoch > len(curve):
                cells.append(f"{'':>26}")
                continue
            done = curve[:epoch]
            cells.append(f"{f'{done[-1]:.4f}  {done[-WINDOW:].mean():.4f}  {done.max():.4f}':>26}")
        print(f"{epoch:>5}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
