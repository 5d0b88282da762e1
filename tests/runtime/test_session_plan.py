"""runtime.plan.plan_graphs, on its own: which graphs a Session loads for a manifest, backend, device
and options, without loading any. The manifests are a real tiny export's (--fp16 --int8-weight-only
--ort-optimized), its ONNX Runtime-optimized listing replaced by one the test states (so what the
export may leave out does not change the cases), and edited copies. Expected files come from the
rules (Session's docstring, runtime.manifest.default_precision), written out per case; each planned
graph's precision and flavour are checked against its file name (NAME[.ort][.PRECISION].onnx, as the
exporter names them). Last, a Session loads exactly the graphs its plan names."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from exporter.export import ExportConfig, export
from runtime import ManifestError
from runtime.manifest import GRAPH_NAMES, GraphSpec, Manifest, Variant
from runtime.plan import GraphPlan, PlannedGraph, plan_graphs

CPU, CUDA = ["cpu"], ["cpu", "cuda"]
# The ONNX Runtime-optimized graphs the stated listing holds: (precision, graph) -> (file, devices). As
# a full --fp16 --int8-weight-only --int8 --ort-optimized export of the tiny variant writes them: no
# fused FP32 / FP16 perceiver (no fusion applies there), FP32's GroupQueryAttention on the CPU only
# (CUDA's takes FP16), int8wo's and int8's INT8 products on the CPU only.
ORT = {
    ("fp32", "vision"): ("vision.ort.onnx", CUDA),
    ("fp32", "decoder"): ("decoder.ort.onnx", CPU),
    ("fp16", "vision"): ("vision.ort.fp16.onnx", CUDA),
    ("fp16", "decoder"): ("decoder.ort.fp16.onnx", CUDA),
    ("int8wo", "vision"): ("vision.ort.int8wo.onnx", CPU),
    ("int8wo", "perceiver"): ("perceiver.ort.int8wo.onnx", CPU),
    ("int8wo", "decoder"): ("decoder.ort.int8wo.onnx", CPU),  # over an INT8 KV cache
    ("int8wo", "prompt"): ("decoder.ort.int8wo.prompt.onnx", CPU),  # writes FP32 K/V
    ("int8", "decoder"): ("decoder.ort.int8.onnx", CPU),
}
INT8_CACHE = {("int8wo", "decoder")}


# ---------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(manifest, folder) of random:tiny exported with --fp16 --int8-weight-only --ort-optimized."""
    out = tmp_path_factory.mktemp("session-plan") / "out"
    manifest = export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("fp16", "int8wo"),
                                   ort_optimized=True, calibration_size=4))
    return manifest, out


def _past_names(manifest: Manifest) -> set[str]:
    return {name for i in range(manifest.model.num_layers) for name in manifest.names.past(i)}


def _with_cache(spec: GraphSpec, dtype: str, past: set[str]) -> GraphSpec:
    return dataclasses.replace(spec, inputs=tuple(dataclasses.replace(t, dtype=dtype) if t.name in past else t
                                                  for t in spec.inputs))


def stated(real_manifest: Manifest, ort: dict = ORT) -> Manifest:
    """A copy of the real manifest with an int8 variant added (its graphs named NAME.int8.onnx, for
    ONNX Runtime and TensorRT, as --int8 writes) and the ORT listing `ort`. A listed graph takes its
    IO from the portable graph of its precision (a prompt graph: the decoder's), its cache dtype
    INT8 where INT8_CACHE says so."""
    m = copy.deepcopy(real_manifest)
    m.variants["int8"] = Variant("int8", {name: dataclasses.replace(spec, file=f"{name}.int8.onnx")
                                          for name, spec in m.variants["fp16"].graphs.items()},
                                 backends=["onnxruntime", "tensorrt"])
    past = _past_names(m)
    m.ort_optimized = {}
    for (precision, graph), (file, devices) in ort.items():
        spec = dataclasses.replace(m.graphs_for(precision)["decoder" if graph == "prompt" else graph], file=file)
        if (precision, graph) in INT8_CACHE:
            spec = _with_cache(spec, "int8", past)
        variant = m.ort_optimized.setdefault(precision, Variant(precision, {}, backends=["onnxruntime"]))
        variant.graphs[graph] = spec
        variant.devices[graph] = list(devices)
    return m


