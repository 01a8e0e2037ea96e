"""Model builders: raw pixels in, probabilities out; the report's CNNs; ResNet parts and weights."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from fer_mlflow.learning import models
from fer_mlflow.errors import ConfigError

# Total and non-trainable parameters in the report's layer tables (Figures 14 and 17).
REPORT_PARAMS = {"cnn_shallow": (277_127, 128), "cnn_deep": (4_300_103, 1_152)}
RESNET_TEST_SIZE = 32  # the backbones' minimum: builds in seconds


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Two raw images: float32 in 0..255, as the saved model receives them."""
    return np.random.default_rng(0).integers(0, 256, size=(2, 48, 48, 1)).astype("float32")


@pytest.fixture(scope="module")
def built():
    """Build each model once per module (ResNets as ResNetParts at 32 pixels, random weights)."""
    cache: dict[str, object] = {}

    def build(name: str):
        if name not in cache:
            if name in models.RESNET_NAMES:
                cache[name] = models.build_resnet(name, RESNET_TEST_SIZE, weights="none")
            else:
                cache[name] = models.build_model(name, weights="none")
        return cache[name]

    return build


@pytest.fixture
def offline(monkeypatch):
    """No network: every host name fails to resolve, as on a machine without internet."""

    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


def end_to_end(name: str, built) -> keras.Model:
    model = built(name)
    return model.model if isinstance(model, models.ResNetParts) else model


# The deeper ResNets take seconds each to build: checked in the full suite, resnet50 in the quick one too.
DEEP_RESNETS = ("resnet101", "resnet152")


def marked(names):
    return [pytest.param(name, marks=pytest.mark.slow) if name in DEEP_RESNETS else name for name in names]


@pytest.mark.parametrize("name", marked(models.MODEL_NAMES))
def test_model_maps_raw_pixels_to_probabilities(name, built, pixels):
    model = end_to_end(name, built)
    probabilities = np.asarray(model(pixels, training=False))
    assert model.input_shape == (None, 48, 48, 1)
    assert model.layers[-1].name == "probabilities"
    assert probabilities.shape == (2, 7)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "cnn_shallow", "cnn_deep"])
def test_cnns_scale_raw_pixels_inside_the_model(name, built):
    scales = [layer.scale for layer in built(name).layers if isinstance(layer, keras.layers.Rescaling)]
    assert scales == [pytest.approx(1 / 255)]


@pytest.mark.parametrize("name", sorted(REPORT_PARAMS))
def test_report_cnns_have_the_report_parameter_counts(name, built):
    model = built(name)
    non_trainable = sum(int(np.prod(weight.shape)) for weight in model.non_trainable_weights)
    assert (model.count_params(), non_trainable) == REPORT_PARAMS[name]


def test_cnn_deep_upscales_to_96_inside_the_model(built):
    assert built("cnn_deep").get_layer("resize").output.shape == (None, 96, 96, 1)


def test_cnn_widths_set_every_block_and_the_head():
    model = models.build_cnn(widths=(8, 16, 24))
    assert [model.get_layer(f"block{block}_conv2").filters for block in (1, 2, 3)] == [8, 16, 24]
    assert model.get_layer("head_dense").units == 24 and model.get_layer("block3_pool").output.shape[1] == 6
    assert model.count_params() < models.build_cnn().count_params()
    with pytest.raises(ConfigError, match="widths"):
        models.build_cnn(widths=())


@pytest.mark.parametrize("name", marked(models.RESNET_NAMES))
def test_resnet_parts_compose_and_preprocess_inside(name, built, pixels):
    parts = built(name)
    features = np.asarray(parts.features(pixels, training=False))
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(
        np.asarray(parts.head(features, training=False)),
        np.asarray(parts.model(pixels, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    # Gray to RGB, resize and the backbone's own preprocess_input, done by hand outside the model.
    resized = keras.ops.image.resize(pixels, (RESNET_TEST_SIZE, RESNET_TEST_SIZE))
    by_hand = keras.applications.resnet.preprocess_input(np.repeat(np.asarray(resized), 3, axis=-1))
    np.testing.assert_allclose(
        np.asarray(parts.backbone(by_hand, training=False)), features, rtol=1e-4, atol=1e-4
    )
    assert parts.weights.startswith("none")


def test_local_weights_file_round_trip(built, tmp_path):
    source = built("resnet50")
    path = tmp_path / "resnet50_notop.weights.h5"
    source.backbone.save_weights(path)
    loaded = models.build_resnet("resnet50", RESNET_TEST_SIZE, weights=str(path))
    assert str(path) in loaded.weights
    for original, copy in zip(source.backbone.weights, loaded.backbone.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(copy))


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50.h5"
    with pytest.raises(ConfigError, match="nowhere"):
        models.build_model("resnet50", image_size=RESNET_TEST_SIZE, weights=str(missing))


def test_imagenet_offline_raises_one_actionable_error_fast(offline, tmp_path):
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="weights=none") as error:
        models.resolve_weights("resnet50", "imagenet", cache_dir=str(tmp_path))
    assert time.perf_counter() - started < 20
    assert "\n" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_build_model_imagenet_offline_raises_config_error(offline):
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    if (keras_home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").exists():
        pytest.skip("ImageNet weights are cached here, so building with them needs no network")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="weights=none"):
        models.build_model("resnet50", image_size=RESNET_TEST_SIZE, weights="imagenet")
    assert time.perf_counter() - started < 20


def test_auto_offline_falls_back_to_random_weights_loudly(offline, tmp_path):
    with pytest.warns(UserWarning, match="weights=auto"):
        weights, description = models.resolve_weights("resnet50", "auto", cache_dir=str(tmp_path))
    assert weights is None
    assert "random initialisation" in description


def test_imagenet_uses_the_keras_cache_without_network(offline, tmp_path, monkeypatch):
    cached = tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir()
    cached.write_bytes(b"stand-in for the cached weights")
    digest = hashlib.md5(cached.read_bytes()).hexdigest()
    monkeypatch.setitem(models._IMAGENET_NOTOP_MD5, "resnet50", digest)
    for keyword in ("imagenet", "auto"):
        weights, description = models.resolve_weights("resnet50", keyword, cache_dir=str(tmp_path))
        assert weights == str(cached)
        assert description.startswith("imagenet")


def test_unknown_model_name_lists_the_names():
    with pytest.raises(ConfigError, match="resnet152") as error:
        models.build_model("vgg16")
    assert all(name in str(error.value) for name in models.MODEL_NAMES)


def test_weights_are_refused_for_the_cnns(tmp_path):
    with pytest.raises(ConfigError, match="weights=none"):
        models.build_model("cnn", weights="imagenet")


@pytest.mark.parametrize("name", ["cnn_shallow", "resnet50"])
def test_saved_model_serves_raw_pixels(name, built, pixels, tmp_path):
    model = end_to_end(name, built)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        np.asarray(reloaded(pixels, training=False)), np.asarray(model(pixels, training=False)), atol=1e-6
    )


def test_cnn_convs_set_each_blocks_depth_and_a_mismatch_is_refused():
    model = models.build_cnn(widths=(8, 16, 24), convs=(1, 1, 2))
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == ["block1_conv1", "block2_conv1", "block3_conv1", "block3_conv2"]
    every = models.build_cnn(widths=(8, 16), convs=(3,))
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in every.layers) == 6
    with pytest.raises(ConfigError, match="convs=1,2 gives 2 blocks but widths=8,16,24 3"):
        models.build_cnn(widths=(8, 16, 24), convs=(1, 2))
    with pytest.raises(ConfigError, match="convs"):
        models.build_cnn(widths=(8,), convs=(0,))
