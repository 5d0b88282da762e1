"""Tests for runtime/reference/tokenizer.py (run from the repo root: python -m pytest tests/exporter)."""

import hashlib
import json

import numpy as np
import PIL.Image
import pytest
import skimage.data
import transformers

from runtime.reference.tokenizer import EXTRA_TOKENS, TRAINING_TEXT, _train_bpe, build_processor, build_tokenizer, min_vocab_size

VOCAB_SIZE = 1024
IMAGE_SIZE = 32
# Pinned fingerprints of the default vocab / merges: a change here means previously exported
# artifacts (tokenizer files, embedding tables) are no longer compatible.
VOCAB_SHA256 = "eabe486800019bb4fb93ed8e64ac755e180aacc3f2db18f57d3894c1119fbd70"
MERGES_SHA256 = "ba37fb0aa64ab583bd8db8093bb7afc70197c8bec4d3f9774981fa70d273160a"
PROMPT = ["User:", None, "Describe this image.<end_of_utterance>\nAssistant:"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(VOCAB_SIZE)


@pytest.fixture(scope="module")
def processor(tok):
    return build_processor(tok, IMAGE_SIZE)


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(skimage.data.astronaut())


def _prompt(image):
    return [image if p is None else p for p in PROMPT]


def test_deterministic(tok):
    assert build_tokenizer(VOCAB_SIZE).get_vocab() == tok.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    assert vocab_hash == VOCAB_SHA256
    _, merges = _train_bpe(TRAINING_TEXT, VOCAB_SIZE - 262)
    assert hashlib.sha256(json.dumps(merges).encode()).hexdigest() == MERGES_SHA256


def test_layout(tok):
    assert len(tok) == VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.convert_tokens_to_ids(list(EXTRA_TOKENS)) == [VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1]
    assert max(tok.get_vocab().values()) == VOCAB_SIZE - 1
    assert tok.extra_special_tokens == list(EXTRA_TOKENS)
    assert set(EXTRA_TOKENS) <= set(tok.all_special_tokens)
    assert tok.convert_tokens_to_ids(["<0x00>", "<0xFF>"]) == [3, 258]
    assert tok.padding_side == "left"


def test_encoding(tok):
    ids = tok("User: Describe this image.").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁User:", "▁Describe", "▁this", "▁image", "."]
    assert tok("cat", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    # special tokens in the text are matched atomically
    ids = tok("a<image>b<end_of_utterance>", add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("<image>") in ids and tok.convert_tokens_to_ids("<end_of_utterance>") in ids


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 😀🚀☕ and 世界, Ελληνικά, عربى", "tabs\tand\nnewlines\r\n", ""])
def test_unicode_roundtrip(tok, text):
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(min_vocab_size() - 1)
    with pytest.raises(TypeError):
        build_tokenizer(1024.0)
    with pytest.raises(ValueError):
        build_processor(tok, 0)
    with pytest.raises(ValueError, match="lacks"):
        build_processor(transformers.LlamaTokenizer(), IMAGE_SIZE)


@pytest.mark.parametrize("vocab_size", [min_vocab_size(), 1500])
def test_other_sizes(vocab_size):
    t = build_tokenizer(vocab_size)
    assert len(t) == vocab_size
    assert t.convert_tokens_to_ids("<end_of_utterance>") == vocab_size - 1
    assert t.decode(t("The astronaut 🚀").input_ids, skip_special_tokens=True) == "The astronaut 🚀"


def test_processor_prompt(processor, tok, image):
    assert isinstance(processor.image_processor, transformers.IdeficsImageProcessorPil)
    assert list(processor.image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(processor.image_processor.image_std) == [0.26862954, 0.26130258, 0.27577711]
    # NB: the prompt list must go to `text=`; the first positional argument of IdeficsProcessor is `images`.
    out = processor(text=[_prompt(image)], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    fake, img, eou = tok.convert_tokens_to_ids(list(EXTRA_TOKENS))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    pos = ids.index(img)
    assert ids[pos - 1 : pos + 2] == [fake, img, fake]
    assert eou in ids
    T = len(ids)
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert tuple(out["attention_mask"].shape) == (1, T) and bool(out["attention_mask"].all())
    iam = out["image_attention_mask"]
    assert tuple(iam.shape) == (1, T, 1)
    assert iam[0, :pos, 0].sum() == 0 and bool((iam[0, pos:, 0] == 1).all())
    assert "Describe this image." in processor.decode(ids, skip_special_tokens=True)


def test_processor_batch_left_padding(processor, tok, image):
    long_prompt = ["User:", image, "What is this?", image, "Please describe both pictures in detail.\nAssistant:"]
    out = processor(text=[_prompt(image), long_prompt], return_tensors="pt")
    ids, mask, iam = out["input_ids"], out["attention_mask"], out["image_attention_mask"]
    n_short = len(processor(text=[_prompt(image)], return_tensors="pt")["input_ids"][0])
    T = ids.shape[1]
    pad = T - n_short
    assert pad > 0 and bool(mask[1].all())
    assert ids[0, :pad].tolist() == [tok.pad_token_id] * pad
    assert mask[0, :pad].sum() == 0 and bool(mask[0, pad:].all())
    assert ids[0, pad].item() == tok.bos_token_id
    assert tuple(out["pixel_values"].shape) == (2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(out["pixel_values"][0, 1].abs().sum()) == 0.0  # missing 2nd image of prompt 0 is zero padding
    assert tuple(iam.shape) == (2, T, 2)
    assert iam[0, :pad].sum() == 0 and iam[0, :, 1].sum() == 0


def test_end_of_utterance_detection(processor, tok):
    # transformers 5.x: special_tokens_map has no "additional_special_tokens" key, so the auto-detection
    # is False even though <end_of_utterance> is a registered extra special token; opt in per call.
    assert processor.tokenizer_was_trained_with_end_of_utterance_token is False
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert eou not in processor(text=[["User: hi", "Assistant: hello"]])["input_ids"][0].tolist()
    ids = processor(text=[["User: hi", "Assistant: hello"]], add_end_of_utterance_token=True)["input_ids"][0]
    assert eou in ids.tolist()


def test_save_load_roundtrip(processor, tok, image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, transformers.IdeficsProcessor)
    lt = loaded.tokenizer
    assert lt.get_vocab() == tok.get_vocab() and len(lt) == VOCAB_SIZE
    assert lt.padding_side == "left" and lt.pad_token_id == 0 and lt.extra_special_tokens == list(EXTRA_TOKENS)
    for text in ["User: Describe this image.<end_of_utterance>\nAssistant:", "emoji 😀 ünïcode", "<image>x"]:
        assert lt(text).input_ids == tok(text).input_ids
        assert lt(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert loaded.image_processor.image_size == IMAGE_SIZE
    a = processor(text=[_prompt(image)], return_tensors="pt")
    b = loaded(text=[_prompt(image)], return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6)
