"""Speed of a served ensemble against one model: crops per second, plain and with ten views.

Each model is the default cnn, untrained (the same cost as a trained one), logged with
`pyfunc_model.log_model` (an ensemble: `ensemble.combine` of k of them, as the `ensemble` stage
logs it) and loaded with `mlflow.pyfunc.load_model`. Each figure is a whole `predict` call on 3,589
random crops (PublicTest's size), median of `--repeats` calls after a warm-up; the models are timed
in turn within each repeat, so they share the machine's state.

    python benchmarks/bench_ensemble.py --repeats 3   # from a scratch folder
    python benchmarks/bench_ensemble.py --views tta   # ten views only
"""

import argparse
import statistics
import time

import mlflow
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--views", nargs="+", choices=["plain", "tta"], default=["plain", "tta"],
                        help="which halves to time: one view, ten views, or both")
    args = parser.parse_args()
    from fer_mlflow.stages.ensemble import combine
    from fer_mlflow.learning.models import build_model
    from fer_mlflow.serving.pyfunc_model import log_model

    mlflow.set_tracking_uri("sqlite:///bench_ensemble.db")
    models = {}
    for count in args.members:
        members = [build_model("cnn", image_size=48) for _ in range(count)]
        keras_model = members[0] if count == 1 else combine(members, [1 / count] * count)
        with mlflow.start_run():
            models[count] = mlflow.pyfunc.load_model(log_model(keras_model, name="model").model_uri)
    crops = np.random.default_rng(0).integers(0, 255, (3589, 48, 48), dtype=np.uint8)
    halves = {"plain": (None, "plain"), "tta": ({"tta": True}, "ten views")}
    for params, label in (halves[name] for name in args.views):
        times = {count: [] for count in models}
        for model in models.values():
            model.predict(crops[:256], params=params)  # warm-up: graph tracing
        for _ in range(args.repeats):
            for count, model in models.items():
                started = time.perf_counter()
                model.predict(crops, params=params)
                times[count].append(time.perf_counter() - started)
        single = statistics.median(times[args.members[0]])
        for count in models:
            seconds = statistics.median(times[count])
            print(f"{label}, {count} model(s): {len(crops) / seconds:,.0f} crops/s "
                  f"({seconds:.2f} s; {seconds / single:.2f}x the time of {args.members[0]})")


if __name__ == "__main__":
    main()
