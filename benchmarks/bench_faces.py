"""Speed of the served model on crops and on photos, per detector, and of the `predict` stage on
a minute of 30 fps video (issue 14, point 5; BlazeFace added since).

A photo is 640x480 JPEG with one face: scikit-image's astronaut, her head scaled to about 130 pixels
and pasted on a grey background. Timings are whole `predict` calls of the loaded pyfunc model (the
default cnn, untrained: the same cost), medians of `--repeats` calls: `--photos` photos a call, and
one photo a call (the latency of one request, in process). Each detector also searches scikit-image's
astronaut (one face), coffee and chelsea (none). The video is 60 s of such frames at 30 fps (mp4v),
the head moving across; `predict.run` over it at the default `every` (auto) with each of
`--video-detectors`, with the annotated video written (the default) and without (max_annotated=0),
and, with ``--all-frames``, with ``every=1`` (every frame analysed) for BlazeFace.

    python benchmarks/bench_faces.py --repeats 3 [--video-repeats 2] [--video-detectors blazeface] [--all-frames]
"""

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from skimage import data


def scene(left: int = 300) -> Image.Image:
    head = Image.fromarray(data.astronaut()).crop((140, 20, 310, 210)).resize((116, 130))
    canvas = Image.new("RGB", (640, 480), (118, 118, 118))
    canvas.paste(head, (left, 140))
    return canvas


def photo() -> bytes:
    canvas = scene()
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def video(path: Path, seconds: int = 60, fps: int = 30) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for index in range(seconds * fps):
        left = 20 + (index * 2) % 480  # the head moves 2 pixels a frame, 8 s a crossing
        writer.write(cv2.cvtColor(np.asarray(scene(left)), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


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
    parser.add_argument("--video-detectors", default="blazeface,mtcnn")
    parser.add_argument("--video-repeats", type=int, default=3)
    parser.add_argument("--all-frames", action="store_true", help="Also predict with every=1 (BlazeFace).")
    args = parser.parse_args()
    from fer_mlflow.serving import faces
    from fer_mlflow.learning.models import build_model
    from fer_mlflow.serving.pyfunc_model import log_model

    mlflow.set_tracking_uri("sqlite:///bench_faces.db")
    keras_model = build_model("cnn", image_size=48)  # the default network, untrained: same cost
    with mlflow.start_run():
        uri = log_model(keras_model, name="model").model_uri
    # All of PublicTest's 3,589 crops in one call: over a request's default limits (`limits`).
    model = mlflow.pyfunc.load_model(uri, model_config={"max_images": 4096, "max_face_views": 4096})
    crops = np.random.default_rng(0).integers(0, 255, (3589, 48, 48), dtype=np.uint8)
    seconds = median_seconds(lambda: model.predict(crops), args.repeats)
    print(f"crops (3,589 pixel arrays, default cnn): {len(crops) / seconds:,.0f} crops/s")
    pixels = crops[..., None].astype(np.float32)
    bare = median_seconds(lambda: keras_model.predict(pixels, batch_size=256, verbose=0), args.repeats)
    print(f"the bare Keras predict on them: {len(crops) / bare:,.0f} crops/s (served / bare time {seconds / bare:.2f})")
    frame = pd.DataFrame({"image": [photo()] * args.photos})
    for detector in faces.DETECTORS:
        answer = model.predict(frame.iloc[:1], params={"detector": detector})
        seconds = median_seconds(lambda: model.predict(frame, params={"detector": detector}), args.repeats)
        one = median_seconds(lambda: model.predict(frame.iloc[:1], params={"detector": detector}),
                             max(args.repeats, args.photos))
        found = {name: len(faces.detect(getattr(data, name)(), detector)) for name in ("astronaut", "coffee", "chelsea")}
        print(f"{detector}: {args.photos / seconds:.1f} photos/s (640x480, faces found in one: "
              f"{int((answer['face'] >= 0).sum())}); one photo a call: p50 {1000 * one:.1f} ms; faces found in "
              f"scikit-image's {', '.join(f'{name} {count}' for name, count in found.items())}")
    from fer_mlflow.stages import predict

    with tempfile.TemporaryDirectory() as folder:
        clip = video(Path(folder) / "minute.mp4")
        cases = [(detector, None, annotated) for detector in args.video_detectors.split(",") for annotated in (50, 0)]
        if args.all_frames:
            cases += [("blazeface", 1, 50), ("blazeface", 1, 0)]
        for detector, every, annotated in cases:
            runs = []
            seconds = median_seconds(lambda: runs.append(predict.run(uri, str(clip), detector=detector, every=every,
                                                                     max_annotated=annotated)), args.video_repeats)
            table = runs[-1].predictions
            print(f"predict on 60 s of 30 fps 640x480 video (every={every or 'auto'}, detector={detector}, "
                  f"annotated video {'written' if annotated else 'not written'}): {seconds:.1f} s; "
                  f"{table['image'].nunique()} frames analysed, {int((table['face'] >= 0).sum())} faces found, "
                  f"{table['track'].nunique()} track(s)")


if __name__ == "__main__":
    main()
