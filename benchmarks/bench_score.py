"""Scoring on Spark (local[2]) against the same images through `predict` in one process.

The images: the first `--faces` FER2013 PublicTest crops of the shared zip and `--photos` 640x480
JPEG photos with one face each (scikit-image's astronaut, her head pasted on grey, as in
bench_faces.py), in one folder. The model: the default cnn, untrained (the same cost), logged with
`pyfunc_model.log_model`. Timed, alternating, `--repeats` times each:

- `score.run(master="local[2]")` in a fresh Python process: the whole command (Spark's start
  included) and the Spark job alone (the run's `seconds`);
- `predict.run` on the same folder in a fresh process: the whole command and the stage's own
  `seconds` metric.

    python benchmarks/bench_score.py --repeats 3   # from a scratch folder
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013-public.zip"

SCORE = """
import json, sys
from fer_mlflow.stages import score
outcome = score.run(sys.argv[1], sys.argv[2], sys.argv[3], master="local[2]")
print(json.dumps({"seconds": outcome.seconds, "images": outcome.images, "faces": outcome.faces}))
"""
PREDICT = """
import json, sys, mlflow
from fer_mlflow.stages import predict
outcome = predict.run(sys.argv[1], sys.argv[2], max_annotated=0)
metrics = mlflow.get_run(outcome.run_id).data.metrics
print(json.dumps({"seconds": metrics["seconds"], "images": metrics["photos"], "faces": metrics["faces"]}))
"""


def images(folder: Path, faces: int, photos: int) -> Path:
    import io

    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(SHARED_ZIP) as archive:
        names = [n for n in archive.namelist() if n.startswith("test/") and n.endswith(".jpg")][:faces]
        for index, name in enumerate(names):
            (folder / f"face_{index:05d}.jpg").write_bytes(archive.read(name))
    head = Image.fromarray(data.astronaut()).crop((140, 20, 310, 210)).resize((116, 130))
    for index in range(photos):
        canvas = Image.new("RGB", (640, 480), (118, 118, 118))
        canvas.paste(head, (40 + (index * 37) % 480, 140))
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=90)
        (folder / f"photo_{index:03d}.jpg").write_bytes(buffer.getvalue())
    return folder


def timed(script: str, *args: str) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faces", type=int, default=3000)
    parser.add_argument("--photos", type=int, default=100)
    args = parser.parse_args()
    import mlflow

    from fer_mlflow.learning.models import build_model
    from fer_mlflow.serving.pyfunc_model import log_model

    mlflow.set_tracking_uri("sqlite:///bench_score.db")
    with mlflow.start_run():
        uri = log_model(build_model("cnn", image_size=48), name="model").model_uri
    folder = images(Path("bench_score_images"), args.faces, args.photos)
    results = {"score": [], "predict": []}
    for repeat in range(args.repeats):
        output = Path(f"bench_score_out_{repeat}")
        results["score"].append(timed(SCORE, uri, str(folder), str(output)))
        results["predict"].append(timed(PREDICT, uri, str(folder)))
    count = args.faces + args.photos
    for name, runs in results.items():
        whole = statistics.median(t for t, _ in runs)
        inner = statistics.median(r["seconds"] for _, r in runs)
        print(f"{name}: {count / whole:,.1f} images/s whole command ({whole:.1f} s), {count / inner:,.1f} images/s "
              f"in the job ({inner:.1f} s); faces {runs[0][1]['faces']}")


if __name__ == "__main__":
    main()
