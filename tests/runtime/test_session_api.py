"""Session's public API: request checks (named, raised before any graph runs), loading and file
verification, torch inputs, thread safety, streaming, finished rows and GenerateResult.

Every generated sequence is compared with transformers' IdeficsForVisionText2Text.generate on the
same checkpoint (greedy, fp32), and texts with the transformers tokenizer's batch_decode."""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, IdeficsForVisionText2Text

from calibration.images import builtin_images
from exporter.export import ExportConfig, export
from runtime import ManifestError, Session, ToolkitError
from runtime.reference.sources import ensure_default_checkpoint
from tests.util import hf_generate

MAX_IMAGES, MAX_SEQ_LEN, MAX_BATCH = 2, 64, 4
IMAGE_SIZE = 32  # the embedded default's vision_config.image_size (checked against HF's config below)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("session_api") / "export"
    export(ExportConfig(output=out, progress=False, max_images=MAX_IMAGES, max_seq_len=MAX_SEQ_LEN,
                        max_batch=MAX_BATCH))
    return out


@pytest.fixture(scope="module")
def bare_export_dir(tmp_path_factory):
    """random:tiny: no processor files."""
    out = tmp_path_factory.mktemp("session_api_bare") / "export"
    export(ExportConfig(output=out, model="random:tiny", progress=False, validate=False))
    return out


@pytest.fixture(scope="module")
def session(export_dir):
    with Session(export_dir) as s:
        yield s


@pytest.fixture(scope="module")
def hf():
    """(model, processor) of the same checkpoint the default export was made from."""
    folder = ensure_default_checkpoint(0)
    model = IdeficsForVisionText2Text.from_pretrained(folder).eval()
    assert model.config.vision_config.image_size == IMAGE_SIZE
    return model, AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def photos():
    return builtin_images(6)


def numpy_inputs(batch) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


def two_prompts(photos):
    return [
        ["User:", photos[0], "Describe this image.<end_of_utterance>\nAssistant:"],
        ["User: compare", photos[1], "and", photos[2], "please.<end_of_utterance>\nAssistant:"],
    ]


# ---------------------------------------------------------------- bad requests
@pytest.fixture
def guard(monkeypatch):
    """Make any graph call of a session fail the test: requests must be rejected before."""

    def apply(s: Session) -> Session:
        def ran(*args, **kwargs):
            raise AssertionError("a graph ran before the bad request was rejected")

        for runner in (s.graphs.vision, s.graphs.perceiver, s.graphs.decoder):
            monkeypatch.setattr(runner, "infer", ran)
            monkeypatch.setattr(runner, "bind", ran)
        return s

    return apply


IDS = np.array([[1, 40, 41, 42, 43]], np.int64)  # a valid [1, 5] prompt
ONES = np.ones_like(IDS)


def _pixels(b=1, n=1, size=IMAGE_SIZE):
    return np.zeros((b, n, 3, size, size), np.float32)


def _image_mask(b=1, t=5, n=1):
    return np.ones((b, t, n), np.int64)


def NUM(n: int) -> str:
    """a regex matching the number n and no longer number"""
    return rf"(?<!\d){n}(?!\d)"


