"""The served model: a pyfunc wrapper that turns encoded images into emotion probabilities.

`log_model` stores the trained Keras model (raw pixels in, 7 softmax probabilities out) as an MLflow
pyfunc model whose input is a DataFrame with one string column ``image`` holding base64 PNG/JPEG
(in Python the column may also hold raw PNG/JPEG bytes). Output: ``label``, ``probability`` and one
``prob_<class>`` column per class.

Why this signature. MLflow 3.17.2 enforces the signature in `PyFuncModel.predict` before our code
runs, and no single signature admits both pixel arrays and encoded images: a column signature turns
the input into a DataFrame, which fails for an N x 48 x 48 array; a tensor signature rejects a
column of strings and would make HTTP clients send 2,304 numbers per image. The signature therefore
serves the HTTP contract (one base64 string per image, the same in ``dataframe_split``,
``dataframe_records``, ``inputs`` and ``instances``), and `string` rather than `binary` because the
scoring server base64-decodes `binary` only for the dataframe formats, so the model would see two
encodings. Pixel arrays go through `predict_pixels`, which calls the unwrapped `FerEmotionModel`
in-process without the encode/decode round trip.

The model is logged as code (a two-line script) with the `fer_mlflow` package in `code_paths`, so
it loads where the project is not installed and without unpickling (MLflow warns on pickled models).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_mlflow.dataset import CLASS_NAMES, IMAGE_SIZE
from fer_mlflow.errors import ConfigError, DataError, FerError

IMAGE_COLUMN = "image"
EXPECTED_FRAME = (
    f"a DataFrame with an '{IMAGE_COLUMN}' column of PNG/JPEG images as bytes or base64 strings"
)
EXPECTED_ARRAY = "an N x 48 x 48 or N x 48 x 48 x 1 array of pixels in 0..255"
# Pinned so a served model gets the versions it was trained and validated with; keras is listed
# because the .keras file format follows the keras release, not tensorflow's.
REQUIREMENT_PACKAGES = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow")
_MODEL_CODE = (
    "import mlflow\n"
    "from fer_mlflow.pyfunc_model import FerEmotionModel\n"
    "mlflow.models.set_model(FerEmotionModel())\n"
)


def decode_images(images: Iterable[bytes | str]) -> np.ndarray:
    """Decode PNG/JPEG images (bytes, or base64 strings, optionally a ``data:`` URL) of any size
    and colour into grayscale 48x48 pixels: returns uint8 (N, 48, 48). Raises DataError naming the
    first bad image and what was expected."""
    decoded = []
    for index, item in enumerate(images):
        if isinstance(item, str):
            item = _base64_bytes(item, index)
        elif isinstance(item, (bytearray, memoryview)):
            item = bytes(item)
        if not isinstance(item, bytes) or not item:
            raise DataError(
                f"image {index} is {type(item).__name__} {str(item)[:40]!r}; "
                "expected PNG/JPEG bytes or a base64 string of them"
            )
        try:
            with Image.open(io.BytesIO(item)) as opened:
                # Phone JPEGs are often stored sideways with an EXIF rotation tag.
                image = ImageOps.exif_transpose(opened).convert("L")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            decoded.append(np.asarray(image, dtype=np.uint8))
        # Decoders raise many types on corrupt data (OSError, SyntaxError, ValueError, ...); every
        # one of them means the client sent a bad image, which must become a 4xx, not a 500.
        except Exception as error:
            reason = "unknown format" if isinstance(error, UnidentifiedImageError) else str(error)
            raise DataError(
                f"image {index} could not be decoded ({reason}); expected a PNG or JPEG image"
            ) from error
    if not decoded:
        raise DataError(f"no images given; expected {EXPECTED_FRAME}")
    return np.stack(decoded)


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


def _pixels(array: np.ndarray) -> np.ndarray:
    """Check a pixel array and shape it as the Keras model's input: float32 (N, 48, 48, 1)."""
    shape = array.shape
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise DataError(f"pixel array has shape {shape}; expected {EXPECTED_ARRAY}")
    if len(array) == 0:
        raise DataError(f"no images given; expected {EXPECTED_ARRAY} with N >= 1")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"pixel array has dtype {array.dtype}; expected {EXPECTED_ARRAY}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise DataError(f"pixel values lie outside 0..255; expected {EXPECTED_ARRAY}")
    return array.astype(np.float32)


