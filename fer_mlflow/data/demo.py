"""A synthetic FER-like dataset drawn in code, so every stage runs without FER2013.

`make_demo` draws 48 x 48 grayscale cartoon faces whose brows, eyes and mouth show the seven FER2013
expressions, with jitter in pose, lighting, expression strength and pixel noise so that a classifier
has something to learn but not a trivial task. It then plants a known number of defects for the
cleaning stage to find (constant and over-exposed images, duplicates, cross-split leaks, conflicting
labels); the ``DEMO_*`` constants give their numbers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fer_mlflow.data.dataset import CLASS_NAMES, IMAGE_SIZE, SPLITS, Dataset

DISGUST_FRACTION = 1 / 3  # FER2013 has about a tenth as many disgust images; a third keeps it learnable
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test within each class
DEMO_BLANK_LEVELS = (0, 8, 128)  # constant images: two dark (mean rule), one mid-grey (blank rule)
DEMO_BLANK = len(DEMO_BLANK_LEVELS)
DEMO_NEAR_WHITE = 2  # over-exposed faces, mean pixel above 0.9 * 255 but not constant
DEMO_DUPLICATES = 5  # extra copies of train images, same label, inside train
DEMO_LEAKS = 3  # train copies of val or test images, same label
DEMO_CONFLICT_PAIRS = 2  # train copies of train images carrying a different label
MIN_PER_CLASS = 9  # disgust then still has an image in each split

_SUPERSAMPLE = 4  # draw at 4x and average down, which anti-aliases the strokes
_ANGLES = np.linspace(0, 2 * np.pi, 20, endpoint=False)
_CIRCLE = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # computed once: speed
_MOUTH_U = np.linspace(-1.0, 1.0, 13)  # positions across the mouth, corner to corner
_ACROSS = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)  # columns, for light from one side

# Expression parameters, in pixels of the 48 x 48 face frame (centre at 0, y grows downward).
# brow_height: brow y; brow_slant: inner end lower than outer by this much (angry > 0, sad < 0);
# eye_open: eye half-height; mouth_curve: corner lift (smile > 0); mouth_open: gap between lips;
# mouth_tilt: lift of one corner only; wrinkle: strength of the nose wrinkles of disgust.
_NEUTRAL = dict(brow_height=-9.0, brow_slant=0.0, brow_arch=0.0, eye_open=1.5, mouth_width=6.0,
                mouth_curve=0.0, mouth_open=0.0, mouth_tilt=0.0, mouth_thick=1.3, wrinkle=0.0)
_EXPRESSIONS = {
    "angry": dict(brow_height=-7.0, brow_slant=3.5, eye_open=1.0, mouth_width=4.5, mouth_curve=-0.8,
                  mouth_thick=2.0),
    "disgust": dict(brow_height=-7.0, brow_slant=1.5, eye_open=0.9, mouth_curve=-1.0, mouth_tilt=3.5,
                    mouth_thick=1.6, wrinkle=1.0),
    "fear": dict(brow_height=-11.5, brow_slant=-1.5, brow_arch=0.5, eye_open=2.6, mouth_width=5.5,
                 mouth_curve=-1.0, mouth_open=3.5),
    "happy": dict(brow_height=-9.5, eye_open=1.1, mouth_width=7.0, mouth_curve=3.5),
    "sad": dict(brow_height=-9.0, brow_slant=-3.0, eye_open=1.1, mouth_width=5.0, mouth_curve=-3.0),
    "surprise": dict(brow_height=-13.0, brow_arch=2.0, eye_open=3.1, mouth_width=3.5, mouth_open=7.5),
    "neutral": {},
}


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Points (20 x 2) of an ellipse outline, so it can be rotated like any other polygon."""
    return _CIRCLE * (rx, ry) + (cx, cy)


