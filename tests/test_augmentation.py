"""Train-split augmentation: the random-erasing knob."""

from __future__ import annotations

import numpy as np

from fer_mlflow.learning.inputs import ERASE_FILL, Augmentation, augmenter

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
