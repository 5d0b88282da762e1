"""FP16, INT8 (QDQ) and INT8 weight-only graphs, checked in the ONNX files themselves.

One export of the embedded default with every reduced precision is shared by the module. The graph
facts are read with the `onnx` package (after onnx.shape_inference where dtypes of intermediate
tensors matter), weights are recomputed with numpy from the FP32 graph, file digests with hashlib;
the manifest is read as plain JSON. Broken transforms (monkeypatched) must make the export fail
with a ValidationError naming the precision and leave nothing behind. The CLI runs in-process
through exporter.cli.main, so calibration.feeds._compute can be counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
from onnx import TensorProto, numpy_helper
from PIL import Image

import calibration.feeds as feeds_mod
import exporter.export as export_mod
import exporter.precision.transforms as precision_mod
import exporter.precision.reduced as reduced_mod
from calibration.data import calibration_data
from calibration.images import to_pixel_values
from exporter.cli import main
from exporter.export import ExportConfig, export
from exporter.precision.mixed import SearchBudget
from exporter.precision.transforms import TOLERANCES, WEIGHT_ONLY_BLOCK
from exporter.graphs.validate import ort_session
from runtime.errors import ManifestError, ValidationError
from runtime.session import Session
from runtime.cpu import exact_int8

GRAPHS = ("vision", "perceiver", "decoder")
VARIANTS = ("fp16", "int8", "int8wo")
# The rule of the FP16 transform (exporter.precision.transforms's docstring), written out here rather than
# read from the code under test: ops that reduce or exponentiate, rotary Cos/Sin, mask building.
FP32_RULE = {"LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax",
             "Cos", "Sin", "Where", "Range", "CumSum"}
NUMERIC_FP32 = ("Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt")


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("precision") / "export"
    export(ExportConfig(output=folder, precisions=VARIANTS, progress=False))
    return folder


@pytest.fixture(scope="module")
def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _model(out: Path, graph: str, precision: str = "fp32") -> onnx.ModelProto:
    suffix = "" if precision == "fp32" else f".{precision}"
    return onnx.load(str(out / f"{graph}{suffix}.onnx"))


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _weight_input(model, node) -> str | None:
    """The initializer behind input 1 of `node` (through Transpose/Identity), or None."""
    if len(node.input) < 2:
        return None
    inits, producers = _initializers(model), _producers(model)
    name = node.input[1]
    source = producers.get(name)
    while source is not None and source.op_type in ("Transpose", "Identity"):
        name, source = source.input[0], producers.get(source.input[0])
    return name if name in inits else None


def _weight_ops(model, ops=("MatMul", "Gemm", "Conv")) -> list:
    return [n for n in model.graph.node if n.op_type in ops and _weight_input(model, n) is not None]


def _softmax_adds(model) -> list:
    """The Add whose output reaches a Softmax through Casts/Identities only."""
    producers, found = _producers(model), []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            source = producers.get(node.input[0])
            while source is not None and source.op_type in ("Cast", "Identity"):
                source = producers.get(source.input[0])
            if source is not None and source.op_type == "Add":
                found.append(source)
    return found


def _elem_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _np_dtype(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _io_shapes(model) -> dict:
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _photo_pngs(folder: Path, names=("coffee", "rocket", "camera")) -> Path:
    folder.mkdir()
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()).resize((96, 96)).save(folder / f"{name}.png")
    return folder


# ------------------------------------------------------------------ 1. FP16
@pytest.mark.parametrize("graph", GRAPHS)
def test_fp16_io_dtypes_match_the_manifest(out, manifest, graph):
    model = _model(out, graph, "fp16")
    spec = manifest["variants"]["fp16"]["graphs"][graph]
    in_file = {v.name: _np_dtype(v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)}
    in_spec = {t["name"]: t["dtype"] for t in (*spec["inputs"], *spec["outputs"])}
    assert in_file == in_spec
    for name, dtype in in_file.items():
        if name in ("pixel_values", "logits"):
            assert dtype == "float32", name
        elif name == "image_hidden_states" or name.startswith(("cross_", "past_", "present_")):
            assert dtype == "float16", name
        else:
            assert dtype in ("int64", "float16"), name
    # the FP32 graph's IO is float32 throughout: the variant really changed it
    plain = _model(out, graph)
    fp32 = {v.name: _np_dtype(v.type.tensor_type.elem_type) for v in (*plain.graph.input, *plain.graph.output)}
    assert all(d != "float16" for d in fp32.values())
    assert _io_shapes(model) == {t["name"]: list(t["shape"]) for t in (*spec["inputs"], *spec["outputs"])}



@pytest.mark.parametrize("graph", GRAPHS)
def test_fp16_keeps_reductions_softmax_and_masks_in_fp32(out, manifest, graph):
    fp32, model = _model(out, graph), _model(out, graph, "fp16")
    types = _elem_types(model)
    by_name = {n.name: n for n in model.graph.node}

    checked = Counter()
    for node in model.graph.node:
        if node.op_type in NUMERIC_FP32:
            for tensor in (node.input[0], node.output[0]):
                assert tensor in types, f"{node.name}: no inferred type for {tensor}"
                assert types[tensor] == TensorProto.FLOAT, (node.op_type, node.name, tensor, types[tensor])
            checked[node.op_type] += 1
    expected = Counter(n.op_type for n in fp32.graph.node if n.op_type in NUMERIC_FP32)
    assert checked == expected and checked["Softmax"] > 0

    # the additive mask in front of each Softmax (decoder: one per attention) stays FP32
    adds = _softmax_adds(fp32)
    assert len(adds) == (6 if graph == "decoder" else 0)
    for add in adds:
        node = by_name[add.name]
        for tensor in (*node.input, *node.output):
            assert types[tensor] == TensorProto.FLOAT, (add.name, tensor)

    # the FP16 part is really FP16: every weight MatMul takes an FP16 initializer and computes in FP16
    inits = _initializers(model)
    weights = [(n, n.input[1]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    fp16_weights = [n for n, w in weights if inits[w].data_type == TensorProto.FLOAT16]
    assert len(fp16_weights) == len(weights) == len([n for n in _weight_ops(fp32, ("MatMul",))])
    assert len(fp16_weights) >= 0.5 * sum(n.op_type == "MatMul" for n in model.graph.node)
    assert {"vision": 12, "perceiver": 16, "decoder": 39}[graph] == len(fp16_weights)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in fp16_weights)
    assert not any(t.data_type == TensorProto.FLOAT and t.name in {w for _, w in weights} for t in inits.values())


@pytest.mark.parametrize("graph", GRAPHS)
def test_fp16_high_precision_nodes_are_exactly_the_fp32_ones(out, manifest, graph):
    fp32, model = _model(out, graph), _model(out, graph, "fp16")
    expected = {n.name for n in fp32.graph.node if n.op_type in FP32_RULE} | {a.name for a in _softmax_adds(fp32)}
    listed = manifest["variants"]["fp16"]["high_precision_nodes"][graph]
    assert len(listed) == len(set(listed))
    assert set(listed) == expected
    # and each listed node really computes in FP32 in the file: no FP16 tensor in or out
    types = _elem_types(model)
    by_name = {n.name: n for n in model.graph.node}
    for name in listed:
        node = by_name[name]
        for tensor in (*node.input, *node.output):
            if tensor:
                assert types.get(tensor) != TensorProto.FLOAT16, (node.op_type, name, tensor)


@pytest.mark.parametrize("precision", VARIANTS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_variant_graphs_are_topologically_sorted(out, graph, precision):
    model = _model(out, graph, precision)
    available = {i.name for i in model.graph.input} | set(_initializers(model)) | {""}
    for node in model.graph.node:
        missing = [i for i in node.input if i not in available]
        assert not missing, f"{graph}.{precision}: {node.name} ({node.op_type}) reads {missing} before they exist"
        available.update(node.output)
    assert {o.name for o in model.graph.output} <= available


# ------------------------------------------------------------------ 2. INT8 (QDQ)
def _dq_of(model, tensor: str):
    node = _producers(model).get(tensor)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _smoothing_factor(fp32, model, activation: str, width: int) -> np.ndarray:
    """s per input channel of a MatMul that reads `activation` (the Q input) in the INT8 graph, read
    off the activation side: the explicit Mul by 1/s, or the norm whose weights were divided by s
    (LayerNormalization scale, RMSNorm's Mul by its weight); ones when the activation is not smoothed."""
    producer = _producers(model).get(activation)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    fp32_inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in fp32.graph.initializer}
    identity = {n.output[0]: n.input[0] for n in fp32.graph.node if n.op_type == "Identity"}
    original = {n.name: n for n in fp32.graph.node}.get(producer.name) if producer is not None else None
    if producer is None:
        return np.ones(width)
    if producer.op_type == "Mul" and producer.name.endswith(".smooth"):
        return 1.0 / next(inits[i] for i in producer.input if i in inits)
    if original is not None and producer.op_type in ("LayerNormalization", "Mul"):
        for new, old in zip(producer.input, original.input):
            old = identity.get(old, old)
            if new != old and new in inits and old in fp32_inits:
                return fp32_inits[old] / inits[new]
    return np.ones(width)


