"""What a sweep costs besides its trials' training, and what two workers give over one (issue 16).

Each measurement is one `fer-mlflow sweep` process on the demo data (cleaned once, beforehand, to
an .npz), in a fresh SQLite tracking store, with pruning off (``--prune-warmup`` past the last
epoch) so that every trial trains its `--epochs`: the same work for one worker and for two. Sweeps
alternate between one and two workers, `--repeats` times each.

- overhead per trial: (the parent run's ``sweep_seconds`` - the trials' ``train_seconds``, summed)
  / trials, for one worker; it holds building the model, logging the run, the model and the trial;
- throughput: trials per minute of the whole process (start to exit), and the ratio 2 workers / 1.

    python benchmarks/bench_sweep.py --trials 8 --epochs 3 --repeats 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def one_sweep(data: str, workers: int, trials: int, epochs: int, folder: Path) -> dict:
    tracking = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], env=env, check=True)
    command = [sys.executable, "-m", "fer_mlflow", "sweep", "--data", data, "--trials", str(trials),
               "--workers", str(workers), "--epochs", str(epochs), "--prune-warmup", str(epochs + 1),
               "--evaluate", "false"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("fer.stage") == "sweep"]
    trained = [r for r in runs if r.data.tags.get("fer.stage") == "train"]
    assert len(trained) == trials and all(r.info.status == "FINISHED" for r in trained)
    train_seconds = sum(r.data.metrics["train_seconds"] for r in trained)
    launcher = next(r for r in parents if r.data.tags["fer.sweep_worker"] == "0")
    sweep_seconds = launcher.data.metrics["sweep_seconds"]
    return {"workers": workers, "wall_seconds": wall, "sweep_seconds": sweep_seconds,
            "train_seconds_per_trial": train_seconds / trials,
            "overhead_per_trial": (sweep_seconds - train_seconds) / trials if workers == 1 else None,
            "trials_per_minute": trials / wall * 60}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from fer_mlflow.data import dataset as ds
    from fer_mlflow.data.demo import make_demo

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as root:
        data = str(ds.save(make_demo(seed=0), Path(root) / "demo.npz"))
        results = []
        for repeat in range(args.repeats):
            for workers in (1, 2):
                folder = Path(root) / f"{repeat}-{workers}"
                folder.mkdir()
                results.append(one_sweep(data, workers, args.trials, args.epochs, folder))
                print(json.dumps(results[-1]), flush=True)
    ones = [r for r in results if r["workers"] == 1]
    twos = [r for r in results if r["workers"] == 2]
    summary = {
        "overhead_per_trial_median": statistics.median(r["overhead_per_trial"] for r in ones),
        "train_seconds_per_trial_1_worker": statistics.median(r["train_seconds_per_trial"] for r in ones),
        "train_seconds_per_trial_2_workers": statistics.median(r["train_seconds_per_trial"] for r in twos),
        "trials_per_minute_1_worker": statistics.median(r["trials_per_minute"] for r in ones),
        "trials_per_minute_2_workers": statistics.median(r["trials_per_minute"] for r in twos),
    }
    summary["two_over_one"] = summary["trials_per_minute_2_workers"] / summary["trials_per_minute_1_worker"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
