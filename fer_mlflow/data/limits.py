"""What one request to the served model may ask for: a range per predict param, and a work budget.

The served model is a public endpoint, so every predict param is checked against its range
(`PARAM_RANGES`) before any work, and a request as a whole is bounded (`Limits`): how many images
it holds, how many pixels each and all of them declare (from their headers, before decoding), and
how many faces x views its network pass may see. An operator sets each limit where the model is
served, as an environment variable (``FER_MAX_PIXELS``, ...) or in the model config; see
docs/security-serving.md.

Free of numpy and Keras, so that anything may import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from fer_mlflow.errors import ConfigError

# Each numeric predict param: (low, high, kind), both ends included. Why each bound: tta_shift pads
# every crop by the shift on each side (4000 took 1.5 GB for one crop), and beyond half the face a
# view is edge pixels only; min_face below MTCNN's 12-pixel window makes it blow the photo up
# (12 / min_face times a side); max_faces and batch_size size the network pass and its memory.
PARAM_RANGES: dict[str, tuple[float, float, type]] = {
    "tta_rotation": (0.0, 45.0, float),  # degrees, each view turned either way
    "tta_zoom": (0.0, 0.5, float),  # fraction, each view zoomed in and out
    "tta_shift": (0, 24, int),  # pixels of the 48x48 face, each view shifted four ways
    "batch_size": (1, 1024, int),  # faces per Keras predict call
    "min_face": (12, 10_000, int),  # pixels: the smallest face searched for
    "max_faces": (1, 100, int),  # per image, the most confident first
}
# auto: crops as they are, larger photos searched; none: each image whole (`faces.CHOICES` is this)
DETECTOR_CHOICES = ("auto", "none", "mtcnn", "haar", "blazeface")

MAX_PIXELS = 40_000_000  # per image (all its frames), from its header, before decoding
MAX_IMAGES = 256  # per request: encoded images and pixel-array crops alike
MAX_REQUEST_PIXELS = 100_000_000  # per request, all images' declared pixels together
MAX_FACE_VIEWS = 4096  # per request: faces x test-time views the network sees (256 faces x 16 views)


@dataclass(frozen=True)
class Limits:
    """The work budget of one request; each field is set by the environment variable
    ``FER_<FIELD>`` (upper case), else by the model config's ``<field>``, else its default."""

    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    max_request_pixels: int = MAX_REQUEST_PIXELS
    max_face_views: int = MAX_FACE_VIEWS

    @classmethod
    def resolve(cls, config: Mapping | None = None, environ: Mapping[str, str] = os.environ) -> Limits:
        """The limits where the model is loaded: each from ``FER_<NAME>`` in `environ`, else
        `config`, else the default. ConfigError naming the setting when one is not a positive integer."""
        config = config or {}
        values = {}
        for field in fields(cls):
            variable = f"FER_{field.name.upper()}"
            raw, where = environ.get(variable), variable
            if not raw:
                raw, where = config.get(field.name), f"the model config's {field.name}"
            if raw is None or raw == "":
                continue
            try:
                value = int(raw)
            except (TypeError, ValueError):
                value = 0
            if value < 1:
                raise ConfigError(f"{where} is {raw!r}; expected a positive integer")
            values[field.name] = value
        return cls(**values)


def check_params(params: Mapping | None) -> None:
    """ConfigError naming the first predict param outside its documented range (`PARAM_RANGES`,
    ``tta`` a boolean, ``detector`` one of `DETECTOR_CHOICES`) and that range; None, the default, passes."""
    params = params or {}
    tta = params.get("tta")
    if tta is not None and not (isinstance(tta, bool) or type(tta).__name__ == "bool_"):
        raise ConfigError(f"param tta={tta!r} is not a boolean; expected true or false")
    detector = params.get("detector")
    if detector is not None and detector not in DETECTOR_CHOICES:
        raise ConfigError(f"param detector={detector!r} is not one of {', '.join(DETECTOR_CHOICES)}")
    for name, (low, high, kind) in PARAM_RANGES.items():
        value = params.get(name)
        if value is None:
            continue
        if not in_range(value, low, high, kind):
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"param {name}={value!r} is out of range; expected {what} from {low:g} to {high:g}")


def in_range(value, low: float, high: float, kind: type) -> bool:
    """Whether `value` is a finite number of `kind` (an int may stand for a float) within low..high."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    if not math.isfinite(number) or (kind is int and number != int(number)):
        return False
    return low <= number <= high
