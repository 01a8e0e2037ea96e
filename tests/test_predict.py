"""The `predict` stage over photos, folders, zips and a video, on real photos no one here made
(scikit-image's astronaut, with one face, and coffee, with none)."""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import all_runs, mlflow_run, tiny_keras_model, tree_checksum
from PIL import Image
from skimage import data

from fer_mlflow.serving import faces
from fer_mlflow.stages import predict as stage
from fer_mlflow.cli import main
from fer_mlflow.data.dataset import CLASS_NAMES

# The astronaut's face in astronaut.png (512 x 512), as in test_faces.py.
FACE_LEFT, FACE_RIGHT, FACE_TOP, FACE_BOTTOM = 165, 285, 50, 180
COLUMNS = ["source", "frame", "time_s", "track", *faces.BOX_COLUMNS, "label", "probability",
           *(f"prob_{name}" for name in CLASS_NAMES)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """The tiny model, logged once and downloaded to a folder: a model URI any test can load."""
    folder = tmp_path_factory.mktemp("model")
    from fer_mlflow.serving.pyfunc_model import log_model

    with pytest.MonkeyPatch.context() as patch:
        uri = f"sqlite:///{folder}/mlflow.db"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = log_model(tiny_keras_model())
        return mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "model"))


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder: the astronaut, coffee one level down, a damaged JPEG and a text file."""
    root = tmp_path / "photos"
    (root / "kitchen").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(data.coffee()).save(root / "kitchen" / "coffee.jpg", quality=95)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not a photo")
    return root


def logged_table(run_id: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv"),
                       keep_default_na=False, na_values=[""])


def test_a_folder_gives_a_row_per_face_skips_the_unreadable_file_and_logs_annotated_copies(
        model_path, photos, caplog):
    before = tree_checksum(photos)
    with caplog.at_level(logging.INFO):
        outcome = stage.run(model_path, str(photos))
    table = logged_table(outcome.run_id)
    assert list(table.columns) == COLUMNS
    assert list(table["source"]) == ["astronaut.png", "kitchen/coffee.jpg"]
    assert list(table["image"]) == [0, 1] and list(table["face"]) == [0, -1]
    face = table.iloc[0]
    assert FACE_LEFT <= face.x and face.x + face.w <= FACE_RIGHT and FACE_TOP <= face.y <= face.y + face.h <= FACE_BOTTOM
    assert face.label in CLASS_NAMES and table.iloc[1]["label"] != table.iloc[1]["label"]  # NaN: no label
    assert table["frame"].isna().all() and table["time_s"].isna().all()  # photos have neither
    assert outcome.skipped == ["broken.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("broken.jpg" in w for w in warnings) == 1 and "skipped 1 unreadable file(s) of 3" in warnings
    assert any("(100%)" in r.getMessage() for r in caplog.records)  # no terminal: progress as log lines
    run = mlflow.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "fer-predictions"
    assert run.data.params["detector_resolved"] == "mtcnn" and run.data.params["every"] == "auto"
    metrics = run.data.metrics
    assert (metrics["photos"], metrics["faces"], metrics["images_without_face"], metrics["skipped_files"]) == \
        (2, 1, 1, 1)
    assert metrics[f"faces_{face.label}"] == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "annotated")}
    assert artifacts == {"annotated/astronaut.png.jpg", "annotated/kitchen"}
    drawn = np.asarray(Image.open(mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="annotated/astronaut.png.jpg")).convert("RGB"), dtype=int)
    reference = io.BytesIO()
    Image.fromarray(data.astronaut()).save(reference, format="JPEG", quality=90)  # the same JPEG noise
    changed = np.abs(drawn - np.asarray(Image.open(reference), dtype=int)).sum(axis=2) > 60
    rows, cols = np.nonzero(changed)  # the box and its label, and the JPEG blocks they touch
    assert FACE_LEFT - 16 <= cols.min() and rows.min() >= FACE_TOP - 50 and rows.max() <= FACE_BOTTOM + 16
    assert changed[int(face.y), int(face.x) + 10: int(face.x + face.w) - 10].all()  # the box's top edge
    assert "figures/label_counts.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "figures")}
    assert tree_checksum(photos) == before  # the user's files are never written to


@pytest.mark.slow
def test_a_zip_is_read_without_extracting_and_answers_as_the_folder_does(model_path, photos, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as writer:
        for path in sorted(photos.rglob("*")):
            writer.write(path, "photos/" + path.relative_to(photos).as_posix())
        writer.writestr("__MACOSX/photos/._astronaut.png", b"resource fork")
    from_folder = stage.run(model_path, str(photos), detector="haar", max_annotated=1)
    from_zip = stage.run(model_path, str(archive), detector="haar", max_annotated=1)
    assert list(from_zip.predictions["source"]) == ["photos/astronaut.png", "photos/kitchen/coffee.jpg"]
    pd.testing.assert_frame_equal(from_zip.predictions.drop(columns="source"),
                                  from_folder.predictions.drop(columns="source"))
    assert from_zip.skipped == ["photos/broken.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlruns", "photos", "photos.zip"]
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(from_zip.run_id, "annotated/photos")}
    assert listed == {"annotated/photos/astronaut.png.jpg"}  # max_annotated=1: the first input only


def write_video(path: Path, fps: float = 12.0) -> Path:
    """Two seconds: the astronaut for the first second, then coffee (no face), 320 x 320."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 320))
    for photo in (data.astronaut(), data.coffee()):
        frame = cv2.cvtColor(np.asarray(Image.fromarray(photo).resize((320, 320))), cv2.COLOR_RGB2BGR)
        for _ in range(int(fps)):
            writer.write(frame)
    writer.release()
    return path


