"""Speed of the served model on crops and on photos, per detector (issue 14, point 5).

A photo is 640x480 JPEG with one face: scikit-image's astronaut, her head scaled to about 130 pixels
and pasted on a grey background. Timings are whole `predict` calls of the loaded pyfunc model (a
tiny Keras network, so detection and decoding dominate), medians of `--repeats` calls.

    python benchmarks/bench_faces.py --repeats 3
"""

import argparse
import io
import statistics
import time

import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from skimage import data


def photo() -> bytes:
    head = Image.fromarray(data.astronaut()).crop((140, 20, 310, 210)).resize((116, 130))
    canvas = Image.new("RGB", (640, 480), (118, 118, 118))
    canvas.paste(head, (300, 140))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: graph tracing, detector weights
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photos", type=int, default=20)
    args = parser.parse_args()
    from fer_mlflow.models import build_model
    from fer_mlflow.pyfunc_model import log_model

    mlflow.set_tracking_uri("sqlite:///bench_faces.db")
    keras_model = build_model("cnn", image_size=48)  # the default network, untrained: same cost
    with mlflow.start_run():
        model = mlflow.pyfunc.load_model(log_model(keras_model, name="model").model_uri)
    crops = np.random.default_rng(0).integers(0, 255, (3589, 48, 48), dtype=np.uint8)
    seconds = median_seconds(lambda: model.predict(crops), args.repeats)
    print(f"crops (3,589 pixel arrays, default cnn): {len(crops) / seconds:,.0f} crops/s")
    frame = pd.DataFrame({"image": [photo()] * args.photos})
    for detector in ("haar", "mtcnn"):
        answer = model.predict(frame.iloc[:1], params={"detector": detector})
        seconds = median_seconds(lambda: model.predict(frame, params={"detector": detector}), args.repeats)
        print(f"{detector}: {args.photos / seconds:.1f} photos/s (640x480, faces found in one: "
              f"{int((answer['face'] >= 0).sum())})")


if __name__ == "__main__":
    main()
