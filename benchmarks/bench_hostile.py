"""A hostile burst against a real `mlflow models serve` on loopback: each body refused, memory bounded.

The bodies (`hostile_bodies`): each predict param far out of its range (tta_shift 4000 and 20000,
tta_zoom, tta_rotation, min_face 1 on a photo, max_faces, batch_size, an unknown detector), 256
flat 40-megapixel PNGs (a 14 MB body that declares 10 gigapixels), 257 pixel-array crops, 256 crops
with 18 views, truncated base64, a PNG whose header declares 36 megapixels over a 48x48 image's
data, a GIF of 10,000 frames, a progressive JPEG just over the pixel limit and three at it. They are
sent `--requests` times in turn, `--concurrency` at once, while the server's process tree's resident
memory is sampled every 20 ms (psutil); then one ordinary request (three 48x48 crops) is sent, and
then the largest request the defaults accept that is not hostile: one 6000 x 6600 progressive JPEG
photo, decoded and searched for faces with MTCNN (timed, and its peak memory). The model: the
default cnn, untrained (the same cost), logged with `pyfunc_model.log_model`; the server runs with
the default limits.

    python benchmarks/bench_hostile.py   # from a scratch folder; prints one JSON line

tests/test_hostile_server.py runs the same burst (`burst`, `hostile_bodies`) against the tests'
tiny model.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

STARTUP_SECONDS = 180


def _encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def crops(count: int) -> list:
    """`count` smooth 48x48 crops as nested lists of pixels, as a client sends decoded faces."""
    rows, cols = np.mgrid[0:48, 0:48]
    return [(60 + (40 * k) % 120 + 30 * np.sin(rows / 5) * np.cos(cols / 5)).astype(np.uint8).tolist()
            for k in range(count)]


def many_frames_gif(frames: int = 10_000, side: int = 100) -> bytes:
    """A GIF of `frames` distinct frames `side` pixels square (one pixel differs each time): a few
    hundred kilobytes that declare frames x side^2 pixels."""
    pictures = []
    for index in range(frames):
        pixels = np.full((side, side), 128, np.uint8)
        pixels[index % side, (index // side) % side] = 255 * (index % 2)
        pictures.append(Image.fromarray(pixels))
    return _encoded(pictures[0], "GIF", save_all=True, append_images=pictures[1:], duration=10)


def lying_png(width: int = 6000, height: int = 6000) -> bytes:
    """A PNG whose header declares `width` x `height` over the data of a 48x48 image."""
    real = _encoded(Image.new("L", (width, height), 90))
    return real[:33] + _encoded(Image.new("L", (48, 48), 90))[33:]


def hostile_bodies() -> list[tuple[str, bytes, str]]:
    """(name, JSON body, a phrase the 4xx answer's message must hold), one per kind of attack."""
    crop = crops(1)
    photo = _b64(_encoded(Image.new("RGB", (640, 480), (120, 110, 100)), "JPEG"))
    flat_40mp = _b64(_encoded(Image.new("L", (6400, 6250), 100)))
    full = _encoded(Image.new("L", (48, 48), 90))
    at_limit = _b64(_encoded(Image.new("RGB", (6000, 6600), (120, 110, 100)), "JPEG", progressive=True))
    over_limit = _b64(_encoded(Image.new("RGB", (6400, 6400), (120, 110, 100)), "JPEG", progressive=True))

    def body(inputs, **params) -> bytes:
        return json.dumps({"inputs": inputs, **({"params": params} if params else {})}).encode()

    return [
        ("tta_shift_4000", body(crop, tta=True, tta_shift=4000), "param tta_shift=4000 is out of range"),
        ("tta_shift_20000", body(crop, tta=True, tta_shift=20000), "param tta_shift=20000 is out of range"),
        ("tta_zoom", body(crop, tta=True, tta_zoom=5.0), "param tta_zoom=5.0 is out of range"),
        ("tta_rotation", body(crop, tta=True, tta_rotation=1e9), "param tta_rotation"),
        ("min_face_1", body([photo], min_face=1), "param min_face=1 is out of range"),
        ("max_faces", body([photo], max_faces=1_000_000), "param max_faces=1000000 is out of range"),
        ("batch_size", body(crop, batch_size=10**9), "param batch_size=1000000000 is out of range"),
        ("detector", body([photo], detector="yolo"), "param detector='yolo' is not one of"),
        ("256_flat_40mp_pngs", body([flat_40mp] * 256), "over the limit of 100 per request (max_request_pixels)"),
        ("257_crops", body(crops(257)), "got 257 images in one request, over the limit of 256"),
        ("256_crops_18_views", body(crops(256), tta=True, tta_shift=1),
         "256 faces x 18 views = 4608 network inputs, over the limit of 4096"),
        ("truncated_base64", body([_b64(full)[:-3]]), "not valid base64"),
        ("lying_png_header", body([_b64(lying_png())]), "image 0 could not be decoded"),
        ("gif_10000_frames", body([_b64(many_frames_gif())]), "100 x 100 x 10000 frames"),
        ("progressive_jpeg_over_limit", body([over_limit]), "over the limit of 40;"),
        ("3_progressive_jpegs_at_limit", body([at_limit] * 3), "over the limit of 100 per request"),
    ]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, str]:
    """POST a JSON body; (status, response text) for success and HTTP errors alike."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class TreeMemory:
    """Samples the summed resident memory of a process and its descendants every `interval` s in a
    thread; `peak` is the largest sum seen, in bytes."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        import psutil

        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a child that exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Answer:
    name: str
    status: int
    seconds: float
    message: str
    expected: str


