"""Test-time views: the settings a model predicts with, and the one implementation of the views.

Test-time augmentation (TTA) is a property of the served model, not only of `evaluate`: the pyfunc
model (`pyfunc_model`) reads its default `Settings` from its model config, takes them per call as
predict params, and averages its Keras model's probabilities over `views` here; `evaluate` scores a
model by calling that same `predict`, so what is scored is what is served.

Nothing here imports Keras or TensorFlow: the command line imports this module to check options
before any framework loads, and a model served through ONNX predicts with its views without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

# The extra test-time views, each also mirrored (chosen on validation data: BENCHMARKS.md): the face
# rotated TTA_ROTATION degrees either way, zoomed TTA_ZOOM in and out, and shifted TTA_SHIFT pixels
# up, down, left and right; 0 turns a kind off.
TTA_ROTATION = 10.0
TTA_ZOOM = 0.1
TTA_SHIFT = 0
BATCH_SIZE = 256  # images per Keras predict call; changes memory, not the answer
VIEW_INPUTS = 4096  # with tta, views (of several faces) made and sent to the network together

# A view: (pixels down, pixels right, degrees anticlockwise, magnification).
IDENTITY = (0, 0, 0.0, 1.0)


@dataclass(frozen=True)
class Settings:
    """How a model predicts: on the face alone (tta False) or averaged over `views`."""

    tta: bool = False
    tta_rotation: float = TTA_ROTATION
    tta_zoom: float = TTA_ZOOM
    tta_shift: int = TTA_SHIFT

    @classmethod
    def from_mapping(cls, values: dict | None, base: Settings | None = None) -> Settings:
        """`base` (default: the defaults) with the settings named in `values` replaced; other keys
        (class names, batch size) are ignored."""
        base = base or cls()
        known = {k: values[k] for k in asdict(base) if values and values.get(k) is not None}
        settings = replace(base, **known)
        return replace(settings, tta=bool(settings.tta), tta_rotation=float(settings.tta_rotation),
                       tta_zoom=float(settings.tta_zoom), tta_shift=int(settings.tta_shift))

    @property
    def views(self) -> list[tuple[int, int, float, float]]:
        return tta_views(self.tta_shift, self.tta_rotation, self.tta_zoom) if self.tta else [IDENTITY]

    @property
    def view_count(self) -> int:
        """Predictions averaged per face: each view and its mirror with tta, else 1."""
        return 2 * len(self.views) if self.tta else 1

    @property
    def key(self) -> str:
        """A canonical text naming what changes the predictions; equal keys predict alike."""
        if not self.tta:
            return "tta=false"
        return f"tta=true,rotation={self.tta_rotation:g},zoom={self.tta_zoom:g},shift={self.tta_shift}"

    def describe(self) -> str:
        """A few words for run names and descriptions."""
        return f"{self.view_count} views (tta)" if self.tta else "plain"


def tta_views(shift: int, rotation: float, zoom: float) -> list[tuple[int, int, float, float]]:
    """The test-time views before mirroring: the face, then each kind whose knob is not 0."""
    views = [IDENTITY]
    if shift:
        views += [(shift, 0, 0.0, 1.0), (-shift, 0, 0.0, 1.0), (0, shift, 0.0, 1.0), (0, -shift, 0.0, 1.0)]
    if rotation:
        views += [(0, 0, rotation, 1.0), (0, 0, -rotation, 1.0)]
    if zoom:
        views += [(0, 0, 0.0, 1.0 + zoom), (0, 0, 0.0, 1.0 - zoom)]
    return views


def probabilities(keras_model, pixels: np.ndarray, settings: Settings,
                  batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Class probabilities (N x classes) of `keras_model` for float32 `pixels` (N x 48 x 48 x 1).

    With ``settings.tta``, the mean over `settings.views` of each face, each view also mirrored:
    with the defaults, the face rotated 10 degrees either way and zoomed 10% in and out, 10 views
    in all; with every knob at 0, the face and its mirror alone.
    """
    if not settings.tta:
        return np.asarray(keras_model.predict(pixels, batch_size=batch_size, verbose=0))
    # Up to VIEW_INPUTS views of the faces at a time: every view of a face in one network call, since
    # each call costs milliseconds whatever its batch (for one face, most of the time), while bounding
    # the memory of many faces' views.
    step = max(1, VIEW_INPUTS // settings.view_count)
    return np.concatenate([_mean_over_views(keras_model, pixels[start:start + step], settings, batch_size)
                           for start in range(0, len(pixels), step)])


def _mean_over_views(keras_model, pixels: np.ndarray, settings: Settings, batch_size: int) -> np.ndarray:
    """`probabilities` with tta for a few faces: all their views through the network at once, then
    summed view by view in `settings.views` order, each view before its mirror."""
    moved = [transformed(pixels, *view) for view in settings.views]
    inputs = [each for faces in moved for each in (faces, faces[:, :, ::-1])]
    found = np.asarray(keras_model.predict(np.concatenate(inputs), batch_size=batch_size, verbose=0))
    total = 0.0
    for view in found.reshape(len(inputs), len(pixels), -1):
        total = total + view
    return total / settings.view_count


def transformed(images: np.ndarray, dy: int = 0, dx: int = 0, degrees: float = 0.0,
                scale: float = 1.0) -> np.ndarray:
    """`images` (N x H x W x C) rotated `degrees` anticlockwise and magnified `scale` times about
    their centre (bilinear), then moved down `dy` and right `dx` pixels; edge pixels are repeated in.
    """
    if degrees or scale != 1.0:
        images = _affine(images, _transform(images.shape, degrees, scale))
    return shifted(images, dy, dx)


def _transform(shape: tuple, degrees: float, scale: float) -> np.ndarray:
    """Keras' 8-number projective transform turning an image of `shape` (N x H x W x C) `degrees`
    anticlockwise and magnifying it `scale` times about its centre."""
    height, width = shape[1:3]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    # keras' transform maps each output pixel (x, y) to the input point it samples.
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    return np.array([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0], np.float32)


def _affine(images: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """`images` (N x H x W x C) each sampled through `transform` (Keras' 8 numbers, the last two 0):
    bilinear, coordinates outside the image moved to its nearest edge. The arithmetic of TensorFlow's
    ``ImageProjectiveTransformV3`` (what ``keras.ops.image.affine_transform`` runs; the same float32
    answer, pixel for pixel) in numpy, so that the views need no TensorFlow."""
    height, width = images.shape[1:3]
    a = transform.astype(np.float32)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    x = np.clip(a[0] * cols + a[1] * rows + a[2], 0, width - 1)
    y = np.clip(a[3] * cols + a[4] * rows + a[5], 0, height - 1)
    left, top = np.floor(x), np.floor(y)
    fx, fy = (x - left)[..., np.newaxis], (y - top)[..., np.newaxis]
    left, top = left.astype(np.intp), top.astype(np.intp)
    right, bottom = np.minimum(left + 1, width - 1), np.minimum(top + 1, height - 1)
    images = images.astype(np.float32, copy=False)
    upper = (1 - fx) * images[:, top, left] + fx * images[:, top, right]
    lower = (1 - fx) * images[:, bottom, left] + fx * images[:, bottom, right]
    return (1 - fy) * upper + fy * lower


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`images` (N x H x W x C) moved down `dy` and right `dx` pixels, the edge rows repeated in."""
    pad = max(abs(dy), abs(dx))
    if not pad:
        return images
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, pad - dy:pad - dy + height, pad - dx:pad - dx + width]
