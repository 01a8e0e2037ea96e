"""The served model bounds every request: each param within its range, and a work budget per request
(images, declared pixels, faces x views), each refused as bad input (a 400 when served) naming it."""

from __future__ import annotations

import base64
import io
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_keras_model
from mlflow.exceptions import MlflowException
from PIL import Image

from fer_mlflow.errors import ConfigError
from fer_mlflow.serving.pyfunc_model import FerEmotionModel, log_model


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def animated_gif(frames: int, side: int = 100) -> bytes:
    """A GIF of `frames` distinct grey frames (one pixel differs each time), small on disk."""
    pictures = []
    for index in range(frames):
        pixels = np.full((side, side), 128, np.uint8)
        pixels[index % side, (index // side) % side] = 255 * (index % 2)
        pictures.append(Image.fromarray(pixels))
    return encoded(pictures[0], "GIF", save_all=True, append_images=pictures[1:], duration=10)


def lying_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` but whose data holds a 48x48 image's worth."""
    small = encoded(Image.new("L", (48, 48), 90))
    real = encoded(Image.new("L", (width, height), 90))
    return real[:33] + small[33:]  # signature + IHDR (with its CRC) of the large one, data of the small


def load(keras_path: str, config: dict | None = None) -> FerEmotionModel:
    """The project's python model loaded as MLflow loads it (`load_context` with the Keras artifact
    and the model config), without a tracking store: what a pyfunc model's `predict` calls."""
    model = FerEmotionModel()
    model.load_context(SimpleNamespace(artifacts={"keras_model": keras_path}, model_config=config or {}))
    return model


@pytest.fixture(scope="module")
def keras_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hostile") / "model.keras"
    tiny_keras_model().save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(keras_path) -> FerEmotionModel:
    """The model as `mlflow models serve` loads it, with the default limits (a real server:
    tests/test_hostile_server.py)."""
    return load(keras_path)


@pytest.fixture
def limited(served, monkeypatch):
    """`limited(**limits)`: the module's model with these limits for one test, as if loaded with
    them in its model config (the environment and config route is tested below)."""
    from fer_mlflow.data.limits import Limits

    def with_limits(**limits):
        monkeypatch.setattr(served, "limits", Limits(**limits))
        return served

    return with_limits


def refused(model, model_input, params=None, match: str = "") -> str:
    """The message of the 400 (INVALID_PARAMETER_VALUE) `model` answers; fails if it answers."""
    with pytest.raises(MlflowException, match=match) as caught:
        model.predict(None, model_input, params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    return caught.value.message


CROP = np.full((1, 48, 48), 100, np.uint8)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"tta": True, "tta_shift": 4000}, "param tta_shift=4000 is out of range; expected an integer from 0 to 24"),
        ({"tta_shift": -1}, "tta_shift=-1 is out of range"),
        ({"tta_zoom": 0.9}, r"param tta_zoom=0.9 is out of range; expected a number from 0 to 0.5"),
        ({"tta_zoom": float("nan")}, "param tta_zoom=nan is out of range"),
        ({"tta_rotation": 400.0}, "param tta_rotation=400.0 is out of range; expected a number from 0 to 45"),
        ({"min_face": 1}, "param min_face=1 is out of range; expected an integer from 12 to 10000"),
        ({"max_faces": 100_000}, "param max_faces=100000 is out of range; expected an integer from 1 to 100"),
        ({"batch_size": 1_000_000}, "param batch_size=1000000 is out of range; expected an integer from 1 to 1024"),
        ({"batch_size": 0}, "param batch_size=0 is out of range"),
        ({"detector": "yolo"}, "param detector='yolo' is not one of auto, none, mtcnn, haar, blazeface"),
    ],
    ids=["tta_shift_4000", "tta_shift_negative", "tta_zoom", "tta_zoom_nan", "tta_rotation", "min_face_1",
         "max_faces", "batch_size_huge", "batch_size_0", "detector"],
)
def test_each_param_out_of_its_range_is_refused_naming_it_and_its_range(served, params, expected):
    refused(served, CROP, params, expected)


def test_params_are_checked_before_any_image_is_read(served):
    # An image the header check would refuse, and a param out of range: the param is named, so no
    # image was opened first.
    huge = encoded(Image.new("L", (8000, 6000)))
    refused(served, pd.DataFrame({"image": [huge]}), {"min_face": 1}, "param min_face=1 is out of range")


def test_pixel_array_crops_count_against_max_images(limited):
    limited = limited(max_images=3)
    assert len(limited.predict(None, np.repeat(CROP, 3, axis=0))) == 3
    refused(limited, np.repeat(CROP, 4, axis=0), match="got 4 images in one request, over the limit of 3")


def test_all_images_of_a_request_together_are_bounded_from_their_headers(limited):
    limited = limited(max_request_pixels=100_000)
    image = encoded(Image.new("L", (300, 200), 80))  # 60,000 pixels, each under max_pixels
    assert len(limited.predict(None, pd.DataFrame({"image": [image]}), {"detector": "none"})) == 1
    # The third is cut off after its header: refused for the total before any image is decoded.
    frame = pd.DataFrame({"image": [image, image, image[:60]]})
    refused(limited, frame, match="the 3 images of this request declare 0.2 megapixels in all, over the limit "
                                  r"of 0.1 per request \(max_request_pixels\)")


def test_faces_times_views_are_bounded_before_the_network_runs(limited):
    limited = limited(max_face_views=20)
    crops = np.repeat(CROP, 3, axis=0)
    assert len(limited.predict(None, crops)) == 3  # 3 faces x 1 view
    refused(limited, crops, {"tta": True},
            r"3 faces x 10 views = 30 network inputs, over the limit of 20 per request \(max_face_views\)")


def test_every_frame_of_an_animated_image_counts_against_max_pixels(limited):
    gif = animated_gif(200)  # 100 x 100 x 200 frames: 2 megapixels in a few kilobytes
    limited = limited(max_pixels=1_000_000)
    refused(limited, pd.DataFrame({"image": [gif]}),
            match="image 0 is 100 x 100 x 200 frames = 2.0 megapixels, over the limit of 1")
    still = encoded(Image.new("L", (100, 100), 90), "GIF")
    assert len(limited.predict(None, pd.DataFrame({"image": [still]}), {"detector": "none"})) == 1


def test_a_png_whose_header_lies_is_refused_quickly(served):
    start = time.monotonic()
    refused(served, pd.DataFrame({"image": [base64.b64encode(lying_png(6000, 6000)).decode()]}),
            match="image 0 could not be decoded")
    assert time.monotonic() - start < 3


def test_the_limits_come_from_the_environment_before_the_model_config(keras_path, monkeypatch):
    monkeypatch.setenv("FER_MAX_FACE_VIEWS", "2")  # as an operator sets it for `mlflow models serve`
    limited = load(keras_path, {"max_face_views": 1000})
    refused(limited, np.repeat(CROP, 3, axis=0), match=r"over the limit of 2 per request \(max_face_views\)")
    monkeypatch.delenv("FER_MAX_FACE_VIEWS")
    configured = load(keras_path, {"max_face_views": 2})
    refused(configured, np.repeat(CROP, 3, axis=0), match=r"over the limit of 2 per request \(max_face_views\)")
    monkeypatch.setenv("FER_MAX_FACE_VIEWS", "many")
    with pytest.raises(ConfigError, match="FER_MAX_FACE_VIEWS is 'many'; expected a positive integer"):
        load(keras_path)


@pytest.mark.slow  # logs and loads a pyfunc model
def test_evaluate_scores_more_crops_than_one_request_takes_in_several():
    from fer_mlflow.serving.pyfunc_model import predict_crops

    with mlflow.start_run():
        uri = log_model(tiny_keras_model(), name="model").model_uri
    crops = (np.arange(3)[:, None, None] * 60 + np.zeros((3, 48, 48))).astype(np.uint8)
    in_one = mlflow.pyfunc.load_model(uri).predict(crops)
    frame = predict_crops(mlflow.pyfunc.load_model(uri, model_config={"max_images": 1}), crops)  # a face a request
    assert list(frame["image"]) == [0, 1, 2]
    np.testing.assert_allclose(frame.filter(like="prob_"), in_one.filter(like="prob_"), atol=1e-6)


def test_the_security_page_states_each_range_and_default_as_the_code_has_them():
    from dataclasses import fields

    from conftest import PROJECT

    from fer_mlflow.data.limits import PARAM_RANGES, Limits

    page = (PROJECT / "docs" / "security-serving.md").read_text()
    for name, (low, high, _) in PARAM_RANGES.items():
        assert f"| `{name}` | {low:g} to {high:g}" in page, name
    for field in fields(Limits):
        assert f"| `FER_{field.name.upper()}` | {field.default:,} |" in page, field.name


@pytest.mark.parametrize(
    ("stage", "kwargs", "expected"),
    [
        ("predict", {"model_uri": "models:/fer-emotion@champion", "input": "photo.jpg", "min_face": 5},
         "param min_face=5 is out of range; expected an integer from 12"),
        ("score", {"model_uri": "models:/fer-emotion@champion", "input": "photos", "output": "out.parquet",
                   "max_faces": 500}, "param max_faces=500 is out of range; expected an integer from 1 to 100"),
        ("evaluate", {"run_id": "0123", "tta": True, "tta_shift": 4000},
         "param tta_shift=4000 is out of range; expected an integer from 0 to 24"),
    ],
)
def test_the_stages_refuse_a_param_out_of_the_served_range_before_a_run_starts(stage, kwargs, expected, tmp_path,
                                                                               monkeypatch):
    import importlib

    unopened = tmp_path / "unopened.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{unopened}")
    mlflow.set_tracking_uri(f"sqlite:///{unopened}")
    with pytest.raises(ConfigError, match=expected):
        importlib.import_module(f"fer_mlflow.stages.{stage}").run(**kwargs)
    assert not unopened.exists()  # the tracking store was never opened: no run
