"""The main entry point end to end, against a local store and against a real tracking server."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import SHARED_ZIP, mlflow_run, write_layout
from mlflow import MlflowClient
from PIL import Image

from fer_mlflow.stages import evaluate, promote, train
from fer_mlflow.data.dataset import CLASS_NAMES

SMALL = {"models": "cnn,cnn_shallow", "epochs": 1, "image_size": 32, "ensemble": "true"}


def real_faces(count: int = 8) -> tuple[np.ndarray, list[str]]:
    """The first `count` PublicTest faces of the shared FER2013 zip, and their class folders."""
    import io

    with zipfile.ZipFile(SHARED_ZIP) as archive:
        names = [n for n in archive.namelist() if n.startswith("test/") and n.endswith(".jpg")][:count]
        images = [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("L")) for n in names]
    return np.stack(images), [n.split("/")[1] for n in names]


def real_sample(folder: Path) -> Path:
    """A small FER2013 sample in the Kaggle layout: 10 train and 3 test faces per class of the
    shared zip, or (without it) synthetic faces in the same layout, which count as real data too."""
    if not SHARED_ZIP.exists():
        return write_layout(folder / "sample", {"train": 10, "test": 3})
    sample = folder / "fer2013-sample.zip"
    with zipfile.ZipFile(SHARED_ZIP) as source, zipfile.ZipFile(sample, "w") as target:
        for split, count in (("train", 10), ("test", 3)):
            for name in CLASS_NAMES:
                members = [n for n in source.namelist() if n.startswith(f"{split}/{name}/") and n.endswith(".jpg")]
                for member in members[:count]:
                    target.writestr(member, source.read(member))
    return sample


def check_pipeline(done: subprocess.CompletedProcess, client: MlflowClient, server: str) -> None:
    """The quick start's pipeline ran whole in the fer-demo experiment, built and evaluated the
    ensemble of its models, registered fer-emotion-demo, and named the UI link last."""
    assert done.returncode == 0, done.stderr[-4000:]
    assert "champion: models:/fer-emotion-demo@champion" in done.stdout
    assert "mlflow.pyfunc.load_model('models:/fer-emotion-demo@champion')" in done.stdout
    demo = client.get_experiment_by_name("fer-demo")
    link = f"{server}/#/experiments/{demo.experiment_id}?workflowType=machine_learning"
    lines = done.stdout.splitlines()  # the project's last lines; `mlflow run` prints its own after them
    assert [line for line in lines if link in line]
    assert max(i for i, line in enumerate(lines) if link in line) > lines.index(
        "champion: models:/fer-emotion-demo@champion")
    runs = client.search_runs([demo.experiment_id])
    parent = [r for r in runs if r.data.tags.get("fer.stage") == "main"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    stages = sorted(r.data.tags.get("fer.stage") for r in runs)
    models = SMALL["models"].count(",") + 1
    assert stages == sorted(["clean", "main", "promote", "ensemble", "evaluate"] + ["evaluate", "train"] * models)
    assert all(r.info.status == "FINISHED" for r in runs)
    steps = [r for r in runs if r.data.tags.get("fer.stage") in ("clean", "train", "ensemble", "promote")]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in steps)
    names = {r.data.tags["fer.stage"]: r.info.run_name for r in runs}
    assert names["train"].startswith(("cnn-demo ", "cnn_shallow-demo ")) and names["clean"] == "clean-demo"
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("fer.stage"), []).append(run)
    (built,) = by_stage["ensemble"]
    assert sorted(built.data.tags["fer.members"].split(",")) == sorted(r.info.run_id for r in by_stage["train"])
    scored = {r.data.tags["fer.source_run"]: r.data.metrics["test_accuracy"] for r in by_stage["evaluate"]}
    assert built.info.run_id in scored and len(scored) == 3  # two models and their ensemble
    champion = client.get_model_version_by_alias("fer-emotion-demo", "champion")
    assert champion.tags["test_digest"] and scored[champion.tags["source_run"]] == max(scored.values())


@pytest.mark.slow
def test_the_quick_start_on_a_postgresql_backed_server_leaves_a_demo_champion_and_never_touches_a_real_one(
        tracking_server, monkeypatch, tmp_path):
    # One pipeline, the README's quick start shrunk and with the ensemble, against a team's server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    sample = real_sample(tmp_path)
    trained = train.run(train.TrainConfig(model="cnn", data=str(sample), epochs=1, batch_size=32))
    evaluate.run(run_id=trained.run_id)
    promote.run()
    client = MlflowClient(tracking_server)
    real = client.get_model_version_by_alias("fer-emotion", "champion")
    assert real.run_id == trained.run_id

    done = mlflow_run("main", SMALL, tracking_server, timeout=1500)
    check_pipeline(done, client, tracking_server)
    after = client.get_model_version_by_alias("fer-emotion", "champion")
    assert (after.version, after.aliases) == (real.version, real.aliases)
    assert len(client.search_model_versions("name = 'fer-emotion'")) == 1
    assert not mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                                  output_format="list")
    assert not (tmp_path / "mlruns").exists()  # artifacts went to the server, not the client's disk

    model = mlflow.pyfunc.load_model("models:/fer-emotion-demo@champion")
    if SHARED_ZIP.exists():
        images, _ = real_faces()
    else:
        from fer_mlflow.data.demo import make_demo

        images = make_demo(per_class=9).images[:8]
    predicted = model.predict(images)
    assert len(predicted) == len(images)
    assert set(predicted["label"]) <= set(CLASS_NAMES)
    assert np.allclose(predicted.filter(like="prob_").sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("tracking_uri, expected_base, command", [
    ("http://127.0.0.1:5071", "http://127.0.0.1:5071", None),
    ("https://alice:secret@mlflow.example.com/team/", "https://mlflow.example.com/team", None),
    ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "mlflow ui --backend-store-uri sqlite:///mlflow.db"),
])
def test_the_ui_link_opens_the_runs_in_the_model_training_view(tracking_uri, expected_base, command):
    from fer_mlflow.stages.main import ui_link

    link, serve = ui_link("7", tracking_uri)
    assert link == f"{expected_base}/#/experiments/7?workflowType=machine_learning" and serve == command
