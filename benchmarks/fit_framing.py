"""How FER2013 frames a face, relative to each detector's box: the numbers behind faces.FRAMING.

FER2013's 48x48 images are whole faces with a little forehead and chin. Upscaled 4x (bicubic, to
192x192) and set in a mid-grey border of half their size (a face filling the whole photo is hard for
MTCNN), training images (never PublicTest) are searched with each detector; for every image with
exactly one face found, the frame (the 192x192 image) is expressed in units of the box's width: its
side, and its centre's offset from the box's centre. Medians over the images are the framing.

    python benchmarks/fit_framing.py ../shared/data/fer2013-public.zip --images 600 [--detectors blazeface]
"""

import argparse
import io
import time
import zipfile

import numpy as np
from PIL import Image

from fer_mlflow.serving.faces import DETECTORS, detect

UPSCALE = 4


def frames(path: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` random training images of the zip, upscaled UPSCALE times, as RGB arrays."""
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("train/") and n.endswith(".jpg"))
        chosen = np.random.default_rng(seed).choice(len(names), count, replace=False)
        images = [Image.open(io.BytesIO(archive.read(names[i]))).convert("RGB") for i in chosen]
    side, border = 48 * UPSCALE, 24 * UPSCALE
    framed = []
    for image in images:
        canvas = Image.new("RGB", (side + 2 * border, side + 2 * border), (128, 128, 128))
        canvas.paste(image.resize((side, side), Image.Resampling.BICUBIC), (border, border))
        framed.append(np.asarray(canvas))
    return framed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    args = parser.parse_args()
    images = frames(args.zip, args.images)
    side, border = 48 * UPSCALE, 24 * UPSCALE
    for detector in args.detectors.split(","):
        started, rows = time.perf_counter(), []
        for image in images:
            found = detect(image, detector, min_face=side // 4)
            if len(found) == 1:
                face = found[0]
                cx, cy = face.x - border + face.w / 2, face.y - border + face.h / 2
                rows.append((side / face.w, (side / 2 - cx) / face.w, (side / 2 - cy) / face.w))
        rows = np.array(rows).reshape(-1, 3)
        if not len(rows):
            print(f"{detector}: no image with exactly one face")
            continue
        median = np.median(rows, axis=0)
        quartiles = np.percentile(rows, [25, 75], axis=0)
        print(f"{detector}: one face in {len(rows)} of {len(images)} images "
              f"({time.perf_counter() - started:.1f} s); frame side / box width {median[0]:.3f} "
              f"(IQR {quartiles[0, 0]:.3f}-{quartiles[1, 0]:.3f}), centre offset x {median[1]:+.3f}, "
              f"y {median[2]:+.3f} box widths (IQR y {quartiles[0, 2]:+.3f}..{quartiles[1, 2]:+.3f})")


if __name__ == "__main__":
    main()