# name -> (exception, generate kwargs, regexes the message must match)
BAD_REQUESTS = {
    "input_ids rank 1": (ValueError, dict(input_ids=IDS[0]), [r"input_ids", r"rank 2|\[batch, seq\]", r"\(5,\)"]),
    "input_ids rank 3": (ValueError, dict(input_ids=IDS[None]), [r"input_ids", r"rank 2|\[batch, seq\]", r"\(1, 1, 5\)"]),
    "float input_ids": (TypeError, dict(input_ids=IDS.astype(np.float32)), [r"input_ids", r"integer|int", r"float32"]),
    "attention_mask shape": (
        ValueError, dict(input_ids=IDS, attention_mask=np.ones((1, 4), np.int64)), [r"attention_mask", r"\(1, 5\)"]),
    "right-padded attention_mask": (
        ValueError, dict(input_ids=IDS, attention_mask=np.array([[1, 1, 1, 1, 0]])), [r"attention_mask", r"left"]),
    "more images than max_images": (
        ValueError,
        dict(input_ids=IDS, attention_mask=ONES, pixel_values=_pixels(n=3), image_attention_mask=_image_mask(n=3)),
        [r"pixel_values", NUM(3), NUM(MAX_IMAGES), r"max.images"]),
    "pixel size": (
        ValueError,
        dict(input_ids=IDS, pixel_values=_pixels(size=16), image_attention_mask=_image_mask()),
        [r"pixel_values", NUM(16), rf"{IMAGE_SIZE}\s*x\s*{IMAGE_SIZE}|{IMAGE_SIZE}, {IMAGE_SIZE}"]),
    "pixel_values batch mismatch": (
        ValueError,
        dict(input_ids=np.repeat(IDS, 2, 0), pixel_values=_pixels(b=1), image_attention_mask=_image_mask(b=2)),
        [r"pixel_values", r"batch\W*2"]),
    "missing image_attention_mask": (
        ValueError, dict(input_ids=IDS, pixel_values=_pixels()), [r"image_attention_mask", r"\[batch, seq, images\]"]),
    "image_attention_mask shape": (
        ValueError,
        dict(input_ids=IDS, pixel_values=_pixels(n=1), image_attention_mask=_image_mask(n=2)),
        [r"image_attention_mask", r"\(1, 5, 1\)"]),
    "token id >= vocab": (
        ValueError, dict(input_ids=np.array([[1, 40, 1024]])), [r"input_ids", NUM(1024)]),
    "prompt + max_new_tokens > max_seq_len": (
        ValueError, dict(input_ids=IDS, max_new_tokens=60), [r"max_new_tokens", NUM(65), NUM(MAX_SEQ_LEN)]),
    "batch > max_batch": (
        ValueError, dict(input_ids=np.repeat(IDS, MAX_BATCH + 1, 0)),
        [r"input_ids|batch", NUM(MAX_BATCH + 1), rf"max_batch\D*{MAX_BATCH}(?!\d)"]),
    "unknown setting": (TypeError, dict(input_ids=IDS, num_beams=2), [r"num_beams"]),
    "prompts and input_ids": (ValueError, dict(input_ids=IDS, prompts=[["User: hi"]]), [r"prompts", r"input_ids"]),
}


def _call(s: Session, method: str, kwargs: dict):
    if method == "generate":
        return s.generate(**kwargs)
    return next(iter(s.stream(**kwargs)))


# generate() queues a batch over max_batch in parts (tests/runtime/test_metrics.py); stream() refuses it
@pytest.mark.parametrize("case,method", [(case, method) for case in BAD_REQUESTS for method in ("generate", "stream")
                                         if (case, method) != ("batch > max_batch", "generate")])
def test_bad_request_is_rejected_before_any_graph_runs(session, guard, case, method):
    exc, kwargs, patterns = BAD_REQUESTS[case]
    guard(session)
    with pytest.raises(exc) as info:
        _call(session, method, dict(kwargs))
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{case}: {message!r} does not match {pattern!r}"


def test_guard_sees_graph_runs(session, guard):
    # the guard itself works: a valid request reaches a graph and fails
    guard(session)
    with pytest.raises(AssertionError, match="graph ran"):
        session.generate(input_ids=IDS, max_new_tokens=2)


def test_prompts_on_export_without_processor(bare_export_dir, guard):
    with Session(bare_export_dir) as s:
        assert s.encoder is None
        guard(s)
        with pytest.raises(ValueError) as info:
            s.generate(prompts=[["User: hi"]], max_new_tokens=2)
        message = str(info.value)
        assert "prompts" in message and "processor" in message
    with Session(bare_export_dir) as s:  # input_ids still work there
        assert s.generate(input_ids=IDS, max_new_tokens=2).texts is None


# ---------------------------------------------------------------- loading
def test_folder_without_manifest(tmp_path, export_dir):
    with pytest.raises(ManifestError) as info:
        Session(tmp_path)
    assert str(tmp_path) in str(info.value) and "manifest.json" in str(info.value)

    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=re.escape(str(copy / "manifest.json"))):
        Session(copy)