@pytest.mark.slow
def test_a_video_is_analysed_every_nth_frame_with_times_and_written_back_annotated(model_path, tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    outcome = stage.run(model_path, str(video), detector="haar")
    table = logged_table(outcome.run_id)
    # every=auto at 12 fps: 2 frames a second, every 6th frame.
    assert list(table["frame"]) == [0, 6, 12, 18]
    np.testing.assert_allclose(table["time_s"], [0, 0.5, 1, 1.5], atol=1e-3)
    assert list(table["face"]) == [0, 0, -1, -1] and list(table["image"]) == list(range(4))
    assert (table["source"] == "clip.mp4").all()
    run = mlflow.get_run(outcome.run_id)
    assert run.data.params["every_resolved"] == "6"
    assert (run.data.metrics["videos"], run.data.metrics["frames"], run.data.metrics["faces"]) == (1, 4, 2)
    copy = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path="annotated/clip.mp4")
    capture = cv2.VideoCapture(copy)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    assert len(frames) == 24  # every frame, each showing the latest analysed frame's faces
    original = cv2.VideoCapture(str(video))
    first = original.read()[1]
    drawn = np.abs(frames[1].astype(int) - first).sum(axis=2) > 100
    assert drawn.any()  # a box drawn on frame 1, in its label's colour (mostly the label's filled band)
    from fer_mlflow.serving.annotate import COLOURS

    colour = np.median(frames[1][drawn][:, ::-1], axis=0)  # BGR as read, to RGB
    assert np.abs(colour - COLOURS[table.loc[0, "label"]]).max() < 40, (colour, table.loc[0, "label"])
    figures = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "figures/emotion_over_time")}
    assert figures == {"figures/emotion_over_time/clip.mp4.png"}
    again = stage.run(model_path, str(video), detector="haar", every=12, max_annotated=0)
    assert list(again.predictions["frame"]) == [0, 12]
    assert not mlflow.MlflowClient().list_artifacts(again.run_id, "annotated")


def test_an_annotated_video_frame_pasted_from_its_layer_is_the_frame_drawn():
    from fer_mlflow.serving import annotate

    rgb = data.astronaut()
    faces = pd.DataFrame({"face": [0, 1, -1], "x": [170, 10, 0], "y": [5, 300, 0], "w": [100, 60, 0],
                          "h": [100, 60, 0], "label": ["happy", "sad", ""], "probability": [0.84, 0.5, np.nan]})
    where, colours = annotate.layer(*rgb.shape[:2], faces)
    pasted = rgb.copy()
    pasted[where] = colours
    assert np.array_equal(pasted, annotate.draw(rgb, faces)) and len(colours)


def write_two_faces(path: Path, frames: int = 16, fps: float = 8.0) -> Path:
    """The astronaut's head twice on grey (640 x 300), moving apart 6 pixels a frame."""
    head = Image.fromarray(data.astronaut()).crop((140, 20, 310, 210))  # 170 x 190
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 300))
    for index in range(frames):
        canvas = Image.new("RGB", (640, 300), (118, 118, 118))
        canvas.paste(head, (140 - 6 * index, 40))
        canvas.paste(head, (330 + 6 * index, 60))
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.slow
def test_two_faces_moving_apart_in_a_video_are_two_tracks_with_stable_ids(model_path, tmp_path):
    video = write_two_faces(tmp_path / "two.mp4")
    outcome = stage.run(model_path, str(video), detector="blazeface", every=1, max_annotated=0)
    table = logged_table(outcome.run_id)
    found = table[table["face"] >= 0]
    assert found.groupby("frame").size().tolist() == [2] * 16  # both faces in every frame
    assert sorted(found["track"].unique()) == [0, 1]
    x = found.pivot(index="frame", columns="track", values="x")
    left = x.columns[np.argmin(x.iloc[0])]  # the track of the face on the left in the first frame
    right = 1 - left
    assert (x[left] < x[right]).all()  # each track stays with one person: never the other's box
    assert x[left].iloc[-1] - x[left].iloc[0] < -60 and x[right].iloc[-1] - x[right].iloc[0] > 60  # 90 apart
    assert table["track"].isna().sum() == 0
    figures = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "figures/emotion_over_time")}
    assert figures == {"figures/emotion_over_time/two.mp4.png"}


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "no photos or videos in"),
    (lambda root: (root / "bad.mp4").write_text("not a video") and root / "bad.mp4", "could not be read"),
])
def test_bad_input_is_one_line_on_stderr_a_non_zero_exit_and_no_run(model_path, tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["predict", "--model-uri", model_path, "--input", str(path)])
    assert exit.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert error.startswith("error: ") and message in error
    assert all_runs() == []


