"""What the batch-norm statistics do to a `train -P ema` checkpoint's moving average: the validation
accuracy of the weights being trained, of the average with the trained network's statistics (what
`-P ema` validated before it recomputed them) and of the average with statistics of its own
(`loop.recompute_statistics` over `--images` training faces, in batches of 256, as `train` does).

    python benchmarks/averaged_statistics.py --checkpoint <run artifacts>/checkpoint/<a|b> \
        --data <clean run's dataset.npz> --widths 32,64,128,256 --dropout 0.1 [--images 1024] [--seed 0]

The checkpoint is a cnn's (`build_cnn` with the `--widths` and `--dropout` it was trained with);
`weights.npz` holds the trained weights and statistics, `optimizer.npz` the averages (after SGD's
`iteration`, in the order of the trainable variables). The faces here are the split's plain training
faces; `train` draws its batches from its augmented training data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fer_mlflow.data import dataset as ds
from fer_mlflow.learning.loop import STATISTICS_BATCH, STATISTICS_IMAGES, load_arrays, recompute_statistics
from fer_mlflow.learning.models import build_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", required=True, help="a clean dataset.npz")
    parser.add_argument("--widths", default="32,64,128,256")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=STATISTICS_IMAGES, help="training faces for the statistics")
    parser.add_argument("--seed", type=int, default=0, help="which training faces")
    args = parser.parse_args()

    data = ds.load(args.data)
    train, val = data.split("train"), data.split("val")
    model = build_cnn(widths=tuple(int(w) for w in args.widths.split(",")), dropout=args.dropout)
    model.set_weights(load_arrays(args.checkpoint / "weights.npz"))
    variables = model.trainable_variables
    averages = load_arrays(args.checkpoint / "optimizer.npz")[1:1 + len(variables)]
    if [a.shape for a in averages] != [tuple(v.shape) for v in variables]:
        raise SystemExit(f"{args.checkpoint}: its optimizer holds no moving average of these weights")

    faces = ds.model_input(val.images)

    def accuracy() -> float:
        return float(np.mean(model.predict(faces, batch_size=512, verbose=0).argmax(1) == val.labels))

    print(f"trained weights:                    {accuracy():.4f}")
    for variable, average in zip(variables, averages, strict=True):
        variable.assign(average)
    print(f"average, the trained statistics:    {accuracy():.4f}")
    chosen = np.random.default_rng(args.seed).choice(len(train.images), args.images, replace=False)
    images = ds.model_input(train.images[chosen])
    started = time.perf_counter()
    recompute_statistics(model, [images[i:i + STATISTICS_BATCH] for i in range(0, len(images), STATISTICS_BATCH)])
    print(f"statistics recomputed in {time.perf_counter() - started:.1f} s")
    print(f"average, statistics of its own:     {accuracy():.4f}")


if __name__ == "__main__":
    main()
