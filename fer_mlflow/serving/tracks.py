"""Following each face through a video: which boxes of consecutive analysed frames are one person.

SORT (Bewley et al., "Simple Online and Realtime Tracking", ICIP 2016) without the Kalman filter's
noise model: each track's box is predicted to move on as it moved between its last two frames
(SORT's constant-velocity model), then the faces of the frame and the live tracks are matched one to
one by the Hungarian algorithm on the overlap (IoU) of each face with each predicted box, a pair
counting only at `MIN_IOU` or more. Both matter when frames are sampled: at 2 frames a second, a face
crossing the picture in 8 s moves half its width between them, too far for SORT's bare 0.3.
An unmatched face starts a new track; a track unmatched for more than `MAX_MISSED` analysed frames
in a row ends, so a face the detector misses once keeps its id. Ids count from 0 in the order tracks
start. Boxes alone, no appearance: two faces that cross may swap ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

MIN_IOU = 0.1  # SORT's 0.3 assumes every frame: sampled, a face's first move can take it to 0.25
MAX_MISSED = 2  # analysed frames a track may miss before it ends (SORT's max_age is 1 at every frame)


def iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of each box (N x 4: x, y, w, h) with each of `others` (M x 4): N x M."""
    boxes, others = np.asarray(boxes, float)[:, None], np.asarray(others, float)[None]
    left = np.maximum(boxes[..., 0], others[..., 0])
    top = np.maximum(boxes[..., 1], others[..., 1])
    right = np.minimum(boxes[..., 0] + boxes[..., 2], others[..., 0] + others[..., 2])
    bottom = np.minimum(boxes[..., 1] + boxes[..., 3], others[..., 1] + others[..., 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = boxes[..., 2] * boxes[..., 3] + others[..., 2] * others[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def track(frames: Iterable[np.ndarray], min_iou: float = MIN_IOU, max_missed: int = MAX_MISSED) -> list[np.ndarray]:
    """The track id of each face, frame by frame: `frames` are the boxes (K x 4: x, y, w, h) of each
    analysed frame in order (K may be 0); returns one int array of K ids per frame."""
    live: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # id -> (latest box, its move a frame, missed)
    next_id, result = 0, []
    for boxes in frames:
        boxes = np.asarray(boxes, float).reshape(-1, 4)
        ids = np.full(len(boxes), -1)
        names = list(live)
        if names and len(boxes):
            predicted = np.stack([box + move * (missed + 1) for box, move, missed in live.values()])
            overlap = iou(predicted, boxes)
            for row, column in zip(*linear_sum_assignment(overlap, maximize=True)):
                if overlap[row, column] >= min_iou:
                    ids[column] = names[row]
        for name in names:
            if name not in ids:
                box, move, missed = live.pop(name)
                if missed < max_missed:
                    live[name] = (box, move, missed + 1)
        for column, name in enumerate(ids):
            if name >= 0:
                box, _, missed = live[name]
                live[name] = (boxes[column], (boxes[column] - box) / (missed + 1), 0)
            else:
                ids[column], next_id = next_id, next_id + 1
                live[int(ids[column])] = (boxes[column], np.zeros(4), 0)
        result.append(ids)
    return result
