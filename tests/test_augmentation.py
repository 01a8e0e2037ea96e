"""Train-split augmentation: the random-erasing knob."""

from __future__ import annotations

import numpy as np

from fer_mlflow.inputs import ERASE_FILL, Augmentation, augmenter

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
    images = np.full((8, 48, 48, 1), 50.0, np.float32)
    out = np.asarray(augmenter(Augmentation(rotation=0.0, zoom=0.0, shift=0.0), seed=0)(images, training=True))
    assert np.all(out == 50.0)
