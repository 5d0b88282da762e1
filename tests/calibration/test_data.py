"""calibration.data: folder and prompt loading, their error messages, the content digest, the
built-in fallback, and the chat prompts as PromptEncoder encodes them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from calibration.data import (
    DEFAULT_PROMPTS,
    CalibrationData,
    calibration_data,
    interleaved_prompts,
    load_image_folder,
    load_prompts,
)
from calibration.images import BUILTIN
from runtime.errors import CalibrationError


def gradient(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    gradient(1).save(d / "b.png")
    gradient(2).save(d / "a.JPG", quality=95)
    gradient(3).convert("L").save(d / "c.jpeg")
    gradient(4).convert("P").save(d / "d.gif")
    (d / "README.txt").write_text("not a photo")
    (d / "notes").mkdir()
    (d / "sub.png").mkdir()  # a folder with an image name is not an image
    return d


# ---------------------------------------------------------------- folders
def test_folder_sorted_by_name_and_non_images_skipped(folder):
    images = load_image_folder(folder)
    assert [name for name, _ in images] == ["a.JPG", "b.png", "c.jpeg", "d.gif"]
    assert all(image.mode == "RGB" for _, image in images)
    assert images[0][1].size == (40, 30)
    np.testing.assert_array_equal(np.asarray(images[1][1]), np.asarray(gradient(1)))


def test_folder_limit_decodes_first_files_only(folder):
    (folder / "z.png").write_bytes(b"broken, but never read")
    assert [n for n, _ in load_image_folder(folder, limit=2)] == ["a.JPG", "b.png"]


def test_transparent_pixels_become_white_as_the_processor_paints_them(tmp_path):
    d = tmp_path / "alpha"
    d.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red hidden under full transparency
    rgba[0, 0] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(d / "x.png")
    (_, image), = load_image_folder(d)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (10, 20, 30)
    assert tuple(pixels[1, 1]) == (255, 255, 255)


def test_missing_folder(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist") as e:
        load_image_folder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "one.png"
    gradient(0).save(path)
    with pytest.raises(CalibrationError, match="not a folder") as e:
        load_image_folder(path)
    assert str(path) in str(e.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here")
    with pytest.raises(CalibrationError, match="no image files") as e:
        load_image_folder(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_jpg_holding_text_names_the_file(folder):
    bad = folder / "aa.jpg"
    bad.write_text("this is not a jpeg")
    with pytest.raises(CalibrationError, match="cannot be decoded") as e:
        load_image_folder(folder)
    assert str(bad) in str(e.value)


def test_truncated_png_names_the_file(folder):
    good = (folder / "b.png").read_bytes()
    bad = folder / "bb.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CalibrationError) as e:
        load_image_folder(folder)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------- prompts
def test_prompts_one_per_non_empty_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffFirst?\r\n\r\n   \n  Zweite Frage: ünïcödé  \nthird".encode("utf-8"))
    assert load_prompts(path) == ["First?", "Zweite Frage: ünïcödé", "third"]


@pytest.mark.parametrize(
    "content, match",
    [(None, "cannot read"), (b"", "no prompts"), (b"\n  \n\n", "no prompts"), ("caf\xe9\n".encode("latin-1"), "not UTF-8")],
    ids=["missing", "empty", "blank-lines", "latin-1"],
)
def test_bad_prompt_file_names_the_file(tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=match) as e:
        load_prompts(path)
    assert str(path) in str(e.value)


def test_prompt_file_that_is_a_folder(tmp_path):
    with pytest.raises(CalibrationError) as e:
        load_prompts(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- digest
def test_digest_stable_across_loads_and_timestamps(folder):
    first = calibration_data(folder, size=4)
    os.utime(folder / "b.png", (1_000_000, 1_000_000))
    second = calibration_data(folder, size=4)
    assert first.images[0][1] is not second.images[0][1]  # decoded afresh
    assert first.digest == second.digest and len(first.digest) == 64
    assert first == second and hash(first) == hash(second)


def test_digest_changes_with_one_pixel(folder):
    before = calibration_data(folder, size=4).digest
    pixels = np.asarray(gradient(1)).copy()
    pixels[5, 7, 1] ^= 1
    Image.fromarray(pixels).save(folder / "b.png")
    assert calibration_data(folder, size=4).digest != before


def test_digest_changes_with_a_renamed_image(folder):
    before = calibration_data(folder, size=4).digest
    (folder / "b.png").rename(folder / "b2.png")  # same order, same pixels, new name
    after = calibration_data(folder, size=4)
    assert after.names[1] == "b2.png"
    assert after.digest != before


def test_digest_changes_with_one_prompt(folder, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Describe this image.\nWhat is in the picture?\n")
    before = calibration_data(folder, size=2, prompts_file=path).digest
    assert calibration_data(folder, size=2, prompts_file=path).digest == before
    path.write_text("Describe this image.\nWhat is in the picture!\n")
    assert calibration_data(folder, size=2, prompts_file=path).digest != before


def test_digest_field_boundaries_matter():
    image = gradient(0)
    assert CalibrationData.of([], ["ab", "c"]).digest != CalibrationData.of([], ["a", "bc"]).digest
    assert CalibrationData.of([("a", image)], []).digest != CalibrationData.of([("b", image)], []).digest


# ---------------------------------------------------------------- sizes and the built-in photos
def test_builtin_photos_are_real():
    data = calibration_data(size=3)
    assert data.names == BUILTIN[:3]
    assert data.prompts == DEFAULT_PROMPTS
    for _, image in data.images:
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.shape[0] >= 256 and pixels.shape[1] >= 256
        assert pixels.std() > 20  # a photograph, not a blank or constant image
    assert not np.array_equal(np.asarray(data.images[0][1]), np.asarray(data.images[1][1]))


def test_builtin_cycles_past_the_available_photos():
    data = calibration_data(size=len(BUILTIN) + 2)
    assert data.names == BUILTIN + BUILTIN[:2]
    assert data.images[len(BUILTIN)][1] is data.images[0][1]


def test_folder_cycles_when_size_exceeds_images(folder):
    data = calibration_data(folder, size=6)
    assert data.names == ("a.JPG", "b.png", "c.jpeg", "d.gif", "a.JPG", "b.png")
    assert calibration_data(folder, size=2).names == ("a.JPG", "b.png")


@pytest.mark.parametrize("size", [0, -3])
def test_size_below_one_names_the_option(folder, size):
    with pytest.raises(CalibrationError, match="--calibration-size"):
        calibration_data(folder, size=size)


# ---------------------------------------------------------------- chat prompts
@pytest.fixture(scope="module")
def encoder():
    from runtime.reference.sources import ensure_default_checkpoint
    from runtime.prompts import PromptEncoder

    return PromptEncoder(ensure_default_checkpoint(0))


@pytest.mark.parametrize("per_prompt", [1, 2, 3])
def test_interleaved_prompts_encode_with_expected_images(folder, encoder, per_prompt):
    data = calibration_data(folder, size=4, prompts_file=None)
    prompts = interleaved_prompts(data, images_per_prompt=per_prompt)
    images = [image for _, image in data.images]

    assert len(prompts) == -(-4 // per_prompt)
    for row, prompt in enumerate(prompts):
        assert prompt[0] == "User:"
        assert prompt[1:-1] == [images[(row * per_prompt + k) % 4] for k in range(per_prompt)]
        assert prompt[-1] == f"{DEFAULT_PROMPTS[row % len(DEFAULT_PROMPTS)]}<end_of_utterance>\nAssistant:"

    encoded = encoder.encode(prompts)
    h, w = encoder.size
    assert encoded.pixel_values.shape == (len(prompts), per_prompt, 3, h, w)
    assert ((encoded.input_ids == encoder.image_id).sum(axis=1) == per_prompt).all()
    # every image slot is filled (zero images would mean padding) and attended by some token
    assert (np.abs(encoded.pixel_values).reshape(len(prompts), per_prompt, -1).max(axis=-1) > 0).all()
    assert (encoded.image_attention_mask.sum(axis=1) > 0).all()
    eou = encoder.tokenizer.token_to_id("<end_of_utterance>")
    assert ((encoded.input_ids == eou).sum(axis=1) == 1).all()


def test_interleaved_prompts_cycle_texts_deterministically(folder, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n")
    data = calibration_data(folder, size=5, prompts_file=path)
    texts = [p[-1] for p in interleaved_prompts(data)]
    assert texts == [f"{t}<end_of_utterance>\nAssistant:" for t in ["one", "two", "three", "one", "two"]]
    assert [p[-1] for p in interleaved_prompts(data)] == texts


def test_interleaved_prompts_refuse_zero_images_per_prompt(folder):
    with pytest.raises(CalibrationError):
        interleaved_prompts(calibration_data(folder, size=2), images_per_prompt=0)
