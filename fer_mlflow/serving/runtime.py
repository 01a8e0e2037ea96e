"""The served network without Keras' per-call machinery.

Keras' `model.predict` costs milliseconds a call whatever the batch (its data adapter, callbacks and
step function are set up each time): more than the network's own work on one face. The served model
(`pyfunc_model`) therefore runs the network through the runtime that measured fastest on the CPU
serving it (benchmarks/bench_runtimes.py, BENCHMARKS.md "Serving runtime") with the same answer:

- ``onnxruntime``: the Keras model exported to ONNX (`export_onnx`, `keras.Model.export`) when the
  model is logged, an extra artifact of the logged model, checked at export against Keras' own
  answer on random pixels (`TOLERANCE`); an export that fails or disagrees is left out with a warning.
- ``tf.function``: the Keras model called inside one traced TensorFlow function with a fixed-rank
  input signature, for a model logged without the ONNX artifact (before it existed, or when its
  export failed) or where onnxruntime cannot be imported.

Both take float32 pixels (N, 48, 48, 1) in 0..255, run them `batch_size` at a time, and answer what
the Keras model's `predict` answers to within `TOLERANCE` (float rounding: the runtimes order the
same sums differently). TensorFlow and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

ONNX_ARTIFACT = "onnx_model"  # the logged model's artifact key of the ONNX file
TOLERANCE = 1e-5  # largest difference from Keras' probabilities a runtime may answer
CHECK_IMAGES = 16  # random faces the export is checked on
INT8_CALIBRATION_FACES = 512  # training faces an 8-bit network's activation ranges are measured on
INT8_AGREEMENT = 0.95  # share of calibration faces an 8-bit network must class as the float32 one does

_logger = logging.getLogger(__name__)


def calibration_choice(images: int, count: int = INT8_CALIBRATION_FACES) -> np.ndarray:
    """Which `count` of `images` training faces an 8-bit network is calibrated on: drawn with a fixed
    seed, in their order (the same faces for the same split, wherever it is quantized)."""
    return np.sort(np.random.default_rng(0).permutation(images)[:count])


class Network:
    """A network runtime with Keras' predict contract: `predict(pixels, batch_size)` returns the
    probabilities (N x classes, float32) of float32 `pixels` (N x H x W x C); `name` says which
    runtime runs it and `outputs` how many classes it answers."""

    def __init__(self, name: str, call, outputs: int):
        self.name = name
        self._call = call
        self.outputs = outputs

    def predict(self, pixels: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        """The probabilities of `pixels`, `batch_size` images a call (changes memory, not the answer);
        `verbose` is accepted, and ignored, so that this stands where a Keras model did."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return np.concatenate([np.asarray(self._call(pixels[start:start + batch_size]))
                               for start in range(0, len(pixels), max(1, int(batch_size)))])


def export_onnx(keras_model, path: Path) -> Path | None:
    """Export `keras_model` to the ONNX file `path` and check that onnxruntime answers Keras'
    probabilities on `CHECK_IMAGES` random images to within `TOLERANCE`. Returns `path`, or None
    (with a warning saying why) when the export fails or disagrees: the model then serves through
    `tf.function`, slower on small batches but the same answer."""
    try:
        import keras

        # Given, not read off the model: a model built but never called has no signature to read.
        spec = keras.InputSpec(shape=(None, *keras_model.input_shape[1:]), dtype="float32")
        with _converter_quiet():
            _inference(keras_model).export(str(path), format="onnx", verbose=False, input_signature=[spec])
        network = onnx_network(path)
        pixels = np.random.default_rng(0).uniform(0, 255, (CHECK_IMAGES, *keras_model.input_shape[1:]))
        pixels = pixels.astype(np.float32)
        difference = float(np.abs(network.predict(pixels) - keras_model.predict(pixels, verbose=0)).max())
    except Exception as error:  # noqa: BLE001 -- any failure to export leaves the slower, exact path
        _logger.warning("the model is logged without its ONNX export, which failed (%s); it serves through "
                        "tf.function", error)
        return None
    if not difference <= TOLERANCE:
        _logger.warning("the model is logged without its ONNX export, whose probabilities differ from "
                        "Keras' by %.2g (over %g); it serves through tf.function", difference, TOLERANCE)
        return None
    return path


