"""What a user sees on the terminal: the project's lines, not MLflow's progress bars in a log."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from conftest import tiny_keras_model
from fer_mlflow.serving.pyfunc_model import log_model

@pytest.mark.slow
@pytest.mark.parametrize("verbose", ["", "1"])
def test_artifact_progress_bars_are_off_without_a_terminal_unless_verbose(tiny_npz, tracking, verbose):
    with mlflow.start_run() as run:
        log_model(tiny_keras_model(0))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "FER_VERBOSE")}
    env.update(MLFLOW_TRACKING_URI=tracking, FER_VERBOSE=verbose)
    done = subprocess.run([sys.executable, "-m", "fer_mlflow", "evaluate", "--model-uri", f"runs:/{run.info.run_id}/model",
                           "--data", tiny_npz], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("Downloading artifacts" in done.stderr) == bool(verbose)
