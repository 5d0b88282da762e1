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


def synthetic_prompts(rows: list[list[Image.Image]], image_size: int, vocab: int, length: int = 24, seed: int = 0):
    """Inputs for an export without a processor: real photos and seeded random text tokens.

    Every row holds the same number n of images; image k becomes visible at token 2 + k*((length-4)//n)
    and later tokens attend only to the latest image, as IdeficsProcessor lays out prompts. Token
    ids are drawn from [3, vocab). Returns (input_ids, attention_mask, pixel_values [B,n,3,S,S],
    image_attention_mask [B,T,n])."""
    counts = {len(row) for row in rows}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every row needs the same, non-zero number of images; got {[len(r) for r in rows]}")
    n, b = counts.pop(), len(rows)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, length), dtype=np.int64)
    image_mask = np.zeros((b, length, n), np.int64)
    for k in range(n):
        start = 2 + k * ((length - 4) // n)
        image_mask[:, start:] = 0
        image_mask[:, start:, k] = 1
    pixels = to_pixel_values([image for row in rows for image in row], image_size).reshape(b, n, 3, image_size, image_size)
    return ids, np.ones_like(ids), pixels, image_mask
