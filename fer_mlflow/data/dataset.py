"""The in-memory dataset every stage shares, and its one-file artifact form.

A `Dataset` holds uint8 images (N x 48 x 48), int labels in FER2013's own code order, a split name
per image and a stable id per image. `save` writes it as a single compressed ``.npz`` with a schema
version; `load` reads it back and checks it.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_mlflow.errors import DataError

# FER2013's label codes: the index is the code in fer2013.csv.
CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 48
SCHEMA_VERSION = 1


def model_input(images: np.ndarray) -> np.ndarray:
    """uint8 faces (N x 48 x 48) as every network here takes them: float32 N x 48 x 48 x 1, the raw
    0..255 grey levels (each network rescales its input itself)."""
    return images.astype(np.float32)[..., np.newaxis]


@dataclass
class Dataset:
    """Images (uint8, N x 48 x 48), labels (int64), splits (str) and ids (str), all of length N."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    ids: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.splits = np.asarray(self.splits, dtype="<U5")
        self.ids = np.asarray(self.ids, dtype=str)
        n = len(self.images)
        if self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"images must be N x 48 x 48, got shape {self.images.shape}")
        if not (len(self.labels) == len(self.splits) == len(self.ids) == n):
            raise DataError("images, labels, splits and ids must have the same length")
        unknown = set(np.unique(self.splits)) - set(SPLITS)
        if unknown:
            raise DataError(f"unknown split names {sorted(unknown)}; expected {list(SPLITS)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must be in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: np.ndarray) -> Dataset:
        """The images where `mask` (bool array or index array) selects them."""
        return Dataset(
            self.images[mask], self.labels[mask], self.splits[mask], self.ids[mask], self.class_names
        )

    def split(self, name: str) -> Dataset:
        """The images of one split ('train', 'val' or 'test')."""
        return self.subset(self.splits == name)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class for each split present: {split: {class: count}}."""
        result = {}
        for split in SPLITS:
            labels = self.labels[self.splits == split]
            if len(labels):
                per_class = np.bincount(labels, minlength=len(self.class_names))
                result[split] = {c: int(k) for c, k in zip(self.class_names, per_class)}
        return result

    def digest(self) -> str:
        """A short content hash: the same pixels, labels, splits and ids give the same digest,
        whatever set these images were taken from."""
        h = hashlib.sha256()
        # A subset keeps its parent's id width (numpy pads every id to the longest of the whole
        # set), so the ids are hashed at the width of this set's own longest id. For a whole
        # dataset, or a split whose longest id is as long as the set's, that is the width used
        # before, so digests stored by earlier runs still compare.
        ids = np.asarray(self.ids.tolist(), dtype=str)
        for array in (self.images, self.labels, self.splits, ids):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(json.dumps(list(self.class_names)).encode())
        return h.hexdigest()[:16]


def stratified_val_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A bool mask choosing `fraction` of each class (at least one image where a class has two)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(len(members) * fraction))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        mask[rng.choice(members, size=take, replace=False)] = True
    return mask


def save(dataset: Dataset, path: str | Path) -> Path:
    """Write `dataset` as one compressed .npz file with a schema version; returns the path."""
    path = Path(path)
    np.savez_compressed(
        path,
        images=dataset.images,
        labels=dataset.labels,
        splits=dataset.splits,
        ids=dataset.ids,
        class_names=np.asarray(dataset.class_names),
        schema_version=np.asarray(SCHEMA_VERSION),
    )
    return path


def load(path: str | Path) -> Dataset:
    """Read a dataset artifact written by `save`, checking its schema version."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            version = int(npz["schema_version"])
            if version != SCHEMA_VERSION:
                raise DataError(
                    f"{path} has dataset schema version {version}, this version reads "
                    f"{SCHEMA_VERSION}; re-run the clean entry point to rebuild it"
                )
            return Dataset(
                npz["images"],
                npz["labels"],
                npz["splits"],
                npz["ids"],
                tuple(str(c) for c in npz["class_names"]),
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:  # truncated: BadZipFile
        raise DataError(
            f"{path} is not a dataset artifact of the clean entry point ({error}); "
            "pass a run's dataset URI or a raw FER2013 source"
        ) from error
