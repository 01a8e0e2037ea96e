"""Which runtime runs the served network fastest on this CPU with the Keras model's answer: Keras'
`predict`, the Keras model called directly, a `tf.function` of it with a fixed-rank signature, and
Keras' own exports run by their runtimes (ONNX through onnxruntime, LiteRT through ai-edge-litert,
a TF SavedModel). For each: the time to make it (export) and to load it, crops/s on 3,589 crops in
one call, the p50 / p99 latency of one crop per call, and the largest difference from Keras'
`predict` on those crops. The network is the default cnn (untrained: the same cost), or
`--model-uri`'s.

    python benchmarks/bench_runtimes.py --calls 300
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 256


def timed(make):
    started = time.perf_counter()
    value = make()
    return value, time.perf_counter() - started


def batched(call, pixels: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([np.asarray(call(pixels[start:start + batch])) for start in range(0, len(pixels), batch)])


def runtimes(keras_model, folder: Path):
    """(name, seconds to make and load, call: float32 N x 48 x 48 x 1 -> probabilities) per runtime."""
    import tensorflow as tf

    yield "keras predict", 0.0, lambda x: keras_model.predict(x, batch_size=BATCH, verbose=0)
    yield "keras call", 0.0, lambda x: batched(lambda b: keras_model(b, training=False), x)
    shape = (None, *keras_model.input_shape[1:])
    compiled = tf.function(lambda x: keras_model(x, training=False), reduce_retracing=True,
                           input_signature=[tf.TensorSpec(shape, tf.float32)])
    _, seconds = timed(lambda: compiled.get_concrete_function())
    yield "tf.function", seconds, lambda x: batched(compiled, x)

    def onnx():
        import onnxruntime

        keras_model.export(folder / "model.onnx", format="onnx", verbose=False)
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    call, seconds = timed(onnx)
    yield "onnxruntime", seconds, lambda x: batched(call, x)

    def saved_model():
        keras_model.export(folder / "saved", format="tf_saved_model", verbose=False)
        return tf.saved_model.load(str(folder / "saved"))  # kept: its functions refer to its variables
    loaded, seconds = timed(saved_model)
    call = loaded.serve
    yield "tf_saved_model", seconds, lambda x: batched(call, x)

    def litert():
        from ai_edge_litert.interpreter import Interpreter

        keras_model.export(folder / "model.tflite", format="litert", verbose=False)
        interpreter = Interpreter(model_path=str(folder / "model.tflite"))
        entry, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

        def run(x):
            interpreter.resize_tensor_input(entry["index"], x.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(entry["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(output["index"]).copy()
        return run
    call, seconds = timed(litert)
    yield "litert", seconds, lambda x: batched(call, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model_uri:
        import mlflow

        from fer_mlflow.serving.pyfunc_model import keras_model_of

        keras_model = keras_model_of(mlflow.pyfunc.load_model(args.model_uri))
    else:
        from fer_mlflow.learning.models import build_model

        keras_model = build_model("cnn", image_size=48)
    pixels = np.random.default_rng(0).integers(0, 256, (3589, 48, 48, 1)).astype(np.float32)
    reference = keras_model.predict(pixels, batch_size=BATCH, verbose=0)
    with tempfile.TemporaryDirectory() as folder:
        for name, seconds, call in runtimes(keras_model, Path(folder)):
            difference = float(np.abs(call(pixels) - reference).max())  # also the warm-up
            batch = statistics.median(timed(lambda: call(pixels))[1] for _ in range(args.repeats))
            call(pixels[:1])
            latencies = [timed(lambda: call(pixels[i % len(pixels)][None]))[1] for i in range(args.calls)]
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            print(f"{name:15s} made+loaded {seconds:5.1f} s  batch {len(pixels) / batch:8,.0f} crops/s  "
                  f"one crop p50 {p50:6.2f} ms p99 {p99:6.2f} ms  max |diff| {difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