def test_changed_byte_in_decoder_is_caught(tmp_path, export_dir):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    path = copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        Session(copy)
    assert "decoder.onnx" in str(info.value) and "sha256" in str(info.value)


def test_deleted_decoder_is_named(tmp_path, export_dir):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "decoder.onnx").unlink()
    with pytest.raises(ManifestError, match=r"decoder\.onnx.*missing"):
        Session(copy)
    with pytest.raises(ToolkitError, match=r"decoder\.onnx"):  # without verification, ONNX Runtime's error names it
        Session(copy, verify=False)


def test_export_from_before_logits_positions_is_refused(tmp_path, export_dir):
    """Decoders exported with the old `logits_to_keep` input: a clear re-export message, not a crash."""
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    text = json.dumps(manifest).replace('"logits_positions"', '"logits_to_keep"')
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=r"decoder\.onnx takes logits_to_keep.*export it again"):
        Session(copy)


def test_verify_false_skips_hash_check(tmp_path, export_dir, hf, photos):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"decoder\.onnx"):
        Session(copy)
    with Session(copy, verify=False) as s:  # files are intact: it loads and generates correctly
        model, processor = hf
        batch = processor(text=[two_prompts(photos)[0]], return_tensors="pt")
        expected = hf_generate(model, batch, max_new_tokens=6)
        np.testing.assert_array_equal(s.generate(**numpy_inputs(batch), max_new_tokens=6).sequences, expected)


# ---------------------------------------------------------------- inputs
def test_torch_tensors_are_accepted(session, hf, photos):
    model, processor = hf
    batch = processor(text=two_prompts(photos), return_tensors="pt")
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    expected = hf_generate(model, batch, max_new_tokens=10)
    from_torch = session.generate(**batch, max_new_tokens=10)
    from_numpy = session.generate(**numpy_inputs(batch), max_new_tokens=10)
    np.testing.assert_array_equal(from_torch.sequences, expected)
    np.testing.assert_array_equal(from_numpy.sequences, expected)


# ---------------------------------------------------------------- threads
def test_concurrent_generate_equals_sequential(session, hf, photos):
    model, processor = hf
    prompt_sets = [
        [["User:", photos[3], "What is in the picture?"]],
        two_prompts(photos),
        [["User: a cat on a table. Assistant:"], ["What is the rocket doing?"], ["Hi"]],
        [["User:", photos[1], photos[2], "Which one is the cat?"]],
    ]
    requests, expected = [], []
    for prompts in prompt_sets:
        batch = processor(text=prompts, return_tensors="pt")
        expected.append(hf_generate(model, batch, max_new_tokens=24))
        inputs = numpy_inputs(batch)
        if not inputs["image_attention_mask"].any():  # text only: no pixels at all
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        requests.append(inputs)
    sequential = [session.generate(**r, max_new_tokens=24).sequences for r in requests]
    for got, want in zip(sequential, expected):
        np.testing.assert_array_equal(got, want)

    for round_ in range(3):
        results: dict[tuple[int, int], np.ndarray] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(requests))

        def work(i):
            try:
                barrier.wait(timeout=30)
                for repeat in range(2):
                    results[i, repeat] = session.generate(**requests[i], max_new_tokens=24).sequences
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        order = [(round_ + k) % len(requests) for k in range(len(requests))]
        threads = [threading.Thread(target=work, args=(i,)) for i in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        for (i, _), got in sorted(results.items()):
            np.testing.assert_array_equal(got, sequential[i])
        assert len(results) == 2 * len(requests)


# ---------------------------------------------------------------- stream
def test_stream_one_prompt(session, hf, photos):
    model, processor = hf
    prompt = two_prompts(photos)[0]
    batch = processor(text=[prompt], return_tensors="pt")
    p = batch["input_ids"].shape[1]
    reference = hf_generate(model, batch, max_new_tokens=24)
    new = reference[:, p:]
    decode = processor.tokenizer.decode
    # lengths: a short one, and the longest whose text ends in an incomplete byte sequence (a
    # byte-fallback token that generation stopped before completing)
    ragged = [n for n in range(1, new.shape[1] + 1) if decode(new[0, :n], skip_special_tokens=True).endswith("\ufffd")]
    assert ragged, "precondition: the reference should end a byte sequence early somewhere"
    for n in (8, ragged[-1]):
        result = session.generate(prompts=[prompt], max_new_tokens=n)
        np.testing.assert_array_equal(result.sequences, reference[:, : p + n])
        assert result.texts[0] == decode(new[0, :n], skip_special_tokens=True)
        pieces = list(session.stream(prompts=[prompt], max_new_tokens=n))
        assert all(isinstance(piece, str) and piece for piece in pieces), pieces  # only new text
        assert "".join(pieces) == result.texts[0], f"max_new_tokens={n}"
        # one piece per token that adds text, by the reference tokenizer (held back while a
        # byte-fallback sequence is incomplete, flushed at the last token)
        shown, changes = "", 0
        for k in range(1, n + 1):
            text = decode(new[0, :k], skip_special_tokens=True)
            if (k == n or not text.endswith("\ufffd")) and text != shown:
                shown, changes = text, changes + 1
        assert len(pieces) == changes


def test_stream_two_prompts(session, hf, photos):
    model, processor = hf
    prompts = two_prompts(photos)
    batch = processor(text=prompts, return_tensors="pt")
    p = batch["input_ids"].shape[1]
    reference = hf_generate(model, batch, max_new_tokens=24)
    texts = processor.tokenizer.batch_decode(reference[:, p:], skip_special_tokens=True)
    result = session.generate(prompts=prompts, max_new_tokens=24)
    np.testing.assert_array_equal(result.sequences, reference)
    assert result.texts == texts
    items = list(session.stream(prompts=prompts, max_new_tokens=24))
    assert all(isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item) for item in items)
    assert all(any(item) for item in items), "a step without new text yields nothing"
    for row in range(2):
        assert "".join(item[row] for item in items) == texts[row], f"row {row}"


