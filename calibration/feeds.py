"""Calibration data -> input feeds of each graph, computed with the FP32 graphs and cached on disk.

Images and prompts go through the model's own processor (runtime.prompts.PromptEncoder, which
reproduces IdeficsProcessor; exports without a processor get seeded random token prompts around
the same real photos). The vision graph is fed the pixels, the perceiver the FP32 vision outputs,
the decoder a prefill with the FP32 perceiver's cross K/V, so each graph is calibrated on the
activations it meets in use. The feeds are cached keyed by the FP32 graphs' sha256 and the data's
digest, so a second export of the same model and data does not recompute them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from calibration.cache import cached_arrays
from calibration.data import CalibrationData, interleaved_prompts
from calibration.images import synthetic_prompts
from runtime.loop import Graphs, prefill_feed
from runtime.manifest import Manifest, sha256_file
from runtime.runners.onnxruntime import OnnxRuntimeRunner

log = logging.getLogger(__name__)

FEEDS_VERSION = 1  # bump when the way feeds are built changes


def calibration_feeds(folder: Path, manifest: Manifest, data: CalibrationData, encoder=None,
                      batch: int = 4) -> dict[str, list[dict[str, np.ndarray]]]:
    """{graph: [feed, ...]} for the FP32 graphs in `folder`, from cache when possible."""
    key = {
        "version": FEEDS_VERSION,
        "graphs": {g.name: sha256_file(folder / g.file) for g in manifest.graphs.values()},
        "data": data.digest, "batch": batch, "processor": encoder is not None,
    }
    arrays = cached_arrays(key, lambda: _flatten(_compute(folder, manifest, data, encoder, batch)))
    return _unflatten(arrays)


def _compute(folder, manifest, data, encoder, batch) -> dict[str, list[dict[str, np.ndarray]]]:
    runners = {name: OnnxRuntimeRunner(spec, folder / spec.file) for name, spec in manifest.graphs.items()}
    for runner in runners.values():
        runner.activate()
    g = Graphs(manifest, runners)
    info = manifest.model
    prompts = interleaved_prompts(data, images_per_prompt=1)
    feeds: dict[str, list] = {"vision": [], "perceiver": [], "decoder": []}
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids, mask, pixels, image_mask = _encode(chunk, encoder, info, seed=start)
        b, n = pixels.shape[:2]
        vision_feed = {"pixel_values": pixels.reshape(b * n, *pixels.shape[2:])}
        hidden = g.vision.infer(vision_feed)["image_hidden_states"]
        perceiver_feed = {"image_hidden_states": hidden.reshape(b, n, *hidden.shape[1:])}
        cross = g.perceiver.infer(perceiver_feed)
        decoder_feed = prefill_feed(g, ids, mask, image_mask, cross)
        for graph, feed in (("vision", vision_feed), ("perceiver", perceiver_feed), ("decoder", decoder_feed)):
            feeds[graph].append(feed)
    return feeds


def _encode(chunk, encoder, info, seed: int):
    if encoder is not None:
        enc = encoder.encode(chunk)
        return enc.input_ids, enc.attention_mask, enc.pixel_values, enc.image_attention_mask
    # No processor: the same photos, with seeded random tokens; each row's image precedes its text.
    rows = [[item for item in prompt if not isinstance(item, str)] for prompt in chunk]
    return synthetic_prompts(rows, info.image_size, info.vocab_size - len(info.image_token_ids), seed=seed)


def _flatten(feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    return {f"{graph}/{i}/{name}": array for graph, items in feeds.items()
            for i, feed in enumerate(items) for name, array in feed.items()}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
    feeds: dict[str, dict[int, dict]] = {}
    for key, array in arrays.items():
        if key.count("/") != 2:  # the cache's own entries
            continue
        graph, index, name = key.split("/")
        feeds.setdefault(graph, {}).setdefault(int(index), {})[name] = array
    return {graph: [items[i] for i in sorted(items)] for graph, items in feeds.items()}


