"""The registered champion served by a real `mlflow models serve` answers images over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.serving.faces import BOX_COLUMNS
from conftest import tiny_keras_model, stop_group

from fer_mlflow.serving.pyfunc_model import log_model

pytestmark = pytest.mark.slow

STARTUP_SECONDS = 120


def jpeg_base64() -> str:
    """A 60x50 RGB gradient as a base64 JPEG, a face crop of another size as a web client sends it
    (at most 64 pixels a side: taken as one face, not searched)."""
    rows, cols = np.mgrid[0:50, 0:60]
    image = np.stack([rows * 5, cols * 4, 255 - cols * 4], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_base64(format: str, size: tuple[int, int]) -> bytes:
    """A plain grey image of `size` in `format`, base64 (a 48-megapixel PNG is a few kilobytes)."""
    buffer = io.BytesIO()
    Image.new("L", size, 100).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue())


def smooth_pixels(count: int) -> np.ndarray:
    """Distinct smooth 48x48 uint8 faces-to-be, as a client holding decoded pixels sends them."""
    rows, cols = np.mgrid[0:48, 0:48]
    return np.stack([60 + 40 * k + 30 * np.sin(rows / (4 + k)) * np.cos(cols / 5) for k in range(count)]
                    ).astype(np.uint8)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, str]:
    """POST a JSON body; returns (status, response text) for success and HTTP errors alike."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Served(NamedTuple):
    url: str  # the /invocations endpoint
    model: mlflow.pyfunc.PyFuncModel  # models:/fer-emotion@champion loaded in-process
    serving_example: str  # the model's serving_input_example.json, written by MLflow at log time


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Served:
    """Register the tiny model as fer-emotion@champion in a temporary store and serve it on
    loopback; yields a `Served`. Stops the server after."""
    yield from serving(tmp_path_factory.mktemp("serving"), tiny_keras_model())


@pytest.fixture(scope="module")
def ensemble_server(tmp_path_factory) -> Served:
    """The same, for an ensemble of two tiny models (weights 0.3 and 0.7) as the ensemble stage logs one."""
    from fer_mlflow.stages.ensemble import combine

    yield from serving(tmp_path_factory.mktemp("ensemble"), combine([tiny_keras_model(0), tiny_keras_model(1)],
                                                                    [0.3, 0.7]))


def serving(folder: Path, keras_model):
    """Log `keras_model` as the project logs a model, register it as fer-emotion@champion in a
    store in `folder`, and serve it on loopback: yields a `Served`, then stops the server."""
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)  # the sqlite store puts artifacts under ./mlruns
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = log_model(keras_model, registered_model_name="fer-emotion")
        MlflowClient().set_registered_model_alias("fer-emotion", "champion", info.registered_model_version)
        local_model = mlflow.pyfunc.load_model("models:/fer-emotion@champion")
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "model")))
        serving_example = (local / "serving_input_example.json").read_text()

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        # Own process group: the CLI starts uvicorn as a child, and teardown must stop both.
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fer-emotion@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/ping", process, log_path)
        yield Served(f"http://127.0.0.1:{port}/invocations", local_model, serving_example)
    finally:
        stop_group(process)


