"""The clean entry point end to end: what it logs, that the source stays untouched, bad input."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_ZIP, all_runs, face, mlflow_run, tree_checksum, write_csv, zip_folder
from mlflow import MlflowClient

from fer_mlflow.stages import clean as stage
from fer_mlflow.cli import main
from fer_mlflow.data.rules import CleanConfig
from fer_mlflow.data.sources import read_source

def only_run(client: MlflowClient):
    """The one run the stage made. `mlflow run`'s own run in Default, copied into the project's
    experiment, is deleted once it has ended: wait for that (test_champion checks it further)."""
    deadline = time.monotonic() + 60
    while client.search_runs(["0"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_mlflow_run_clean_on_demo_logs_counts_figures_inputs_and_dataset(tracking):
    done = mlflow_run("clean", {"data": "demo"}, tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "fer-demo"  # not MLflow's Default
    metrics = run.data.metrics
    for key in ("source/images", "removed/total", "removed/duplicates", "removed/leakage",
                "removed/conflicting_labels", "removed/blank", "removed/mean_outlier", "images/train"):
        assert key in metrics
    assert metrics["removed/total"] > 0  # the demo plants blanks, duplicates and leaks
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {f"figures/{n}.png" for n in
                         ("class_counts", "samples_per_class", "mean_pixel_boxplot", "removed_by_rule")}
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    cleaned, _ = read_source(f"runs:/{run.info.run_id}/dataset/dataset.npz")
    assert inputs["train"].digest == cleaned.split("train").digest()
    assert run.data.tags["fer.data_digest"] == cleaned.digest()
    assert metrics["images/train"] == (cleaned.splits == "train").sum()


def test_the_same_source_and_parameters_give_the_same_digest(kaggle_folder):
    happy = kaggle_folder / "train" / "happy"
    (happy / "copy.png").write_bytes((happy / "000.png").read_bytes())  # a duplicate, which cleaning drops
    first = stage.run(str(kaggle_folder), seed=3)
    again = stage.run(str(kaggle_folder), seed=3)
    other = stage.run(str(kaggle_folder), CleanConfig(drop_duplicates=False), seed=3)
    assert first.digest == again.digest != other.digest


def test_the_source_is_never_written_to(kaggle_folder):
    """Checksums of every file (and the listing) of a folder and a zip source, before and after."""
    archive = zip_folder(kaggle_folder, kaggle_folder / "kaggle.zip")
    (kaggle_folder / "train" / "sad" / "broken.jpg").write_bytes(b"not an image")
    before = tree_checksum(kaggle_folder)
    for source in (kaggle_folder, archive):
        stage.run(str(source), CleanConfig(splits=("train", "val", "test")))
    assert tree_checksum(kaggle_folder) == before


def bad_sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (data argument, text the one-line error must contain)."""
    (tmp_path / "empty").mkdir()
    unknown = tmp_path / "unknown" / "train" / "contempt"
    unknown.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(face(0, 0)).save(unknown / "a.png")
    corrupt = tmp_path / "corrupt" / "test" / "happy"
    corrupt.mkdir(parents=True)
    (corrupt / "a.jpg").write_bytes(b"\xff\xd8garbage")
    rows = write_csv(tmp_path / "fer2013.csv", [(1, face(1, 0), "Training")])
    rows.write_text(rows.read_text().replace(" 1", " 1x", 1))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(face(0, 0)).save(loose / "a.png")
    return {
        "missing": (str(tmp_path / "nowhere"), "does not exist"),
        "empty": (str(tmp_path / "empty"), "no images in the expected layout"),
        "unknown class": (str(tmp_path / "unknown"), "unknown class folder(s) contempt"),
        "corrupt": (str(tmp_path / "corrupt"), "no readable image"),
        "csv": (str(rows), "malformed row(s) at line(s) 2"),
        "zip layout": (str(zip_folder(loose, tmp_path / "loose.zip")), "no images in the expected layout"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "unknown class", "corrupt", "csv", "zip layout"])
def test_bad_input_is_one_line_a_nonzero_exit_and_no_running_run(case, tmp_path, capsys):
    data, expected = bad_sources(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["clean", "--data", data])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err
    runs = all_runs()
    assert runs and all(r.info.status == "FAILED" for r in runs)


@pytest.mark.parametrize("args, expected", [
    (["--mean-low", "2"], "--mean-low"),
    (["--mean-low", "0.5", "--mean-high", "0.4"], "must be below mean_high"),
    (["--seed", "one"], "--seed"),
    (["--clean-test", "maybe"], "--clean-test"),
])
def test_bad_option_values_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["clean", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


@pytest.mark.slow
def test_mlflow_run_with_bad_data_fails_the_run_with_the_message(tracking, tmp_path):
    done = mlflow_run("clean", {"data": str(tmp_path / "nowhere")}, tracking)
    assert done.returncode != 0
    assert "error: data path" in done.stderr and "Traceback" not in done.stderr
    assert only_run(MlflowClient()).info.status == "FAILED"


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="the shared FER2013 zip is not here")
def test_mlflow_run_clean_on_the_shared_zip_in_under_a_minute(tracking):
    started = time.perf_counter()
    done = mlflow_run("clean", {"data": str(SHARED_ZIP)}, tracking)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run(MlflowClient())
    assert run.data.metrics["source/images"] == 32298
    assert run.data.metrics["images/test"] == 3589
    assert elapsed < 60, f"clean took {elapsed:.0f} s"


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="the shared FER2013 zip is not here")
def test_unpacked_folder_and_csv_read_the_same_images_as_the_zip(tmp_path):
    # Every 8th image of the shared zip (about 4,000, every class of both splits): the same reading
    # code as the whole, in an eighth of the time.
    sample = tmp_path / "sample.zip"
    with zipfile.ZipFile(SHARED_ZIP) as source, zipfile.ZipFile(sample, "w") as target:
        for name in source.namelist()[::8]:
            target.writestr(name, source.read(name))
    zipped, _ = read_source(str(sample))
    with zipfile.ZipFile(sample) as archive:
        archive.extractall(tmp_path / "unpacked")
    folder, _ = read_source(str(tmp_path / "unpacked"))
    assert np.array_equal(folder.images, zipped.images) and list(folder.ids) == list(zipped.ids)
    usage = {"train": "Training", "val": "Training", "test": "PublicTest"}
    csv_path = write_csv(tmp_path / "fer2013.csv", [
        (label, image, usage[split]) for label, image, split in
        zip(zipped.labels, zipped.images, zipped.splits)
    ])
    dataset, report = read_source(str(csv_path))
    assert report.kind == "csv" and np.array_equal(dataset.images, zipped.images)
    # PublicTest is the csv's validation split
    assert (dataset.splits == "val").sum() == (zipped.splits == "test").sum() > 400
    for source in (tmp_path / "unpacked", csv_path):
        outcome = stage.run(str(source))
        assert outcome.result.removed_total > 0