def _expression(label: int, rng: np.random.Generator) -> dict[str, float]:
    """The class's parameters at a random strength, each with a little independent jitter."""
    strength = float(rng.uniform(0.55, 1.0))  # weak expressions sit near neutral: the hard cases
    target = {**_NEUTRAL, **_EXPRESSIONS[CLASS_NAMES[label]]}
    jitter = rng.standard_normal(len(_NEUTRAL)).tolist()  # Python floats: faster scalar arithmetic
    scale = dict(brow_height=0.7, brow_slant=0.5, brow_arch=0.3, eye_open=0.2, mouth_width=0.5,
                 mouth_curve=0.5, mouth_open=0.3, mouth_tilt=0.3, mouth_thick=0.15, wrinkle=0.0)
    return {
        key: _NEUTRAL[key] + strength * (target[key] - _NEUTRAL[key]) + scale[key] * noise
        for (key, noise) in zip(_NEUTRAL, jitter)
    }


def render_face(label: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one face showing expression `label` (an index into CLASS_NAMES); returns 48 x 48 uint8.

    Everything random (pose, lighting, expression strength, noise) comes from `rng`, so the same
    generator state gives the same pixels.
    """
    p = _expression(label, rng)
    angle = np.deg2rad(rng.normal(0.0, 6.0))
    scale = rng.uniform(0.85, 1.1)
    centre = np.array([24.0, 25.0]) + rng.normal(0.0, 1.5, 2)
    background, skin, hair = (np.array([25.0, 80.0, 10.0]) + rng.random(3) * (190, 130, 80)).tolist()
    if abs(skin - background) < 30:  # keep the face outline visible
        background = min(230.0, max(20.0, skin + (45 if background > skin else -45)))
    ink = int(max(0.0, skin - rng.uniform(55, 100)))  # brows, eyes and lips darker than skin
    tilt_side = 1.0 if rng.random() < 0.5 else -1.0  # disgust raises either corner of the mouth

    def stroke(pixels: float) -> int:
        return max(1, round(pixels * scale * _SUPERSAMPLE))

    # (ImageDraw method, points in the face frame, style), drawn in order.
    shapes = [("polygon", _ellipse(0, -4, 17.5, 20), dict(fill=int(hair))),
              ("polygon", _ellipse(0, 0, 16, 20), dict(fill=int(skin)))]
    eye_open = max(0.4, p["eye_open"])
    white = min(255, int(skin) + 35)  # the eye's white, lighter than skin
    for side in (-1, 1):
        brow = [(side * 3.5, p["brow_height"] + p["brow_slant"] / 2),
                (side * 7.0, p["brow_height"] - p["brow_arch"]),
                (side * 11.0, p["brow_height"] - p["brow_slant"] / 2)]
        # A wide outline costs ImageDraw a mask per shape; a dark ellipse under a light one is cheaper.
        shapes += [("line", np.array(brow), dict(fill=ink, width=stroke(1.8), joint="curve")),
                   ("polygon", _ellipse(side * 7.0, -3.0, 3.6, eye_open + 0.6), dict(fill=ink)),
                   ("polygon", _ellipse(side * 7.0, -3.0, 3.0, eye_open), dict(fill=white)),
                   ("polygon", _ellipse(side * 7.0, -3.0, 1.3, min(1.3, eye_open)), dict(fill=ink))]
        if p["wrinkle"] > 0:
            shapes.append(("line", np.array([(side * 2.5, 2.5), (side * 4.5, 0.0)]),
                           dict(fill=ink, width=stroke(0.7))))
    nose = np.array([(0.0, -1.0), (0.0, 4.5), (-1.5, 5.0)])
    shapes.append(("line", nose, dict(fill=int((skin + ink) / 2), width=stroke(0.8))))

    u = _MOUTH_U
    middle = 11.0 - p["mouth_curve"] * (u**2 - 0.5) - p["mouth_tilt"] * ((tilt_side * u + 1) / 2) ** 2
    x = u * p["mouth_width"]
    gap = max(0.0, p["mouth_open"]) / 2 * np.sqrt(1 - u**2)
    if gap.max() > 0.6:
        lips = np.concatenate([np.stack([x, middle - gap], 1), np.stack([x, middle + gap], 1)[::-1]])
        shapes.append(("polygon", lips, dict(fill=int(ink * 0.6))))
    else:
        shapes.append(("line", np.stack([x, middle], 1), dict(fill=ink, width=stroke(p["mouth_thick"]))))

    # Pose moves all points in one product rather than rotating a bitmap or each shape: most of
    # the build time would otherwise go there.
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.concatenate([points for _, points, _ in shapes])
    moved = (points @ np.array([[cos, sin], [-sin, cos]]) * scale + centre) * _SUPERSAMPLE
    flat, start = moved.ravel().tolist(), 0
    size = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("L", (size, size), int(background))
    draw = ImageDraw.Draw(canvas)
    for method, points, style in shapes:
        getattr(draw, method)(flat[start : start + 2 * len(points)], **style)
        start += 2 * len(points)

    face = np.frombuffer(canvas.reduce(_SUPERSAMPLE).tobytes(), np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    light = 1 + rng.uniform(-0.15, 0.15) * _ACROSS  # light from one side
    noise = rng.standard_normal(face.shape, dtype=np.float32) * rng.uniform(2.0, 7.0)
    return np.clip(np.rint(face * light + noise), 0, 255).astype(np.uint8)


def _split_sizes(count: int) -> tuple[int, int, int]:
    """Train/val/test sizes for one class, with at least one image in val and test."""
    val = max(1, round(count * SPLIT_FRACTIONS[1]))
    test = max(1, round(count * SPLIT_FRACTIONS[2]))
    return count - val - test, val, test


def make_demo(seed: int = 0, per_class: int = 300) -> Dataset:
    """A synthetic FER-like `Dataset`: `per_class` faces per class (disgust about a third of that),
    split 70/15/15 per class, plus the planted defects the ``DEMO_*`` constants count.

    The same `seed` gives byte-identical arrays. Ids read ``demo/<split>/<class>/<number>`` for drawn
    faces and ``demo/train/<class>/<defect>-<k>`` for planted ones.
    """
    if per_class < MIN_PER_CLASS:
        raise ValueError(f"per_class must be at least {MIN_PER_CLASS} so every split holds every "
                         f"class; got {per_class}")
    rng = np.random.default_rng(seed)
    images, labels, splits, ids = [], [], [], []

    def add(image: np.ndarray, label: int, split: str, name: str) -> None:
        images.append(image)
        labels.append(label)
        splits.append(split)
        ids.append(f"demo/{split}/{CLASS_NAMES[label]}/{name}")

    for label, class_name in enumerate(CLASS_NAMES):
        count = round(per_class * DISGUST_FRACTION) if class_name == "disgust" else per_class
        split_of = np.repeat(SPLITS, _split_sizes(count))
        for number, split in enumerate(split_of):
            add(render_face(label, rng), label, str(split), f"{number:05d}")

    labels_so_far, splits_so_far = np.array(labels), np.array(splits)
    train = np.flatnonzero(splits_so_far == "train")
    held_out = np.flatnonzero(splits_so_far != "train")
    # Distinct sources, so each planted copy forms its own identical-pixel pair.
    sources = rng.choice(train, DEMO_DUPLICATES + DEMO_CONFLICT_PAIRS, replace=False)
    for k, level in enumerate(DEMO_BLANK_LEVELS):
        label = int(rng.integers(len(CLASS_NAMES)))
        add(np.full((IMAGE_SIZE, IMAGE_SIZE), level, np.uint8), label, "train", f"blank-{k}")
    for k in range(DEMO_NEAR_WHITE):
        label = int(rng.integers(len(CLASS_NAMES)))
        face = render_face(label, rng).astype(np.float32)
        add(np.rint(235 + face * (20 / 255)).astype(np.uint8), label, "train", f"near-white-{k}")
    for k, source in enumerate(sources[:DEMO_DUPLICATES]):
        add(images[source], int(labels_so_far[source]), "train", f"duplicate-{k}")
    for k, source in enumerate(rng.choice(held_out, DEMO_LEAKS, replace=False)):
        add(images[source], int(labels_so_far[source]), "train", f"leak-{k}")
    for k, source in enumerate(sources[DEMO_DUPLICATES:]):
        shift = int(rng.integers(1, len(CLASS_NAMES)))  # any label but its own
        other = (int(labels_so_far[source]) + shift) % len(CLASS_NAMES)
        add(images[source], other, "train", f"conflict-{k}")
    return Dataset(np.stack(images), np.array(labels), np.array(splits), np.array(ids))
