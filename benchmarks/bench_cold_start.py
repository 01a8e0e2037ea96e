"""Seconds from a fresh Python process to a served model's first answer: what every `mlflow models
serve` start, Spark worker, `evaluate` or `predict` process pays before its work.

Each repeat is a new interpreter that imports MLflow, loads the model with
`mlflow.pyfunc.load_model` and predicts 3 face crops; the figure is the median of `--repeats`
processes run one after another. It also says whether TensorFlow was imported on the way. The child
processes inherit this one's environment, so ``PYTHONPATH=<another checkout>`` times that checkout's
serving code (log the model with that checkout too: a logged model carries its own code).

    python benchmarks/bench_cold_start.py --model-uri models:/fer-emotion@pretrained-fast --repeats 3
"""

import argparse
import os
import statistics
import subprocess
import sys

import mlflow

CHILD = """
import time
started = time.perf_counter()
import sys, mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(np.zeros((3, 48, 48), np.uint8))
print("answered", time.perf_counter() - started, "tensorflow" in sys.modules)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    seconds, imported = [], set()
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-c", CHILD, args.model_uri], capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        _, took, tensorflow = done.stdout.split()[-3:]
        seconds.append(float(took))
        imported.add(tensorflow)
    print(f"first answer after {statistics.median(seconds):.2f} s (median of {args.repeats}: "
          f"{', '.join(f'{s:.2f}' for s in seconds)}); TensorFlow imported: {', '.join(sorted(imported))}")


if __name__ == "__main__":
    main()
