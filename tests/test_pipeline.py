"""The main entry point end to end, against a local store and against a real tracking server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile

import mlflow
import numpy as np
import pytest
from conftest import SHARED_ZIP, free_port, mlflow_run
from mlflow import MlflowClient
from PIL import Image

from fer_mlflow.dataset import CLASS_NAMES

SMALL = {"models": "cnn,resnet50", "epochs": 1, "image_size": 32}


def real_faces(count: int = 8) -> tuple[np.ndarray, list[str]]:
    """The first `count` PublicTest faces of the shared FER2013 zip, and their class folders."""
    import io

    with zipfile.ZipFile(SHARED_ZIP) as archive:
        names = [n for n in archive.namelist() if n.startswith("test/") and n.endswith(".jpg")][:count]
        images = [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("L")) for n in names]
    return np.stack(images), [n.split("/")[1] for n in names]


def check_pipeline(done: subprocess.CompletedProcess, client: MlflowClient) -> None:
    assert done.returncode == 0, done.stderr[-4000:]
    assert "champion: models:/fer-emotion@champion" in done.stdout
    assert "mlflow.pyfunc.load_model('models:/fer-emotion@champion')" in done.stdout
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("fer.stage") == "main"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    stages = sorted(r.data.tags.get("fer.stage") for r in runs)
    assert stages == ["clean", "evaluate", "evaluate", "main", "promote", "train", "train"]
    assert all(r.info.status == "FINISHED" for r in runs)
    steps = [r for r in runs if r.data.tags.get("fer.stage") in ("clean", "train", "promote")]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in steps)
    champion = client.get_model_version_by_alias("fer-emotion", "champion")
    assert champion.tags["test_digest"] and champion.tags["model"] in ("cnn", "resnet50")


@pytest.mark.slow
def test_mlflow_run_main_leaves_a_champion_that_predicts_real_faces(tracking):
    done = mlflow_run("main", SMALL, tracking, timeout=1500)
    check_pipeline(done, MlflowClient())
    model = mlflow.pyfunc.load_model("models:/fer-emotion@champion")
    if SHARED_ZIP.exists():
        images, _ = real_faces()
    else:
        from fer_mlflow.demo import make_demo

        images = make_demo(per_class=9).images[:8]
    predicted = model.predict(images)
    assert len(predicted) == len(images)
    assert set(predicted["label"]) <= set(CLASS_NAMES)
    assert np.allclose(predicted.filter(like="prob_").sum(axis=1), 1, atol=1e-4)


@pytest.mark.slow
def test_the_pipeline_works_against_a_tracking_server(tracking_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    done = mlflow_run("main", {**SMALL, "models": "cnn"}, tracking_server, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(tracking_server)
    champion = client.get_model_version_by_alias("fer-emotion", "champion")
    assert champion.tags["model"] == "cnn"
    model = mlflow.pyfunc.load_model("models:/fer-emotion@champion")
    from fer_mlflow.demo import make_demo

    assert len(model.predict(make_demo(per_class=9).images[:3])) == 3
    assert not (tmp_path / "mlruns").exists()  # artifacts went to the server, not the client's disk
