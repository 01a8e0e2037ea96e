"""Opening untrusted encoded images: what the served model accepts, and within which limits.

The served model is a public endpoint, so an image is opened only if it is one of `FORMATS`, and
its size is checked from the header before any pixel is decoded (a small compressed PNG can declare
hundreds of megapixels). Then it becomes 8-bit grayscale the way a person would see it: EXIF
rotation applied, 16-bit samples scaled down (not clipped to white), and transparent or palette
images flattened onto white, as a browser shows them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_mlflow.errors import DataError

# Pillow's format names; GIF gives its first frame.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
FORMAT_NAMES = "PNG, JPEG, WebP, BMP or GIF"
MAX_PIXELS = 40_000_000  # per image, from its header, before decoding
MAX_IMAGES = 256  # per request
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_gray(data: bytes, index: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image in `data` as uint8 grayscale (H x W), upright (see `open_rgb`)."""
    return gray(open_rgb(data, index, max_pixels))


def gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 to H x W luma, as Pillow's ``convert("L")`` computes it."""
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)


def open_rgb(data: bytes, index: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image in `data` as uint8 RGB (H x W x 3), upright; DataError naming image `index` and
    the fix when it is not an accepted format, declares more than `max_pixels`, or is corrupt."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise DataError(
                        f"image {index} is {width} x {height} = {width * height / 1e6:.1f} megapixels, over "
                        f"the limit of {max_pixels / 1e6:g}; send a smaller image (or raise max_pixels)")
                image = ImageOps.exif_transpose(opened)  # phone photos are often stored sideways
                return _rgb(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"image {index} is too large to decode ({error}); send a smaller image") from error
    # Decoders raise many types on corrupt data (OSError, SyntaxError, ValueError, ...); every one
    # of them means the client sent a bad image, which must become a 4xx, not a 500.
    except Exception as error:
        reason = "not one of the accepted formats" if isinstance(error, UnidentifiedImageError) else str(error)
        raise DataError(f"image {index} could not be decoded ({reason}); expected a {FORMAT_NAMES} image") \
            from error


def _rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:  # 16-bit PNGs: 0..65535 down to 0..255, not clipped at 255
        samples = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(samples[..., None], 3, axis=2)
    if image.mode in ("P", "PA") or "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
