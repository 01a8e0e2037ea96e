"""Stages that read datasets and models from a remote artifact store leave nothing in /tmp."""

from __future__ import annotations

import os
import tempfile

import mlflow
import numpy as np
import pytest
from conftest import tiny_keras_model

from fer_mlflow.stages import evaluate
from fer_mlflow.serving.pyfunc_model import log_model
from fer_mlflow.data.sources import read_source


@pytest.mark.slow
def test_reading_a_dataset_and_evaluating_a_model_through_a_server_leaves_no_temporary_files(
        tracking_server, tiny_npz, monkeypatch, tmp_path):
    # A temporary folder of this test's own: no other test (or process) writes there meanwhile.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    with mlflow.start_run() as run:
        mlflow.log_artifact(tiny_npz, "dataset")
        model_uri = log_model(tiny_keras_model()).model_uri
    data = f"runs:/{run.info.run_id}/dataset/{os.path.basename(tiny_npz)}"
    before = set(os.listdir(tempfile.gettempdir()))
    dataset, _ = read_source(data)
    outcome = evaluate.run(model_uri=model_uri, data=data)
    left = set(os.listdir(tempfile.gettempdir())) - before
    # MLflow's own lock for initialising a SQLite store (one per database, kept by design) is no copy.
    assert {name for name in left if not name.startswith("db_init_lock-")} == set()
    # What was read through the server is the dataset itself: the model scores on it what it scores
    # on the local file's test split.
    test = read_source(tiny_npz)[0].split("test")
    assert len(dataset) == len(read_source(tiny_npz)[0]) and len(test) > 0
    scores = tiny_keras_model().predict(test.images[..., None].astype(np.float32), verbose=0)
    expected = np.mean(np.argmax(scores, axis=1) == test.labels)
    assert outcome.metrics["test_accuracy"] == pytest.approx(expected, abs=1e-9)