@pytest.mark.parametrize("graph", GRAPHS)
def test_int8_weights_and_activations_are_symmetric_qdq(out, manifest, graph):
    fp32, model = _model(out, graph), _model(out, graph, "int8")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    init_types = {t.name: t.data_type for t in model.graph.initializer}
    fp32_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    producers = _producers(model)
    by_name = {n.name: n for n in model.graph.node}
    lm_head = _producers(fp32).get("logits")
    # the mixed-precision search may leave some unquantized: they read FP32 weights again
    searched = {k["node"] for k in manifest["variants"]["int8"]["kept_nodes"][graph] if k["reason"] == "accuracy"}
    weight_ops = [n for n in _weight_ops(fp32) if n is not lm_head]
    assert len(weight_ops) == {"vision": 13, "perceiver": 16, "decoder": 38}[graph]
    for name in searched:
        node = by_name[name]
        assert _dq_of(model, node.input[0]) is None and _dq_of(model, node.input[1]) is None, name
        assert init_types[node.input[1]] == TensorProto.FLOAT, name
    targets = [n for n in weight_ops if n.name not in searched]
    assert len(searched) < len(weight_ops) / 2 and targets
    # the MatMuls whose INT8 weights GPTQ re-rounded at their scales (the others: nearest rounding),
    # before the search, which may then keep some of them in FP32
    gptq = set(manifest["variants"]["int8"]["calibration"]["smoothing"][graph]["gptq"]["gptq"])
    assert gptq <= {n.name for n in weight_ops if n.op_type == "MatMul"}

    for ref in targets:
        node = by_name[ref.name]
        assert node.op_type == ref.op_type
        # weight: DQ(INT8 initializer, per-channel scale vector along `axis`, zero point 0)
        dq = _dq_of(model, node.input[1])
        assert dq is not None, f"{node.name}: weight not dequantized"
        q_weight, scale, zero = dq.input[0], dq.input[1], dq.input[2]
        assert init_types[q_weight] == TensorProto.INT8, node.name
        assert init_types[zero] == TensorProto.INT8 and not inits[zero].any(), node.name
        axis = _attr(dq, "axis")
        assert axis is not None, f"{node.name}: weight DQ without axis (per-tensor)"
        w8, s = inits[q_weight], inits[scale]
        assert s.ndim == 1 and s.shape[0] == w8.shape[axis] > 1 and (s > 0).all(), node.name
        assert inits[zero].shape == s.shape
        assert w8.min() >= -127  # symmetric range
        # recompute: int8 * scale along axis is the FP32 weight, its input rows multiplied by the
        # SmoothQuant factor that the activation side divides by, within half a step unless GPTQ
        # re-rounded it (tests/exporter/test_gptq_int8.py checks that rounding); the scale is
        # max|w| / 127 per channel (MinMax, symmetric) either way
        w = fp32_inits[ref.input[1]].astype(np.float64)
        act = _dq_of(model, node.input[0])
        if node.op_type == "MatMul" and act is not None:  # smoothing applies to MatMul weights [K, N]
            w = w * np.reshape(_smoothing_factor(fp32, model, producers[act.input[0]].input[0], w8.shape[0]), (-1, 1))
        assert w.shape == w8.shape
        shape = [1] * w.ndim
        shape[axis] = -1
        step = s.astype(np.float64).reshape(shape)
        deq = w8.astype(np.float64) * step
        nearest = np.abs(deq - w) <= step / 2 * (1 + 1e-4) + 1e-9
        if node.name in gptq:  # GPTQ moves some weights past half a step, where it spreads the others' errors
            assert not nearest.all(), f"{node.name}: recorded as re-rounded by GPTQ, but rounded to nearest"
        else:
            assert nearest.all(), node.name
        others = tuple(i for i in range(w.ndim) if i != axis)
        np.testing.assert_allclose(np.abs(w).max(axis=others) / 127, s, rtol=1e-4, err_msg=node.name)

        # activation: Q -> DQ, per-tensor, INT8 zero point 0, matching scales
        act = _dq_of(model, node.input[0])
        assert act is not None, f"{node.name}: activation not quantized"
        q = producers.get(act.input[0])
        assert q is not None and q.op_type == "QuantizeLinear", node.name
        for z in (act.input[2], q.input[2]):
            assert init_types[z] == TensorProto.INT8 and not inits[z].any(), node.name
        assert inits[act.input[1]].size == 1 and inits[act.input[1]] == inits[q.input[1]]
        assert inits[act.input[1]] > 0

    if graph == "decoder":
        node = by_name[lm_head.name]
        assert node.output[0] == "logits" and node.op_type == "MatMul"
        assert _dq_of(model, node.input[0]) is None and _dq_of(model, node.input[1]) is None
        assert init_types[node.input[1]] == TensorProto.FLOAT
        np.testing.assert_array_equal(inits[node.input[1]], fp32_inits[lm_head.input[1]])


