"""runtime.prompts.PromptEncoder against transformers' IdeficsProcessor (the reference), both reading
the processor files of the embedded default checkpoint, on real photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from calibration.images import builtin_images
from runtime.prompts import PromptEncoder
from runtime.reference.sources import ensure_default_checkpoint


@pytest.fixture(scope="module")
def folder():
    return ensure_default_checkpoint(0)


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def encoder(folder):
    return PromptEncoder(folder)


@pytest.fixture(scope="module")
def photos():
    return builtin_images()


def batches(im):
    return {
        "one-image": [["User:", im[0], "Describe this image.\nAssistant:"]],
        "text-only": [["User: What is the capital of France?\nAssistant:"]],
        "consecutive-images": [["User:", im[0], im[1], "What differs between these two?\nAssistant:"]],
        "image-first": [[im[2], "What is in the picture?"]],
        "three-images": [["A:", im[3], "B:", im[4], "C:", im[5], "Which one is a cat?"]],
        "mixed-batch": [
            ["short"],
            ["User:", im[6], "a much longer question about the photo, with many more words in it\nAssistant:"],
            [im[7], "x", im[0], im[1], "y z"],
        ],
        "eos-in-text": [["User:", im[0], "first answer.</s>after the end of the sequence", im[1], "more</s>tail"]],
        "eos-batch": [["User:", im[2], "done.</s>no image here"], ["hello", im[3], "there"]],
        "unicode": [["Ünïcödé ✓ — “quotes” 日本語 🚀🐱", im[4], "emoji 😀 at the end  "]],
        "adjacent-text-items": [["  leading", "trailing  ", im[5], " both ", "User:"]],
    }


BATCH_NAMES = list(batches([None] * 8))


@pytest.mark.parametrize("name", BATCH_NAMES)
def test_encode_matches_idefics_processor(name, processor, encoder, photos):
    prompts = batches(photos)[name]
    ref = processor(text=prompts, return_tensors="pt")
    ours = encoder.encode(prompts)

    assert ours.input_ids.dtype == np.int64 and ours.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"].numpy())
    np.testing.assert_array_equal(ours.attention_mask, ref["attention_mask"].numpy())
    assert ours.image_attention_mask.dtype == np.int64
    np.testing.assert_array_equal(ours.image_attention_mask, ref["image_attention_mask"].numpy().astype(np.int64))

    n_images = max(1, max(sum(isinstance(i, Image.Image) for i in p) for p in prompts))
    size = processor.image_processor.size
    expected_shape = (len(prompts), n_images, 3, size.height, size.width)
    assert ours.pixel_values.shape == tuple(ref["pixel_values"].shape) == expected_shape
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"].numpy(), rtol=0, atol=1e-5)


def test_padding_is_on_the_left(processor, encoder, photos):
    assert processor.tokenizer.padding_side == "left"
    prompts = batches(photos)["mixed-batch"]
    ours = encoder.encode(prompts)
    lengths = ours.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # rows of different lengths, so there is padding
    width = ours.input_ids.shape[1]
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(ours.attention_mask[row], [0] * (width - n) + [1] * n)
        assert (ours.input_ids[row, : width - n] == processor.tokenizer.pad_token_id).all()
        assert ours.input_ids[row, width - n] == processor.tokenizer.bos_token_id


def test_eos_in_text_stops_image_attention(processor, encoder, photos):
    # The end-of-sequence rule of IdeficsProcessor: tokens after </s> attend to no image until the next one.
    ours = encoder.encode(batches(photos)["eos-in-text"])
    ids, mask = ours.input_ids[0], ours.image_attention_mask[0]
    eos, image = processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<image>")
    eos_positions, image_positions = np.flatnonzero(ids == eos), np.flatnonzero(ids == image)
    assert len(eos_positions) == 2 and len(image_positions) == 2
    after_first_eos = slice(eos_positions[0] + 1, image_positions[1])
    assert mask[after_first_eos].sum() == 0
    assert mask[image_positions[0]: eos_positions[0] + 1, 0].all()
    assert mask[image_positions[1]: eos_positions[1] + 1, 1].all()
    assert mask[eos_positions[1] + 1:].sum() == 0


def test_flat_prompt_is_one_batch_row(processor, encoder, photos):
    prompt = ["User:", photos[0], "Describe.\nAssistant:"]
    ref = processor(text=prompt, return_tensors="pt")
    ours = encoder.encode(prompt)
    assert ours.input_ids.shape[0] == 1
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"].numpy())
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "array"])
def test_image_modes_match_idefics_processor(mode, processor, encoder, photos):
    image = np.asarray(photos[1]) if mode == "array" else photos[1].convert(mode)
    prompts = [["User:", image, "What is this?"]]
    ref = processor(text=prompts, return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_allclose(encoder.encode(prompts).pixel_values, ref, rtol=0, atol=1e-5)


def transparent(photos, mode):
    image = photos[0].copy()
    image.putalpha(photos[2].convert("L").resize(image.size))  # a real photo as the alpha channel
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":
        image = photos[0].convert("P")
        image.info["transparency"] = int(np.asarray(image)[0, 0])  # one palette entry is transparent
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_image_matches_idefics_processor(mode, processor, encoder, photos):
    prompts = [["User:", transparent(photos, mode), "What is this?"]]
    ref = processor(text=prompts, return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_allclose(encoder.encode(prompts).pixel_values, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- decode
def test_decode_matches_tokenizer_on_random_ids(processor, encoder):
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(0)
    special = tokenizer.all_special_ids
    for _ in range(300):
        ids = rng.integers(0, len(tokenizer), rng.integers(0, 40)).tolist()
        if rng.random() < 0.5:  # make sure special tokens (to be skipped) are mixed in
            ids[rng.integers(0, len(ids) + 1):0] = [int(rng.choice(special))]
        assert encoder.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids
    ids = np.array([1, 300, 400, 2, 1022], np.int64)  # numpy ids are accepted
    assert encoder.decode(ids) == tokenizer.decode(ids.tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("text", [
    "Ünïcödé ✓ — “quotes” 日本語 🚀🐱",
    "emoji 😀 and a tab\tand\nnew lines",
    "  two  spaces  ",
    "special <image> and </s> inside",
])
def test_decode_matches_tokenizer_on_encoded_text(text, processor, encoder):
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert encoder.decode(ids) == expected
    if "<" not in text:
        assert expected.strip() == text.strip()  # byte fallback really round-trips the unicode


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("url", ["https://example.com/cat.png", " http://images.example.org/a/b.jpg "])
def test_url_item_is_refused(url, encoder):
    with pytest.raises(ValueError, match="URL"):
        encoder.encode([["User:", url, "Describe."]])


def test_url_inside_text_is_text(processor, encoder):
    prompts = [["Look at https://example.com/cat.png please"]]
    ref = processor(text=prompts, return_tensors="pt")["input_ids"].numpy()
    np.testing.assert_array_equal(encoder.encode(prompts).input_ids, ref)


@pytest.mark.parametrize("item", [42, 3.5, None, b"bytes"])
def test_non_text_non_image_item_is_a_type_error(item, encoder):
    with pytest.raises(TypeError):
        encoder.encode([["User:", item, "Describe."]])


def test_folder_without_tokenizer_json_is_refused(folder, tmp_path):
    for path in folder.iterdir():
        if path.name not in ("tokenizer.json", "model.safetensors"):
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ValueError, match="tokenizer.json"):
        PromptEncoder(tmp_path)
