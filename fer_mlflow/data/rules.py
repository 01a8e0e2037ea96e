"""The cleaning rules, as pure functions over a `Dataset`.

Rules run in this order, each on what the earlier ones left, and each records what it removed:
1. ``mean_outlier``: the report's rule, mean pixel / 255 <= mean_low or >= mean_high;
2. ``blank``: near-constant images (pixel standard deviation below ``blank_std`` grey levels);
3. ``conflicting_labels``: pixel-identical images carrying different labels (all copies go: no one
   of them can be trusted);
4. ``leakage``: an image of train whose pixels also appear in val or test, and one of val whose pixels
   appear in test, is dropped from the earlier split, so evaluation stays honest;
5. ``duplicates``: pixel-identical images within one split, keeping the first.
Only the splits in ``CleanConfig.splits`` lose images (train and val by default): the test split stays
whole so that test figures compare with published ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fer_mlflow.data.dataset import Dataset

RULES = ("mean_outlier", "blank", "conflicting_labels", "leakage", "duplicates")


@dataclass(frozen=True)
class CleanConfig:
    """Cleaning thresholds and switches; defaults follow the report where it had a rule."""

    mean_low: float = 0.1  # the report's lower bound on mean pixel / 255
    mean_high: float = 0.9  # the report's upper bound
    blank_std: float = 2.0  # grey levels; a face has far more contrast than this
    drop_conflicts: bool = True
    drop_leakage: bool = True
    drop_duplicates: bool = True
    splits: tuple[str, ...] = ("train", "val")  # which splits the rules may remove images from


@dataclass
class CleanResult:
    """The cleaned dataset, and for each rule the indices (into the input) of the images it removed."""

    dataset: Dataset
    removed: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def removed_total(self) -> int:
        return int(sum(len(v) for v in self.removed.values()))


def pixel_groups(images: np.ndarray) -> np.ndarray:
    """A group id per image; images share an id exactly when their pixels are identical."""
    seen: dict[bytes, int] = {}
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return np.fromiter((seen.setdefault(row.tobytes(), len(seen)) for row in flat), np.int64, len(flat))


def clean(dataset: Dataset, config: CleanConfig = CleanConfig()) -> CleanResult:
    """Apply the rules of the module docstring to `dataset`; the input is not modified."""
    keep = np.ones(len(dataset), dtype=bool)
    cleanable = np.isin(dataset.splits, config.splits)
    flat = dataset.images.reshape(len(dataset), -1)
    removed = {}

    def drop(rule: str, flagged: np.ndarray) -> None:
        hit = flagged & keep & cleanable
        removed[rule] = np.flatnonzero(hit)
        keep[hit] = False

    mean = flat.mean(axis=1) / 255.0
    drop("mean_outlier", (mean <= config.mean_low) | (mean >= config.mean_high))
    drop("blank", flat.std(axis=1) < config.blank_std)

    groups = pixel_groups(dataset.images)
    if config.drop_conflicts:
        drop("conflicting_labels", _conflicting(groups, dataset.labels, keep))
    if config.drop_leakage:
        drop("leakage", _leaked(groups, dataset.splits, keep))
    if config.drop_duplicates:
        drop("duplicates", _repeated(groups, dataset.splits, keep))
    return CleanResult(dataset.subset(keep), removed)


def _conflicting(groups: np.ndarray, labels: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Images whose identical-pixel group (among the live images) holds more than one label."""
    labels_of: dict[int, set[int]] = {}
    for g, label in zip(groups[alive], labels[alive]):
        labels_of.setdefault(int(g), set()).add(int(label))
    bad = [g for g, found in labels_of.items() if len(found) > 1]
    return np.isin(groups, bad) & alive


def _leaked(groups: np.ndarray, splits: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Train images also present in val or test, and val images also present in test."""
    in_test = np.isin(groups, groups[alive & (splits == "test")])
    in_val = np.isin(groups, groups[alive & (splits == "val")])
    return alive & (((splits == "train") & (in_val | in_test)) | ((splits == "val") & in_test))


def _repeated(groups: np.ndarray, splits: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Every live image after the first with the same pixels in the same split."""
    seen: set[tuple[str, int]] = set()
    flagged = np.zeros(len(groups), dtype=bool)
    for i in np.flatnonzero(alive):
        key = (str(splits[i]), int(groups[i]))
        flagged[i] = key in seen
        seen.add(key)
    return flagged
