"""Batch scoring on Spark (local[2]): the Parquet holds what the model itself answers, file by file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_ZIP, all_runs, face, mlflow_run, tiny_keras_model
from mlflow import MlflowClient
from PIL import Image
from skimage import data as photos

from fer_mlflow.stages import score
from fer_mlflow.cli import main
from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.serving.pyfunc_model import log_model

PROBABILITIES = [f"prob_{name}" for name in CLASS_NAMES]
FACES = 200


def encoded(rgb_or_gray: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of FER2013 PublicTest faces (synthetic faces without the shared zip) in class
    folders, three photos (one face, two without), a corrupt file and a hidden one."""
    root = tmp_path_factory.mktemp("images") / "images"
    if SHARED_ZIP.exists():
        with zipfile.ZipFile(SHARED_ZIP) as archive:
            names = [n for n in archive.namelist() if n.startswith("test/") and n.endswith(".jpg")][:FACES]
            for name in names:
                target = root / "faces" / name.split("/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    else:
        for index in range(FACES):
            target = root / "faces" / CLASS_NAMES[index % 7] / f"{index:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded(face(index % 7, index)))
    (root / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (root / "photos" / f"{name}.JPG").write_bytes(encoded(getattr(photos, name)(), "JPEG"))
    (root / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "photos" / ".hidden.png").write_bytes(encoded(face(0, 0)))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def model_uri() -> str:
    with mlflow.start_run():
        return log_model(tiny_keras_model()).model_uri


def expected_rows(model_uri: str, folder: Path, params: dict) -> pd.DataFrame:
    """What the model itself answers for each readable photo under `folder`, a row per face."""
    model = mlflow.pyfunc.load_model(model_uri)
    rows = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".jpg", ".png") and not path.name.startswith(".") and path.name != "broken.png":
            found = model.predict(pd.DataFrame({"image": [path.read_bytes()]}), params=params)
            found.insert(0, "path", path.resolve().as_uri())
            rows.append(found)
    return pd.concat(rows, ignore_index=True)


def check_same(written: pd.DataFrame, expected: pd.DataFrame) -> None:
    key = ["path", "face"]
    written = written[written["error"].isna()].sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    written["path"] = written["path"].str.replace("file:///", "file:/", regex=False)
    expected["path"] = expected["path"].str.replace("file:///", "file:/", regex=False)
    assert list(written["path"]) == list(expected["path"])
    for column in ("face", "x", "y", "w", "h", "label"):
        assert list(written[column]) == list(expected[column]), column
    np.testing.assert_allclose(written[PROBABILITIES].to_numpy(dtype=float),
                               expected[PROBABILITIES].to_numpy(dtype=float), atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("java")
def test_spark_writes_a_row_per_face_equal_to_the_models_own_answer(images, model_uri, tmp_path):
    output = tmp_path / "scored"
    outcome = score.run(model_uri, str(images), str(output), master="local[2]")  # crops as they are, photos searched
    written = pd.read_parquet(output)
    check_same(written, expected_rows(model_uri, images, {}))
    broken = written[written["error"].notna()]
    assert list(broken["path"].str.rsplit("/", n=1).str[-1]) == ["broken.png"]
    assert "could not be decoded" in broken["error"].iloc[0]
    assert not written["path"].str.contains("hidden").any()
    assert (outcome.images, outcome.skipped_files) == (FACES + 4, 1)
    assert outcome.images_without_face == 2  # the coffee cup and the cat
    assert outcome.faces == FACES + 1  # each crop, and the astronaut
    run = MlflowClient().get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fer.stage"] == "score"
    assert run.data.metrics["images"] == FACES + 4 and run.data.metrics["images_per_second"] > 0
    assert run.data.params["master_resolved"] == "local[2]"


@pytest.mark.slow
@pytest.mark.usefixtures("java")
def test_udf_mode_and_a_parquet_table_give_one_row_per_crop(images, model_uri, tmp_path):
    crops = images / "faces"
    outcome = score.run(model_uri, str(crops), str(tmp_path / "udf"), master="local[2]", mode="udf",
                        detector="none")
    written = pd.read_parquet(tmp_path / "udf")
    assert outcome.images == FACES and len(written) == FACES and (written["face"] == 0).all()
    check_same(written, expected_rows(model_uri, crops, {"detector": "none"}))

    files = sorted(p for p in crops.rglob("*") if p.is_file())
    table = tmp_path / "table.parquet"
    pd.DataFrame({"path": [p.resolve().as_uri() for p in files],
                  "content": [p.read_bytes() for p in files]}).to_parquet(table)
    score.run(model_uri, str(table), str(tmp_path / "from_table"), master="local[2]", detector="none")
    check_same(pd.read_parquet(tmp_path / "from_table"), expected_rows(model_uri, crops, {"detector": "none"}))


def test_bad_options_are_refused_in_one_line_before_any_run(model_uri, tmp_path, capsys):
    existing = tmp_path / "done"
    existing.mkdir()
    cases = {
        "mode=udf scores each image as one face": ["--input", str(tmp_path), "--output", str(tmp_path / "new"),
                                                   "--mode", "udf"],
        "exists; give a new folder": ["--input", str(tmp_path), "--output", str(existing)],
        "pass -P input=": ["--output", str(tmp_path / "new")],
        "could not be downloaded": ["--model-uri", "runs:/0123456789abcdef0123456789abcdef/model",
                                    "--input", str(tmp_path), "--output", str(tmp_path / "new")],
    }
    before = len(all_runs())
    for message, args in cases.items():
        with pytest.raises(SystemExit) as stopped:
            main(["score", "--model-uri", model_uri, *args])
        assert stopped.value.code == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert message in error
    assert len(all_runs()) == before


@pytest.mark.slow
@pytest.mark.usefixtures("java")
def test_a_missing_input_is_one_line_and_no_run(model_uri, tmp_path, capsys):
    # Found by Spark's listing: one line, exit 2.
    with pytest.raises(SystemExit) as stopped:
        main(["score", "--model-uri", model_uri, "--input", str(tmp_path / "nowhere"), "--output",
              str(tmp_path / "o2"), "--master", "local[2]"])
    assert stopped.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "could not be listed" in error
    assert not all_runs("attributes.status = 'RUNNING'")


def test_a_null_or_unreadable_content_gives_an_error_row_not_a_failed_task(model_uri):
    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"path": ["null.png", "junk.png", "face.png", "text.png"],
                          "content": [None, b"\x89PNG\r\n\x1a\n cut", encoded(face(3, 3)), "not bytes"]})
    rows = score.score_images(model, frame, {"detector": "none"}, CLASS_NAMES).set_index("path")
    assert rows.loc["face.png", "face"] == 0 and rows.loc["face.png", "error"] is None
    for path in ("null.png", "junk.png", "text.png"):
        assert rows.loc[path, "face"] == -1 and rows.loc[path, "label"] == "", path
    assert "no content" in rows.loc["null.png", "error"]
    assert "could not be decoded" in rows.loc["junk.png", "error"]