def burst(url: str, bodies: list[tuple[str, bytes, str]], requests: int = 50,
          concurrency: int = 4) -> list[Answer]:
    """Send `requests` bodies (`bodies` in turn), `concurrency` at once: an `Answer` each."""

    def send(index: int) -> Answer:
        name, body, expected = bodies[index % len(bodies)]
        started = time.perf_counter()
        status, text = post(url, body)
        seconds = time.perf_counter() - started
        try:
            message = json.loads(text).get("message", text)
        except (ValueError, AttributeError):
            message = text
        # MLflow's scoring server puts the input before the model's error: "Failed to predict
        # data '...'. \nError: <the model's message>".
        return Answer(name, status, seconds, str(message).rsplit("Error: ", 1)[-1][:500], expected)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(send, range(requests)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(model_uri: str, port: int, log, env: dict | None = None) -> subprocess.Popen:
    """`mlflow models serve` of `model_uri` on 127.0.0.1:`port`, in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_ready(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /ping (exit code {process.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    import signal

    import mlflow

    from fer_mlflow.learning.models import build_model
    from fer_mlflow.serving.pyfunc_model import log_model

    mlflow.set_tracking_uri("sqlite:///bench_hostile.db")
    with mlflow.start_run():
        model_uri = log_model(build_model("cnn"), name="model").model_uri
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path="bench_hostile_model")
    bodies = hostile_bodies()
    port = free_port()
    with open("bench_hostile_server.log", "w") as log:
        process = serve(local, port, log)
    try:
        wait_until_ready(port, process)
        url = f"http://127.0.0.1:{port}/invocations"
        normal = json.dumps({"inputs": crops(3)}).encode()
        assert post(url, normal)[0] == 200  # warm: TensorFlow's first predict
        memory = TreeMemory(process.pid)
        idle = memory.now()
        started = time.perf_counter()
        with memory:
            answers = burst(url, bodies, args.requests, args.concurrency)
        burst_seconds = time.perf_counter() - started
        status, _ = post(url, normal)
        largest = json.dumps({"inputs": [_b64(_encoded(Image.new("RGB", (6000, 6600), (120, 110, 100)), "JPEG",
                                                       progressive=True))]}).encode()
        after = TreeMemory(process.pid)
        started = time.perf_counter()
        with after:
            largest_status, _ = post(url, largest)
        largest_seconds = time.perf_counter() - started
        print(json.dumps({
            "requests": len(answers), "concurrency": args.concurrency,
            "all_4xx": all(400 <= a.status < 500 for a in answers),
            "messages_as_expected": all(a.expected in a.message for a in answers),
            "slowest_s": round(max(a.seconds for a in answers), 2),
            "median_s": round(statistics.median(a.seconds for a in answers), 2),
            "slowest_kind": max(answers, key=lambda a: a.seconds).name,
            "burst_s": round(burst_seconds, 1), "idle_mb": round(idle / 2**20),
            "peak_mb": round(memory.peak / 2**20), "normal_after": status,
            "largest_accepted": largest_status, "largest_accepted_s": round(largest_seconds, 2),
            "largest_accepted_peak_mb": round(after.peak / 2**20),
            "body_mb": {name: round(len(body) / 2**20, 2) for name, body, _ in bodies},
        }))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
