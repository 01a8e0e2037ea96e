"""Opening untrusted encoded images: what the served model accepts, and within which limits.

The served model is a public endpoint, so an image is opened only if it is one of `FORMATS`, and
its size is checked from the header before any pixel is decoded (a small compressed PNG can declare
hundreds of megapixels). An animated image declares its size once per frame: only the first frame
is read, but all of them count, so a GIF of 10,000 frames is refused rather than accepted. Then it
becomes 8-bit grayscale the way a person would see it: EXIF rotation applied, 16-bit samples
scaled down (not clipped to white), and transparent or palette images flattened onto white, as a
browser shows them.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_mlflow.data.dataset import IMAGE_SIZE
from fer_mlflow.errors import DataError
from fer_mlflow.data.limits import MAX_IMAGES, MAX_PIXELS  # noqa: F401  (re-exported: their old home)

# Pillow's format names; an animated GIF, PNG or WebP gives its first frame.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
FORMAT_NAMES = "PNG, JPEG, WebP, BMP or GIF"
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_gray(data: bytes, index: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image in `data` as uint8 grayscale (H x W), upright (see `open_rgb`)."""
    return gray(open_rgb(data, index, max_pixels))


def gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 to H x W luma, as Pillow's ``convert("L")`` computes it."""
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)


def declared_pixels(data: bytes, index: int = 0, max_pixels: int = MAX_PIXELS) -> int:
    """The pixels `data`'s header declares (width x height x frames), read without decoding any;
    DataError naming image `index` and the fix when over `max_pixels` or not an accepted image."""
    with _opened(data, index, max_pixels) as (_, pixels):
        return pixels


def open_rgb(data: bytes, index: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image in `data` as uint8 RGB (H x W x 3), upright; DataError naming image `index` and
    the fix when it is not an accepted format, declares more than `max_pixels`, or is corrupt."""
    with _opened(data, index, max_pixels) as (opened, _):
        try:
            image = ImageOps.exif_transpose(opened)  # phone photos are often stored sideways
            return _rgb(image)
        except Exception as error:
            raise _undecodable(index, error) from error


@contextmanager
def _opened(data: bytes, index: int, max_pixels: int):
    """Pillow's lazily opened image of `data` (header read, no pixel decoded) and its declared
    pixels, checked against `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            # A GIF's frames are counted by walking its blocks without decoding them: work bounded
            # by the body's size (about 16 ms a megabyte); PNG and WebP state the count in a header.
            width, height, frames = *opened.size, getattr(opened, "n_frames", 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"image {index} is too large to decode ({error}); send a smaller image") from error
    except Exception as error:
        raise _undecodable(index, error) from error
    with opened:
        pixels = width * height * frames
        if pixels > max_pixels:
            size = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
            raise DataError(f"image {index} is {size} = {pixels / 1e6:.1f} megapixels, over the limit of "
                            f"{max_pixels / 1e6:g}; send a smaller image (or raise max_pixels)")
        yield opened, pixels


def _undecodable(index: int, error: Exception) -> DataError:
    """Decoders raise many types on corrupt data (OSError, SyntaxError, ValueError, ...); every one
    of them means the client sent a bad image, which must become a 4xx, not a 500."""
    if isinstance(error, DataError):
        return error
    reason = "not one of the accepted formats" if isinstance(error, UnidentifiedImageError) else str(error)
    return DataError(f"image {index} could not be decoded ({reason}); expected a {FORMAT_NAMES} image")


def _rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:  # 16-bit PNGs: 0..65535 down to 0..255, not clipped at 255
        samples = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(samples[..., None], 3, axis=2)
    if image.mode in ("P", "PA") or "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def whole(gray_image: np.ndarray) -> np.ndarray:
    """A grayscale image (H x W uint8), whole, as a 48x48 face crop."""
    image = Image.fromarray(gray_image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