@pytest.mark.parametrize("graph", GRAPHS)
def test_int8_quantized_matmuls_run_as_integer_products_in_onnx_runtime(out, manifest, graph, tmp_path):
    """Every quantized MatMul reads its activation through a Q/DQ pair of its own, and ONNX
    Runtime's CPU optimizer (its own fusion rules, not the code under test) turns each one into
    MatMulIntegerToFloat, so no weight is dequantized at run time. A pair shared by q/k/v or
    gate/up stayed DQ + FP32 MatMul (16 of 52 fused on random:medium's decoder)."""
    import onnxruntime as ort

    model = _model(out, graph, "int8")
    producers = _producers(model)
    readers = Counter(name for node in model.graph.node for name in node.input)
    quantized = [n for n in model.graph.node if n.op_type == "MatMul" and _dq_of(model, n.input[1]) is not None
                 and _dq_of(model, n.input[0]) is not None]
    assert quantized
    for node in quantized:
        dq = _dq_of(model, node.input[0])
        assert readers[dq.output[0]] == 1 and readers[producers[dq.input[0]].output[0]] == 1, node.name
    options = exact_int8(ort.SessionOptions())  # as the runtime opens it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / manifest["variants"]["int8"]["graphs"][graph]["file"]), options,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in optimized.graph.node)
    # ONNX Runtime 1.32 leaves a quantized MatMul that a Relu reads unfused (the perceiver MLP's fc:
    # its activation pair turned UINT8 there, whatever the pairs), so those are not counted
    relu_read = {n.input[0] for n in model.graph.node if n.op_type == "Relu"}
    fused = [n for n in quantized if n.output[0] not in relu_read]
    assert ops["MatMulIntegerToFloat"] == len(fused), ops
    # and what is still dequantized feeds only those (the vision's patch Conv keeps its Q/DQ)
    dequantized = {o for n in optimized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    unfused = [n.name for n in optimized.graph.node if "MatMul" in n.op_type and dequantized & set(n.input)]
    assert sorted(unfused) == sorted(n.name for n in quantized if n.output[0] in relu_read)


# ------------------------------------------------------------------ 3. INT8 weight-only
@pytest.mark.parametrize("graph", GRAPHS)
def test_int8wo_uses_matmulnbits_for_every_weight_matmul(out, manifest, graph):
    fp32, model = _model(out, graph), _model(out, graph, "int8wo")
    producers = _producers(model)
    weight_matmuls = _weight_ops(fp32, ("MatMul",))
    assert weight_matmuls
    for ref in weight_matmuls:
        node = producers[ref.output[0]]
        assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft"), ref.name
        assert _attr(node, "bits") == 8 and _attr(node, "block_size") == WEIGHT_ONLY_BLOCK
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(weight_matmuls)
    # what stays MatMul is the activation x activation products (attention)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == \
        sum(n.op_type == "MatMul" for n in fp32.graph.node) - len(weight_matmuls)
    if graph == "decoder":
        assert producers["logits"].op_type == "MatMulNBits"  # the lm_head too
    assert any(o.domain == "com.microsoft" for o in model.opset_import)


def test_backends_per_precision(manifest):
    backends = {p: manifest["variants"][p]["backends"] for p in VARIANTS}
    assert backends["int8wo"] == ["onnxruntime"]
    assert {"onnxruntime", "tensorrt"} <= set(backends["fp16"])
    assert {"onnxruntime", "tensorrt"} <= set(backends["int8"])


# ------------------------------------------------------------------ 4. manifest
def test_manifest_variants_files_and_default(out, manifest):
    assert set(manifest["variants"]) == set(VARIANTS)
    assert manifest["precision"] == "fp16"
    onnx_files = sorted(p.name for p in out.glob("*.onnx"))
    assert len(onnx_files) == 12
    for name in onnx_files:
        assert manifest["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    for precision in VARIANTS:
        for graph, spec in manifest["variants"][precision]["graphs"].items():
            assert spec["file"] == f"{graph}.{precision}.onnx" and spec["file"] in manifest["files"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_int8_calibration_digest_is_the_builtin_data(manifest):
    calibration = manifest["variants"]["int8"]["calibration"]
    assert calibration["digest"] == calibration_data(None, 16).digest
    assert calibration["images"] == 16
    assert set(calibration["smoothing"]) == set(GRAPHS)  # SmoothQuant: alpha per graph, or None
    # FP16 reads the same data for its overflow check (FP32 activation peaks)
    fp16 = manifest["variants"]["fp16"]["calibration"]
    assert fp16["digest"] == calibration["digest"] and "65504" in fp16["method"]


@pytest.mark.parametrize("precision", VARIANTS)
def test_accuracy_rows_pass_their_thresholds(manifest, precision):
    tol = TOLERANCES[precision]
    accuracy = manifest["variants"][precision]["accuracy"]
    assert set(accuracy) == set(GRAPHS)
    assert set(accuracy["decoder"]) == {"prefill", "decode", "decode-static"}
    rows = [row for cases in accuracy.values() for outputs in cases.values() for row in outputs.values()]
    assert len(rows) > 10
    for row in rows:
        assert row["ok"] is True
        assert row["cosine"] >= tol["cosine"]
        assert row["max_abs_diff"] <= row["limit"]


@pytest.mark.parametrize("precision", VARIANTS)
def test_vision_variant_agrees_with_fp32_on_photos(out, manifest, precision):
    """Independently of the export's report: the variant's vision graph against the FP32 one, on
    real photos, cosine computed here."""
    size = manifest["model"]["image_size"]
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "chelsea", "coffee")]
    pixels = to_pixel_values(photos, size)
    (ref,) = ort_session(out / "vision.onnx").run(None, {"pixel_values": pixels})
    (got,) = ort_session(out / f"vision.{precision}.onnx").run(None, {"pixel_values": pixels})
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    cosine = ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cosine >= TOLERANCES[precision]["cosine"]
    assert not np.array_equal(ref, got)  # the variant is not the FP32 graph again


# ------------------------------------------------------------------ 5. broken transforms fail loudly
# (with the mixed-precision search off: it would keep the broken nodes at the higher precision)
NO_SEARCH = SearchBudget(rounds=0)


def test_fp16_with_masks_softmax_and_norms_in_fp16_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_mod, "FP32_OPS", ())
    monkeypatch.setattr(precision_mod, "softmax_mask_adds", lambda model: [])
    converted = []
    real = reduced_mod.to_fp16

    def spy(model, spec, keep=()):
        result = real(model, spec, keep)
        converted.append(result)
        return result

    monkeypatch.setattr(reduced_mod, "to_fp16", spy)
    with pytest.raises(ValidationError, match="fp16") as info:
        export(ExportConfig(output=tmp_path / "out", precisions=("fp16",), progress=False, search=NO_SEARCH))
    assert "decoder" in str(info.value)
    assert _leftovers(tmp_path) == []
    # the break was real: the decoder's Softmax ran in FP16 and nothing was kept in FP32
    decoder, _, kept = converted[-1]
    assert kept == []
    types = _elem_types(decoder)
    assert any(types[n.input[0]] == TensorProto.FLOAT16 for n in decoder.graph.node if n.op_type == "Softmax")


