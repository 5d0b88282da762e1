"""The GPU code paths of the generation loop, run on CPU.

- Device memory: the loop with `TorchMemory` keeps every buffer (KV cache, cross K/V, logits,
  ids) in torch tensors and binds them by address; on "cpu" this is the exact code a GPU runs,
  apart from the device string. Checked token-identical to transformers' generate.
- TensorRT runner: real TensorRT cannot be installed here, so `fake_tensorrt` stands in for the
  `tensorrt` module (TensorRT's API contracts, ONNX Runtime arithmetic reading and writing the
  bound addresses). The runner, the engine metadata checks and the builder's optimisation
  profiles are the real code; generation through them must equal transformers' tokens.
- The errors a user without CUDA, TensorRT or onnxruntime-gpu gets.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch

from calibration.images import builtin_images
from exporter.engines.build import profiles
from exporter.export import ExportConfig, export
from runtime import Session
from runtime.engines import EngineError, EngineInfo, engine_paths
from runtime.errors import ToolkitError
from runtime.loop import Graphs, Timings, generate_tokens
from runtime.manifest import GRAPH_NAMES, Manifest, sha256_file
from runtime.memory import TorchMemory
from runtime.reference.sources import ensure_default_checkpoint
from runtime.runners import create_runner
from runtime.runners.tensorrt import TensorRTRunner
from runtime.sampling import SamplingConfig
from runtime.session import check_request
from tests.runtime import fake_tensorrt

NEW = 24
CAPABILITY = "9.0"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16",)))
    return folder


@pytest.fixture(scope="module")
def hf_model():
    from transformers import IdeficsForVisionText2Text

    return IdeficsForVisionText2Text.from_pretrained(ensure_default_checkpoint(0)).eval()


@pytest.fixture(scope="module")
def request_(out):
    """Three rows, left padded, with 1 / 2 / 0 images."""
    session = Session(out)
    images = builtin_images(3)
    prompts = [["User:", images[0], "What is this?<end_of_utterance>\nAssistant:"],
               ["User:", images[1], "and", images[2], "Compare them.<end_of_utterance>\nAssistant:"],
               ["User: tell me a story about a cat.<end_of_utterance>\nAssistant:"]]
    enc = session.encoder.encode(prompts)
    return check_request(session.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values,
                         enc.image_attention_mask)


def hf_generate(model, request, **settings) -> np.ndarray:
    with torch.no_grad():
        return model.generate(input_ids=torch.from_numpy(request.input_ids),
                              attention_mask=torch.from_numpy(request.attention_mask),
                              pixel_values=torch.from_numpy(request.pixel_values),
                              image_attention_mask=torch.from_numpy(request.image_attention_mask),
                              do_sample=False, max_new_tokens=NEW, **settings).numpy()


def loop_generate(graphs, request, **settings) -> np.ndarray:
    cfg = SamplingConfig(max_new_tokens=NEW, **settings)
    tokens = [step.tokens for step in generate_tokens(graphs, request, cfg, Timings())]
    return np.concatenate([request.input_ids, np.stack(tokens, axis=1)], axis=1)


# ---------------------------------------------------------------- device memory (torch tensors)
@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.3}], ids=["greedy-on-device", "host-processors"])
def test_torch_memory_loop_matches_transformers(out, hf_model, request_, settings):
    manifest = Manifest.load(out)
    graphs = manifest.graphs_for("fp32")
    runners = {name: create_runner("onnxruntime", graphs[name], out) for name in GRAPH_NAMES}
    for runner in runners.values():
        runner.activate()
    g = Graphs(manifest, runners, memory=TorchMemory("cpu"))
    expected = hf_generate(hf_model, request_, **settings)
    np.testing.assert_array_equal(loop_generate(g, request_, **settings), expected)
    # the buffers the loop bound really were tensors
    bound = runners["decoder"]
    assert isinstance(g.memory.zeros((1,), np.float32), torch.Tensor) and bound.is_active


def test_greedy_decode_sends_only_token_ids_to_the_host(out, request_, monkeypatch):
    """With device memory, the only device-to-host transfers of plain greedy generation are the
    [B] token ids of each step: logits, caches and cross K/V never leave the device."""
    manifest = Manifest.load(out)
    graphs = manifest.graphs_for("fp32")
    runners = {name: create_runner("onnxruntime", graphs[name], out) for name in GRAPH_NAMES}
    for runner in runners.values():
        runner.activate()
    memory = TorchMemory("cpu")
    transfers = []
    to_host = memory.to_host
    monkeypatch.setattr(memory, "to_host", lambda t: transfers.append((tuple(t.shape), t.dtype)) or to_host(t))
    loop_generate(Graphs(manifest, runners, memory=memory), request_)
    b = request_.input_ids.shape[0]
    assert transfers == [((b,), torch.int64)] * NEW


# ---------------------------------------------------------------- TensorRT runner on the fake
@pytest.fixture
def fake_trt(monkeypatch):
    module = fake_tensorrt.as_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr("runtime.runners.tensorrt.gpu_identity", lambda device="cuda": (CAPABILITY, "Fake GPU"))
    return module


def write_engines(folder, precision: str, shape_inputs=(), **info_overrides) -> None:
    """What idefics-build-engines writes, with the builder's own profiles, as fake engine files."""
    manifest = Manifest.load(folder)
    for name, spec in manifest.graphs_for(precision).items():
        engine, meta = engine_paths(folder, name, precision)
        engine.parent.mkdir(exist_ok=True)
        fake_tensorrt.write_engine(engine, folder, spec, profiles(manifest, spec),
                                   [n for n in shape_inputs if n in {t.name for t in spec.inputs}])
        info = EngineInfo(graph=name, precision=precision, onnx_file=spec.file,
                          onnx_sha256=sha256_file(folder / spec.file), tensorrt_version=fake_tensorrt.__version__,
                          compute_capability=CAPABILITY, device="Fake GPU", profiles=profiles(manifest, spec))
        meta.write_text(json.dumps({**asdict(info), **info_overrides}))