def wait_until_ready(url: str, process: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # connection refused while it starts (URLError is an OSError)
            pass
        time.sleep(0.5)
    pytest.fail(f"no /ping answer within {STARTUP_SECONDS} s:\n{log_path.read_text()[-5000:]}")




def check_predictions(text: str, expected: pd.DataFrame) -> None:
    """The JSON answer has one record per image, consistent, and equal to the in-process output."""
    predictions = json.loads(text)["predictions"]
    assert len(predictions) == len(expected)
    for prediction, (_, row) in zip(predictions, expected.iterrows()):
        probabilities = [prediction[f"prob_{name}"] for name in CLASS_NAMES]
        assert prediction["label"] == CLASS_NAMES[int(np.argmax(probabilities))]
        assert prediction["probability"] == max(probabilities)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert probabilities == pytest.approx([row[f"prob_{name}"] for name in CLASS_NAMES], abs=1e-6)


def test_champion_loaded_in_python_takes_pixel_arrays_and_encoded_images(server):
    pixels = smooth_pixels(3)
    from_uint8 = server.model.predict(pixels)
    assert list(from_uint8.columns) == [*BOX_COLUMNS, "label", "probability", *[f"prob_{n}" for n in CLASS_NAMES]]
    assert list(from_uint8["face"]) == [0, 0, 0] and list(from_uint8["w"]) == [48, 48, 48]
    assert len(from_uint8) == 3
    from_float = server.model.predict(pixels[..., None].astype(np.float32))
    np.testing.assert_allclose(from_float.filter(like="prob_"), from_uint8.filter(like="prob_"), atol=1e-6)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, format="PNG")
    from_png = server.model.predict(pd.DataFrame({"image": [buffer.getvalue()]}))
    np.testing.assert_allclose(from_png.filter(like="prob_"), from_uint8.filter(like="prob_").iloc[:1], atol=1e-6)


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["{image}"]]}},
        {"dataframe_records": [{"image": "{image}"}]},
        {"inputs": {"image": ["{image}"]}},
        {"inputs": ["{image}"]},
        {"instances": [{"image": "{image}"}]},
        {"instances": ["{image}"]},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs", "inputs_list", "instances_records",
         "instances_list"],
)
def test_served_model_answers_a_base64_jpeg(server, body):
    image = jpeg_base64()
    status, text = post(server.url, json.dumps(body).replace("{image}", image).encode())
    assert status == 200, text
    check_predictions(text, server.model.predict(pd.DataFrame({"image": [image]})))


@pytest.mark.parametrize("key", ["inputs", "instances"])
def test_served_model_answers_pixel_arrays(server, key):
    pixels = smooth_pixels(2)
    status, text = post(server.url, json.dumps({key: pixels.tolist()}).encode())
    assert status == 200, text
    check_predictions(text, server.model.predict(pixels))


def test_served_model_answers_a_photo_with_a_row_per_face_and_takes_the_detector_as_a_param(server):
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    photo = base64.b64encode(buffer.getvalue()).decode("ascii")
    for params in ({}, {"detector": "haar"}, {"detector": "mtcnn", "min_face": 40}, {"detector": "blazeface"}):
        body = {"dataframe_split": {"columns": ["image"], "data": [[photo]]}, "params": params}
        status, text = post(server.url, json.dumps(body).encode())
        assert status == 200, text
        (row,) = json.loads(text)["predictions"]
        assert row["face"] == 0 and 165 <= row["x"] and row["x"] + row["w"] <= 285, (params, row)
        expected = server.model.predict(pd.DataFrame({"image": [photo]}), params=params or None)
        check_predictions(text, expected)


