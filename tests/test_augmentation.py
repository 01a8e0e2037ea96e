"""Train-split augmentation: the random-erasing knob; MixUp and CutMix, which mix the targets too."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import refused
from mlflow import MlflowClient

from fer_mlflow.errors import ConfigError
from fer_mlflow.learning.inputs import ERASE_FILL, Augmentation, augmenter, train_dataset
from fer_mlflow.stages import train

ONLY_ERASING = dict(shift=0.0, flip=False, rotation=0.0, zoom=0.0)


def test_erase_1_paints_one_grey_rectangle_on_every_image_and_leaves_the_rest():
    images = np.full((32, 48, 48, 1), 50.0, np.float32)
    out = np.asarray(augmenter(Augmentation(**ONLY_ERASING, erase=1.0), seed=0)(images, training=True))
    assert set(np.unique(out)) <= {50.0, ERASE_FILL}
    for image in out[..., 0]:
        rows, cols = np.nonzero(image == ERASE_FILL)
        assert len(rows) > 0
        box = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert np.all(box == ERASE_FILL), "the erased pixels form one filled rectangle"
        assert len(rows) < image.size // 2


def test_erasing_is_off_by_default_and_at_zero():
    assert Augmentation().erase == 0.0
    assert augmenter(Augmentation(**ONLY_ERASING, erase=0.0), seed=0) is None
    # A left-to-right ramp, so that a flip shows (on a constant image it would not): with the default
    # flip on and erasing off, every image comes out as itself or its mirror, untouched otherwise.
    ramp = np.tile(np.arange(48, dtype=np.float32) * 4, (48, 1))[..., None]
    images = np.repeat(ramp[None], 32, axis=0)
    out = np.asarray(augmenter(Augmentation(rotation=0.0, zoom=0.0, shift=0.0), seed=0)(images, training=True))
    flipped = [bool(np.array_equal(image, ramp[:, ::-1])) for image in out]
    assert all(flipped[i] or np.array_equal(image, ramp) for i, image in enumerate(out))
    assert 0 < sum(flipped) < len(out), "about half the images are mirrored"


NO_TRANSFORMS = dict(ONLY_ERASING, flip=False)


@pytest.mark.parametrize("mixing", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mixed_faces_carry_targets_mixed_by_how_much_of_each_face_they_hold(mixing):
    """Each face of class c is flat grey 30 * (c + 1): a mixed face's mean grey is then 30 times the
    targets' mean of (c + 1), exactly when its targets hold each face in the share its pixels do."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 64)
    images = np.repeat(30.0 * (labels + 1), 48 * 48).reshape(64, 48, 48, 1).astype(np.float32)
    targets = np.eye(7, dtype=np.float32)[labels]
    batches = list(train_dataset(images, targets, 16, Augmentation(**NO_TRANSFORMS, **mixing), seed=0))
    mixed_images = np.concatenate([np.asarray(x) for x, _ in batches])
    mixed_targets = np.concatenate([np.asarray(y) for _, y in batches])
    assert np.allclose(mixed_targets.sum(axis=1), 1, atol=1e-5)
    held = mixed_targets @ (30.0 * np.arange(1, 8))
    # Keras sets CutMix's targets by the pasted box's area before it is cut to whole pixels: a share
    # off by up to one row and one column of 48 (4.2%) of at most 180 grey levels between two faces.
    tolerance = 0.042 * 180 if "cutmix" in mixing else 1e-2
    assert np.allclose(mixed_images.mean(axis=(1, 2, 3)), held, atol=tolerance)
    assert (mixed_targets.max(axis=1) < 0.95).sum() > 8, "many faces are mixed, not just a few"


def test_mixing_is_off_by_default_and_a_bad_value_is_one_line_before_any_run(tiny_npz, capsys):
    assert (Augmentation().mixup, Augmentation().cutmix) == (0.0, 0.0)
    images = np.zeros((16, 48, 48, 1), np.float32)
    targets = np.eye(7, dtype=np.float32)[np.arange(16) % 7]
    (_, unmixed), = list(train_dataset(images, targets, 16, Augmentation(**NO_TRANSFORMS), seed=0))
    assert np.array_equal(np.sort(np.asarray(unmixed), axis=0), np.sort(targets, axis=0))
    with pytest.raises(ConfigError, match=r"cutmix=1.5 lie in 0..1"):
        train.TrainConfig(data=tiny_npz, cutmix=1.5).resolved()
    assert "--mixup" in refused(["train", "--data", tiny_npz, "--mixup", "-1"], capsys)


@pytest.mark.slow
def test_a_run_with_mixup_and_cutmix_trains_and_logs_them(tiny_npz):
    outcome = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32, widths=(8, 16),
                                          mixup=0.2, cutmix=1.0, class_weight="balanced"))
    params = MlflowClient().get_run(outcome.run_id).data.params
    assert (params["mixup"], params["cutmix"]) == ("0.2", "1.0")
    assert 0 <= outcome.best_val_accuracy <= 1
