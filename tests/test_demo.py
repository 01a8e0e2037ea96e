"""The synthetic demo dataset: deterministic, balanced like FER2013, learnable, with known defects."""

import numpy as np
import pytest

from fer_mlflow.data import demo
from fer_mlflow.data.rules import CleanConfig, clean
from fer_mlflow.data.dataset import CLASS_NAMES, SPLITS

PLANTED = (demo.DEMO_BLANK + demo.DEMO_NEAR_WHITE + demo.DEMO_DUPLICATES + demo.DEMO_LEAKS
           + demo.DEMO_CONFLICT_PAIRS)


@pytest.fixture(scope="module")
def dataset():
    return demo.make_demo()  # the default size, built once: about a second


def pixel_pairs(dataset):
    """Indices of every group of two or more pixel-identical images."""
    flat = dataset.images.reshape(len(dataset), -1)
    _, group, sizes = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    return [np.flatnonzero(group == g) for g in np.flatnonzero(sizes > 1)]


def test_same_seed_gives_identical_arrays_and_other_seeds_differ():
    first, again, other = (demo.make_demo(seed, per_class=20) for seed in (1, 1, 2))
    for name in ("images", "labels", "splits", "ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.digest() == again.digest()
    assert not np.array_equal(first.images, other.images)


def test_render_face_depends_only_on_the_generator_state():
    face = demo.render_face(3, np.random.default_rng(7))
    assert face.shape == (48, 48) and face.dtype == np.uint8
    np.testing.assert_array_equal(face, demo.render_face(3, np.random.default_rng(7)))
    assert not np.array_equal(face, demo.render_face(3, np.random.default_rng(8)))


def test_default_size_shapes_and_ids(dataset):
    assert 1900 <= len(dataset) <= 2000
    assert dataset.images.shape == (len(dataset), 48, 48) and dataset.images.dtype == np.uint8
    assert dataset.labels.dtype == np.int64
    assert set(dataset.labels.tolist()) == set(range(len(CLASS_NAMES)))
    assert len(set(dataset.ids.tolist())) == len(dataset)
    for image_id, split, label in zip(dataset.ids, dataset.splits, dataset.labels):
        assert image_id.startswith(f"demo/{split}/{CLASS_NAMES[label]}/")


def test_every_split_holds_every_class_in_70_15_15_proportion(dataset):
    counts = dataset.counts()
    assert set(counts) == set(SPLITS)
    for split in SPLITS:
        assert min(counts[split].values()) > 0, split
    sizes = np.array([sum(counts[split].values()) for split in SPLITS]) - [PLANTED, 0, 0]
    np.testing.assert_allclose(sizes / sizes.sum(), demo.SPLIT_FRACTIONS, atol=0.01)


def test_disgust_is_rarer_than_every_other_class(dataset):
    per_class = np.bincount(dataset.labels, minlength=len(CLASS_NAMES))
    disgust = per_class[CLASS_NAMES.index("disgust")]
    others = np.delete(per_class, CLASS_NAMES.index("disgust"))
    assert disgust < 0.5 * others.min()


def test_only_planted_images_are_constant_or_over_exposed(dataset):
    flat = dataset.images.reshape(len(dataset), -1).astype(np.float64)
    mean, std = flat.mean(axis=1) / 255, flat.std(axis=1)
    assert np.sum(std == 0) == demo.DEMO_BLANK
    assert np.sum((mean >= 0.9) & (std > 0)) == demo.DEMO_NEAR_WHITE
    # Drawn faces stay clear of the cleaning thresholds, so cleaning removes only what was planted.
    drawn = (std > 0) & (mean < 0.9)
    assert mean[drawn].min() > 0.15 and mean[drawn].max() < 0.85 and std[drawn].min() > 5
    assert np.all(dataset.splits[(std == 0) | (mean >= 0.9)] == "train")


def test_planted_duplicates_leaks_and_conflicts_come_in_the_stated_numbers(dataset):
    pairs = pixel_pairs(dataset)
    assert all(len(pair) == 2 for pair in pairs)
    kinds = []
    for pair in pairs:
        splits = sorted(dataset.splits[pair].tolist())
        if dataset.labels[pair[0]] != dataset.labels[pair[1]]:
            kinds.append("conflict")
        elif splits == ["train", "train"]:
            kinds.append("duplicate")
        else:  # a leak is one train copy of one val or test image
            assert splits.count("train") == 1
            kinds.append("leak")
    assert kinds.count("conflict") == demo.DEMO_CONFLICT_PAIRS
    assert kinds.count("leak") == demo.DEMO_LEAKS
    assert kinds.count("duplicate") == demo.DEMO_DUPLICATES


def test_cleaning_removes_exactly_the_planted_images(dataset):
    config = CleanConfig()
    dark = sum(level / 255 <= config.mean_low for level in demo.DEMO_BLANK_LEVELS)
    result = clean(dataset, config)
    removed = {rule: len(indices) for rule, indices in result.removed.items()}
    assert removed == {
        "mean_outlier": dark + demo.DEMO_NEAR_WHITE,
        "blank": demo.DEMO_BLANK - dark,
        "conflicting_labels": 2 * demo.DEMO_CONFLICT_PAIRS,  # both copies of each pair go
        "leakage": demo.DEMO_LEAKS,
        "duplicates": demo.DEMO_DUPLICATES,
    }
    assert pixel_pairs(result.dataset) == []


def test_classes_are_learnable_by_a_linear_model(dataset):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def features(images):
        # The face's centre at half resolution, each image scaled to zero mean and unit spread so
        # that lighting differences do not dominate a linear model.
        crop = images[:, 8:44, 6:42].astype(np.float32)
        small = crop.reshape(len(crop), 18, 2, 18, 2).mean(axis=(2, 4)).reshape(len(crop), -1)
        return (small - small.mean(1, keepdims=True)) / (small.std(1, keepdims=True) + 1e-6)

    train, test = dataset.split("train"), dataset.split("test")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000))
    with threadpool_limits(limits=1):  # threaded BLAS on a problem this small only slows it down
        model.fit(features(train.images), train.labels)
    accuracy = model.score(features(test.images), test.labels)
    assert accuracy > 0.5  # chance is about 1/7


def test_too_few_images_per_class_is_refused():
    with pytest.raises(ValueError, match="per_class"):
        demo.make_demo(per_class=demo.MIN_PER_CLASS - 1)
