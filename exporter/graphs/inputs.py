"""Inputs that exercise every graph: real photos, batch with left padding, several images per row,
text before the first image, prefill (empty past) and a decode step (non-empty past).

Masks follow IdeficsProcessor and IdeficsForVisionText2Text: each text token attends only to the most
recent image before it, tokens before the first image attend to none, padding is on the left,
position ids are `cumsum(attention_mask) - 1` with padding set to 1, and a generated token reuses
the prompt's last row of `image_attention_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration.images import builtin_images, to_pixel_values
from runtime.manifest import ModelInfo


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [B,T]
    attention_mask: torch.Tensor  # [B,P+T]
    position_ids: torch.Tensor  # [B,T]
    image_attention_mask: torch.Tensor  # [B,T,I]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def sample_pixels(info: ModelInfo, batch: int, images: int) -> torch.Tensor:
    """[B,I,3,H,W] real photos; row r holds max(1, I - r) images, the rest zero as the processor pads."""
    photos = torch.from_numpy(to_pixel_values(builtin_images(batch * images), info.image_size))
    pixels = photos.view(batch, images, 3, info.image_size, info.image_size).clone()
    for row in range(batch):
        pixels[row, max(1, images - row):] = 0
    return pixels


def sample_prompt(info: ModelInfo, batch: int, images: int, seq: int, seed: int = 0) -> TextBatch:
    """A left-padded prompt batch whose rows hold max(1, I - r) images at spread-out positions."""
    gen = torch.Generator().manual_seed(seed)
    low = 3  # skip pad/bos/eos
    high = info.vocab_size - len(info.image_token_ids) if info.image_token_ids else info.vocab_size
    input_ids = torch.randint(low, high, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    image_mask = torch.zeros(batch, seq, images, dtype=torch.long)
    for row in range(batch):
        pad = min(2 * row, seq - images - 2)
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = info.pad_token_id or 0
        n_images = max(1, images - row)
        start = pad + 2  # some text before the first image
        span = max(1, (seq - start) // n_images)
        for k in range(n_images):
            at = start + k * span
            image_mask[row, at:, :] = 0
            image_mask[row, at:, k] = 1  # each token attends only to the most recent image
            if info.image_token_ids:
                input_ids[row, at] = info.image_token_ids[0]
    return TextBatch(input_ids, attention_mask, positions_from_mask(attention_mask), image_mask)


def next_step(prompt: TextBatch, seed: int = 1) -> TextBatch:
    """The decode step after `prompt`: one new token per row, masks extended as generate() does."""
    gen = torch.Generator().manual_seed(seed)
    batch = prompt.input_ids.shape[0]
    input_ids = torch.randint(3, int(prompt.input_ids.max()) + 1, (batch, 1), generator=gen)
    attention_mask = torch.cat([prompt.attention_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    position_ids = prompt.position_ids[:, -1:] + 1
    return TextBatch(input_ids, attention_mask, position_ids, prompt.image_attention_mask[:, -1:])
