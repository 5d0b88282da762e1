"""Real photos for validation and calibration, offline: scikit-image's bundled samples."""

from __future__ import annotations

import numpy as np
from PIL import Image

# RGB photographs shipped inside scikit-image (no download needed).
BUILTIN = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "retina", "colorwheel")

IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)


def builtin_images(n: int | None = None) -> list[Image.Image]:
    """The first `n` built-in photos (cycled when more are asked for than exist)."""
    import skimage.data

    names = list(BUILTIN)
    count = len(names) if n is None else n
    return [Image.fromarray(getattr(skimage.data, names[i % len(names)])()).convert("RGB") for i in range(count)]


def to_pixel_values(images: list[Image.Image], size: int) -> np.ndarray:
    """[N,3,size,size] float32, as IdeficsImageProcessor prepares them (bicubic resize, CLIP mean/std)."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    mean = np.asarray(IDEFICS_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IDEFICS_STD, dtype=np.float32)[:, None, None]
    for i, image in enumerate(images):
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        out[i] = (array.transpose(2, 0, 1) - mean) / std
    return out
