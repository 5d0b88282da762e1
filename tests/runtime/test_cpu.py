"""INT8 that is right on any x86-64 CPU (runtime.cpu).

ONNX Runtime's u8 x s8 INT8 kernel saturates on CPUs without AVX-512 VNNI; runtime.cpu makes every
session of the toolkit use the exact u8 x u8 kernel there. The tests below that carry the
`int8_numerics` marker compare INT8 products with NumPy's integer arithmetic; they run natively and,
through `avx2_run`, under ../shared/cpu/avx2 (qemu-user emulating a Haswell: AVX2, no AVX-512, no
VNNI), so a VNNI machine's CI proves the AVX2 behaviour too. Under the emulator the programs start in
20-30 s and compute 10-50x slower: only small graphs run there.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import cpu
from runtime.errors import ToolkitError
from tests.util import avx2_run

M, K, N = 8, 256, 64


# ---------------------------------------------------------------- the choice of kernel
@pytest.fixture
def features(monkeypatch):
    """Pretend the CPU has (or lacks) VNNI: runtime.cpu reads NumPy's table through cpu_features."""
    def set_(vnni: bool, mode: str | None = None):
        monkeypatch.setattr(cpu, "cpu_features", lambda: {"AVX2": True, "AVX512F": vnni, "AVX512VNNI": vnni})
        monkeypatch.setattr(cpu, "is_x86", lambda: True)
        if mode is None:
            monkeypatch.delenv(cpu.ENV, raising=False)
        else:
            monkeypatch.setenv(cpu.ENV, mode)
    return set_


@pytest.mark.parametrize("vnni, mode, kernels, option", [
    (True, None, "u8s8-vnni", None),  # VNNI: ORT's default kernel is exact, and the u8 x u8 one slower
    (False, None, "u8u8", "1"),  # no VNNI: the exact u8 x u8 kernel
    (True, "exact", "u8u8", "1"),
    (False, "native", "u8s8-saturating", None),
    (True, "native", "u8s8-vnni", None),
    (False, "AUTO", "u8u8", "1"),
])
def test_kernel_choice_follows_vnni(features, vnni, mode, kernels, option):
    features(vnni, mode)
    assert cpu.int8_kernels() == kernels
    options = cpu.exact_int8(ort.SessionOptions())
    if option is None:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry(cpu.PRECISION_OPTION)
    else:
        assert options.get_session_config_entry(cpu.PRECISION_OPTION) == option
    assert cpu.describe()["avx512_vnni"] is vnni and cpu.describe()["int8_kernels"] == kernels


def test_unknown_mode_is_refused_by_name(features):
    features(False, "fast")
    with pytest.raises(ValueError, match=f"{cpu.ENV}='fast'.*auto, exact, native"):
        cpu.int8_kernels()


def test_features_come_from_numpy_cpuid():
    from numpy._core._multiarray_umath import __cpu_features__

    assert cpu.cpu_features() == dict(__cpu_features__)


def test_session_refuses_int8_on_saturating_kernels(features):
    from runtime.session import refuse_saturating_int8

    features(False, "native")
    with pytest.raises(ToolkitError, match="precision 'int8wo' needs exact INT8.*AVX-512 VNNI.*unset IDEFICS"):
        refuse_saturating_int8(["int8wo", None])
    refuse_saturating_int8(["fp32", "fp16"])  # no INT8 products: nothing to refuse
    features(True, "native")
    refuse_saturating_int8(["int8"])  # VNNI: the native kernel is exact


# ---------------------------------------------------------------- INT8 products against NumPy
def _matmul_integer(b: np.ndarray, b_zero_point=None):
    inputs = ["a", "b", "za"] + (["zb"] if b_zero_point is not None else [])
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(128, np.uint8), "za")]
    if b_zero_point is not None:
        inits.append(numpy_helper.from_array(np.array(b_zero_point, b.dtype), "zb"))
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_matmul(x_scale: float, wq: np.ndarray, w_scale: np.ndarray):
    """QuantizeLinear / DequantizeLinear (INT8, symmetric) on x, per-channel INT8 weight: what the
    INT8 export writes for TensorRT, and ONNX Runtime fuses into an integer MatMul."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(wq.shape[1], np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model, feed, toolkit: bool = True):
    """`toolkit`: a session set up as the toolkit's (runtime.cpu.exact_int8); else ONNX Runtime's defaults."""
    options = ort.SessionOptions()
    if toolkit:
        cpu.exact_int8(options)
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture
def full_range():
    """Full-range operands: u8 activations and s8 weights, where 16-bit pair sums overflow (255 x 127 x 2)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (M, K), dtype=np.uint8), rng.integers(-128, 128, (K, N), dtype=np.int8)


@pytest.mark.int8_numerics
@pytest.mark.parametrize("weight_zero_point", [None, 0])
def test_matmul_integer_is_exact(full_range, weight_zero_point):
    a, b = full_range
    want = (a.astype(np.int64) - 128) @ b.astype(np.int64)
    np.testing.assert_array_equal(_run(_matmul_integer(b, weight_zero_point), {"a": a}), want)


@pytest.mark.int8_numerics
def test_qdq_matmul_is_the_integer_product():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((M, K)).astype(np.float32) * 3
    w = rng.standard_normal((K, N)).astype(np.float32)
    x_scale = np.float32(np.abs(x).max() / 127)
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    xq = np.clip(np.round(x / x_scale), -128, 127).astype(np.int64)
    want = (xq @ wq.astype(np.int64)).astype(np.float64) * x_scale * w_scale
    got = _run(_qdq_matmul(x_scale, wq, w_scale), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.int8_numerics
def test_onnx_runtime_defaults_saturate_exactly_where_vnni_is_missing(full_range):
    """What the toolkit's setting is for: ONNX Runtime's own default kernel is exact with VNNI and
    wrong without it (the emulated Haswell). Also proves the emulator emulates what it claims."""
    a, b = full_range
    want = (a.astype(np.int64) - 128) @ b.astype(np.int64)
    got = _run(_matmul_integer(b), {"a": a}, toolkit=False)
    if cpu.has_vnni() or not cpu.is_x86():
        np.testing.assert_array_equal(got, want)
    else:
        wrong = np.count_nonzero(got != want)
        assert wrong > want.size // 2, f"{wrong} of {want.size} products wrong: expected saturation without VNNI"


# ---------------------------------------------------------------- under the emulated AVX2 CPU
@pytest.mark.slow
def test_the_emulated_cpu_lacks_vnni_and_the_toolkit_picks_u8u8():
    done = avx2_run(["-c", "import json; from runtime import cpu; print(json.dumps(cpu.describe()))"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    described = json.loads(done.stdout.strip().splitlines()[-1])
    assert described["avx2"] and not described["avx512f"] and not described["avx512_vnni"], described
    assert described["int8_kernels"] == "u8u8"


@pytest.mark.slow
def test_int8_numerics_tests_pass_on_the_emulated_avx2_cpu():
    """The `int8_numerics` tests (exact INT8 products, against NumPy) run again under the emulator."""
    done = avx2_run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "int8_numerics",
                     "tests/runtime/test_cpu.py", "tests/exporter/test_int8_products.py"], timeout=900)
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail + done.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail
