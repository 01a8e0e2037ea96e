"""The served network's runtime: onnxruntime on the logged ONNX export, tf.function for models
logged without one, each answering the Keras model's probabilities for crops, views and photos."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as photos

from conftest import SHARED_ZIP, tiny_keras_model

from fer_mlflow.serving import pyfunc_model
from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.serving.runtime import TOLERANCE

PROB_COLUMNS = [f"prob_{name}" for name in CLASS_NAMES]
CALLS = [  # (name, input, params): crops, the default test-time views, and a photo searched by haar
    ("crops", lambda: np.random.default_rng(0).integers(0, 256, (40, 48, 48), dtype=np.uint8), None),
    ("views", lambda: np.random.default_rng(1).integers(0, 256, (6, 48, 48), dtype=np.uint8), {"tta": True}),
    ("photo", lambda: pd.DataFrame({"image": [_png(photos.astronaut())]}), {"detector": "haar"}),
]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def log_and_load(keras_model, model_config: dict | None = None) -> tuple[mlflow.pyfunc.PyFuncModel, Path]:
    with mlflow.start_run():
        info = pyfunc_model.log_model(keras_model)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    return mlflow.pyfunc.load_model(info.model_uri, model_config=model_config), local


def keras_answer(model: mlflow.pyfunc.PyFuncModel, model_input, params, monkeypatch) -> pd.DataFrame:
    """What `model` answers when its network runs through Keras' own `predict`."""
    python_model = model.unwrap_python_model()
    with monkeypatch.context() as patch:
        patch.setattr(python_model, "network", python_model.keras_model)
        return model.predict(model_input, params=params)


def assert_same_answer(model, model_input, params, monkeypatch) -> None:
    served, expected = model.predict(model_input, params=params), keras_answer(model, model_input, params, monkeypatch)
    assert (expected["face"] >= 0).any(), "the call must reach the network"
    pd.testing.assert_frame_equal(served.drop(columns=[*PROB_COLUMNS, "probability"]),
                                  expected.drop(columns=[*PROB_COLUMNS, "probability"]))
    np.testing.assert_allclose(served[PROB_COLUMNS], expected[PROB_COLUMNS], atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny model logged and loaded back once for the module (logging takes seconds)."""
    folder = tmp_path_factory.mktemp("runtime")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        patch.chdir(folder)  # where the store's artifacts go (./mlruns), not the checkout
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        yield log_and_load(tiny_keras_model())


def test_a_logged_model_carries_its_onnx_export_and_serves_through_onnxruntime(logged):
    model, local = logged
    assert (local / "artifacts" / "model.onnx").is_file()
    assert "onnxruntime" in (local / "requirements.txt").read_text()
    assert pyfunc_model.runtime_of(model) == "onnxruntime"


@pytest.mark.parametrize("name, make_input, params", CALLS, ids=[call[0] for call in CALLS])
def test_served_probabilities_are_the_keras_models(logged, monkeypatch, name, make_input, params):
    assert_same_answer(logged[0], make_input(), params, monkeypatch)


def test_the_served_call_does_not_go_through_keras_predict(logged, monkeypatch):
    """Keras' predict costs milliseconds a call: the served path must not use it."""
    model, _ = logged

    def refuse(*args, **kwargs):
        raise AssertionError("keras predict was called")

    monkeypatch.setattr(model.unwrap_python_model().keras_model, "predict", refuse)
    assert len(model.predict(np.zeros((3, 48, 48), np.uint8))) == 3


@pytest.mark.slow  # a Python process of its own
def test_serving_crops_through_onnx_starts_without_tensorflow(logged):
    """Importing TensorFlow costs seconds at every start of a server, Spark worker or `evaluate`: a
    model with its ONNX export loads and answers crops, alone and with its ten views, without it,
    and still hands over its Keras model when asked (after its download folder is gone)."""
    _, local = logged
    script = (
        "import sys, mlflow, numpy as np, shutil, tempfile\n"
        "from fer_mlflow.serving import pyfunc_model\n"
        "folder = tempfile.mkdtemp()\n"
        f"model = mlflow.pyfunc.load_model(shutil.copytree({str(local)!r}, folder + '/m'))\n"
        "shutil.rmtree(folder)\n"
        "crops = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)\n"
        "answer = model.predict(crops).join(model.predict(crops, params={'tta': True}), rsuffix='_views')\n"
        "print(len(answer), 'tensorflow' in sys.modules)\n"
        "print(pyfunc_model.keras_model_of(model).output_shape[-1])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3", "False", "7"]


@pytest.mark.slow  # logs a second model
def test_a_network_that_resizes_its_input_exports_with_its_batch_normalisation_in_inference_mode(tmp_path):
    from fer_mlflow.learning import models
    from fer_mlflow.serving.runtime import export_onnx, onnx_network

    keras_model = models.build_model("cnn", image_size=32, widths=(8, 16))  # Resizing, then the cnn
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 48, 48, 1)).astype(np.float32)
    network = onnx_network(export_onnx(keras_model, tmp_path / "model.onnx"))  # None (refused) before
    assert np.abs(network.predict(pixels) - keras_model.predict(pixels, verbose=0)).max() <= TOLERANCE
    alone = network.predict(pixels[:1])  # batch statistics would make a face's answer depend on its batch
    assert np.abs(alone - network.predict(pixels)[:1]).max() <= TOLERANCE


def test_a_model_logged_without_the_onnx_export_serves_through_tf_function(monkeypatch):
    """As a model logged before the export existed: only the Keras file among its artifacts."""
    with monkeypatch.context() as patch:
        patch.setattr(pyfunc_model, "export_onnx", lambda keras_model, path: None)
        model, local = log_and_load(tiny_keras_model(1))
    assert not (local / "artifacts" / "model.onnx").exists()
    assert pyfunc_model.runtime_of(model) == "tf.function"
    for _, make_input, params in CALLS[:2]:
        assert_same_answer(model, make_input(), params, monkeypatch)


def test_without_onnxruntime_the_model_loads_and_serves_through_tf_function(logged, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    model = mlflow.pyfunc.load_model(str(logged[1]))
    assert pyfunc_model.runtime_of(model) == "tf.function"
    assert_same_answer(model, CALLS[0][1](), None, monkeypatch)


def test_an_8_bit_network_serves_through_onnxruntime_and_falls_back_to_float32_with_a_warning(
        tmp_path, monkeypatch, caplog):
    from fer_mlflow.serving import runtime

    monkeypatch.setitem(sys.modules, "sympy", None)  # not a dependency here: quantizing must not need it
    keras_model = tiny_keras_model(2)
    faces = np.random.default_rng(0).uniform(0, 255, (64, 48, 48, 1)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        assert runtime.quantize_onnx(tmp_path / "missing.onnx", tmp_path / "int8.onnx", faces) is None
    assert "quantization failed" in caplog.text and "serves in float32" in caplog.text
    int8 = runtime.quantize_onnx(runtime.export_onnx(keras_model, tmp_path / "model.onnx"), tmp_path / "int8.onnx",
                                 faces)
    # Weights of 7 bits, wherever it was made: 8-bit ones saturate onnxruntime's products on an AVX2-only CPU.
    import onnx
    from onnx import numpy_helper

    def largest_weight(path) -> int:
        return max(np.abs(numpy_helper.to_array(t).astype(int)).max() for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.dims)

    assert largest_weight(int8) == 64
    # The control: full 8-bit weights reach 127, where they serve at all (on an AVX2-only CPU their copy
    # disagrees with the network and is refused).
    eight = runtime.quantize_onnx(tmp_path / "model.onnx", tmp_path / "int8-8bit.onnx", faces, reduce_range=False)
    assert eight is None or largest_weight(eight) == 127
    pyfunc_model.save_model(keras_model, tmp_path / "saved", int8_onnx=int8)
    model = mlflow.pyfunc.load_model(str(tmp_path / "saved"))
    assert pyfunc_model.runtime_of(model) == "onnxruntime int8"
    served = model.predict(faces[..., 0]).filter(like="prob_").to_numpy()
    exact = keras_model.predict(faces, verbose=0)
    assert 1e-4 < np.abs(served - exact).max() < 0.2 and np.mean(served.argmax(1) == exact.argmax(1)) >= 0.95

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fallback = mlflow.pyfunc.load_model(str(tmp_path / "saved"))
    assert pyfunc_model.runtime_of(fallback) == "tf.function" and "pip install onnxruntime" in caplog.text
    assert "8-bit network" in caplog.text
    np.testing.assert_allclose(fallback.predict(faces[..., 0]).filter(like="prob_").to_numpy(), exact, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="the shared FER2013 zip is not here")
def test_on_real_faces_the_default_network_serves_the_keras_probabilities(monkeypatch):
    """The default cnn, fitted one epoch on 1,024 real training faces so that its answers are not
    flat, serves PublicTest faces (crops and views) as Keras predicts them."""
    import keras

    from fer_mlflow.learning.models import build_model
    from fer_mlflow.data.sources import read_source

    dataset, _ = read_source(str(SHARED_ZIP))
    train, test = dataset.split("train"), dataset.split("test")
    picked = np.random.default_rng(0).choice(len(train.images), 1024, replace=False)
    keras.utils.set_random_seed(0)
    network = build_model("cnn", image_size=48)
    network.compile("adam", "sparse_categorical_crossentropy")
    network.fit(train.images[picked][..., None].astype(np.float32), train.labels[picked], epochs=1, verbose=0)
    model, _ = log_and_load(network, {"max_images": 1024})  # a request of 1,024 faces
    assert pyfunc_model.runtime_of(model) == "onnxruntime"
    assert_same_answer(model, test.images[:1024], None, monkeypatch)
    assert_same_answer(model, test.images[1024:1280], {"tta": True}, monkeypatch)


class CountingNetwork:
    """A network runtime that counts its calls."""

    def __init__(self, network):
        self.network, self.calls = network, 0

    def predict(self, pixels, batch_size=256, verbose=0):
        self.calls += 1
        return self.network.predict(pixels, batch_size=batch_size)


def one_view_at_a_time(network, pixels: np.ndarray, settings) -> np.ndarray:
    """The views' mean as first written: each view and its mirror through the network in turn."""
    from fer_mlflow.serving import views

    total = 0.0
    for view in settings.views:
        moved = views.transformed(pixels, *view)
        for flipped in (moved, moved[:, :, ::-1]):
            total = total + network.predict(flipped)
    return total / settings.view_count


@pytest.mark.parametrize("shift", [0, 2])
def test_all_views_of_a_face_go_through_the_network_in_one_call_with_the_same_answer(logged, monkeypatch, shift):
    from fer_mlflow.serving import views

    network = CountingNetwork(logged[0].unwrap_python_model().network)
    pixels = np.random.default_rng(2).integers(0, 256, (5, 48, 48, 1)).astype(np.float32)
    settings = views.Settings(tta=True, tta_shift=shift)
    expected = one_view_at_a_time(network.network, pixels, settings)
    np.testing.assert_allclose(views.probabilities(network, pixels, settings), expected, atol=1e-7, rtol=0)
    assert network.calls == 1
    monkeypatch.setattr(views, "VIEW_INPUTS", 2 * settings.view_count)  # many faces: two at a time
    network.calls = 0
    np.testing.assert_allclose(views.probabilities(network, pixels, settings), expected, atol=1e-7, rtol=0)
    assert network.calls == 3


def test_a_model_logged_with_other_versions_loads_with_a_warning_naming_them(logged, tmp_path, caplog):
    """What MLflow's own check tells, in one line (without its seconds-long scan of every package)."""
    from fer_mlflow.tracking import registry

    _, local = logged
    copy = Path(shutil.copytree(local, tmp_path / "model"))
    requirements = copy / "requirements.txt"
    pinned = f"numpy=={np.__version__}"
    assert pinned in requirements.read_text()
    requirements.write_text(requirements.read_text().replace(pinned, "numpy==1.21.0").rstrip() + "\nabsent-package==1.0\n")
    python = copy / "python_env.yaml"
    python.write_text(re.sub(r"python: *\S+", "python: 3.9.1", python.read_text()))
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        model = registry.load_model(str(copy))
    assert len(model.predict(np.zeros((1, 48, 48), np.uint8))) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == registry.__name__]
    assert f"numpy==1.21.0 (installed: {np.__version__})" in warning and "\n" not in warning
    assert "absent-package==1.0 (installed: none)" in warning and "python 3.9.1 (installed: 3." in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        registry.load_model(str(local))  # logged in this environment: nothing to tell
    assert not [r for r in caplog.records if r.name == registry.__name__]