def trt_graphs(folder, precision: str = "fp32") -> Graphs:
    manifest = Manifest.load(folder)
    specs = manifest.graphs_for(precision)
    runners = {name: TensorRTRunner(specs[name], folder, manifest, device="cpu") for name in GRAPH_NAMES}
    for runner in runners.values():
        runner.activate()
    return Graphs(manifest, runners, memory=TorchMemory("cpu"))


def test_tensorrt_runner_generation_matches_transformers(out, hf_model, request_, fake_trt):
    write_engines(out, "fp32")
    g = trt_graphs(out)
    np.testing.assert_array_equal(loop_generate(g, request_), hf_generate(hf_model, request_))
    prefill, decode = g.decoder.contexts
    assert prefill.runs == 1 and decode.runs == NEW - 1  # prompt on profile 0, one-token steps on profile 1
    assert decode.profile == 1


def test_tensorrt_runner_concurrent_requests_equal_sequential(out, request_, fake_trt):
    """Requests from several threads share the runners' execution contexts: each must get the
    tokens it gets alone (calls re-bind the context they find bound to another call)."""
    import threading

    from runtime.loop import Request

    write_engines(out, "fp32")
    g = trt_graphs(out)
    rows = [Request(request_.input_ids[i:i + 1], request_.attention_mask[i:i + 1],
                    None if i == 2 else request_.pixel_values[i:i + 1], request_.image_attention_mask[i:i + 1])
            for i in range(3)]
    alone = [loop_generate(g, row) for row in rows]
    together = [None] * len(rows)

    def work(i):
        together[i] = loop_generate(g, rows[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_tensorrt_runner_fp16_teacher_forced_agreement(out, request_, fake_trt):
    """Teacher forcing asks for the logits of many positions: kept_seq > 1 must fit the prefill profile."""
    from runtime.compare import compare_sessions

    write_engines(out, "fp16")
    reference, other = types.SimpleNamespace(graphs=trt_graphs(out)), types.SimpleNamespace(graphs=trt_graphs(out, "fp16"))
    agreement = compare_sessions(reference, other, request_, 16)
    assert agreement.top1_share >= 0.9, agreement.as_dict()


def test_tensorrt_contexts_rebind_between_calls(out, fake_trt):
    """Two bound calls on one context: each run must use its own buffers."""
    write_engines(out, "fp32")
    manifest = Manifest.load(out)
    runner = TensorRTRunner(manifest.graphs_for("fp32")["vision"], out, manifest, device="cpu")
    runner.activate()
    memory, size = TorchMemory("cpu"), manifest.model.image_size
    rng = np.random.default_rng(0)
    pixels = [rng.standard_normal((n, 3, size, size), dtype=np.float32) for n in (1, 2)]
    expected = [fake_tensorrt._Engine(json.loads(runner.engine_path.read_text())).session.run(None, {"pixel_values": p})[0]
                for p in pixels]
    calls, outputs = [], []
    for p in pixels:
        outputs.append(memory.zeros((p.shape[0], manifest.model.vision_seq_len, manifest.model.vision_dim), np.float32))
        calls.append(runner.bind({"pixel_values": memory.from_host(p)}, {"image_hidden_states": outputs[-1]}))
    for k in (0, 1, 0):
        outputs[k].zero_()
        calls[k].run()
        np.testing.assert_allclose(outputs[k].numpy(), expected[k], rtol=1e-5, atol=1e-5)


def test_tensorrt_runner_refuses_bad_bindings(out, fake_trt):
    write_engines(out, "fp32")
    manifest = Manifest.load(out)
    g = trt_graphs(out)
    memory, info = g.memory, manifest.model
    spec = manifest.graphs_for("fp32")["vision"]
    size = info.image_size
    too_many = manifest.limits.max_batch * manifest.limits.max_images + 1
    with pytest.raises(EngineError, match="no optimisation profile fits.*pixel_values"):
        g.vision.bind({"pixel_values": memory.zeros((too_many, 3, size, size), np.float32)},
                      {"image_hidden_states": memory.zeros((too_many, info.vision_seq_len, info.vision_dim), np.float32)})
    with pytest.raises(EngineError, match="output image_hidden_states is"):
        g.vision.bind({"pixel_values": memory.zeros((2, 3, size, size), np.float32)},
                      {"image_hidden_states": memory.zeros((1, info.vision_seq_len, info.vision_dim), np.float32)})
    assert spec.name == "vision"
    # a decode-shaped call (one token) asking for the logits of two positions fits no profile
    decoder = manifest.graphs_for("fp32")["decoder"]
    sizes = {"batch": 1, "seq": 1, "past_seq": 4, "total_seq": 5, "images": 1, "kept_seq": 2,
             "image_tokens": info.image_seq_len}
    feed = {t.name: memory.zeros([sizes.get(d, d) for d in t.shape], t.dtype) for t in decoder.inputs}
    outputs = {t.name: memory.zeros([sizes.get(d, d) for d in t.shape], t.dtype) for t in decoder.outputs}
    with pytest.raises(EngineError, match="profile 1: logits_positions \\[2\\] outside \\[1\\]..\\[1\\]"):
        g.decoder.bind(feed, outputs)


def test_tensorrt_runner_refuses_shape_tensor_inputs(out, fake_trt):
    """Engines whose inputs TensorRT reads as shape tensors (from older exports) are refused on load."""
    write_engines(out, "fp32", shape_inputs=("position_ids",))
    manifest = Manifest.load(out)
    with pytest.raises(EngineError, match="shape tensors.*export again"):
        TensorRTRunner(manifest.graphs_for("fp32")["decoder"], out, manifest, device="cpu").activate()


@pytest.mark.parametrize("override, message", [
    ({"compute_capability": "8.0"}, "compute capability 8.0.*this GPU is 9.0"),
    ({"tensorrt_version": "10.0.0"}, "TensorRT 10.0.0"),
    ({"onnx_sha256": "0" * 64}, "built from another"),
])
def test_tensorrt_runner_refuses_engines_built_elsewhere(out, fake_trt, override, message):
    write_engines(out, "fp32", **override)
    manifest = Manifest.load(out)
    runner = TensorRTRunner(manifest.graphs_for("fp32")["decoder"], out, manifest, device="cpu")
    with pytest.raises(EngineError, match=f"{message}.*Rebuild it: idefics-build-engines"):
        runner.activate()


def test_tensorrt_runner_missing_or_unreadable_engine(out, tmp_path, fake_trt):
    manifest = Manifest.load(out)
    spec = manifest.graphs_for("fp16")["perceiver"]
    write_engines(out, "fp16")
    engine, meta = engine_paths(out, "perceiver", "fp16")
    engine.write_bytes(b"not an engine")
    with pytest.raises(EngineError, match="could not deserialize.*idefics-build-engines"):
        TensorRTRunner(spec, out, manifest, device="cpu").activate()
    engine.unlink()
    with pytest.raises(EngineError, match="no TensorRT engine for the fp16 perceiver.*idefics-build-engines .* --precision fp16"):
        TensorRTRunner(spec, out, manifest, device="cpu").activate()


# ---------------------------------------------------------------- errors without the GPU pieces
def test_session_errors_name_what_to_install(out, monkeypatch):
    with pytest.raises(ValueError, match="device='cuda'"):
        Session(out, backend="tensorrt")
    with pytest.raises(ValueError, match="device must be"):
        Session(out, device="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        Session(out, backend="openvino")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(EngineError, match="pip install tensorrt"):
        Session(out, backend="tensorrt", device="cuda")
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ToolkitError, match="pip install onnxruntime-gpu"):
        Session(out, device="cuda")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.as_module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ToolkitError, match="PyTorch sees no CUDA device"):
        Session(out, backend="tensorrt", device="cuda")


def test_cuda_provider_falling_back_to_cpu_is_an_error(out, monkeypatch):
    """ONNX Runtime quietly runs on the CPU when its CUDA provider cannot load; the runner refuses.
    (Here the CPU build of onnxruntime is told it has the provider: it falls back exactly so.)"""
    import onnxruntime

    from runtime.runners.onnxruntime import OnnxRuntimeRunner

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: None, raising=False)
    spec = Manifest.load(out).graphs_for("fp32")["vision"]
    runner = OnnxRuntimeRunner(spec, out / spec.file, device="cuda:0", stream=1234)
    with pytest.raises(ToolkitError, match="CUDA provider did not load.*CPUExecutionProvider"), \
            pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # ONNX Runtime's own warning
        runner.activate()



def test_idefics_check_graph_rows_through_the_tensorrt_runner(out, hf_model, fake_trt):
    """idefics-check's graph cases (prefill, decode, decode against a static cache; batch 2, 1-2
    images) through TensorRT runners: every shape fits the builder's profiles and matches PyTorch."""
    from exporter.check.regression import runner_factory
    from exporter.graphs.comparison import failures, run_cases
    from runtime.reference.modules import graph_modules
    from exporter.precision.transforms import TOLERANCES
    from exporter.graphs.validate import reference_cases

    write_engines(out, "fp32")
    manifest = Manifest.load(out)
    cases = reference_cases(manifest.graphs, graph_modules(hf_model), manifest.model)
    report, _ = run_cases(out, manifest.graphs, cases, TOLERANCES["fp32"],
                          session_factory=runner_factory(out, manifest, "tensorrt", "cpu"))
    assert {case.graph for case in cases} == set(GRAPH_NAMES)
    assert failures(report, TOLERANCES["fp32"]) == []