def quantize_onnx(source: Path, target: Path, faces: np.ndarray, reduce_range: bool = True) -> Path | None:
    """The float32 ONNX file `source` quantized to 8-bit integers at `target` by onnxruntime's static
    quantization (QDQ: int8 weights per output channel, uint8 activations whose ranges come from
    running `faces`, float32 N x 48 x 48 x 1 in 0..255). Checked on those faces: it must name the
    float32 network's class for `INT8_AGREEMENT` of them. Returns `target`, or None (with a warning)
    when quantization fails or disagrees more: the model then serves `source`.

    Weights are quantized to 7 bits (`reduce_range`) unless told otherwise, so that the file serves
    the same answers on any x86 CPU: on one without 8-bit dot-product instructions (AVX2 only)
    onnxruntime's uint8 x int8 products saturate with full 8-bit weights (a tiny network's 8-bit copy
    agreed with it on 0% of faces on an AVX2 EPYC), and a file quantized on a CPU with them may be
    served on one without. On an AVX-512 VNNI EPYC the shipped pair ran 3.12x the float32 crops a
    second with 7-bit weights (3.09x with 8-bit) and scored 0.7060 on validation with ten views
    against float32's 0.7081 (8-bit: 0.7085); a network with little arithmetic (the fast variant)
    ran slower (BENCHMARKS.md)."""
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        faces = np.ascontiguousarray(faces, dtype=np.float32)
        prepared = target.with_name(f"{target.stem}-prepared.onnx")
        name = onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        batches = iter([{name: faces[start:start + 64]} for start in range(0, len(faces), 64)])

        class Reader:  # onnxruntime's calibration data reader
            def get_next(self):
                return next(batches, None)

        with _converter_quiet():
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # needs no sympy
            quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=reduce_range)
        prepared.unlink()
        agreement = float(np.mean(onnx_network(target).predict(faces).argmax(1)
                                  == onnx_network(source).predict(faces).argmax(1)))
    except Exception as error:  # noqa: BLE001 -- a model that cannot be quantized serves in float32
        _logger.warning("the model is logged without its 8-bit ONNX network, whose quantization failed (%s); it "
                        "serves in float32", error)
        return None
    if agreement < INT8_AGREEMENT:
        _logger.warning("the model is logged without its 8-bit ONNX network, which names the float32 network's "
                        "class for %.1f%% of the calibration faces (under %g%%); it serves in float32",
                        100 * agreement, 100 * INT8_AGREEMENT)
        return None
    return target


def _inference(keras_model):
    """`keras_model` called with ``training=False``, to export. Exported as it is, a model whose
    first layer is `Resizing` (image_size other than 48) had its batch normalisation traced in
    training mode: normalised by each batch's own statistics, an answer that changed with the batch
    (0.2-0.5 from Keras' probabilities, so the export was refused)."""
    import keras
    import numpy as np

    class Inference(keras.Model):
        def __init__(self, model):
            super().__init__(name=f"{model.name}_inference")
            self.model = model

        def call(self, pixels):
            return self.model(pixels, training=False)

    wrapper = Inference(keras_model)
    wrapper(np.zeros((1, *keras_model.input_shape[1:]), dtype="float32"))  # built, as export requires
    return wrapper


@contextlib.contextmanager
def _converter_quiet():
    """The converters' own lines kept off the output while they work (unless ``FER_VERBOSE=1``):
    tf2onnx logs a line per graph rewrite ("Removed Mul ...", hundreds for a ResNet) and numpy's
    deprecation warning, onnxruntime's quantizer its shape inference; the outcome is this module's
    one line."""
    if os.environ.get("FER_VERBOSE") == "1":
        yield
        return
    converters = [logging.getLogger(name) for name in ("tf2onnx", "onnxruntime.quantization")]
    levels = [converter.level for converter in converters]
    for converter in converters:
        converter.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for converter, level in zip(converters, levels):
            converter.setLevel(level)


def onnx_network(path: str | Path) -> Network:
    """The ONNX file at `path` run by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Network("onnxruntime", lambda pixels: session.run(None, {name: pixels})[0],
                   int(session.get_outputs()[0].shape[-1]))


def compiled_network(keras_model) -> Network:
    """`keras_model` called inside one `tf.function` traced for any batch size: no retracing, and
    none of `predict`'s per-call set-up."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, *keras_model.input_shape[1:]), tf.float32)]
    call = tf.function(lambda pixels: keras_model(pixels, training=False), input_signature=signature)
    return Network("tf.function", lambda pixels: call(pixels).numpy(), int(keras_model.output_shape[-1]))


def fastest(load_keras_model, onnx_path: str | None, precision: str = "float32") -> Network:
    """The runtime a loaded model serves with: onnxruntime on its ONNX artifact (`onnx_path`) when
    there is one and onnxruntime imports, else `compiled_network` of the Keras model that
    `load_keras_model()` returns (called only then: loading it imports TensorFlow). `precision`
    ``int8``: the ONNX network computes in 8-bit integers (named ``onnxruntime int8``), and falling back
    to Keras changes the answers slightly, which the warning says."""
    if onnx_path and Path(onnx_path).is_file():
        try:
            network = onnx_network(onnx_path)
        except ImportError as error:
            if precision == "int8":
                _logger.warning("this model serves an 8-bit network through onnxruntime, which cannot be imported "
                                "here (%s): it serves its float32 Keras model, whose answers differ slightly from "
                                "those it was scored with (pip install onnxruntime)", error)
            else:
                _logger.warning("onnxruntime cannot be imported (%s); the model serves through tf.function", error)
        else:
            if precision == "int8":
                network.name = "onnxruntime int8"
            return network
    return compiled_network(load_keras_model())
