"""Every IdeficsConfig variant exports, validates, and its ONNX graphs chained in ONNX Runtime give
the logits of transformers' IdeficsForVisionText2Text (the independent reference) for a prefill
and decode steps against a static cache (garbage in its unfilled slots), on real photos, left padding and several images per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.images import builtin_images, to_pixel_values
from exporter.export import ExportConfig, export
from exporter.graphs.validate import ort_session
from runtime.reference.presets import CONFIG_VARIANTS as VARIANTS
from runtime.reference.sources import variant_model


B, I, T = 3, 2, 11  # batch, images per row, prompt length


def _prompt(cfg, seed=0):
    """Left-padded rows; row r has max(1, I-r) images; each token sees only the latest image."""
    gen = torch.Generator().manual_seed(seed)
    base_vocab = cfg.vocab_size  # stay out of the additional vocab except where images go
    ids = torch.randint(3, base_vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    image_mask = torch.zeros(B, T, I, dtype=torch.long)
    for row in range(B):
        pad = 2 * row
        mask[row, :pad] = 0
        ids[row, :pad] = 0
        for k in range(max(1, I - row)):
            at = pad + 1 + 3 * k
            image_mask[row, at:] = 0
            image_mask[row, at:, k] = 1
        if cfg.additional_vocab_size:
            ids[row, pad + 1] = cfg.vocab_size + cfg.additional_vocab_size - 1  # an additional-vocab token
    pixels = torch.from_numpy(to_pixel_values(builtin_images(B * I), cfg.vision_config.image_size))
    pixels = pixels.view(B, I, *pixels.shape[1:]).clone()
    for row in range(B):
        pixels[row, max(1, I - row):] = 0
    return ids, mask, image_mask, pixels


def _ort_chain(folder, manifest, ids, mask, image_mask, pixels, new_ids, spare=4):
    """Vision -> perceiver -> decoder prefill -> decode steps, all in ONNX Runtime, with the caller
    owning a static cache: a buffer of T + spare slots, garbage in the unfilled ones, each step's
    present K/V written at its slot."""
    graphs = manifest.graphs
    sessions = {name: ort_session(folder / g.file) for name, g in graphs.items()}
    (hidden,) = sessions["vision"].run(None, {"pixel_values": pixels.flatten(0, 1).numpy()})
    hidden = hidden.reshape(B, I, *hidden.shape[1:])
    cross = sessions["perceiver"].run(None, {"image_hidden_states": hidden})
    cross = dict(zip([o.name for o in graphs["perceiver"].outputs], cross))
    info = manifest.model
    # position ids computed here, independently of exporter.graphs.inputs
    pos = np.where(mask.numpy() == 0, 1, np.cumsum(mask.numpy(), -1) - 1)
    past = {s.name: np.zeros((B, info.num_heads, 0, info.head_dim), np.float32)
            for s in graphs["decoder"].inputs if s.name.startswith("past_")}
    feed = dict(input_ids=ids.numpy(), attention_mask=mask.numpy(), position_ids=pos,
                image_attention_mask=image_mask.numpy(), logits_positions=np.arange(T), **cross, **past)
    names = [o.name for o in graphs["decoder"].outputs]
    prefill = dict(zip(names, sessions["decoder"].run(None, feed)))

    rng = np.random.default_rng(0)
    size = T + spare
    cache = {n: rng.normal(0, 10, (B, info.num_heads, size, info.head_dim)).astype(np.float32) for n in past}
    for name in past:
        cache[name][:, :, :T] = prefill[name.replace("past_", "present_")]
    slot_mask = np.zeros((B, size), np.int64)
    slot_mask[:, :T] = mask.numpy()
    logits = [prefill["logits"]]
    for k in range(new_ids.shape[1]):
        step = dict(input_ids=new_ids[:, k:k + 1].numpy(), position_ids=pos[:, -1:] + 1 + k,
                    attention_mask=np.concatenate([slot_mask, np.ones((B, 1), np.int64)], 1),
                    image_attention_mask=image_mask[:, -1:].numpy(), logits_positions=np.array([0]),
                    **cross, **cache)
        out = dict(zip(names, sessions["decoder"].run(None, step)))
        for name in past:
            cache[name][:, :, T + k] = out[name.replace("past_", "present_")][:, :, 0]
        slot_mask[:, T + k] = 1
        logits.append(out["logits"])
    return logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(variant, tmp_path):
    model = variant_model(VARIANTS[variant])
    cfg = model.config
    if variant == "tied-embeddings":  # the variant must really tie, or it tests nothing
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids, mask, image_mask, pixels = _prompt(cfg)
    new_ids = torch.randint(3, cfg.vocab_size, (B, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                    image_attention_mask=image_mask, use_cache=False).logits
        blank = model(input_ids=ids, attention_mask=mask, pixel_values=torch.zeros_like(pixels),
                      image_attention_mask=image_mask, use_cache=False).logits
        full_ids = torch.cat([ids, new_ids], 1)
        full_mask = torch.cat([mask, torch.ones(B, 2, dtype=torch.long)], 1)
        full_image_mask = torch.cat([image_mask, image_mask[:, -1:], image_mask[:, -1:]], 1)
        ref_steps = model(input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels,
                          image_attention_mask=full_image_mask, use_cache=False).logits[:, -2:]
    valid = mask.bool()
    # The image path must matter for this model, or image bugs would pass.
    assert (ref - blank)[valid].abs().max() > 1e-2

    manifest = _export_model(model, tmp_path / "out")
    prefill, *steps = _ort_chain(tmp_path / "out", manifest, ids, mask, image_mask, pixels, new_ids)
    np.testing.assert_allclose(prefill[valid.numpy()], ref[valid].numpy(), atol=1e-4, rtol=1e-4)
    for k, step in enumerate(steps):
        np.testing.assert_allclose(step[:, -1], ref_steps[:, k].numpy(), atol=1e-4, rtol=1e-4)
    # Every graph was validated at export, prefill and decode.
    report = manifest.validation["report"]
    assert set(report) == {"vision", "perceiver", "decoder"}
    assert set(report["decoder"]) == {"prefill", "decode", "decode-static"}
    assert all(row["ok"] for cases in report.values() for rows in cases.values() for row in rows.values())


def _export_model(model, out):
    """Export an in-memory model through the public path: save it as a checkpoint, export --model DIR."""
    ckpt = out.parent / "ckpt"
    model.save_pretrained(ckpt)
    return export(ExportConfig(output=out, model=str(ckpt), progress=False))
