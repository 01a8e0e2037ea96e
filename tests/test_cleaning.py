"""The cleaning rules, each on a dataset built to trigger it, and their counts on the real FER2013."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_ZIP, face

from fer_mlflow.data.rules import CleanConfig, clean, pixel_groups
from fer_mlflow.data.dataset import Dataset


def make(rows: list[tuple[np.ndarray, int, str]]) -> Dataset:
    images, labels, splits = zip(*rows)
    return Dataset(np.stack(images), labels, splits, [f"img{i}" for i in range(len(rows))])


def test_pixel_groups_match_identical_images_only():
    a, b = face(0, 0), face(0, 1)
    groups = pixel_groups(np.stack([a, b, a.copy(), b]))
    assert groups[0] == groups[2] and groups[1] == groups[3] and groups[0] != groups[1]


def test_mean_rule_follows_the_report_thresholds():
    dark = np.full((48, 48), 20, np.uint8)  # mean 0.078 <= 0.1
    dark[::2] = 30  # not constant, so only the mean rule applies
    bright = 255 - dark
    result = clean(make([(dark, 0, "train"), (bright, 1, "val"), (face(2, 0), 2, "train")]))
    assert result.removed["mean_outlier"].tolist() == [0, 1]
    assert len(result.dataset) == 1


def test_blank_images_go():
    flat = np.full((48, 48), 128, np.uint8)
    result = clean(make([(flat, 0, "train"), (face(1, 0), 1, "train")]))
    assert result.removed["blank"].tolist() == [0]
    kept = clean(make([(flat, 0, "train")]), CleanConfig(blank_std=0))
    assert len(kept.dataset) == 1  # blank_std=0 disables the rule


def test_duplicates_within_a_split_keep_the_first():
    a = face(3, 0)
    result = clean(make([(a, 3, "train"), (a, 3, "train"), (a, 3, "train"), (face(3, 1), 3, "train")]))
    assert result.removed["duplicates"].tolist() == [1, 2]
    assert list(result.dataset.ids) == ["img0", "img3"]


def test_leakage_drops_the_train_copy_and_keeps_test_whole():
    a, b = face(4, 0), face(4, 1)
    result = clean(make([(a, 4, "train"), (a, 4, "test"), (b, 4, "val"), (b, 4, "test")]))
    assert result.removed["leakage"].tolist() == [0, 2]
    assert list(result.dataset.splits) == ["test", "test"]


def test_conflicting_labels_drop_every_cleanable_copy():
    a = face(5, 0)
    rows = [(a, 5, "train"), (a, 6, "train"), (a, 6, "test"), (face(5, 1), 5, "train")]
    result = clean(make(rows))
    assert result.removed["conflicting_labels"].tolist() == [0, 1]
    assert list(result.dataset.ids) == ["img2", "img3"]  # test is whole by default


def test_clean_test_applies_the_rules_to_test_too():
    a = face(5, 0)
    rows = [(a, 5, "test"), (a, 5, "test"), (np.zeros((48, 48), np.uint8), 0, "test")]
    assert len(clean(make(rows)).dataset) == 3
    everywhere = CleanConfig(splits=("train", "val", "test"))
    result = clean(make(rows), everywhere)
    assert result.removed["duplicates"].tolist() == [1] and result.removed["mean_outlier"].tolist() == [2]


def test_rules_can_be_switched_off():
    a = face(5, 0)
    rows = [(a, 5, "train"), (a, 5, "train"), (a, 6, "val")]
    off = CleanConfig(drop_conflicts=False, drop_leakage=False, drop_duplicates=False)
    assert len(clean(make(rows), off).dataset) == 3


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="the shared FER2013 zip is not here")
def test_counts_on_the_shared_fer2013():
    """Measured on ../shared/data/fer2013-public.zip with the default rules and seed 0."""
    from fer_mlflow.data.sources import read_source

    dataset, _ = read_source(str(SHARED_ZIP))
    result = clean(dataset)
    removed = {rule: len(idx) for rule, idx in result.removed.items()}
    assert removed == {
        "mean_outlier": 47, "blank": 1, "conflicting_labels": 103, "leakage": 505, "duplicates": 920,
    }
    assert (result.dataset.splits == "test").sum() == 3589  # PublicTest stays whole