def astronaut_photo(size: tuple[int, int], head: tuple[int, int], at: tuple[int, int], noise: float = 0,
                    quality: int = 90) -> bytes:
    """A JPEG of `size` with the astronaut's head scaled to `head` pasted `at`, on grey (plus noise)."""
    from skimage import data

    rng = np.random.default_rng(0)
    background = (118 + rng.normal(0, noise, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(background)
    canvas.paste(Image.fromarray(data.astronaut()).crop((140, 20, 310, 210)).resize(head), at)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_served_model_answers_a_10_mb_photo_and_a_request_of_50_photos(server):
    large = astronaut_photo((3600, 2700), (510, 570), (1500, 1000), noise=60, quality=97)
    assert len(large) >= 10_000_000
    body = {"inputs": [base64.b64encode(large).decode("ascii")]}
    status, text = post(server.url, json.dumps(body).encode())
    assert status == 200, text[:2000]
    (row,) = json.loads(text)["predictions"]
    assert row["face"] == 0 and 1500 <= row["x"] and row["x"] + row["w"] <= 2010 and 1000 <= row["y"]
    small = base64.b64encode(astronaut_photo((640, 480), (116, 130), (300, 140))).decode("ascii")
    status, text = post(server.url, json.dumps({"inputs": [small] * 50}).encode())
    assert status == 200, text[:2000]
    rows = json.loads(text)["predictions"]
    assert [r["image"] for r in rows] == list(range(50)) and {r["face"] for r in rows} == {0}


def test_served_model_takes_test_time_views_as_body_params(server):
    pixels = smooth_pixels(2)
    body = {"inputs": pixels.tolist(), "params": {"tta": True}}
    status, text = post(server.url, json.dumps(body).encode())
    assert status == 200, text
    ten_views = server.model.predict(pixels, params={"tta": True})
    check_predictions(text, ten_views)
    assert not np.allclose(ten_views.filter(like="prob_"), server.model.predict(pixels).filter(like="prob_"))


def test_served_model_answers_its_own_input_example(server):
    status, text = post(server.url, server.serving_example.encode())
    assert status == 200, text
    assert len(json.loads(text)["predictions"]) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"dataframe_split": {"columns": ["image"], "data": [["abc"', "valid JSON"),
        (b'{"dataframe_split": {"columns": ["image"], "data": [["not an image!"]]}}', "base64"),
        (b'{"inputs": {"image": ["aGVsbG8gd29ybGQ="]}}', "expected a PNG, JPEG, WebP, BMP or GIF"),
        (b'{"inputs": {"picture": ["aGVsbG8gd29ybGQ="]}}', "expected an 'image' key"),
        (b'{"inputs": {"image": "aGVsbG8gd29ybGQ="}}', "expected a 1-D list of PNG/JPEG"),
        (b'{"dataframe_records": [{"picture": "aGVsbG8="}]}', "expected a DataFrame with an 'image' column"),
        (b'{"instances": [{"image": null}]}', "expected PNG/JPEG bytes or a base64 string"),
        (b'{"inputs": [[1, 2], [3, 4]]}', "expected an N x 48 x 48"),
        (b'{"inputs": "aGVsbG8gd29ybGQ="}', "expected an N x 48 x 48"),
        (b'{"inputs": []}', "no images given"),
        (b'{"image": ["aGVsbG8gd29ybGQ="]}', "dataframe_split"),
        (b'{"inputs": ["' + image_base64("TIFF", (48, 48)) + b'"]}', "expected a PNG, JPEG, WebP, BMP or GIF"),
        (b'{"inputs": ["' + image_base64("PNG", (8000, 6000)) + b'"]}', "over the limit of 40"),
        (b'{"inputs": [' + b",".join([b'"' + image_base64("PNG", (48, 48)) + b'"'] * 257) + b"]}",
         "257 images in one request, over the limit of 256"),
    ],
    ids=["invalid_json", "not_base64", "not_an_image", "wrong_key", "lone_string", "wrong_column",
         "null_image", "small_pixel_array", "single_string", "empty", "no_format_key", "tiff",
         "48_megapixels", "257_images"],
)
def test_served_model_rejects_bad_bodies_with_4xx(server, body, expected):
    status, text = post(server.url, body)
    assert 400 <= status < 500, (status, text)
    assert expected in json.loads(text)["message"]
    assert post(server.url, json.dumps({"inputs": smooth_pixels(1).tolist()}).encode())[0] == 200  # still up


def test_a_served_ensemble_answers_photos_pixels_and_views_as_its_members_mean(ensemble_server):
    from skimage import data

    from fer_mlflow.serving.pyfunc_model import keras_model_of

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    photo = base64.b64encode(buffer.getvalue()).decode("ascii")
    pixels = smooth_pixels(3)
    for body, params, local_input in (
        ({"dataframe_split": {"columns": ["image"], "data": [[photo]]}}, {"detector": "haar"},
         pd.DataFrame({"image": [photo]})),
        ({"inputs": pixels.tolist()}, {"tta": True}, pixels),
    ):
        status, text = post(ensemble_server.url, json.dumps({**body, "params": params}).encode())
        assert status == 200, text
        check_predictions(text, ensemble_server.model.predict(local_input, params=params))
    # ...and what it serves is the weighted mean of its members' probabilities.
    combined = keras_model_of(ensemble_server.model)
    members = [tiny_keras_model(0), tiny_keras_model(1)]
    x = pixels[..., None].astype(np.float32)
    expected = 0.3 * members[0].predict(x, verbose=0) + 0.7 * members[1].predict(x, verbose=0)
    np.testing.assert_allclose(combined.predict(x, verbose=0), expected, atol=1e-6)