@pytest.fixture(scope="module")
def manifest(real):
    return stated(real[0])


def _precision_of(file: str) -> str:
    """The precision a file name says (NAME[.ort][.PRECISION][.prompt].onnx): fp32 when it names none."""
    parts = file.split(".")
    return next((p for p in ("fp16", "int8wo", "int8") if p in parts), "fp32")


def files(plan: GraphPlan) -> tuple:
    return tuple(g.file if g is not None else None
                 for g in (plan.vision, plan.perceiver, plan.decoder, plan.prefill, plan.prompt))


def check_graphs_say_their_precision(plan: GraphPlan) -> None:
    for graph in (plan.vision, plan.perceiver, plan.decoder, plan.prefill, plan.prompt):
        if graph is not None:
            assert isinstance(graph, PlannedGraph)
            assert graph.precision == _precision_of(graph.file), graph
            assert graph.ort == (".ort." in graph.file), graph


# ---------------------------------------------------------------- the rules, case by case
# (backend, device, precision, prefill_precision, portable) ->
# (precision, (vision, perceiver, decoder, prefill, prompt), flavour, quantize_prompt_kv)
CASES = {
    # ONNX Runtime's CPU: int8wo by default; its ORT graphs where listed; prompts in its prompt graph,
    # whose FP32 K/V go into the decoder's INT8 cache; whole sequences in the portable int8wo decoder
    "cpu-default": (("onnxruntime", "cpu", None, None, False), (
        "int8wo", ("vision.ort.int8wo.onnx", "perceiver.ort.int8wo.onnx", "decoder.ort.int8wo.onnx",
                   "decoder.int8wo.onnx", "decoder.ort.int8wo.prompt.onnx"), "ort", True)),
    "cpu-default-portable": (("onnxruntime", "cpu", None, None, True), (
        "int8wo", ("vision.int8wo.onnx", "perceiver.int8wo.onnx", "decoder.int8wo.onnx", None, None),
        "portable", False)),
    "cpu-int8wo-prefill-same": (("onnxruntime", "cpu", "int8wo", "int8wo", False), (
        "int8wo", ("vision.ort.int8wo.onnx", "perceiver.ort.int8wo.onnx", "decoder.ort.int8wo.onnx",
                   "decoder.int8wo.onnx", "decoder.ort.int8wo.prompt.onnx"), "ort", True)),
    # FP32: no fused perceiver listed; prompts in the ORT decoder itself
    "cpu-fp32": (("onnxruntime", "cpu", "fp32", None, False), (
        "fp32", ("vision.ort.onnx", "perceiver.onnx", "decoder.ort.onnx", "decoder.onnx", "decoder.ort.onnx"),
        "ort", False)),
    "cpu-fp32-portable": (("onnxruntime", "cpu", "fp32", None, True), (
        "fp32", ("vision.onnx", "perceiver.onnx", "decoder.onnx", None, None), "portable", False)),
    "cpu-fp16": (("onnxruntime", "cpu", "fp16", None, False), (
        "fp16", ("vision.ort.fp16.onnx", "perceiver.fp16.onnx", "decoder.ort.fp16.onnx", "decoder.fp16.onnx",
                 "decoder.ort.fp16.onnx"), "ort", False)),
    # int8: only its decoder is listed; images in the portable INT8 encoders
    "cpu-int8": (("onnxruntime", "cpu", "int8", None, False), (
        "int8", ("vision.int8.onnx", "perceiver.int8.onnx", "decoder.ort.int8.onnx", "decoder.int8.onnx",
                 "decoder.ort.int8.onnx"), "ort", False)),
    # images and prompts in FP32, decoding in int8wo: FP32's ORT encoders and decoder for the prompt
    "cpu-int8wo-prefill-fp32": (("onnxruntime", "cpu", "int8wo", "fp32", False), (
        "int8wo", ("vision.ort.onnx", "perceiver.onnx", "decoder.ort.int8wo.onnx", "decoder.onnx",
                   "decoder.ort.onnx"), "ort", True)),
    "cpu-int8wo-prefill-fp32-portable": (("onnxruntime", "cpu", "int8wo", "fp32", True), (
        "int8wo", ("vision.onnx", "perceiver.onnx", "decoder.int8wo.onnx", "decoder.onnx", None), "portable", False)),
    "cpu-int8wo-prefill-fp16": (("onnxruntime", "cpu", "int8wo", "fp16", False), (
        "int8wo", ("vision.ort.fp16.onnx", "perceiver.fp16.onnx", "decoder.ort.int8wo.onnx", "decoder.fp16.onnx",
                   "decoder.ort.fp16.onnx"), "ort", True)),
    # ONNX Runtime on CUDA: fp16 by default; only graphs listed for CUDA
    "cuda-default": (("onnxruntime", "cuda", None, None, False), (
        "fp16", ("vision.ort.fp16.onnx", "perceiver.fp16.onnx", "decoder.ort.fp16.onnx", "decoder.fp16.onnx",
                 "decoder.ort.fp16.onnx"), "ort", False)),
    "cuda1-fp32": (("onnxruntime", "cuda:1", "fp32", None, False), (
        "fp32", ("vision.ort.onnx", "perceiver.onnx", "decoder.onnx", None, None), "ort", False)),
    "cuda-int8wo": (("onnxruntime", "cuda", "int8wo", None, False), (
        "int8wo", ("vision.int8wo.onnx", "perceiver.int8wo.onnx", "decoder.int8wo.onnx", None, None),
        "portable", False)),
    "cuda-int8wo-prefill-fp32": (("onnxruntime", "cuda:0", "int8wo", "fp32", False), (
        "int8wo", ("vision.ort.onnx", "perceiver.onnx", "decoder.int8wo.onnx", "decoder.onnx", None), "ort", False)),
    # TensorRT: the portable graphs only; fp16 by default
    "tensorrt-default": (("tensorrt", "cuda", None, None, False), (
        "fp16", ("vision.fp16.onnx", "perceiver.fp16.onnx", "decoder.fp16.onnx", None, None), "portable", False)),
    "tensorrt-fp32-prefill-fp16": (("tensorrt", "cuda", "fp32", "fp16", False), (
        "fp32", ("vision.fp16.onnx", "perceiver.fp16.onnx", "decoder.onnx", "decoder.fp16.onnx", None),
        "portable", False)),
    # the PyTorch reference: FP32 whatever the export holds
    "torch-default": (("torch", "cpu", None, None, False), (
        "fp32", ("vision.onnx", "perceiver.onnx", "decoder.onnx", None, None), "portable", False)),
    "torch-fp32-prefill-fp32": (("torch", "cuda", "fp32", "fp32", False), (
        "fp32", ("vision.onnx", "perceiver.onnx", "decoder.onnx", None, None), "portable", False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_follows_the_rules(manifest, case):
    (backend, device, precision, prefill, portable), (want, graphs, flavour, quantize) = CASES[case]
    plan = plan_graphs(manifest, backend, device, precision=precision, prefill_precision=prefill, portable=portable)
    assert (plan.backend, plan.device) == (backend, device)
    assert plan.precision == want and plan.defaulted == (precision is None)
    assert files(plan) == graphs
    assert plan.flavour == flavour
    assert plan.quantize_prompt_kv == quantize
    # images (and the prompt) in prefill_precision when it differs, decoding in `precision`
    split = prefill if prefill not in (None, want) else None
    assert plan.prefill_precision == split
    assert plan.decoder.precision == want
    assert plan.vision.precision == plan.perceiver.precision == (split or want)
    check_graphs_say_their_precision(plan)
    assert plan.prompt_is_decoder == (graphs[4] is not None and graphs[4] == graphs[2])
    assert plan.graphs == {name: getattr(plan, name).spec for name in GRAPH_NAMES}


def test_plan_is_frozen(manifest):
    plan = plan_graphs(manifest)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.precision = "fp32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.decoder.precision = "fp32"


def test_files_are_each_graph_and_its_external_data_once(manifest):
    m = copy.deepcopy(manifest)
    spec = m.ort_optimized["fp32"].graphs["decoder"]
    m.ort_optimized["fp32"].graphs["decoder"] = dataclasses.replace(spec, external_data="decoder.ort.onnx.data")
    plan = plan_graphs(m, precision="fp32")  # prompts in the decode graph: listed once
    assert plan.files == ["vision.ort.onnx", "perceiver.onnx", "decoder.ort.onnx", "decoder.onnx",
                          "decoder.ort.onnx.data"]
    assert plan_graphs(m, precision="fp32", portable=True).files == ["vision.onnx", "perceiver.onnx", "decoder.onnx"]


# ---------------------------------------------------------------- what the manifest lists decides
def test_no_ort_decoder_of_the_precision_keeps_the_portable_one(real):
    """odd-sizes: the export could write no GroupQueryAttention decoder; the fused vision still runs."""
    m = stated(real[0], {k: v for k, v in ORT.items() if k != ("fp32", "decoder")})
    plan = plan_graphs(m, precision="fp32")
    assert files(plan) == ("vision.ort.onnx", "perceiver.onnx", "decoder.onnx", None, None)
    assert plan.flavour == "ort" and not plan.quantize_prompt_kv


def test_a_prompt_precision_without_an_ort_decoder_runs_prompts_in_its_portable_one(real):
    m = stated(real[0], {k: v for k, v in ORT.items() if k != ("fp16", "decoder")})
    plan = plan_graphs(m, precision="int8wo", prefill_precision="fp16")
    assert files(plan) == ("vision.ort.fp16.onnx", "perceiver.fp16.onnx", "decoder.ort.int8wo.onnx",
                           "decoder.fp16.onnx", None)
    assert plan.prompt is None and not plan.quantize_prompt_kv


def test_without_a_prompt_graph_int8wo_prompts_run_in_its_decoder(real):
    m = stated(real[0], {k: v for k, v in ORT.items() if k != ("int8wo", "prompt")})
    plan = plan_graphs(m)
    assert files(plan)[2:] == ("decoder.ort.int8wo.onnx", "decoder.int8wo.onnx", "decoder.ort.int8wo.onnx")
    assert plan.prompt_is_decoder and not plan.quantize_prompt_kv


def test_no_ort_graphs_is_the_portable_flavour(real):
    plan = plan_graphs(stated(real[0], {}), "onnxruntime", "cpu", precision="fp16")
    assert files(plan) == ("vision.fp16.onnx", "perceiver.fp16.onnx", "decoder.fp16.onnx", None, None)
    assert plan.flavour == "portable"


def test_a_graph_listed_for_no_device_runs_on_any(real):
    """Variant.devices: a graph it does not list runs anywhere (manifests before the field)."""
    m = stated(real[0])
    del m.ort_optimized["fp32"].devices["decoder"]
    assert plan_graphs(m, device="cuda", precision="fp32").decoder.file == "decoder.ort.onnx"
    m.ort_optimized["fp32"].devices["vision"] = ["cpu"]
    assert plan_graphs(m, device="cuda", precision="fp32").vision.file == "vision.onnx"


@pytest.mark.parametrize("removed, fp16_backends, expected", [
    # variants removed, fp16's backends -> the default on ONNX Runtime CPU, ONNX Runtime CUDA, TensorRT
    ((), None, ("int8wo", "fp16", "fp16")),
    (("int8wo",), None, ("fp32", "fp16", "fp16")),
    (("fp16",), None, ("int8wo", "int8", "int8")),
    (("fp16", "int8"), None, ("int8wo", "fp32", "fp32")),
    ((), ["onnxruntime"], ("int8wo", "fp16", "int8")),  # TensorRT cannot read that fp16
    ((), [], ("int8wo", "fp16", "fp16")),  # no backends listed (an older manifest): any
])
def test_default_precision_by_backend_and_device(manifest, removed, fp16_backends, expected):
    m = copy.deepcopy(manifest)
    for precision in removed:
        del m.variants[precision]
    if fp16_backends is not None:
        m.variants["fp16"].backends = fp16_backends
    plans = [plan_graphs(m, "onnxruntime", "cpu"), plan_graphs(m, "onnxruntime", "cuda"),
             plan_graphs(m, "tensorrt", "cuda")]
    assert tuple(p.precision for p in plans) == expected
    assert all(p.defaulted and p.decoder.precision == p.precision for p in plans)
    assert plan_graphs(m, "torch", "cpu").precision == "fp32"


# ---------------------------------------------------------------- impossible requests
@pytest.mark.parametrize("kwargs, error, named", [
    (dict(precision="bf16"), ManifestError, ["'bf16' is not a precision", "fp16 (--fp16)", "this export has"]),
    (dict(precision="int8"), ManifestError, ["no int8 graphs", "re-export with --int8"]),
    (dict(precision="fp32", prefill_precision="int8"), ManifestError, ["no int8 graphs", "--int8"]),
    (dict(prefill_precision="bf16"), ManifestError, ["'bf16' is not a precision"]),
    (dict(backend="torch", precision="fp16"), ValueError, ["backend='torch'", "precision 'fp16'",
                                                           "backend='onnxruntime'"]),
    (dict(backend="torch", precision="int8wo"), ValueError, ["precision 'int8wo'"]),
    (dict(backend="torch", prefill_precision="fp16"), ValueError, ["prefill_precision", "backend='onnxruntime'"]),
    (dict(backend="openvino"), ValueError, ["backend must be one of", "'openvino'"]),
    (dict(backend="tensorrt", device="cpu"), ValueError, ["backend='tensorrt'", "device='cuda'"]),
    (dict(device="gpu"), ValueError, ["device must be", "'gpu'"]),
    (dict(device="cpu:1"), ValueError, ["device must be", "'cpu:1'"]),
])
def test_impossible_requests_name_what_is_at_fault(real, kwargs, error, named):
    """On the real manifest (fp32, fp16, int8wo: no int8)."""
    with pytest.raises(error) as info:
        plan_graphs(real[0], **kwargs)
    for text in named:
        assert text in str(info.value), (text, str(info.value))


def test_a_precision_without_int8wo_names_the_flag(manifest):
    m = copy.deepcopy(manifest)
    del m.variants["int8wo"]
    for kwargs in (dict(precision="int8wo"), dict(precision="fp32", prefill_precision="int8wo")):
        with pytest.raises(ManifestError, match="no int8wo graphs.*--int8-weight-only"):
            plan_graphs(m, **kwargs)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_manifest_missing_a_graph_names_it_and_the_folder(manifest, tmp_path, precision):
    m = copy.deepcopy(manifest)
    del m.graphs_for(precision)["perceiver"]
    with pytest.raises(ManifestError) as info:
        plan_graphs(m, precision=precision, folder=tmp_path)
    assert str(info.value) == f"{tmp_path}: the manifest lists no perceiver graph"
    plan_graphs(m, precision="int8wo")  # the other precisions' graphs are whole


# ---------------------------------------------------------------- a Session loads its plan
@pytest.mark.parametrize("options", [{}, {"precision": "fp32"}, {"prefill_precision": "fp32"}, {"portable": True}],
                         ids=["default", "fp32", "int8wo-prefill-fp32", "portable"])
def test_session_loads_what_its_plan_names(real, options, opened):
    manifest, out = real
    session = opened(out, **options)
    plan = plan_graphs(Manifest.load(out), "onnxruntime", "cpu", **options)
    assert session.plan == plan
    g = session.graphs
    assert (session.precision, session.flavour) == (plan.precision, plan.flavour)
    assert (g.vision.spec.file, g.perceiver.spec.file, g.decoder.spec.file) == (
        plan.vision.file, plan.perceiver.file, plan.decoder.file)
    assert g.prefill_decoder.spec.file == (plan.prefill or plan.decoder).file
    assert (g.prefill_decoder is g.decoder) == (plan.prefill is None)
    assert g.prompt_decoder.spec.file == (plan.prompt or plan.prefill or plan.decoder).file
    assert (g.prompt_decoder is g.decoder) == (plan.prompt_is_decoder or (plan.prompt or plan.prefill) is None)
    assert (g.kv_scales is not None) == plan.quantize_prompt_kv
    if plan.quantize_prompt_kv:  # the decode graph's cache is INT8, the prompt's is not
        assert g.cache_dtype == np.int8 and g.prompt_cache_dtype != np.int8
    # and what the plan names follows the real export's listing, by the rules
    ort = {} if options.get("portable") else manifest.ort_graphs(options.get("prefill_precision")
                                                                 or plan.precision, "cpu")
    for name in ("vision", "perceiver"):
        portable = manifest.graphs_for(options.get("prefill_precision") or plan.precision)[name]
        assert getattr(plan, name).file == (ort.get(name) or portable).file