def test_a_model_that_cannot_be_loaded_is_one_line_and_no_run(photos, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--input", str(photos), "--model-uri", "models:/fer-emotion@staging"])
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert error.startswith("error: model models:/fer-emotion@staging could not be loaded")
    assert all_runs() == []


@pytest.mark.slow
def test_mlflow_run_predict_with_the_registered_champion(model_path, photos, tracking):
    version = mlflow.register_model(model_path, "fer-emotion")
    mlflow.MlflowClient().set_registered_model_alias("fer-emotion", "champion", version.version)
    result = mlflow_run("predict", {"input": photos / "astronaut.png", "detector": "haar"}, tracking)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 images, 1 faces" in result.stdout
    (run,) = all_runs("tags.`fer.stage` = 'predict'")
    assert run.info.status == "FINISHED" and run.data.tags["fer.model_version"] == "fer-emotion/1"
    assert list(logged_table(run.info.run_id)["face"]) == [0]


def small_photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_annotated_copies_of_zip_members_stay_under_annotated_whatever_their_names(model_path, tmp_path,
                                                                                  monkeypatch):
    # The run's own temporary folder inside tmp_path, so that a copy escaping it would be seen here.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    outside = tmp_path / "outside" / "PWNED.jpg"
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as writer:
        for index, name in enumerate([str(outside), "../../x.jpg", "..\\..\\y.jpg", "C:/z.jpg"]):
            writer.writestr(name, small_photo(index))
    outcome = stage.run(model_path, str(archive), detector="haar")
    assert not outside.exists()
    assert [p for p in scratch.rglob("*")] == []  # nothing left beside the run's folder, which is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.zip", "mlflow.db", "mlruns", "scratch"]
    logged = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path="annotated",
                                                 dst_path=str(tmp_path / "scratch"))
    written = sorted(p.relative_to(logged).as_posix() for p in Path(logged).rglob("*.jpg"))
    assert written == sorted([outside.relative_to("/").as_posix(), "x.jpg", "y.jpg", "z.jpg"])


def test_zip_members_inflate_within_the_readers_bounds(model_path, tmp_path, monkeypatch, caplog):
    from fer_mlflow.data import reading

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as writer:
        writer.writestr("good.png", small_photo(0))
        writer.writestr("bomb.png", b"\0" * 20_000_000)  # deflate packs it about 1000 to 1
        writer.writestr("large.png", small_photo(1) + np.random.default_rng(2).bytes(len(small_photo(1))))
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", len(small_photo(0)) + 1000)  # good.png, not large.png
    with caplog.at_level(logging.WARNING):
        outcome = stage.run(model_path, str(archive), detector="haar")
    assert sorted(outcome.skipped) == ["bomb.png", "large.png"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "bomb.png could not be read (inflates to over 100 times its compressed size" in warned
    assert "large.png could not be read (inflates to over the" in warned
    assert list(outcome.predictions["source"]) == ["good.png"]


@pytest.mark.slow
def test_a_video_in_a_zip_is_extracted_once(model_path, tmp_path, monkeypatch):
    video = write_video(tmp_path / "clip.mp4")
    archive = tmp_path / "clips.zip"
    with zipfile.ZipFile(archive, "w") as writer:
        writer.write(video, "clips/clip.mp4")
    opened = []
    original = zipfile.ZipFile.open

    def counting(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))  # the model's .keras file is a zip too
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting)
    outcome = stage.run(model_path, str(archive), detector="haar")
    assert list(outcome.predictions["frame"]) == [0, 6, 12, 18]  # read, analysed and annotated
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "annotated/clips")} == \
        {"annotated/clips/clip.mp4"}
    assert [name for name in opened if name.endswith(".mp4")] == ["clips/clip.mp4"]
