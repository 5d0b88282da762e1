"""`idefics-generate` as a user meets it: the text it streams and the JSON it prints equal what
transformers' IdeficsForVisionText2Text.generate gives for the same prompt and image files, and a
caller's mistake exits 2 with one line naming the folder, file, count or setting at fault.

The command runs in-process through runtime.cli.main (plus one real `idefics-generate --help`).
Photos are scikit-image's samples written to JPEG / PNG files; the reference reads the same files
and decodes its new tokens with the processor's tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.images import builtin_images
from exporter.export import ExportConfig, export
from runtime.cli import build_parser, main, unescape
from runtime.prompts import build_prompt
from tests.util import default_hf

MAX_IMAGES = 2
QUESTION = "What is in the picture?<end_of_utterance>\nAssistant:"
CLI_PROMPT = r"User:<image>What is in the picture?<end_of_utterance>\nAssistant:"  # as a shell passes it
FLAGS = ("--image", "--max-new-tokens", "--precision", "--backend", "--device", "--threads", "--do-sample",
         "--temperature", "--top-k", "--top-p", "--seed", "--json", "--verbose", "--quiet", "--help")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate_cli") / "export"
    export(ExportConfig(output=out, progress=False, max_images=MAX_IMAGES))
    return out


@pytest.fixture(scope="module")
def bare_export_dir(tmp_path_factory):
    """random:tiny: an export without processor files."""
    out = tmp_path_factory.mktemp("generate_cli_bare") / "export"
    export(ExportConfig(output=out, model="random:tiny", progress=False, validate=False))
    return out


@pytest.fixture(scope="module")
def hf():
    """(model, processor) of the checkpoint the default export was made from."""
    return default_hf()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """astronaut as a JPEG file, coffee as a PNG file."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut, coffee = builtin_images(2)
    astronaut.save(folder / "astronaut.jpg", quality=90)
    coffee.save(folder / "coffee.png")
    return folder / "astronaut.jpg", folder / "coffee.png"


def reference(hf, prompt: list, max_new_tokens: int) -> tuple[np.ndarray, str]:
    """transformers' greedy sequences [1, prompt + new] and the new text, for an interleaved prompt
    whose images are file paths."""
    model, processor = hf
    prompt = [Image.open(item) if isinstance(item, Path) else item for item in prompt]
    batch = processor(text=[prompt], return_tensors="pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to share between threads
    try:
        with torch.no_grad():
            sequences = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens).numpy()
    finally:
        torch.set_num_threads(threads)
    new = sequences[0, batch["input_ids"].shape[1]:]
    return sequences, processor.tokenizer.decode(new, skip_special_tokens=True)


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