def test_int8_with_scales_four_times_too_large_is_refused(tmp_path, monkeypatch):
    real = reduced_mod.to_int8
    edited = []

    def coarse(src, dst, spec, feeds, nodes=None):
        result = real(src, dst, spec, feeds, nodes)
        model = onnx.load(str(dst))
        inits = _initializers(model)
        done = set()
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] not in done:
                t = inits[node.input[1]]
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(4), t.name))
                done.add(node.input[1])
        assert done
        edited.append(spec.name)
        onnx.save(model, str(dst))
        return result

    monkeypatch.setattr(reduced_mod, "to_int8", coarse)
    with pytest.raises(ValidationError, match="int8"):
        export(ExportConfig(output=tmp_path / "out", precisions=("int8",), progress=False, search=NO_SEARCH))
    assert set(edited) == set(GRAPHS)
    assert _leftovers(tmp_path) == []


def test_int8_calibrated_on_shrunken_activations_is_refused(tmp_path, monkeypatch):
    real = export_mod.calibration_feeds  # export.py imported the name: patch it where it is looked up
    calls = []

    def shrunk(*args, **kwargs):
        calls.append(1)
        feeds = real(*args, **kwargs)
        return {graph: [{name: (a * np.float32(1e-3)).astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a
                         for name, a in feed.items()} for feed in items]
                for graph, items in feeds.items()}

    monkeypatch.setattr(export_mod, "calibration_feeds", shrunk)
    with pytest.raises(ValidationError, match="int8") as info:
        export(ExportConfig(output=tmp_path / "out", precisions=("int8",), progress=False, search=NO_SEARCH))
    assert calls == [1]
    assert "int8 result(s) miss their bounds" in str(info.value)
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ 6. calibration through the CLI
def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_calibration_images_and_feed_cache(tmp_path, capsys, monkeypatch):
    photos = _photo_pngs(tmp_path / "photos")
    real = feeds_mod._compute
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2].digest)
        return real(*args, **kwargs)

    monkeypatch.setattr(feeds_mod, "_compute", counting)
    builtin = calibration_data(None, 16).digest

    rc, err = _run(["--quiet", "--int8", "--calibration-images", photos, tmp_path / "a"], capsys)
    assert rc == 0, err
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())["variants"]["int8"]["calibration"]
    assert first["digest"] != builtin
    assert first["digest"] == calibration_data(photos, 16).digest
    assert first["source"] == str(photos)
    assert len(calls) == 1

    # the same model and data again: the feeds come from the cache, and the graphs are the same bytes
    rc, err = _run(["--quiet", "--int8", "--calibration-images", photos, tmp_path / "b"], capsys)
    assert rc == 0, err
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())["variants"]["int8"]["calibration"]
    assert second["digest"] == first["digest"]
    assert len(calls) == 1
    for graph in GRAPHS:
        a, b = (hashlib.sha256((tmp_path / x / f"{graph}.int8.onnx").read_bytes()).hexdigest() for x in "ab")
        assert a == b, graph

    # another --calibration-size is other data: computed afresh
    rc, err = _run(["--quiet", "--int8", "--calibration-images", photos, "--calibration-size", 2,
                    tmp_path / "c"], capsys)
    assert rc == 0, err
    third = json.loads((tmp_path / "c" / "manifest.json").read_text())["variants"]["int8"]["calibration"]
    assert third["digest"] not in (first["digest"], builtin) and third["images"] == 2
    assert len(calls) == 2 and calls[1] == third["digest"]


