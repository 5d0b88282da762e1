"""Which precision a Session loads when none is named: the fastest the export has for the backend
and device (runtime.manifest.default_precision), unit-tested on manifests with various variant
sets, then on a real export with FP16 and INT8 weight-only graphs. Also the message for a precision
the toolkit does not write."""

from __future__ import annotations

import logging

import pytest

from exporter.export import ExportConfig, export
from runtime import ManifestError, Session
from runtime.manifest import CacheNames, Limits, Manifest, ModelInfo, Variant, default_precision

BOTH = ["onnxruntime", "tensorrt"]
ORT = ["onnxruntime"]


def manifest_with(variants: dict[str, list[str]], recorded: str = "fp32") -> Manifest:
    """A manifest whose only content that matters is its variants: precision -> backends."""
    info = ModelInfo(num_layers=1, num_cross_layers=1, cross_layer_interval=1, num_heads=1, head_dim=8,
                     hidden_size=8, vocab_size=16, vision_seq_len=5, vision_dim=8, image_seq_len=2, image_size=8,
                     use_resampler=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    names = CacheNames("ck.{j}", "cv.{j}", "pk.{i}", "pv.{i}", "prk.{i}", "prv.{i}")
    return Manifest(source={}, precision=recorded, opset=18, model=info, limits=Limits(1, 1, 8), graphs={},
                    names=names, versions={},
                    variants={p: Variant(p, {}, backends=list(b)) for p, b in variants.items()})


# (variants present -> backends) ; expected on ORT CPU, ORT CUDA, TensorRT
CASES = [
    ({}, ("fp32", "fp32", "fp32")),
    ({"fp16": BOTH}, ("fp32", "fp16", "fp16")),
    ({"int8": BOTH}, ("fp32", "int8", "int8")),  # `--int8` alone: INT8 Q/DQ is the slowest on CPU
    ({"int8wo": ORT}, ("int8wo", "fp32", "fp32")),
    ({"fp16": BOTH, "int8": BOTH}, ("fp32", "fp16", "fp16")),
    ({"int8": BOTH, "int8wo": ORT}, ("int8wo", "int8", "int8")),
    ({"fp16": BOTH, "int8wo": ORT}, ("int8wo", "fp16", "fp16")),
    ({"fp16": BOTH, "int8": BOTH, "int8wo": ORT}, ("int8wo", "fp16", "fp16")),
    ({"fp16": ORT, "int8": BOTH}, ("fp32", "fp16", "int8")),  # only a variant TensorRT can read
    ({"int8wo": ["tensorrt"]}, ("fp32", "fp32", "fp32")),  # (never written) backends are obeyed
    ({"fp16": [], "int8wo": []}, ("int8wo", "fp16", "fp16")),  # no backends listed: an older manifest
]


@pytest.mark.parametrize("variants, expected", CASES, ids=["+".join(v) or "fp32-only" for v, _ in CASES])
def test_default_precision_follows_backend_and_device(variants, expected):
    manifest = manifest_with(variants, recorded=next(iter(variants), "fp32"))
    got = (default_precision(manifest, "onnxruntime", "cpu"), default_precision(manifest, "onnxruntime", "cuda"),
           default_precision(manifest, "tensorrt", "cuda"))
    assert got == expected
    assert default_precision(manifest, "onnxruntime", "cuda:1") == expected[1]
    assert default_precision(manifest, "torch", "cpu") == default_precision(manifest, "torch", "cuda") == "fp32"


def test_the_manifests_own_field_is_not_the_session_default():
    # `idefics-export --int8` records int8; on the CPU the default is still fp32
    assert default_precision(manifest_with({"int8": BOTH}, recorded="int8"), "onnxruntime", "cpu") == "fp32"


@pytest.mark.parametrize("precision, named", [
    ("bf16", ["'bf16' is not a precision", "fp16 (--fp16)", "int8 (--int8)", "int8wo (--int8-weight-only)",
              "this export has: fp32, fp16"]),
    ("int8", ["no int8 graphs", "it has: fp32, fp16", "re-export with --int8"]),
    ("int8wo", ["no int8wo graphs", "re-export with --int8-weight-only"]),
])
def test_missing_precision_names_the_flags_that_exist(precision, named):
    with pytest.raises(ManifestError) as info:
        manifest_with({"fp16": BOTH}).graphs_for(precision)
    message = str(info.value)
    for text in named:
        assert text in message, (text, message)
    assert "--bf16" not in message


# ---------------------------------------------------------------- a real export
@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default-precision") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16", "int8wo")))
    return folder


def test_session_default_on_cpu_is_int8_weight_only(out, caplog):
    with caplog.at_level(logging.INFO, logger="runtime.session"):
        session = Session(out)
    with session:
        assert session.precision == "int8wo"
        assert session.manifest.precision == "fp16"  # what `--fp16 --int8-weight-only` recorded
        assert session.graphs.decoder.spec.file == "decoder.int8wo.onnx"
        assert session.graphs.vision.spec.file == "vision.int8wo.onnx"
        assert len(session.generate(prompts=[["User: hello<end_of_utterance>\nAssistant:"]],
                                    max_new_tokens=3).new_tokens[0]) == 3
    assert any("loading int8wo, the default on onnxruntime cpu among fp32, fp16, int8wo" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_an_explicit_precision_wins(out):
    with Session(out, precision="fp16") as session:
        assert session.precision == "fp16" and session.graphs.decoder.spec.file == "decoder.fp16.onnx"
    with Session(out, precision="fp32") as session:
        assert session.precision == "fp32" and session.graphs.decoder.spec.file == "decoder.onnx"


def test_session_refuses_bf16_naming_what_exists(out):
    with pytest.raises(ManifestError) as info:
        Session(out, precision="bf16")
    message = str(info.value)
    assert "--bf16" not in message
    for text in ("fp16 (--fp16)", "int8 (--int8)", "int8wo (--int8-weight-only)",
                 "this export has: fp32, fp16, int8wo"):
        assert text in message, (text, message)
