"""The shipped models: networks this project trained on FER2013, inside the package, so that the
first answer needs no training.

Two variants (`VARIANTS`): ``accurate`` (the default, the most accurate network the project has
trained) and ``fast`` (a narrower network distilled from it: several times the crops a second,
about six points less accurate on PublicTest; BENCHMARKS.md). ``files/<variant>/`` holds ``model.keras`` (the network: 48x48
grey pixels 0..255 in, 7 probabilities out) and ``record.json``: how it was made (commands, commit,
data and its digest, minutes and epochs, the
per-epoch curves), what it serves with (test-time views, temperature), its SHA-256, and its scores
(validation, PublicTest as served: accuracy, F1, per class, confusion matrix, calibration). The
model file is checked against that checksum each time it is read (`keras_model`).

`served_model` loads it as the served pyfunc model (saved once to a cache folder), what `predict`
uses when the registry has no champion yet; the ``pretrained`` stage (`fer_mlflow.stages.pretrained`)
puts it in the user's tracking store and registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import mlflow

from fer_mlflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FILES = Path(__file__).resolve().parent / "files"
VARIANTS = ("accurate", "fast")
DEFAULT_VARIANT = "accurate"
MODEL_NAME, RECORD_NAME = "model.keras", "record.json"
SHA_TAG = "fer.shipped_sha256"
ALIAS = "pretrained"  # the default variant's registry alias (`alias`)


def check_variant(variant: str) -> str:
    """`variant` when it is one of `VARIANTS`; ConfigError in one line otherwise."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown shipped model {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def model_file(variant: str = DEFAULT_VARIANT) -> Path:
    """Where the shipped `variant`'s network is (``files/<variant>/model.keras``)."""
    return FILES / check_variant(variant) / MODEL_NAME


def alias(variant: str = DEFAULT_VARIANT) -> str:
    """The registry alias the ``pretrained`` stage gives the shipped `variant`: `ALIAS`, or ALIAS-<variant>."""
    return ALIAS if check_variant(variant) == DEFAULT_VARIANT else f"{ALIAS}-{variant}"


def card_page(variant: str = DEFAULT_VARIANT) -> str:
    """The name of the shipped `variant`'s model card under docs/ (`card`)."""
    return "model-card.md" if check_variant(variant) == DEFAULT_VARIANT else f"model-card-{variant}.md"


def record(variant: str = DEFAULT_VARIANT) -> dict:
    """The shipped `variant`'s record (``files/<variant>/record.json``)."""
    return _read_record(FILES / check_variant(variant) / RECORD_NAME)


def networks(found: dict) -> list[dict]:
    """The training blocks of the networks in a shipped `found` record (each with its epochs,
    minutes and per-epoch ``history``): the one network's, or each ensemble member's, a member that
    is itself an ensemble (an earlier shipped ensemble averaged with new networks) giving its own
    members in its place, each with ``within``: the title of the ensemble it came in."""
    return [network for network, _ in _weighted(found["training"])]


def network_weights(found: dict) -> list[float]:
    """The share of each of `networks(found)` in the served probabilities: an ensemble's weight
    times the weights of the ensembles it sits in (1.0 for one network)."""
    return [weight for _, weight in _weighted(found["training"])]


def _weighted(training: dict, weight: float = 1.0, within: str = "") -> list[tuple[dict, float]]:
    members = training.get("members")
    if not members:
        return [({**training, "within": within} if within else training, weight)]
    weights = [float(w) for w in training["params"]["weights_resolved"].split(",")]
    return [found for member, share in zip(members, weights)
            for found in _weighted(member, weight * share, member.get("title", "") if member.get("members") else within)]


@cache
def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"the shipped model's record {path} cannot be read ({error}); "
                        "reinstall fer-mlflow (pip install --force-reinstall) or check out the file again") from error


def checked_model_file(variant: str = DEFAULT_VARIANT) -> Path:
    """The shipped `variant`'s model file, once its SHA-256 matches the record's; DataError otherwise."""
    expected, path = record(variant)["sha256"], model_file(variant)
    try:
        found = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise DataError(f"the shipped model {path} cannot be read ({error}); reinstall fer-mlflow "
                        "or check out the file again (git lfs is not used: it is a plain file)") from error
    if found != expected:
        raise DataError(f"the shipped model {path} has SHA-256 {found[:12]}..., not the recorded "
                        f"{expected[:12]}...; it is damaged or was changed: reinstall fer-mlflow or check it out again")
    return path


def keras_model(variant: str = DEFAULT_VARIANT):
    """The shipped `variant`'s network, checked against its recorded checksum."""
    import keras  # deferred: TensorFlow takes seconds to import

    return keras.models.load_model(checked_model_file(variant), compile=False)


def served_model(variant: str = DEFAULT_VARIANT) -> mlflow.pyfunc.PyFuncModel:
    """The shipped `variant` as the served pyfunc model (its views and temperature by default), saved
    once to ``$XDG_CACHE_HOME/fer-mlflow`` (default ``~/.cache``) and loaded from there."""
    from fer_mlflow.serving import pyfunc_model

    folder = _cache_folder() / f"pretrained-{record(variant)['sha256'][:16]}"
    if not (folder / "MLmodel").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
            pyfunc_model.save_model(keras_model(variant), Path(scratch) / "model", **served_arguments(variant))
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder of an interrupted save
            os.replace(Path(scratch) / "model", folder)  # whole or not at all, also for two at once
    return mlflow.pyfunc.load_model(str(folder))


def describe(variant: str = DEFAULT_VARIANT) -> str:
    """One line naming the shipped `variant` and its recorded PublicTest accuracy."""
    found = record(variant)
    test = found["evaluation"]
    return (f"the shipped model ({found['title']}; {test['split']}_accuracy {test['metrics']['test_accuracy']:.4f} "
            f"on {test['data']} {test['part']})")


def served_arguments(variant: str = DEFAULT_VARIANT) -> dict:
    """What the shipped `variant` is served with (`pyfunc_model.save_model`'s keywords): its class
    names, test-time views and temperature, as recorded."""
    from fer_mlflow.serving.views import Settings

    found = record(variant)
    return {"class_names": found["class_names"], "settings": Settings(**found["settings"]),
            "temperature": found["temperature"]}


def _cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fer-mlflow"