def _corrupt_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = _photo_pngs(tmp_path / "photos", names=("coffee",))
    bad = folder / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x13" * 64)
    return folder, bad


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt"])
def test_cli_bad_calibration_folder(tmp_path, capsys, case):
    if case == "empty":
        folder = named = tmp_path / "photos"
        folder.mkdir()
    elif case == "missing":
        folder = named = tmp_path / "no-such-photos"
    else:
        folder, named = _corrupt_folder(tmp_path)
    before = _leftovers(tmp_path)
    rc, err = _run(["--quiet", "--int8", "--calibration-images", folder, tmp_path / "out"], capsys)
    assert rc == 2
    assert "Traceback" not in err and "idefics-export: error:" in err, err
    assert str(named) in err, err
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == before  # no partial folder either


# ------------------------------------------------------------------ 7. Session per precision
@pytest.mark.parametrize("precision", ["fp32", *VARIANTS])
def test_session_generates_with_each_precision(out, manifest, precision):
    photo = Image.fromarray(skimage.data.chelsea())
    prompt = [["User:", photo, "Describe this image.<end_of_utterance>\nAssistant:"]]
    with Session(out, precision="fp32") as reference:
        ref = reference.generate(prompts=prompt, max_new_tokens=8, min_new_tokens=8, output_logits=True)
    with Session(out, precision=precision) as session:
        assert session.precision == precision
        suffix = "" if precision == "fp32" else f".{precision}"
        assert session.graphs.decoder.path.name == f"decoder{suffix}.onnx"
        # ONNX Runtime itself sees the variant's IO dtypes
        cross = {i.name: i.type for i in session.graphs.decoder.session.get_inputs()}["cross_key.0"]
        assert cross == ("tensor(float16)" if precision == "fp16" else "tensor(float)")
        result = session.generate(prompts=prompt, max_new_tokens=8, min_new_tokens=8, output_logits=True)
    assert result.new_tokens.shape == (1, 8)
    assert result.texts is not None and len(result.texts) == 1
    vocab = manifest["model"]["vocab_size"]
    assert ((result.new_tokens >= 0) & (result.new_tokens < vocab)).all()
    # the first step is the prefill: its logits agree with FP32 within the precision's cosine
    a, b = ref.logits[0, 0].astype(np.float64), result.logits[0, 0].astype(np.float64)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine >= (TOLERANCES[precision]["cosine"] if precision != "fp32" else 0.999999)
    assert result.new_tokens[0, 0] == ref.new_tokens[0, 0]



def test_session_without_int8wo_names_the_flag(tmp_path):
    plain = tmp_path / "plain"
    export(ExportConfig(output=plain, progress=False))
    with pytest.raises(ManifestError, match="int8wo") as info:
        Session(plain, precision="int8wo")
    assert "--int8-weight-only" in str(info.value)