@pytest.fixture
def spark_cluster(tmp_path, java):
    """A Spark standalone cluster on loopback: a master and one worker (1 core, its executors in
    processes of their own), started from pyspark's own scripts and stopped at the end. Executors
    find `python3` on the worker's PATH, a wrapper that notes each start in `started.txt`: the
    cluster's Python, as a real cluster has its own."""
    import pyspark
    from conftest import free_port, stop_group

    home = Path(pyspark.__file__).parent
    tools = tmp_path / "cluster-bin"
    tools.mkdir()
    started = tmp_path / "started.txt"
    wrapper = tools / "python3"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {started}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1",
           "PATH": f"{tools}:{os.environ['PATH']}"}
    env.pop("PYSPARK_PYTHON", None)
    port = free_port()
    logs = []

    def start(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"spark-{len(logs)}.log", "wb")
        logs.append(log)
        return subprocess.Popen([str(home / "bin" / "spark-class"), *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    processes = [start("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                       "--webui-port", str(free_port()))]
    try:
        processes.append(start("org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                               "--host", "127.0.0.1", "--cores", "1", "--memory", "1g",
                               "--webui-port", str(free_port()), "--work-dir", str(tmp_path / "work")))
        deadline = time.monotonic() + 120
        while b"Registering worker" not in (tmp_path / "spark-0.log").read_bytes():
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                pytest.fail("the Spark cluster did not start: " +
                            (tmp_path / "spark-1.log").read_text(errors="replace")[-2000:])
            time.sleep(0.5)
        yield f"spark://127.0.0.1:{port}", started, tmp_path / "work"
    finally:
        for process in reversed(processes):
            stop_group(process)
        for log in logs:
            log.close()


@pytest.mark.slow
def test_mlflow_run_score_on_a_standalone_cluster_with_the_clusters_python(spark_cluster, images, model_uri,
                                                                        tracking, tmp_path):
    # The entry point as a team runs it: `mlflow run -e score` on a cluster whose executors start
    # their own Python (the one Spark start of a driver outside this process).
    master, started, work = spark_cluster
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYSPARK_PYTHON", None)
    done = mlflow_run("score", {"model_uri": model_uri, "input": images / "photos", "output": tmp_path / "out",
                                "master": master, "detector": "haar"}, tracking, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 images, 1 faces, 2 without a face, 1 unreadable" in done.stdout
    written = pd.read_parquet(tmp_path / "out")
    broken = written[written["error"].notna()]
    assert list(broken["path"].str.rsplit("/", n=1).str[-1]) == ["broken.png"]
    assert "could not be decoded" in broken["error"].iloc[0]
    assert started.exists()  # the executors ran the cluster's python3, not the driver's path
    assert list(work.glob("app-*/0/stderr"))  # an executor of its own, started by the worker
    (run,) = all_runs("tags.`fer.stage` = 'score'")
    assert run.info.status == "FINISHED" and run.data.params["master_resolved"] == master


@pytest.mark.slow
@pytest.mark.usefixtures("java")
def test_a_file_over_the_readers_limit_is_an_error_row_and_never_read(model_uri, tmp_path, monkeypatch):
    from fer_mlflow.data import reading

    folder = tmp_path / "in"
    (folder / "__MACOSX").mkdir(parents=True)
    small, large = encoded(face(1, 1)), encoded(np.random.default_rng(0).integers(0, 255, (96, 96), np.uint8))
    (folder / "small.png").write_bytes(small)
    (folder / "large.png").write_bytes(large)
    (folder / "__MACOSX" / "small.png").write_bytes(small)
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", (len(small) + len(large)) // 2)
    score.run(model_uri, str(folder), str(tmp_path / "out"), master="local[2]", detector="none")
    written = pd.read_parquet(tmp_path / "out")
    written["name"] = written["path"].str.rsplit("/", n=1).str[-1]
    assert sorted(written["name"]) == ["large.png", "small.png"]  # __MACOSX/ left out
    rows = written.set_index("name")
    assert rows.loc["small.png", "face"] == 0 and pd.isna(rows.loc["small.png", "error"])
    assert rows.loc["large.png", "face"] == -1 and "no content" in rows.loc["large.png", "error"]
