"""The two INT8-product rewrites of exporter.precision.transforms that the int8wo ONNX Runtime graphs use for
many rows at once (a prompt, an image's tokens): per_token_int8 (the prompt decoder) and
dynamic_int8 (vision / perceiver). Each is compared with the same arithmetic computed here in NumPy
and with FP32; a row far larger than the others shows why the prompt graph quantizes per row."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.precision.transforms import dynamic_int8, per_token_int8
from runtime.cpu import exact_int8

K, N1, N2 = 96, 80, 48
# also run on an emulated AVX2-only CPU by tests/runtime/test_cpu.py
pytestmark = pytest.mark.int8_numerics


def _graph(w1: np.ndarray, w2: np.ndarray, rows: int):
    """y1 = x @ w1, y2 = x @ w2 (one activation read by two weight MatMuls), z = y1 @ y1^T (no weight)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="first"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="second"),
             helper.make_node("Transpose", ["y1"], ["y1t"], perm=[1, 0]),
             helper.make_node("MatMul", ["y1", "y1t"], ["z"], name="activations")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, K])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "z")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x):
    options = exact_int8(ort.SessionOptions())  # as every session of the toolkit
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _numpy_per_token(x, w):
    """Per-row symmetric INT8 activations x per-column symmetric INT8 weights, products in integers."""
    step = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.float32(1e-12))
    q = np.round(x / step).astype(np.int64)
    column = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
    wq = np.clip(np.round(w / column), -127, 127).astype(np.int64)
    return (q @ wq).astype(np.float32) * step * column.astype(np.float32)


def _relative(got, want):
    return np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((K, N1)).astype(np.float32) * rng.uniform(0.1, 3, N1).astype(np.float32)
    w2 = rng.standard_normal((K, N2)).astype(np.float32)
    x = rng.standard_normal((7, K)).astype(np.float32) * rng.uniform(0.01, 50, (7, 1)).astype(np.float32)
    return w1, w2, x


def test_per_token_int8_is_the_integer_arithmetic_it_names(case):
    w1, w2, x = case
    model = per_token_int8(_graph(w1, w2, len(x)))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # both weight MatMuls became MatMulInteger over one shared quantization of x; x @ x^T stayed FP32
    assert ops["MatMulInteger"] == 2 and ops["MatMul"] == 1 and ops["ReduceMax"] == 1, ops
    assert {t.name for t in model.graph.initializer}.isdisjoint({"w1", "w2"})  # the FP32 weights are gone
    assert {n.name for n in model.graph.node if n.op_type == "MatMulInteger"} == {"first", "second"}
    y1, y2, z = _run(model, x)
    np.testing.assert_allclose(y1, _numpy_per_token(x, w1), rtol=1e-5, atol=1e-5 * np.abs(y1).max())
    np.testing.assert_allclose(y2, _numpy_per_token(x, w2), rtol=1e-5, atol=1e-5 * np.abs(y2).max())
    np.testing.assert_allclose(z, y1 @ y1.T, rtol=1e-4)
    # and near FP32: INT8 on both sides costs about a percent of each row's range
    assert _relative(y1, x @ w1).max() < 0.03 and _relative(y2, x @ w2).max() < 0.03


def test_a_large_row_does_not_coarsen_the_others(case):
    """One row 1000x the others (LLaMA's first token is such a row): per row, every other row keeps
    its own step; one scale per tensor (dynamic_int8, DynamicQuantizeLinear) rounds them to noise."""
    w1, w2, x = case
    x = x.copy()
    x[0] *= 1000 / np.abs(x[0]).max() * np.abs(x[1:]).max()
    want = x @ w1
    per_row = _run(per_token_int8(_graph(w1, w2, len(x))), x)[0]
    per_tensor = _run(dynamic_int8(_graph(w1, w2, len(x))), x)[0]
    assert _relative(per_row, want).max() < 0.03
    assert _relative(per_tensor[1:], want[1:]).max() > 0.2  # the failure per-row quantization avoids


def test_dynamic_int8_quantizes_weight_matmuls_only(case):
    w1, w2, x = case
    model = dynamic_int8(_graph(w1, w2, len(x)))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLinear"] >= 1 and ops["MatMul"] == 1, ops
    y1, y2, z = _run(model, x)
    # one scale for the whole tensor: each row's error is measured against the largest row's range
    scale = np.abs(x @ w1).max()
    assert np.abs(y1 - x @ w1).max() / scale < 0.03 and np.abs(y1 - x @ w1).max() > 0
    np.testing.assert_allclose(z, y1 @ y1.T, rtol=1e-4)
    onnx.checker.check_model(model)
