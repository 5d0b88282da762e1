"""calibration.images.synthetic_prompts: the inputs used where an export has no processor."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.images import builtin_images, synthetic_prompts, to_pixel_values


def test_layout_follows_the_processors_rules():
    photos = builtin_images(4)
    ids, mask, pixels, image_mask = synthetic_prompts([photos[:2], photos[2:]], 32, vocab=100, length=16, seed=3)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == np.int64
    assert ids.min() >= 3 and ids.max() < 100 and (mask == 1).all()
    # each token attends to at most one image: the latest one before it (image 1 appears at 2 + 12 // 2)
    expected = np.zeros((16, 2), np.int64)
    expected[2:8, 0] = 1
    expected[8:, 1] = 1
    assert (image_mask == expected[None]).all()
    np.testing.assert_array_equal(pixels.reshape(4, 3, 32, 32), to_pixel_values(photos, 32))
    again = synthetic_prompts([photos[:2], photos[2:]], 32, vocab=100, length=16, seed=3)[0]
    np.testing.assert_array_equal(ids, again)  # seeded


def test_rows_need_the_same_number_of_images():
    photos = builtin_images(3)
    with pytest.raises(ValueError, match=r"same, non-zero number of images; got \[1, 2\]"):
        synthetic_prompts([photos[:1], photos[1:]], 32, vocab=100)
