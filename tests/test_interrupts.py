"""SIGINT and SIGTERM end a stage's run KILLED, training keeps its best model so far, and `main`
passes the stop on to the step it is running, leaving no process of the project behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
from conftest import PROJECT, all_runs
from mlflow import MlflowClient


def start(arguments: list[str], tracking: str) -> subprocess.Popen:
    """The CLI in its own session, as a shell or a scheduler starts it."""
    MlflowClient().search_experiments()  # create the store's tables first: two creators would race
    return subprocess.Popen([sys.executable, "-m", "fer_mlflow", *arguments], cwd=PROJECT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_training(process: subprocess.Popen, timeout: float = 300) -> str:
    """The id of the RUNNING train run, once it has logged an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        for run in all_runs("tags.`fer.stage` = 'train' and attributes.status = 'RUNNING'"):
            if "val_accuracy" in run.data.metrics:
                return run.info.run_id
        time.sleep(1)
    pytest.fail("training did not log an epoch in time")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_training_logs_the_best_model_so_far_and_ends_the_run_killed(name, tiny_npz, tracking):
    process = start(["train", "--data", tiny_npz, "--epochs", "500", "--patience", "500"], tracking)
    run_id = wait_for_training(process)
    sent = time.monotonic()
    process.send_signal(getattr(signal, name))
    status = process.wait(timeout=120)
    stopping = time.monotonic() - sent
    error = process.stderr.read()
    assert status == {"SIGTERM": 143, "SIGINT": 130}[name], error[-3000:]
    assert f"stopped by {name}; the run ended KILLED" in error
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["fer.interrupted"] == name
    assert run.data.metrics["epochs_trained"] < 500 and stopping < 60
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # the best so far, usable by evaluate
    assert len(model.predict(__import__("numpy").zeros((2, 48, 48), "uint8"))) == 2


@pytest.mark.slow
def test_a_ctrl_c_to_main_stops_its_running_step_and_leaves_no_process_or_running_run(tracking):
    # SIGINT, as a terminal's Ctrl-C sends it (here to main alone: its steps run in process groups
    # of their own). SIGTERM takes the same handler; its exit status is tested in training above.
    process = start(["main", "--models", "cnn", "--epochs", "500"], tracking)
    wait_for_training(process, timeout=600)
    family = psutil.Process(process.pid).children(recursive=True)
    assert family, "main runs its steps as processes of their own"
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=180)
    assert status == 130, process.stderr.read()[-3000:]
    # main waits for its step to log what it has and exit: nothing of it outlives main
    gone, alive = psutil.wait_procs(family, timeout=3)
    assert alive == []
    runs = all_runs()
    assert {run.data.tags.get("fer.stage") for run in runs} >= {"main", "clean", "train"}
    assert not [run for run in runs if run.info.status == "RUNNING"]
    statuses = {run.data.tags["fer.stage"]: run.info.status for run in runs if "fer.stage" in run.data.tags}
    assert statuses["main"] == "KILLED" and statuses["train"] == "KILLED" and statuses["clean"] == "FINISHED"


@pytest.mark.slow
def test_a_signal_to_a_two_worker_sweep_stops_both_workers_and_leaves_no_trial_or_run_running(tiny_npz, tracking,
                                                                                             tmp_path):
    journal = str(tmp_path / "study.journal")
    process = start(["sweep", "--data", tiny_npz, "--workers", "2", "--trials", "6", "--storage", journal,
                     "--study", "stopped", "--epochs", "500", "--patience", "500"], tracking)
    deadline = time.monotonic() + 300
    while len(all_runs("tags.`fer.stage` = 'train' and attributes.status = 'RUNNING'")) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(1)
    family = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=180)
    assert status == 143, process.stderr.read()[-3000:]
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert alive == []
    runs = all_runs()
    assert not [run for run in runs if run.info.status == "RUNNING"]
    sweeps = [run for run in runs if run.data.tags.get("fer.stage") == "sweep"]
    trained = [run for run in runs if run.data.tags.get("fer.stage") == "train"]
    assert len(sweeps) == 2 and {run.info.status for run in sweeps} == {"KILLED"}
    assert len(trained) == 2 and {run.info.status for run in trained} == {"KILLED"}
    assert {run.data.tags["fer.trial_state"] for run in trained} == {"stopped"}
    import optuna

    study = optuna.load_study(study_name="stopped", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert {trial.user_attrs["error"] for trial in study.trials} == {"stopped"}
