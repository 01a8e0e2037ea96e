"""Accuracy of the photo path: FER2013 faces set in larger photos, found, cut and labelled
(issue 14, points 1 and 6).

Each face of the split is upscaled 3x (bicubic, 144x144), made RGB, and pasted at a random place in a
480x360 photo whose background is a random part of scikit-image's coffee or chelsea photo (no human
face) or smooth noise. Each photo is searched by each detector (`faces.detect`, as the served model
does with min_face 20); the face found whose box centre lies in the pasted square is the match
(the most confident, if several). It is cut as the served model cuts it (`faces.crop`) and the model
labels it. Reported per detector: the share of faces found, the faces found elsewhere, the accuracy
on the faces found, and the model's accuracy on the same faces given as the dataset's own crops (the
gap between the two is what the photo path costs), and the median time to search one photo.

The served cut levels the eyes of MTCNN's faces (`faces.crop`). ``--level``: also cut each of them
as found, not levelled, and report that accuracy beside the served one (whether eye-levelling helps:
decided on the val split, BENCHMARKS.md; before commit 87c88f9 the served cut was the unlevelled one
and this option turned the photo instead).

    python benchmarks/photo_path.py --model-uri runs:/<id>/model --data ../shared/data/fer2013-public.zip
    python benchmarks/photo_path.py --model-uri runs:/<id>/model --data runs:/<clean>/dataset/dataset.npz \
        --split val --level
"""

import argparse
import time

import mlflow
import numpy as np
from PIL import Image
from skimage import data as photos

from fer_mlflow.serving import faces
from fer_mlflow.data.decode import gray
from fer_mlflow.data.sources import read_source

SCALE, WIDTH, HEIGHT = 3, 480, 360


def backgrounds(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` 480x360 RGB backgrounds: parts of photos without a human face, or smooth noise."""
    sources = [photos.coffee(), photos.chelsea()]
    result = []
    for _ in range(count):
        kind = rng.integers(3)
        if kind < 2:
            source = sources[kind]
            height, width = source.shape[:2]
            side = rng.uniform(0.5, 1.0)
            w, h = int(width * side), int(height * side)
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            part = Image.fromarray(source[top:top + h, left:left + w]).resize((WIDTH, HEIGHT))
        else:
            noise = rng.integers(0, 256, (HEIGHT // 24, WIDTH // 24, 3), dtype=np.uint8)
            part = Image.fromarray(noise).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        result.append(np.asarray(part))
    return result


def composite(face: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """`face` (48x48 gray) upscaled and pasted at a random place; returns the photo and the square."""
    side = 48 * SCALE
    big = Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
    left, top = int(rng.integers(0, WIDTH - side + 1)), int(rng.integers(0, HEIGHT - side + 1))
    canvas = Image.fromarray(background.copy())
    canvas.paste(big, (left, top))
    return np.asarray(canvas), (left, top, side)


def match(found: list[faces.Face], square: tuple) -> tuple[faces.Face | None, int]:
    """The most confident face whose centre lies in `square`, and how many others were found."""
    left, top, side = square
    inside = [f for f in found if left <= f.x + f.w / 2 <= left + side and top <= f.y + f.h / 2 <= top + side]
    return (inside[0] if inside else None), len(found) - min(1, len(inside))


def unlevelled(face: faces.Face) -> faces.Face:
    """The face without its eyes: `faces.crop` then cuts it as found, not levelled."""
    return faces.Face(face.x, face.y, face.w, face.h, face.confidence)


def labels_of(model, crops: np.ndarray, class_names: list[str]) -> np.ndarray:
    if not len(crops):
        return np.zeros(0, int)
    crops = np.stack(crops)
    labels = []
    for start in range(0, len(crops), 256):  # the served model's request limit (limits.MAX_IMAGES)
        labels += list(model.predict(crops[start:start + 256])["label"])
    return np.array([class_names.index(label) for label in labels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--limit", type=int, default=0,
                        help="Only N faces drawn at random (--seed; the zip lists its faces class by class), 0: all.")
    parser.add_argument("--level", action="store_true")
    parser.add_argument("--detectors", default=",".join(faces.DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset, _ = read_source(args.data)
    part = dataset.split(args.split)
    images, truth = part.images, part.labels
    if args.limit:
        chosen = np.sort(np.random.default_rng(args.seed).choice(len(images), args.limit, replace=False))
        images, truth = images[chosen], truth[chosen]
    model = mlflow.pyfunc.load_model(args.model_uri)
    class_names = list(part.class_names)
    plain = labels_of(model, list(images), class_names) == truth
    print(f"{args.split}: {len(images)} faces; plain-crop accuracy {plain.mean():.4f}")
    rng = np.random.default_rng(args.seed)
    scenes = [composite(face, background, rng) for face, background in zip(images, backgrounds(len(images), rng))]
    for detector in args.detectors.split(","):
        faces.detect(scenes[0][0], detector)  # warm-up: the detector's weights
        started = time.perf_counter()
        found_at, crops, as_found, elsewhere, each = [], [], [], 0, []
        for index, (photo, square) in enumerate(scenes):
            searched = time.perf_counter()
            found = faces.detect(photo, detector)
            each.append(time.perf_counter() - searched)
            face, others = match(found, square)
            elsewhere += others
            if face is None:
                continue
            luma = gray(photo)
            found_at.append(index)
            crops.append(faces.crop(luma, face, detector))
            if args.level and face.eyes is not None:
                as_found.append(faces.crop(luma, unlevelled(face), detector))
        seconds = time.perf_counter() - started
        found_at = np.array(found_at, int)
        correct = labels_of(model, crops, class_names) == truth[found_at]
        same = plain[found_at]
        print(f"{detector}: found {len(found_at)} of {len(images)} ({len(found_at) / len(images):.1%}), "
              f"{elsewhere} faces elsewhere; accuracy on those found {correct.mean():.4f} vs their plain crops "
              f"{same.mean():.4f} (gap {100 * (same.mean() - correct.mean()):+.1f} points); {seconds:.0f} s, "
              f"detection {1000 * np.median(each):.1f} ms a photo (median)")
        if as_found and len(as_found) == len(crops):
            right = labels_of(model, as_found, class_names) == truth[found_at]
            print(f"{detector} cut as found, eyes not levelled: accuracy {right.mean():.4f} "
                  f"vs {correct.mean():.4f} as served (levelled)")


if __name__ == "__main__":
    main()
