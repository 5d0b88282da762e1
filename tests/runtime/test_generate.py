"""Session.generate is token-identical to transformers' IdeficsForVisionText2Text.generate (greedy,
fp32) for every config variant: batch 1 and batch 3 with left padding, 0 / 1 / 3 images per row,
66 new tokens. Settings with transformers' meanings (min_new_tokens, repetition_penalty,
bad_words_ids, eos/pad ids) are compared the same way."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from calibration.images import builtin_images, to_pixel_values
from runtime import Session
from runtime.reference.presets import CONFIG_VARIANTS
from tests.util import engine_with_chunks, export_variant, hf_generate, run_threads

NEW = 66


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """variant -> (hf model, Session), exported once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            model, _, out = export_variant(tmp_path_factory.mktemp(variant), variant)
            cache[variant] = (model, Session(out))
        return cache[variant]

    return get


def make_batch(cfg, images_per_row, length=13, seed=0):
    """Left-padded rows; row r has images_per_row[r] images (0 = text only); tokens after image k
    attend only to image k. Returns transformers-style torch inputs."""
    b, n = len(images_per_row), max(1, max(images_per_row))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (b, length), generator=gen)
    mask = torch.ones(b, length, dtype=torch.long)
    image_mask = torch.zeros(b, length, n, dtype=torch.long)
    photos = iter(builtin_images(b * n))
    pixels = torch.zeros(b, n, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    for row, count in enumerate(images_per_row):
        pad = 3 * row
        mask[row, :pad] = 0
        ids[row, :pad] = cfg.pad_token_id
        for k in range(count):
            at = pad + 1 + 3 * k
            image_mask[row, at:] = 0
            image_mask[row, at:, k] = 1
            pixels[row, k] = torch.from_numpy(to_pixel_values([next(photos)], cfg.vision_config.image_size)[0])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask)


CASES = {"batch1-1image": [1], "batch1-text-only": [0], "batch3-left-padded-1-3-0-images": [1, 3, 0]}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_greedy_matches_transformers(exports, variant, case):
    model, session = exports(variant)
    batch = make_batch(model.config, CASES[case])
    expected = hf_generate(model, batch, max_new_tokens=NEW)
    if CASES[case] == [0]:
        # transformers needs pixel_values even for a text-only prompt; Session takes None
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    else:
        inputs = {k: v.numpy() for k, v in batch.items()}
    result = session.generate(**inputs, max_new_tokens=NEW)
    np.testing.assert_array_equal(result.sequences, expected)


# (images per row, prompt length, max_new_tokens, seed): prompt lengths, 0/1/2 images, output
# lengths and a batched call of two rows, all different
CONCURRENT = [([1], 17, 40, 0), ([0], 9, 12, 1), ([2], 21, 24, 2), ([2, 0], 13, 18, 3), ([1], 11, 30, 4)]


@pytest.mark.parametrize("prefill_chunk", [None, 3])  # 3: chunked joins (runtime.engine)
@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_concurrent_requests_match_transformers_alone(exports, variant, prefill_chunk):
    # Requests started from threads a few milliseconds apart share decode steps (in-flight
    # batching); each must equal transformers' generate for that request alone.
    model, session = exports(variant)
    with engine_with_chunks(session, prefill_chunk):
        batches = [make_batch(model.config, rows, length, seed) for rows, length, _, seed in CONCURRENT]
        expected = [hf_generate(model, batch, max_new_tokens=new) for batch, (_, _, new, _) in zip(batches, CONCURRENT)]
        session.engine.stats["max_rows"] = 0
        results = {}

        def work(i):
            inputs = {k: v.numpy() for k, v in batches[i].items()}
            results[i] = session.generate(**inputs, max_new_tokens=CONCURRENT[i][2]).sequences

        errors = run_threads(work, len(CONCURRENT))
        assert not errors, errors
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i], want, err_msg=f"request {i}: {CONCURRENT[i]}")
        assert session.engine.stats["max_rows"] >= 3, "the requests did not share decode steps"


def test_images_change_the_generated_tokens(exports):
    # The test models' gates are open: different photos must change what is generated, or the
    # comparisons above would not be exercising the image path.
    model, session = exports("tiny")
    batch = {k: v.numpy() for k, v in make_batch(model.config, [1]).items()}
    other = dict(batch, pixel_values=batch["pixel_values"][:, :, ::-1].copy())
    a = session.generate(**batch, max_new_tokens=16).sequences
    b = session.generate(**other, max_new_tokens=16).sequences
    assert not np.array_equal(a, b)


SETTINGS = {
    "min-new-tokens": dict(min_new_tokens=10, eos_token_id=None),
    "repetition-penalty": dict(repetition_penalty=1.3),
    "bad-words": dict(bad_words_ids=None),  # filled from transformers' own output below
    "eos-list-and-pad": dict(eos_token_id=None, pad_token_id=7),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_match_transformers(exports, name):
    model, session = exports("tiny")
    batch = make_batch(model.config, [1, 3, 0])
    settings = dict(SETTINGS[name], max_new_tokens=24)
    plain = hf_generate(model, batch, max_new_tokens=24)
    generated = plain[:, batch["input_ids"].shape[1]:]
    if name == "min-new-tokens":
        # make the early tokens of row 0 end-of-sequence tokens, so min_new_tokens has work to do
        settings["eos_token_id"] = [int(generated[0, 2]), int(generated[1, 5])]
    if name == "bad-words":
        settings["bad_words_ids"] = [[int(generated[0, 3])], [int(generated[1, 1]), int(generated[1, 2])]]
    if name == "eos-list-and-pad":
        settings["eos_token_id"] = [int(generated[0, 4]), int(generated[2, 9])]
    expected = hf_generate(model, batch, **settings)
    result = session.generate(**{k: v.numpy() for k, v in batch.items()}, **settings)
    np.testing.assert_array_equal(result.sequences, expected)


def test_torch_backend_matches_transformers_and_onnxruntime(exports):
    # backend="torch" runs the PyTorch modules the graphs were traced from through the same loop:
    # it must give transformers' tokens too (the loop and the graphs are checked separately).
    model, session = exports("tiny")
    torch_session = Session(session.folder, backend="torch")
    assert torch_session.graphs.decoder.backend == "torch"
    batch = make_batch(model.config, [1, 3, 0])
    expected = hf_generate(model, batch, max_new_tokens=24)
    inputs = {k: v.numpy() for k, v in batch.items()}
    np.testing.assert_array_equal(torch_session.generate(**inputs, max_new_tokens=24).sequences, expected)
