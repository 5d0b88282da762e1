"""GPU tests: run only where onnxruntime-gpu finds a CUDA device (skipped on CPU-only machines).

Session on ONNX Runtime CUDA must give transformers' greedy tokens in FP32, and FP16 must stay
within the precision thresholds. Not run in this project's CI (no GPU there)."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu and an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    from exporter.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("gpu") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16",)))
    return folder


def test_cuda_fp32_matches_transformers(out):  # pragma: no cover - GPU only
    import torch
    from transformers import IdeficsForVisionText2Text

    from calibration.images import builtin_images
    from exporter.load import ensure_default_checkpoint
    from runtime import Session

    session = Session(out, device="cuda", precision="fp32")
    prompts = [["User:", img, "Describe this image.<end_of_utterance>\nAssistant:"] for img in builtin_images(3)]
    enc = session.encoder.encode(prompts)
    model = IdeficsForVisionText2Text.from_pretrained(ensure_default_checkpoint(0)).eval()
    with torch.no_grad():
        expected = model.generate(input_ids=torch.from_numpy(enc.input_ids),
                                  attention_mask=torch.from_numpy(enc.attention_mask),
                                  pixel_values=torch.from_numpy(enc.pixel_values),
                                  image_attention_mask=torch.from_numpy(enc.image_attention_mask),
                                  max_new_tokens=32, do_sample=False).numpy()
    np.testing.assert_array_equal(session.generate(prompts=prompts, max_new_tokens=32).sequences, expected)


def test_cuda_fp16_agrees_with_fp32(out):  # pragma: no cover - GPU only
    from calibration.images import builtin_images
    from runtime import Session
    from runtime.compare import compare_sessions
    from runtime.session import check_request

    reference = Session(out, device="cuda", precision="fp32")
    prompts = [["User:", img, "What is in the picture?<end_of_utterance>\nAssistant:"] for img in builtin_images(4)]
    enc = reference.encoder.encode(prompts)
    request = check_request(reference.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values,
                            enc.image_attention_mask)
    agreement = compare_sessions(reference, Session(out, device="cuda", precision="fp16"), request, 32)
    assert agreement.top1_share >= 0.9, agreement.as_dict()
