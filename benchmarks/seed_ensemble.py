"""Training runs alone and averaged, scored on the validation faces that none of them trained on
and on the test split: for runs whose validation splits differ (`train -P seed=N` on a raw source
draws its own split), where the `ensemble` stage refuses them.

    python benchmarks/seed_ensemble.py --runs <run id>,<run id> --data ../shared/data/fer2013-public.zip

(with MLFLOW_TRACKING_URI pointing at the runs' store). Each run's network is scored without and
with the ten default test-time views (`views.probabilities`); the averaged probabilities are the
members' own, with equal weights. Prints a line per figure and writes them as JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mlflow import MlflowClient

from fer_mlflow.data.dataset import model_input
from fer_mlflow.data.sources import read_source
from fer_mlflow.serving import pyfunc_model, views
from fer_mlflow.stages import ensemble
from fer_mlflow.tracking import registry
from fer_mlflow.tracking.runs import run_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="training run ids, comma-separated")
    parser.add_argument("--data", required=True, help="the test data (PublicTest: the FER2013 zip)")
    parser.add_argument("--output", default="seed_ensemble.json")
    args = parser.parse_args()

    client = MlflowClient()
    run_ids = [r.strip() for r in args.runs.split(",") if r.strip()]
    networks, unseen = {}, None
    for run_id in run_ids:
        networks[run_id] = pyfunc_model.keras_model_of(registry.load_model(f"runs:/{run_id}/model"))
        val = read_source(run_params(client.get_run(run_id))["data_uri"])[0].split("val")
        unseen = val if unseen is None else unseen.subset(np.isin(unseen.ids, val.ids))
    test = read_source(args.data)[0].split("test")
    figures = {"val_unseen_faces": len(unseen), "test_faces": len(test)}
    print(f"validation faces no run trained on: {len(unseen)}; test faces: {len(test)}")
    for split_name, split in (("val_unseen", unseen), ("test", test)):
        pixels = model_input(split.images)
        for settings in (views.Settings(), views.Settings(tta=True)):
            started = time.perf_counter()
            probabilities = {run_id[:8]: views.probabilities(network, pixels, settings)
                             for run_id, network in networks.items()}
            probabilities["averaged"] = np.mean(list(probabilities.values()), axis=0)
            for name, found in probabilities.items():
                accuracy = ensemble.accuracy(found, split.labels)
                figures[f"{split_name}/{settings.key}/{name}"] = accuracy
                print(f"{split_name} {settings.describe()} {name}: {accuracy:.4f}")
            print(f"  ({time.perf_counter() - started:.0f} s)")
    with open(args.output, "w") as handle:
        json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
