"""Drawing predictions on the photos and frames they came from: each face's box in its label's
colour, with the label and its probability above it, sized to the image."""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

# One colour per class of FER2013 (matplotlib's tab10), so a label reads the same in every image.
COLOURS = {"angry": (214, 39, 40), "disgust": (44, 160, 44), "fear": (148, 103, 189),
           "happy": (255, 127, 14), "sad": (31, 119, 180), "surprise": (227, 119, 194),
           "neutral": (127, 127, 127)}
OTHER = (23, 190, 207)


def draw(rgb: np.ndarray, faces: pd.DataFrame) -> np.ndarray:
    """A copy of `rgb` (H x W x 3 uint8) with each face of `faces` (rows of the predictions, for
    this image: x, y, w, h, label, probability) boxed and labelled; rows without a face are left out."""
    image = Image.fromarray(rgb)
    _paint(image, faces)
    return np.asarray(image)


def layer(height: int, width: int, faces: pd.DataFrame) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """What `draw` paints for `faces` on any image of this size: the (rows, columns) it covers and
    their RGB values (K x 3), so a video's frames that show the same faces are painted by one
    assignment each (``frame[where] = colours``), not drawn again."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    _paint(image, faces)
    pixels = np.asarray(image)
    where = np.nonzero(pixels[..., 3])
    return where, pixels[where][:, :3]


def _paint(image: Image.Image, faces: pd.DataFrame) -> None:
    canvas = ImageDraw.Draw(image)
    side = min(image.size)
    width = max(2, round(side / 250))
    font = _font(max(12, round(side / 30)))
    for face in faces[faces["face"] >= 0].itertuples():
        colour = COLOURS.get(face.label, OTHER)
        box = (face.x, face.y, face.x + face.w - 1, face.y + face.h - 1)
        canvas.rectangle(box, outline=colour, width=width)
        text = f"{face.label} {face.probability:.2f}"
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        height = bottom - top + 2 * width
        y = face.y - height if face.y >= height else face.y + face.h  # above the box, else below
        canvas.rectangle((face.x, y, face.x + right - left + 2 * width, y + height), fill=colour)
        canvas.text((face.x + width - left, y + width - top), text, fill=(255, 255, 255), font=font)


@cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own TrueType font: nothing to install