# ---------------------------------------------------------------- finished rows
N_EOS = 20


@pytest.fixture(scope="module")
def eos_case(hf, photos):
    """Two-row batch, HF's free-running reference, and for each row a token HF generates mid-way in
    that row (first occurrence, not generated by the other row)."""
    model, processor = hf
    batch = processor(text=two_prompts(photos)[:1] + [["User:", photos[4], "Where was this photo taken? Assistant:"]],
                      return_tensors="pt")
    p = batch["input_ids"].shape[1]
    new = hf_generate(model, batch, max_new_tokens=N_EOS)[:, p:]
    model_eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    picks = []
    for row in range(2):
        other = set(new[1 - row].tolist())
        end = next((k for k, tok in enumerate(new[row]) if tok == model_eos), N_EOS)
        pick = next(((int(new[row, k]), k) for k in range(2, min(end, N_EOS - 4))
                     if new[row, k] not in new[row, :k] and new[row, k] not in other
                     and new[row, k] not in (pad, model_eos)), None)
        assert pick is not None, f"precondition: no usable mid-way token in row {row}: {new[row]}"
        picks.append(pick)
    return batch, p, picks


def test_eos_finishes_one_row(session, hf, eos_case):
    model, _ = hf
    batch, p, [(eos, k), _] = eos_case
    expected = hf_generate(model, batch, max_new_tokens=N_EOS, eos_token_id=eos)
    pad = model.generation_config.pad_token_id
    assert expected.shape[1] == p + N_EOS  # the other row runs on
    assert expected[0, p + k] == eos and (expected[0, p + k + 1:] == pad).all()  # HF pads the finished row
    result = session.generate(**numpy_inputs(batch), max_new_tokens=N_EOS, eos_token_id=eos)
    np.testing.assert_array_equal(result.sequences, expected)


def test_eos_list_stops_when_all_rows_finish(session, hf, eos_case):
    model, processor = hf
    batch, p, [(eos0, k0), (eos1, k1)] = eos_case
    expected = hf_generate(model, batch, max_new_tokens=N_EOS, eos_token_id=[eos0, eos1])
    assert expected.shape[1] == p + max(k0, k1) + 1 < p + N_EOS  # early stop
    result = session.generate(**numpy_inputs(batch), max_new_tokens=N_EOS, eos_token_id=[eos0, eos1])
    np.testing.assert_array_equal(result.sequences, expected)
    generated = expected.shape[1] - p
    assert len(result.timings["decode"]) == generated - 1
    assert result.texts == processor.tokenizer.batch_decode(expected[:, p:], skip_special_tokens=True)
    items = list(session.stream(**numpy_inputs(batch), max_new_tokens=N_EOS, eos_token_id=[eos0, eos1]))
    assert len(items) == generated


