"""GPU tests: run only where a CUDA device and the GPU packages are present (skipped elsewhere).

- ONNX Runtime CUDA (onnxruntime-gpu) and the PyTorch backend on CUDA give transformers' greedy
  tokens in FP32; FP16 stays within the precision thresholds;
- the loop's caches live on the GPU and only the token ids come back per step;
- --ort-optimized: the FP16 ONNX Runtime decoder (GroupQueryAttention over the shared cache) on
  CUDA agrees with FP32, in the single-request loop and the in-flight engine;
- TensorRT engines (needs the tensorrt package) built from the FP16 graphs agree with FP32.
`scripts/gpu_run.sh` runs these on a lent GPU host. Not run in this project's CI (no GPU there).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_CUDA_EP and torch.cuda.is_available()),
                       reason="needs onnxruntime-gpu, PyTorch with CUDA and an NVIDIA GPU"),
]
NEW = 32


@pytest.fixture(autouse=True)
def _no_tf32():  # pragma: no cover - GPU only
    # transformers' FP32 reference runs on the CPU; TF32 convolutions/matmuls on the GPU would
    # differ from it by ~1e-3 and flip near ties of the random weights
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def out(tmp_path_factory):  # pragma: no cover - GPU only
    from exporter.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("gpu") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16",)))
    return folder


@pytest.fixture(scope="module")
def prompts():  # pragma: no cover - GPU only
    from calibration.images import builtin_images

    return [["User:", img, "Describe this image.<end_of_utterance>\nAssistant:"] for img in builtin_images(3)]


def _request(session, prompts):  # pragma: no cover - GPU only
    from runtime.session import check_request

    enc = session.encoder.encode(prompts)
    return check_request(session.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values,
                         enc.image_attention_mask)


def _transformers(session, prompts):  # pragma: no cover - GPU only
    from transformers import IdeficsForVisionText2Text

    from runtime.reference.sources import ensure_default_checkpoint

    enc = session.encoder.encode(prompts)
    model = IdeficsForVisionText2Text.from_pretrained(ensure_default_checkpoint(0)).eval()
    with torch.no_grad():
        return model.generate(input_ids=torch.from_numpy(enc.input_ids),
                              attention_mask=torch.from_numpy(enc.attention_mask),
                              pixel_values=torch.from_numpy(enc.pixel_values),
                              image_attention_mask=torch.from_numpy(enc.image_attention_mask),
                              max_new_tokens=NEW, do_sample=False).numpy()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_cuda_fp32_matches_transformers(out, prompts, backend):  # pragma: no cover - GPU only
    from runtime import Session

    session = Session(out, backend=backend, device="cuda", precision="fp32")
    expected = _transformers(session, prompts)
    np.testing.assert_array_equal(session.generate(prompts=prompts, max_new_tokens=NEW).sequences, expected)


def test_cuda_fp16_agrees_with_fp32(out, prompts):  # pragma: no cover - GPU only
    from runtime import Session
    from runtime.compare import compare_sessions

    reference = Session(out, device="cuda", precision="fp32")
    agreement = compare_sessions(reference, Session(out, device="cuda", precision="fp16"),
                                 _request(reference, prompts), NEW)
    assert agreement.top1_share >= 0.9, agreement.as_dict()


def test_cuda_caches_stay_on_the_gpu(out, prompts, monkeypatch):  # pragma: no cover - GPU only
    from runtime import Session
    from runtime.loop import Timings, generate_tokens
    from runtime.sampling import SamplingConfig

    session = Session(out, device="cuda", precision="fp16")
    memory = session.graphs.memory
    assert memory.zeros((1,), np.float16).device.type == "cuda"
    transfers, to_host = [], memory.to_host
    monkeypatch.setattr(memory, "to_host", lambda t: transfers.append((t.device.type, tuple(t.shape))) or to_host(t))
    request = _request(session, prompts)
    steps = list(generate_tokens(session.graphs, request, SamplingConfig(max_new_tokens=NEW, min_new_tokens=0),
                                 Timings()))
    assert steps[0].logits.device.type == "cuda"
    assert transfers == [("cuda", (len(prompts),))] * len(steps)


def test_cuda_ort_fp16_decoder_agrees_with_fp32(tmp_path_factory, prompts):  # pragma: no cover - GPU only
    """--ort-optimized on CUDA: the FP16 ONNX Runtime decoder (GroupQueryAttention over the shared
    cache on the GPU, prompts in it too) agrees with FP32 as the portable FP16 graphs must."""
    from exporter.graphs.bounds import TOLERANCES
    from exporter.export import ExportConfig, export
    from runtime import Session
    from runtime.compare import teacher_forced_logits
    from runtime.loop import Timings, generate_tokens
    from runtime.sampling import SamplingConfig

    folder = tmp_path_factory.mktemp("gpu-ort") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16",), ort_optimized=True))
    with Session(folder, device="cuda", precision="fp16") as session, \
            Session(folder, device="cuda", precision="fp32") as reference:
        assert session.graphs.decoder.spec.file == "decoder.ort.fp16.onnx" and session.graphs.shared_prefill
        assert reference.graphs.decoder.spec.file == "decoder.onnx"  # no FP32 GroupQueryAttention on CUDA
        request = _request(reference, prompts)
        cfg = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW)
        loop = np.stack([s.tokens for s in generate_tokens(session.graphs, request, cfg, Timings())], axis=1)
        engine = session.generate(prompts=prompts, max_new_tokens=NEW, min_new_tokens=NEW).sequences[:, -NEW:]
        for tokens in (loop, engine):  # the single-request loop and the in-flight engine
            # FP32 teacher-forced along the FP16 ORT decoder's own greedy sequences picks the same next tokens
            sequences = np.concatenate([request.input_ids, tokens], axis=1)
            predicted = teacher_forced_logits(reference, request, sequences, NEW).argmax(-1)
            assert (predicted == tokens).mean() >= TOLERANCES["fp16"]["top1"], (predicted == tokens).mean()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT")
def test_tensorrt_fp16_agrees_with_fp32(out, prompts):  # pragma: no cover - GPU + TensorRT only
    from exporter.engines.build import BuildConfig, build_engines
    from runtime import Session
    from runtime.compare import compare_sessions

    build_engines(out, BuildConfig("fp16"))
    reference = Session(out, device="cuda", precision="fp32")
    engine = Session(out, backend="tensorrt", device="cuda", precision="fp16")
    agreement = compare_sessions(reference, engine, _request(reference, prompts), NEW)
    assert agreement.top1_share >= 0.9, agreement.as_dict()
    # the same request through Session.generate and stream
    result = engine.generate(prompts=prompts, max_new_tokens=8)
    assert result.sequences.shape == (len(prompts), result.prompt_length + 8)
