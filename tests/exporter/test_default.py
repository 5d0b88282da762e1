"""The embedded default: built offline from a seed, deterministic, exported by `idefics-export out/`
with its processor, and the exported graphs reproduce transformers on a real processed prompt."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from transformers import AutoProcessor, IdeficsForVisionText2Text

from calibration.images import builtin_images
from exporter import cli
from exporter.graphs.validate import ort_session
from runtime.manifest import Manifest
from runtime.reference.sources import ensure_default_checkpoint, write_default_checkpoint


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_default_checkpoint_is_deterministic_and_gated(tmp_path):
    write_default_checkpoint(tmp_path / "a", seed=0)
    write_default_checkpoint(tmp_path / "b", seed=0)
    write_default_checkpoint(tmp_path / "c", seed=1)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    model = IdeficsForVisionText2Text.from_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "idefics"
    for layer in model.model.gated_cross_attn_layers:  # gates open, so the image path matters
        assert layer.alpha_cross_attn.abs().min() > 0.1 and layer.alpha_dense.abs().min() > 0.1


def test_cli_exports_default_with_processor(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([str(out), "--quiet"]) == 0
    manifest = Manifest.load(out)
    assert manifest.source["kind"] == "default"
    assert manifest.processor_files and all((out / f).is_file() for f in manifest.processor_files)
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    assert set(manifest.model.image_token_ids) == set(tok.convert_tokens_to_ids(["<image>", "<fake_token_around_image>"]))

    # A real interleaved prompt through the exported processor and graphs, against transformers.
    photos = builtin_images(2)
    prompts = [
        ["User:", photos[0], "Describe this image.<end_of_utterance>\nAssistant:"],
        ["User: compare", photos[0], "and", photos[1], "please.<end_of_utterance>\nAssistant:"],
    ]
    batch = processor(text=prompts, return_tensors="pt")
    model = IdeficsForVisionText2Text.from_pretrained(ensure_default_checkpoint(0))
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits
    graphs = manifest.graphs
    s = {name: ort_session(out / g.file) for name, g in graphs.items()}
    pixels = batch["pixel_values"]
    b, n = pixels.shape[:2]
    (hidden,) = s["vision"].run(None, {"pixel_values": pixels.flatten(0, 1).numpy()})
    cross = s["perceiver"].run(None, {"image_hidden_states": hidden.reshape(b, n, *hidden.shape[1:])})
    mask = batch["attention_mask"].numpy()
    info = manifest.model
    feed = dict(
        input_ids=batch["input_ids"].numpy(), attention_mask=mask,
        position_ids=np.where(mask == 0, 1, np.cumsum(mask, -1) - 1),
        image_attention_mask=batch["image_attention_mask"].numpy().astype(np.int64),
        logits_positions=np.arange(mask.shape[1]),
        **dict(zip([o.name for o in graphs["perceiver"].outputs], cross)),
        **{i.name: np.zeros((b, info.num_heads, 0, info.head_dim), np.float32)
           for i in graphs["decoder"].inputs if i.name.startswith("past_")},
    )
    logits = s["decoder"].run(["logits"], feed)[0]
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], ref.numpy()[valid], atol=1e-4, rtol=1e-4)
