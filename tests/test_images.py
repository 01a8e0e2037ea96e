"""Opening untrusted images: accepted formats, limits checked before decoding, and grayscale as a
person sees the image (16-bit scaled, transparency on white)."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_keras_model
from mlflow.exceptions import MlflowException
from PIL import Image

from fer_mlflow.errors import DataError
from fer_mlflow.data.decode import open_gray
from fer_mlflow.serving.pyfunc_model import decode_images, log_model


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def test_only_the_web_formats_are_opened():
    face = Image.fromarray(np.full((48, 48), 90, np.uint8))
    for format in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        assert abs(int(open_gray(encoded(face, format)).mean()) - 90) <= 2, format
    for format in ("TIFF", "PPM", "ICO"):
        with pytest.raises(DataError, match="expected a PNG, JPEG, WebP, BMP or GIF image"):
            open_gray(encoded(face, format))


def test_an_image_over_max_pixels_is_refused_from_its_header():
    huge = encoded(Image.new("L", (8000, 6000)), "PNG")  # 48 megapixels in a few kilobytes
    assert len(huge) < 200_000
    with pytest.raises(DataError, match="8000 x 6000 = 48.0 megapixels, over the limit of 40"):
        open_gray(huge, max_pixels=40_000_000)
    assert open_gray(encoded(Image.new("L", (300, 200)), "PNG"), max_pixels=60_000).shape == (200, 300)
    with pytest.raises(DataError, match="over the limit of 0.05"):
        open_gray(encoded(Image.new("L", (300, 200)), "PNG"), max_pixels=50_000)


def test_sixteen_bit_pngs_are_scaled_not_clipped_to_white():
    samples = np.array([[0, 257 * 100, 32768, 65535]] * 4, np.uint16)
    assert open_gray(encoded(Image.fromarray(samples), "PNG"))[0].tolist() == [0, 100, 128, 255]


def test_transparent_and_palette_images_are_flattened_onto_white():
    clear = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # transparent black shows as white
    assert open_gray(encoded(clear, "PNG")).min() == 255
    half = Image.new("LA", (48, 48), (0, 128))
    assert abs(int(open_gray(encoded(half, "PNG"))[0, 0]) - 128) <= 1  # black at half opacity on white
    palette = Image.new("RGB", (48, 48), (200, 30, 30)).convert("P")
    assert open_gray(encoded(palette, "GIF"))[0, 0] == np.asarray(palette.convert("L"))[0, 0]


def test_too_many_images_in_one_call_are_refused():
    png = encoded(Image.new("L", (48, 48), 80), "PNG")
    assert decode_images([png] * 3, max_images=3).shape == (3, 48, 48)
    with pytest.raises(DataError, match="got 4 images in one request, over the limit of 3"):
        decode_images([png] * 4, max_images=3)


def test_the_served_model_answers_the_limits_as_bad_input_and_they_are_configurable(monkeypatch):
    with mlflow.start_run():
        uri = log_model(tiny_keras_model(), name="model").model_uri
    frame = pd.DataFrame({"image": [encoded(Image.new("L", (400, 300), 80), "PNG")] * 2})
    monkeypatch.setenv("FER_MAX_IMAGES", "1")  # as an operator sets it for `mlflow models serve`
    with pytest.raises(MlflowException, match="over the limit of 1") as caught:
        mlflow.pyfunc.load_model(uri).predict(frame)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    monkeypatch.delenv("FER_MAX_IMAGES")
    limited = mlflow.pyfunc.load_model(uri, model_config={"max_pixels": 100_000, "max_images": 5})
    with pytest.raises(MlflowException, match="over the limit of 0.1"):
        limited.predict(frame)
    assert len(mlflow.pyfunc.load_model(uri, model_config={"max_images": 5}).predict(frame)) == 2
