"""Interleaved text-and-image prompts -> model inputs, without torch or transformers.

A numpy re-implementation of transformers' IdeficsProcessor (which only returns torch tensors)
over the export's own processor files (`tokenizer.json`, `tokenizer_config.json`,
`processor_config.json`), so a deployment needs only `tokenizers` and Pillow. The tests check
that it produces exactly what IdeficsProcessor produces.

Differences, on purpose: strings that are URLs are refused (IdeficsProcessor would download them;
a server must never fetch what a request names), and padding is always on the left (generation
needs it).

`build_prompt` turns a text prompt with `<image>` placeholders plus the images' encoded bytes into
such an interleaved prompt (the Triton model's requests, idefics-generate's command line).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
from PIL import Image

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = IMAGE_TOKEN  # what marks an image's place in a text prompt (build_prompt)


@dataclass
class EncodedPrompts:
    input_ids: np.ndarray  # [B,T] int64, left padded
    attention_mask: np.ndarray  # [B,T] int64
    pixel_values: np.ndarray  # [B,I,3,H,W] float32 (I >= 1; zero images pad)
    image_attention_mask: np.ndarray  # [B,T,I] int64


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class PromptEncoder:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
            if not (folder / name).is_file():
                raise ValueError(f"{folder / name}: missing; this export has no processor, pass input_ids instead")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.bos = _token(config.get("bos_token")) or ""
        eos = _token(config.get("eos_token"))
        pad = _token(config.get("pad_token")) or _token(config.get("unk_token"))
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None
        self.pad_id = self.tokenizer.token_to_id(pad) if pad else 0
        self.image_id = self.tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_id is None:
            raise ValueError(f"{folder / 'tokenizer.json'}: has no {IMAGE_TOKEN} token; not an IDEFICS tokenizer")
        images = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
        size = images.get("size") or {"height": images["image_size"], "width": images["image_size"]}
        self.size = (int(size["height"]), int(size["width"]))
        self.mean = np.asarray(images.get("image_mean", (0.0, 0.0, 0.0)), np.float32)[:, None, None]
        self.std = np.asarray(images.get("image_std", (1.0, 1.0, 1.0)), np.float32)[:, None, None]
        self.rescale = float(images.get("rescale_factor", 1 / 255))
        self.resample = Image.Resampling(int(images.get("resample", Image.Resampling.BICUBIC)))

    # ------------------------------------------------------------ text
    def build_text(self, prompt: Sequence[Any]) -> tuple[str, list[Image.Image]]:
        text, images, last_was_image = self.bos, [], False
        for item in prompt:
            if isinstance(item, str):
                item = item.strip(" ")
                if _is_url(item):
                    raise ValueError(f"prompt item {item!r} is a URL: images are never fetched; pass a PIL image")
                text += item
                last_was_image = False
            elif isinstance(item, (Image.Image, np.ndarray)):
                text += IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN
                images.append(item if isinstance(item, Image.Image) else Image.fromarray(item))
                last_was_image = True
            else:
                raise TypeError(f"prompt items must be str or PIL.Image.Image, got {type(item).__name__}")
        return text, images

    def encode(self, prompts: Sequence[Sequence[Any]]) -> EncodedPrompts:
        if isinstance(prompts, (str, Image.Image)) or not prompts:
            raise TypeError("prompts must be a non-empty list of prompts, each a list of str and PIL images")
        if not any(isinstance(p, (list, tuple)) for p in prompts):
            prompts = [prompts]
        texts, images = zip(*(self.build_text(p) for p in prompts))
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        width = max(len(i) for i in ids)
        input_ids = np.full((len(ids), width), self.pad_id, np.int64)
        attention_mask = np.zeros((len(ids), width), np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = seq
            attention_mask[row, width - len(seq):] = 1
        n_images = max(1, max(len(i) for i in images))
        h, w = self.size
        pixel_values = np.zeros((len(ids), n_images, 3, h, w), np.float32)
        for row, row_images in enumerate(images):
            count = min(int((input_ids[row] == self.image_id).sum()), n_images)
            for k, image in enumerate(row_images[:count]):
                pixel_values[row, k] = self.preprocess(image)
        if any(images):
            image_attention_mask = self._image_attention_mask(input_ids, n_images)
        else:
            image_attention_mask = np.zeros((len(ids), width, 1), np.int64)
        return EncodedPrompts(input_ids, attention_mask, pixel_values, image_attention_mask)

    def _image_attention_mask(self, input_ids: np.ndarray, n_images: int) -> np.ndarray:
        # Each token attends to the most recent image before it; tokens after an end-of-sequence
        # token attend to none until the next image (IdeficsProcessor's packed-input rule).
        latest = np.full(input_ids.shape, -1, np.int64)
        for row, seq in enumerate(input_ids):
            count, seen_eos = -1, False
            for t, token in enumerate(seq):
                if token == self.image_id:
                    count, seen_eos = count + 1, False
                latest[row, t] = -1 if seen_eos else count
                if token == self.eos_id:
                    seen_eos = True
        latest[latest >= n_images] = -1
        mask = (latest[..., None] == np.arange(n_images)).astype(np.int64)
        return mask

    # ------------------------------------------------------------ images
    def preprocess(self, image: Image.Image) -> np.ndarray:
        h, w = self.size
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # transformers' convert_to_rgb paints transparency onto white; PIL's convert drops it
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        array = np.asarray(image.convert("RGB").resize((w, h), self.resample), np.float32) * np.float32(self.rescale)
        return (array.transpose(2, 0, 1) - self.mean) / self.std

    # ------------------------------------------------------------ text out
    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# ------------------------------------------------------------ text prompts with placeholders
def decode_image(data: bytes, label: str, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> a loaded PIL image; errors start with `label` (e.g. "image 0" or a
    file name). The limits (None: none) are checked before the pixels are decoded."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{label}: {len(data)} bytes; the limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: the header gives the size before any decoding
    except Exception as exc:
        raise ValueError(f"{label}: not a readable image ({type(exc).__name__})") from exc
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{label}: {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"{label}: cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return image


def build_prompt(prompt: str, images: Sequence[bytes], *, max_images: int | None = None,
                 labels: Sequence[str] | None = None, max_image_bytes: int | None = None,
                 max_image_pixels: int | None = None) -> list[Any]:
    """Text with one <image> placeholder per image + the images' encoded bytes, in placeholder order
    -> an interleaved prompt for PromptEncoder: "User:<image>Hi" -> ["User:", image, "Hi"].
    `labels` name the images in error messages (default "image 0", "image 1", ...)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(images):
        raise ValueError(f"prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images "
                         "were sent")
    if max_images is not None and len(images) > max_images:
        raise ValueError(f"{len(images)} images; this export allows at most {max_images} per prompt")
    labels = list(labels) if labels is not None else [f"image {i}" for i in range(len(images))]
    items: list[Any] = []
    for index, text in enumerate(parts):
        if text.strip(" "):
            items.append(text)
        if index < len(images):
            items.append(decode_image(images[index], labels[index], max_image_bytes, max_image_pixels))
    return items


def _is_url(text: str) -> bool:
    if " " in text:
        return False
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)