class Recorder:
    """A stdout that records every write and flush."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return len(text)

    def flush(self) -> None:
        self.events.append(("flush", ""))

    @property
    def text(self) -> str:
        return "".join(text for kind, text in self.events if kind == "write")


# ---------------------------------------------------------------- text out
def test_prompt_becomes_the_interleaved_prompt(photos):
    jpeg, _ = photos
    assert unescape(CLI_PROMPT) == "User:<image>" + QUESTION
    assert unescape(r"a\tb\\nc\x") == "a\tb\\nc\\x"  # \\ is one backslash; other escapes stay as typed
    items = build_prompt(unescape(CLI_PROMPT), [jpeg.read_bytes()])
    assert len(items) == 3 and items[0] == "User:" and items[2] == QUESTION
    assert isinstance(items[1], Image.Image)
    np.testing.assert_array_equal(np.asarray(items[1]), np.asarray(Image.open(jpeg)))


def test_streamed_text_equals_transformers(export_dir, hf, photos, monkeypatch):
    jpeg, _ = photos
    _, expected = reference(hf, ["User:", jpeg, QUESTION], 24)
    assert expected.strip(), "precondition: the reference produces text"
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    rc = main([str(export_dir), CLI_PROMPT, "--image", str(jpeg), "--max-new-tokens", "24", "--precision", "fp32"])
    assert rc == 0
    assert out.text == expected + "\n"
    # streamed: several pieces, each flushed as soon as it is written
    writes = [i for i, (kind, _) in enumerate(out.events) if kind == "write"]
    assert len(writes) > 2, out.events
    assert all(out.events[i + 1][0] == "flush" for i in writes), out.events


@pytest.mark.parametrize("case", ["two images, text first", "text only"])
def test_more_prompts_equal_transformers(export_dir, hf, photos, capsys, case):
    jpeg, png = photos
    if case == "text only":
        cli, images, prompt = r"User: a cat on a table.<end_of_utterance>\nAssistant:", [], \
            ["User: a cat on a table.<end_of_utterance>\nAssistant:"]
    else:
        cli, images = r"User: compare<image>and<image>please.<end_of_utterance>\nAssistant:", [png, jpeg]
        prompt = ["User: compare", png, "and", jpeg, "please.<end_of_utterance>\nAssistant:"]
    _, expected = reference(hf, prompt, 16)
    argv = [export_dir, cli, "--max-new-tokens", 16, "--precision", "fp32"]
    for image in images:
        argv += ["--image", image]
    rc, out, err = run(argv, capsys)
    assert (rc, out, err) == (0, expected + "\n", "")


def test_json_sequences_equal_transformers(export_dir, hf, photos, capsys):
    jpeg, _ = photos
    sequences, expected = reference(hf, ["User:", jpeg, QUESTION], 12)
    rc, out, err = run([export_dir, CLI_PROMPT, "--image", jpeg, "--json", "--max-new-tokens", 12,
                        "--precision", "fp32"], capsys)
    assert rc == 0 and err == ""
    result = json.loads(out)  # one JSON object, nothing else on stdout
    assert result["sequences"] == sequences.tolist()
    assert result["texts"] == [expected]
    assert result["prompt_length"] == sequences.shape[1] - 12
    assert {"vision", "perceiver", "prefill"} <= set(result["timings"])
    assert len(result["timings"]["decode"]) == 11


def test_sampling_with_a_seed_is_reproducible(export_dir, photos, capsys):
    jpeg, _ = photos
    argv = [export_dir, CLI_PROMPT, "--image", jpeg, "--max-new-tokens", 8, "--do-sample", "--temperature", 0.8,
            "--top-k", 20, "--top-p", 0.9, "--seed", 3, "--json"]
    first, second = (json.loads(run(argv, capsys)[1]) for _ in range(2))
    assert first["sequences"] == second["sequences"]  # the same seed gives the same tokens
    assert first["prompt_length"] < len(first["sequences"][0]) <= first["prompt_length"] + 8


# ---------------------------------------------------------------- logging
def test_libraries_stay_quiet_unless_verbose(export_dir, photos, capsys):
    jpeg, _ = photos
    argv = [export_dir, CLI_PROMPT, "--image", jpeg, "--max-new-tokens", 2]
    assert run(argv, capsys)[2] == ""
    rc, _, err = run(argv + ["-v"], capsys)
    assert rc == 0 and "loaded" in err and "generated" in err
    # a setting without effect is a warning, which --quiet hides
    assert "--temperature applies only with --do-sample" in run(argv + ["--temperature", 0.5], capsys)[2]
    assert run(argv + ["--temperature", 0.5, "-q"], capsys)[2] == ""


# ---------------------------------------------------------------- errors
def assert_user_error(rc, out, err, *names):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    assert err.startswith("idefics-generate: error:"), err
    assert err.count("\n") == 1, f"not one line: {err!r}"
    for name in names:
        assert str(name) in err, f"{name!r} not in {err!r}"
    assert out == ""


def test_missing_export_folder(tmp_path, photos, capsys):
    missing = tmp_path / "no-such-export"
    rc, out, err = run([missing, CLI_PROMPT, "--image", photos[0]], capsys)
    assert_user_error(rc, out, err, missing, "no such folder")


def test_folder_without_manifest(tmp_path, photos, capsys):
    rc, out, err = run([tmp_path, CLI_PROMPT, "--image", photos[0]], capsys)
    assert_user_error(rc, out, err, tmp_path / "manifest.json", "not found")


def test_missing_image_file(export_dir, tmp_path, capsys):
    missing = tmp_path / "holiday.jpg"
    rc, out, err = run([export_dir, CLI_PROMPT, "--image", missing], capsys)
    assert_user_error(rc, out, err, missing, "no such file")


def test_image_file_that_is_not_an_image(export_dir, photos, tmp_path, capsys):
    fake = tmp_path / "notes.jpg"
    fake.write_text("shopping list: eggs, milk\n")
    rc, out, err = run([export_dir, r"User:<image>and<image>\nAssistant:", "--image", photos[0], "--image", fake],
                       capsys)
    assert_user_error(rc, out, err, fake, "not a readable image")
    rc, out, err = run([export_dir, CLI_PROMPT, "--image", tmp_path], capsys)
    assert_user_error(rc, out, err, tmp_path, "folder")


@pytest.mark.parametrize("placeholders, images", [(1, 0), (1, 2), (0, 1), (2, 1)])
def test_placeholder_count_differs_from_images(export_dir, photos, capsys, placeholders, images):
    prompt = "User:" + "<image>" * placeholders + r"Hi<end_of_utterance>\nAssistant:"
    argv = [export_dir, prompt]
    for _ in range(images):
        argv += ["--image", photos[0]]
    rc, out, err = run(argv, capsys)
    assert_user_error(rc, out, err, f"{placeholders} <image> placeholder", f"{images} --image file")


def test_more_images_than_the_export_takes(export_dir, photos, capsys):
    rc, out, err = run([export_dir, "User:<image><image><image>Hi", *["--image", photos[0]] * 3], capsys)
    assert_user_error(rc, out, err, "3 images", f"at most {MAX_IMAGES}")


def test_export_without_processor(bare_export_dir, photos, capsys):
    rc, out, err = run([bare_export_dir, CLI_PROMPT, "--image", photos[0]], capsys)
    assert_user_error(rc, out, err, bare_export_dir, "no processor files", "Python API", "input_ids")


@pytest.mark.parametrize("argv, names", [
    (["--temperature", "-1"], ["--temperature", "> 0", "-1"]),
    (["--temperature", "hot"], ["--temperature", "hot"]),
    (["--top-p", "1.5"], ["--top-p", "1.5"]),
    (["--top-k", "-3"], ["--top-k", "-3"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "positive"]),
    (["--max-new-tokens", "100000"], ["max_new_tokens is 100000", "--max-seq-len"]),
    (["--precision", "int8"], ["no int8 graphs", "--int8"]),
    (["--precision", "fp8"], ["--precision", "fp8"]),
    (["--backend", "openvino"], ["--backend", "openvino"]),
    (["--device", "gpu"], ["device", "gpu"]),
    (["--backend", "tensorrt"], ["tensorrt", "device='cuda'"]),
    (["--seed", "x"], ["--seed", "x"]),
    (["--bogus"], ["--bogus"]),
])
def test_bad_setting(export_dir, photos, capsys, argv, names):
    rc, out, err = run([export_dir, CLI_PROMPT, "--image", photos[0], *argv], capsys)
    assert_user_error(rc, out, err, *names)


# ---------------------------------------------------------------- help and entry point
def test_help_explains_every_flag(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for flag in FLAGS:
        assert flag in out, flag
    for action in build_parser()._actions:  # every option has its own explanation
        assert action.help, action.option_strings or action.dest
    assert r"\n" in out and "newline" in out  # the prompt's escapes are explained


def test_console_script_is_installed():
    script = shutil.which("idefics-generate") or shutil.which("idefics-generate", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("idefics-generate is not installed (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--max-new-tokens" in done.stdout
