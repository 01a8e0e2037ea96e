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

SMALL = {"models": "cnn,resnet50", "epochs": 1, "image_size": 32}


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


def check_pipeline(done: subprocess.CompletedProcess, client: MlflowClient) -> None:
    """The quick start's pipeline ran whole in the fer-demo experiment and registered fer-emotion-demo."""
    assert done.returncode == 0, done.stderr[-4000:]
    assert "champion: models:/fer-emotion-demo@champion" in done.stdout
    assert "mlflow.pyfunc.load_model('models:/fer-emotion-demo@champion')" in done.stdout
    demo = client.get_experiment_by_name("fer-demo")
    runs = client.search_runs([demo.experiment_id])
    parent = [r for r in runs if r.data.tags.get("fer.stage") == "main"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    stages = sorted(r.data.tags.get("fer.stage") for r in runs)
    models = SMALL["models"].count(",") + 1
    assert stages == sorted(["clean", "main", "promote"] + ["evaluate", "train"] * models)
    assert all(r.info.status == "FINISHED" for r in runs)
    steps = [r for r in runs if r.data.tags.get("fer.stage") in ("clean", "train", "promote")]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id for r in steps)
    names = {r.data.tags["fer.stage"]: r.info.run_name for r in runs}
    assert names["train"].startswith(("cnn-demo ", "resnet50-demo ")) and names["clean"] == "clean-demo"
    champion = client.get_model_version_by_alias("fer-emotion-demo", "champion")
    assert champion.tags["test_digest"] and champion.tags["model"] in ("cnn", "resnet50")


@pytest.mark.slow
def test_the_quick_start_leaves_a_demo_champion_and_never_touches_one_trained_on_real_data(tracking, tmp_path):
    sample = real_sample(tmp_path)
    trained = train.run(train.TrainConfig(model="cnn", data=str(sample), epochs=1, batch_size=32))
    evaluate.run(run_id=trained.run_id)
    promote.run()
    client = MlflowClient()
    real = client.get_model_version_by_alias("fer-emotion", "champion")
    assert real.run_id == trained.run_id

    done = mlflow_run("main", SMALL, tracking, timeout=1500)  # the README's quick start, shrunk
    check_pipeline(done, client)
    after = client.get_model_version_by_alias("fer-emotion", "champion")
    assert (after.version, after.aliases) == (real.version, real.aliases)
    assert len(client.search_model_versions("name = 'fer-emotion'")) == 1
    assert not client.search_runs(["0"], "attributes.status = 'RUNNING'")

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


@pytest.mark.slow
def test_the_pipeline_works_against_a_postgresql_backed_tracking_server(tracking_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    done = mlflow_run("main", {**SMALL, "models": "cnn,cnn_shallow", "ensemble": "true"}, tracking_server,
                      timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(tracking_server)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    stages = {}
    for run in runs:
        stages.setdefault(run.data.tags.get("fer.stage"), []).append(run)
    (parent,), (built,) = stages["main"], stages["ensemble"]
    assert built.data.tags["mlflow.parentRunId"] == parent.info.run_id and built.info.status == "FINISHED"
    assert sorted(built.data.tags["fer.members"].split(",")) == sorted(r.info.run_id for r in stages["train"])
    scored = {r.data.tags["fer.source_run"]: r.data.metrics["test_accuracy"] for r in stages["evaluate"]}
    assert built.info.run_id in scored and len(scored) == 3  # two models and their ensemble
    champion = client.get_model_version_by_alias("fer-emotion-demo", "champion")
    assert scored[champion.tags["source_run"]] == max(scored.values())
    model = mlflow.pyfunc.load_model("models:/fer-emotion-demo@champion")
    from fer_mlflow.data.demo import make_demo

    assert len(model.predict(make_demo(per_class=9).images[:3])) == 3
    assert not (tmp_path / "mlruns").exists()  # artifacts went to the server, not the client's disk
