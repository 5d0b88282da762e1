"""What this CPU's INT8 products compute in ONNX Runtime, and the session setting that makes them exact.

ONNX Runtime's CPU provider (MLAS) picks its u8 x s8 integer MatMul kernel by CPU feature. With
AVX-512 VNNI it multiplies and adds in 32 bits (VPDPBUSD): the exact integer product. Without VNNI
(AVX2-only CPUs such as AMD Zen 2 / Zen 3 and Intel servers before Ice Lake, and AVX-512 CPUs
without VNNI such as Skylake-SP) it adds pairs of u8 x s8 products in saturating 16-bit lanes
(VPMADDUBSW): 255 x 127 x 2 = 64770 does not fit in 32767, so full-range INT8 operands give wrong
sums (measured under an emulated Haswell: an 8x256 by 256x64 MatMulInteger wrong in 503 of 512
outputs, by up to 6e4). Every INT8 graph of this toolkit has such products: the static Q/DQ graphs
(fused into MatMulIntegerToFloat / QLinearMatMul), the per-token prompt graph and the dynamic
encoders (MatMulInteger, DynamicQuantizeMatMul, QAttention).

ONNX Runtime's own remedy is the session option `session.x64quantprecision`: its
Avx2WeightS8ToU8Transformer turns each constant INT8 weight into UINT8 (plus 128), and the u8 x u8
kernel widens to 16 bits before multiplying (VPMADDWD), which cannot saturate. It is set here on
CPUs without VNNI only. On a VNNI CPU it would also switch to the u8 x u8 kernel, which there is
3.3x-4.3x slower than the exact u8 x s8 one for 64-257 rows (one [m,768] x [768,3072] MatMul on
the 2-core Sapphire Rapids VM, 2026-12-06; the same at 1 row, where the weights' bytes bound it).
MatMulNBits (int8wo) and the INT8 KV cache need nothing: their kernels give the same result on
both CPU kinds (checked under the emulator).

Features come from CPUID through NumPy (`__cpu_features__`), not /proc/cpuinfo: what the process
is given (an emulator, a VM's CPU model) is what ONNX Runtime sees too. NumPy does not report
AVX-VNNI (the VEX form of Alder Lake and later client CPUs), so such a CPU gets the u8 x u8
kernel: exact, only slower.

`IDEFICS_TOOLKIT_INT8_KERNELS` overrides the choice: `auto` (the default, as above), `exact`
(the u8 x u8 kernel whatever the CPU), `native` (ONNX Runtime's default kernel whatever the CPU:
exact only with VNNI; for measuring and for showing the failure, never for serving).
"""

from __future__ import annotations

import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "IDEFICS_TOOLKIT_INT8_KERNELS"
MODES = ("auto", "exact", "native")
PRECISION_OPTION = "session.x64quantprecision"


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """NumPy's CPUID-based feature table ({} where NumPy does not expose it)."""
    try:  # NumPy 2.x
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x (the Triton model's environment)
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:  # pragma: no cover - every NumPy since 1.20 has it
            return {}
    return dict(__cpu_features__)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def has_vnni() -> bool:
    """AVX-512 VNNI, where ONNX Runtime's u8 x s8 kernel sums in 32 bits (exact)."""
    return bool(cpu_features().get("AVX512VNNI"))


def int8_kernels() -> str:
    """The ONNX Runtime INT8 kernel this process uses: 'u8s8-vnni' (exact), 'u8u8' (exact, chosen
    here), 'u8s8-saturating' (native mode on a CPU without VNNI: wrong sums) or 'native' (not x86)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if not is_x86():
        return "native"  # ARM's and others' INT8 kernels do not saturate: nothing to choose
    if mode == "exact" or (mode == "auto" and not has_vnni()):
        return "u8u8"
    return "u8s8-vnni" if has_vnni() else "u8s8-saturating"


def exact_int8(options):
    """Set up ONNX Runtime SessionOptions `options` so its INT8 products are exact on this CPU (see
    the module's docstring); return them. Every session the toolkit opens goes through here."""
    kernels = int8_kernels()
    if kernels == "u8u8":
        options.add_session_config_entry(PRECISION_OPTION, "1")
    elif kernels == "u8s8-saturating":
        _warn_once()
    return options


@functools.lru_cache(maxsize=1)
def _warn_once() -> None:
    log.warning("%s=native on a CPU without AVX-512 VNNI: ONNX Runtime's INT8 products saturate in 16 bits "
                "here and INT8 graphs give wrong results; unset it to serve", ENV)


def describe() -> dict[str, object]:
    """What the manifest and reports record of the CPU: its INT8-relevant features and kernel."""
    features = cpu_features()
    return {"machine": platform.machine(), "avx2": bool(features.get("AVX2")),
            "avx512f": bool(features.get("AVX512F")), "avx512_vnni": has_vnni(),
            "int8_kernels": int8_kernels()}