def test_pad_token_id_override(session, hf, eos_case):
    model, _ = hf
    batch, p, [(eos, k), _] = eos_case
    pad = 7
    assert pad != model.generation_config.pad_token_id
    expected = hf_generate(model, batch, max_new_tokens=N_EOS, eos_token_id=eos, pad_token_id=pad)
    assert (expected[0, p + k + 1:] == pad).all()
    result = session.generate(**numpy_inputs(batch), max_new_tokens=N_EOS, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(result.sequences, expected)


# ---------------------------------------------------------------- GenerateResult
def test_generate_result_with_images(session, hf, photos):
    model, processor = hf
    prompts = two_prompts(photos)
    batch = processor(text=prompts, return_tensors="pt")
    p = batch["input_ids"].shape[1]
    expected = hf_generate(model, batch, max_new_tokens=12)
    result = session.generate(prompts=prompts, max_new_tokens=12)
    np.testing.assert_array_equal(result.sequences, expected)
    assert result.prompt_length == p
    np.testing.assert_array_equal(result.new_tokens, expected[:, p:])
    assert result.texts == processor.tokenizer.batch_decode(expected[:, p:], skip_special_tokens=True)
    timings = result.timings
    assert set(timings) >= {"vision", "perceiver", "prefill", "decode", "queued", "first_token", "cached_images"}
    # the session's image cache may hold these photos from earlier tests; a cold one runs the graphs
    cold = Session(session.folder, image_cache_bytes=0).generate(prompts=prompts, max_new_tokens=12).timings
    assert cold["cached_images"] == 0
    for key in ("vision", "perceiver", "prefill"):
        assert isinstance(cold[key], float) and cold[key] > 0, key
    assert 0 < timings["queued"] <= timings["first_token"] + sum(timings["decode"]) and timings["first_token"] > 0
    generated = expected.shape[1] - p
    assert isinstance(timings["decode"], list) and len(timings["decode"]) == generated - 1
    assert all(isinstance(t, float) and t > 0 for t in timings["decode"])


def test_generate_result_text_only(session, hf):
    model, processor = hf
    batch = processor(text=[["User: a cat on a table. Assistant:"]], return_tensors="pt")
    p = batch["input_ids"].shape[1]
    expected = hf_generate(model, batch, max_new_tokens=5)
    result = session.generate(prompts=[["User: a cat on a table. Assistant:"]], max_new_tokens=5)
    np.testing.assert_array_equal(result.sequences, expected)
    assert result.texts == processor.tokenizer.batch_decode(expected[:, p:], skip_special_tokens=True)
    assert result.timings["vision"] == 0 and result.timings["perceiver"] == 0  # no image: neither graph runs
    assert result.timings["prefill"] > 0 and len(result.timings["decode"]) == expected.shape[1] - p - 1


def test_processor_output_for_text_only_prompt_is_accepted(session, hf):
    # IdeficsProcessor returns a bool image_attention_mask and zero pixel_values for text-only prompts
    model, processor = hf
    batch = processor(text=[["User: a cat on a table. Assistant:"]], return_tensors="pt")
    assert batch["image_attention_mask"].dtype == torch.bool
    expected = hf_generate(model, batch, max_new_tokens=8)
    result = session.generate(**batch, max_new_tokens=8)
    np.testing.assert_array_equal(result.sequences, expected)


def test_torch_backend_loads_without_transformers_bar(export_dir, capsys):
    """Session(backend="torch") is a library call: transformers' "Loading weights" bar is not the
    caller's to see; the caller's own setting is left as it was."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    capsys.readouterr()
    with Session(export_dir, backend="torch") as s:
        assert s.backend == "torch"
    err = capsys.readouterr().err
    assert "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()
