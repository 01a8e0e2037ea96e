"""What a user sees on the terminal: the project's lines, not MLflow's progress bars in a log, nor
TensorFlow's C++ start-up lines."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from conftest import tiny_keras_model
from fer_mlflow.serving.pyfunc_model import log_model
from fer_mlflow.quiet import NOISE

# Lines TensorFlow 2.21 writes at start-up on any machine (the project turns oneDNN on).
TENSORFLOW_START = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")


def stage(arguments: list[str], tracking: str, verbose: str = "") -> subprocess.CompletedProcess:
    """`python -m fer_mlflow <arguments>` as `mlflow run` starts a stage: no terminal attached."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "FER_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(MLFLOW_TRACKING_URI=tracking, FER_VERBOSE=verbose)
    return subprocess.run([sys.executable, "-m", "fer_mlflow", *arguments], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("verbose", ["", "1"])
def test_progress_bars_are_off_without_a_terminal_unless_verbose(tiny_npz, tracking, verbose):
    with mlflow.start_run() as run:
        log_model(tiny_keras_model(0))
    done = stage(["evaluate", "--model-uri", f"runs:/{run.info.run_id}/model", "--data", tiny_npz], tracking, verbose)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("Downloading artifacts" in done.stderr) == bool(verbose)
    # A model with its ONNX export is evaluated without starting TensorFlow at all, verbose or not.
    assert not any(line in done.stderr for line in TENSORFLOW_START), done.stderr[-2000:]
    assert "evaluation run: " in done.stdout  # the project's own lines, either way


@pytest.mark.slow
def test_training_shows_the_projects_lines_not_the_onnx_converters_or_keras_warnings(tiny_npz, tracking):
    done = stage(["train", "--data", tiny_npz, "--epochs", "1", "--widths", "8,16"], tracking)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: runs:/" in done.stdout
    assert "tf2onnx" not in done.stderr  # it logs a line per graph rewrite, hundreds for a ResNet
    assert "Warning:" not in done.stderr, done.stderr[-2000:]  # Keras' shuffle warning, numpy's FutureWarning
    assert not any(line in done.stderr for line in TENSORFLOW_START), done.stderr[-2000:]


@pytest.mark.slow
def test_tensorflow_start_up_lines_come_through_when_verbose(tiny_npz, tracking):
    done = stage(["train", "--data", tiny_npz, "--epochs", "1", "--widths", "8,16"], tracking, verbose="1")
    assert done.returncode == 0, done.stderr[-2000:]
    for line in TENSORFLOW_START:
        assert line in done.stderr, line


@pytest.mark.slow
def test_an_error_still_gets_through_as_the_last_line(tracking):
    done = stage(["train", "--data", "/nowhere", "--epochs", "1"], tracking)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("error: data path /nowhere does not exist")
    assert not any(line in done.stderr for line in TENSORFLOW_START)


@pytest.mark.parametrize("line, noise", [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", True),
    ("E0000 00:00:1796400330.327839   27845 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n", True),
    ("I0000 00:00:1796400298.002443   27845 port.cc:153] oneDNN custom operations are on.\n", True),
    ("E0000 00:00:1796400330.327839   27845 bfc_allocator.cc:47] Allocator ran out of memory\n", False),
    ("INFO fer_mlflow.evaluate: port.cc:153] quoted\n", False),
    ("error: data path /nowhere does not exist\n", False),
])
def test_only_the_known_tensorflow_lines_are_dropped(line, noise):
    assert bool(NOISE.fullmatch(line.encode())) == noise
