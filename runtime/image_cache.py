"""Cross-attention K/V per image, kept across requests in a content-addressed LRU.

The cross-attention K/V of one image depend on that image alone (vision -> perceiver -> each
cross layer's K/V projections), so a request whose image was seen before (a chat that sends the
same photo at every turn) skips the vision and perceiver work for it. Keys are a digest of the
preprocessed pixels, so the same photo sent as PNG or JPEG bytes of the same pixels, or by
another client, hits; the cache is bounded in bytes and forgets the least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def image_digest(pixels: np.ndarray) -> str:
    """Content key of one preprocessed image [3,H,W] (float32)."""
    pixels = np.ascontiguousarray(pixels, np.float32)
    h = hashlib.blake2b(digest_size=20)
    h.update(str(pixels.shape).encode())
    h.update(memoryview(pixels).cast("B"))
    return h.hexdigest()


def nbytes(entry: dict) -> int:
    return sum(int(np.prod(v.shape)) * v.element_size() if hasattr(v, "element_size") else v.nbytes
               for v in entry.values())


class ImageCache:
    """digest -> {cross name: [H,L,hd]} in the loop's memory, at most `capacity` bytes (0: off)."""

    def __init__(self, capacity: int, metrics=None):
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"image_cache_bytes must be a non-negative integer, got {capacity!r}")
        self.capacity, self.size = capacity, 0
        self.entries: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = 0
        self.metrics = metrics  # runtime.metrics.Metrics: hits and misses counted there too

    def get(self, digest: str) -> dict | None:
        entry = self.entries.get(digest)
        if entry is None:
            self.misses += 1
            if self.metrics is not None:
                self.metrics.inc("idefics_image_cache_misses_total")
            return None
        self.entries.move_to_end(digest)
        self.hits += 1
        if self.metrics is not None:
            self.metrics.inc("idefics_image_cache_hits_total")
        return entry

    def put(self, digest: str, entry: dict) -> None:
        size = nbytes(entry)
        if size > self.capacity or digest in self.entries:
            return
        self.entries[digest] = entry
        self.size += size
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= nbytes(old)
