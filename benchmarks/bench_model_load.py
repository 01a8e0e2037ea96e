"""Seconds a fresh Python process takes to load a logged model, as the project's stages load one
(`registry.load_model`: its own one-line check of the model's requirements) against MLflow's
`mlflow.pyfunc.load_model` with its default check (which scans every installed package's files).
Each repeat runs one new interpreter of each kind, one after the other; the figures are medians.

    python benchmarks/bench_model_load.py --model-uri <a logged model's folder or URI> --repeats 5
"""

import argparse
import statistics
import subprocess
import sys

TIMED = {
    "mlflow.pyfunc.load_model": "import time, tempfile, mlflow\nstarted = time.perf_counter()\n"
                                "mlflow.pyfunc.load_model({uri!r}, dst_path=tempfile.mkdtemp())\n"
                                "print(time.perf_counter() - started)",
    "registry.load_model": "import time, mlflow\nfrom fer_mlflow.tracking import registry\n"
                           "started = time.perf_counter()\nregistry.load_model({uri!r})\n"
                           "print(time.perf_counter() - started)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds = {name: [] for name in TIMED}
    for _ in range(args.repeats):
        for name, code in TIMED.items():
            done = subprocess.run([sys.executable, "-c", code.format(uri=args.model_uri)], capture_output=True,
                                  text=True, check=True)
            seconds[name].append(float(done.stdout.split()[-1]))
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