class FerEmotionModel(mlflow.pyfunc.PythonModel):
    """Pyfunc model: encoded images (or, in-process, pixel arrays) in, emotion probabilities out."""

    def load_context(self, context) -> None:
        """Load the Keras model from the `keras_model` artifact and the class names from the model
        config; fails if their counts disagree."""
        import keras  # deferred: importing TensorFlow takes seconds and only loading needs it

        self.keras_model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.class_names = tuple((context.model_config or {}).get("class_names", CLASS_NAMES))
        if self.keras_model.output_shape[-1] != len(self.class_names):
            raise ConfigError(
                f"the Keras model has {self.keras_model.output_shape[-1]} outputs but "
                f"{len(self.class_names)} class names were logged"
            )

    # Annotated as the DataFrame the signature promises: MLflow reads this hint at class creation
    # and warns on anything it cannot turn into a schema (a Union with ndarray included).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Predict emotions for `model_input`: a DataFrame with an ``image`` column (bytes or base64
        PNG/JPEG), or a pixel array N x 48 x 48 (x 1) in 0..255. Returns a DataFrame with ``label``,
        ``probability`` and ``prob_<class>`` columns. Bad input raises MlflowException
        (INVALID_PARAMETER_VALUE, so the scoring server answers 400) saying what was expected."""
        try:
            if isinstance(model_input, np.ndarray):
                pixels = _pixels(model_input)
            elif isinstance(model_input, pd.DataFrame):
                if IMAGE_COLUMN not in model_input.columns:
                    raise DataError(f"columns {list(model_input.columns)} given; expected {EXPECTED_FRAME}")
                pixels = _pixels(decode_images(model_input[IMAGE_COLUMN].tolist()))
            else:
                raise DataError(
                    f"got {type(model_input).__name__}; expected {EXPECTED_FRAME}, or {EXPECTED_ARRAY}"
                )
        except FerError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error
        probabilities = np.asarray(self.keras_model.predict(pixels, batch_size=256, verbose=0))
        return _prediction_frame(probabilities.astype(np.float64), self.class_names)


def _prediction_frame(probabilities: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """The output table: argmax label, its probability, then one probability column per class."""
    best = probabilities.argmax(axis=1)
    frame = pd.DataFrame({
        "label": np.asarray(class_names, dtype=object)[best],
        "probability": probabilities[np.arange(len(best)), best],
    })
    for column, name in enumerate(class_names):
        frame[f"prob_{name}"] = probabilities[:, column]
    return frame


def predict_pixels(model: mlflow.pyfunc.PyFuncModel, images: np.ndarray) -> pd.DataFrame:
    """Predict on raw pixels (N x 48 x 48 (x 1), 0..255) with a model loaded by
    `mlflow.pyfunc.load_model`; `model.predict` itself only accepts the encoded-image DataFrame."""
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, FerEmotionModel):
        raise ConfigError(f"expected a model logged by fer_mlflow.pyfunc_model, got {type(python_model)}")
    return python_model.predict(None, images)


def encode_png_base64(image: np.ndarray) -> str:
    """A uint8 48x48 grayscale image as a base64 PNG string, the format the served model takes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def signature(class_names: Sequence[str] = CLASS_NAMES) -> ModelSignature:
    """The logged signature: ``image`` (string) in; label, probability and per-class columns out."""
    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability")]
    outputs += [ColSpec(DataType.double, f"prob_{name}") for name in class_names]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]), outputs=Schema(outputs))


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
) -> mlflow.models.model.ModelInfo:
    """Log `keras_model` (pixels (N, 48, 48, 1) 0..255 in, (N, len(class_names)) softmax out) as a
    pyfunc model named `name` in the active run (with none, MLflow 3 logs a run-less model), with the
    signature, a base64 PNG input example (`example_image`, 48x48 uint8, or a synthetic face) and
    pinned pip requirements; registers it as `registered_model_name` if given. Returns ModelInfo."""
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
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_path),
            artifacts={"keras_model": str(keras_path)},
            model_config={"class_names": list(class_names)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=signature(class_names),
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_png_base64(example)]}),
            pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENT_PACKAGES],
            registered_model_name=registered_model_name,
        )
