"""FP16 and INT8 as ONNX-to-ONNX transforms of the validated FP32 graphs.

TensorRT 11 builds strongly typed networks only: a tensor is FP16 where the ONNX graph says so and
INT8 where it has explicit QuantizeLinear/DequantizeLinear pairs. So both precisions live in the
graphs, and ONNX Runtime on CPU measures their accuracy.

FP16 (onnxruntime.transformers.float16, shipped inside onnxruntime, so no extra dependency; it is
the converter ORT's own transformer optimizer uses and takes op- and node-level block lists).
The rule, op by op:
  - FP16: MatMul/Gemm/Conv and their weights, elementwise ops, the residual stream, the
    self-attention and cross-attention caches (graph IO: half the cache bytes per decode step);
  - FP32: everything that reduces or exponentiates (LayerNormalization, RMSNorm's Pow /
    ReduceMean / Sqrt / Div, Softmax and the mask Add in front of it, whose finfo(float32).min
    would overflow to -inf in FP16 and turn fully masked rows into NaN), the rotary Cos/Sin, and
    mask construction (Where, Range, CumSum);
  - graph IO keeps FP32 for pixel_values (user input) and logits (sampling precision).
INT8 (onnxruntime.quantization.quantize_static, QDQ format): symmetric (zero point 0) per-channel
INT8 weights and symmetric per-tensor INT8 activations on every MatMul/Gemm/Conv that has a
weight, calibrated on real photos; the lm_head stays FP32 (its output is the logits). This is
the graph TensorRT builds; ONNX Runtime's CPU provider fuses only part of its per-channel QDQ
MatMuls and is slower on it than on FP32 (measured, README).
INT8 weight-only ("int8wo", ONNX Runtime only): every weight MatMul, lm_head included, becomes
ONNX Runtime's MatMulNBits (8 bits, symmetric, blocks of 32 along K) with accuracy level 4
(activations quantized per block on the fly): decode on CPU is memory bound, and this reads a
quarter of the FP32 weight bytes. TensorRT cannot read MatMulNBits, so the manifest says so.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from exporter.util import quiet_logger
from runtime.manifest import GraphSpec, TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "int8wo")
# Which backends can read each precision's graphs: int8wo uses ONNX Runtime's MatMulNBits contrib op.
BACKENDS = {"fp32": ["onnxruntime", "tensorrt"], "fp16": ["onnxruntime", "tensorrt"],
            "int8": ["onnxruntime", "tensorrt"], "int8wo": ["onnxruntime"]}
# Per precision, every output must satisfy both, against the FP32 PyTorch module:
#   max |onnx - torch| <= atol + rtol * max|torch|      and      cosine(onnx, torch) >= cosine
# The one place these numbers live; export and idefics-check read this table.
TOLERANCES = {
    "fp32": dict(atol=1e-4, rtol=1e-4, cosine=0.99999),
    "fp16": dict(atol=1e-2, rtol=1e-2, cosine=0.999),
    "int8": dict(atol=5e-2, rtol=0.25, cosine=0.98),
    "int8wo": dict(atol=5e-2, rtol=0.25, cosine=0.98),
}

FP32_OPS = (
    "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax",
    "Cos", "Sin", "Where", "Range", "CumSum",
)
FP32_IO = ("pixel_values", "logits")
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def variant_file(spec: GraphSpec, precision: str) -> str:
    return f"{spec.name}.{precision}.onnx"


# ---------------------------------------------------------------- FP16
def to_fp16(model, spec: GraphSpec):
    """Return (fp16 ModelProto, new GraphSpec, node names kept in FP32)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    mask_adds = softmax_mask_adds(model)
    kept = [n.name for n in model.graph.node if n.op_type in FP32_OPS or n.name in mask_adds]
    keep_io = [t.name for t in (*spec.inputs, *spec.outputs) if t.name in FP32_IO]
    converted = convert_float_to_float16(
        model, keep_io_types=keep_io, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=mask_adds,
    )

    topological_sort(converted.graph)  # the converter appends its Casts; ONNX and TensorRT need order

    def retype(t: TensorSpec) -> TensorSpec:
        return dataclasses.replace(t, dtype="float16") if t.dtype == "float32" and t.name not in keep_io else t

    new_spec = dataclasses.replace(
        spec, file=variant_file(spec, "fp16"), external_data=None,
        inputs=tuple(map(retype, spec.inputs)), outputs=tuple(map(retype, spec.outputs)),
    )
    return converted, new_spec, sorted(kept)


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def softmax_mask_adds(model) -> list[str]:
    """The Add feeding each Softmax (through Casts): where the additive finfo.min mask is applied."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        source = producer.get(node.input[0])
        while source is not None and source.op_type in ("Cast", "Identity"):
            source = producer.get(source.input[0])
        if source is not None and source.op_type == "Add":
            found.append(source.name)
    return found


# ---------------------------------------------------------------- INT8
def weight_nodes(model, ops: Iterable[str] = QUANTIZED_OPS) -> list[str]:
    """Nodes of `ops` that take a weight (an initializer, possibly through Transpose/Identity)."""
    initializers = {t.name for t in model.graph.initializer}
    constant_outputs = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {out: node for node in model.graph.node for out in node.output}

    def is_weight(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Identity"):
            name, node = node.input[0], producer.get(node.input[0])
        return name in initializers or name in constant_outputs

    return [n.name for n in model.graph.node if n.op_type in ops and any(is_weight(i) for i in n.input[1:2])]


def output_node(model, output: str) -> str | None:
    for node in model.graph.node:
        if output in node.output:
            return node.name
    return None


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def to_int8(src: Path, dst: Path, spec: GraphSpec, feeds: list[dict[str, np.ndarray]]):
    """Quantize the FP32 graph at `src` into `dst`; return (new GraphSpec, node names left in FP32)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    candidates = weight_nodes(model)
    excluded = [n for n in (output_node(model, "logits"),) if n in candidates]
    chosen = [n for n in candidates if n not in excluded]
    with quiet_logger():  # quantize_static logs a generic "consider pre-processing" at WARNING
        _quantize(src, dst, feeds, chosen, spec)
    others = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in chosen]
    new_spec = dataclasses.replace(spec, file=variant_file(spec, "int8"), external_data=None)
    return new_spec, sorted(others)


def _quantize(src: Path, dst: Path, feeds, chosen: list[str], spec: GraphSpec) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=chosen, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        use_external_data_format=spec.external_data is not None,
    )


# ---------------------------------------------------------------- INT8 weight-only (ONNX Runtime)
WEIGHT_ONLY_BLOCK = 32


def to_int8_weight_only(model, spec: GraphSpec):
    """Return (ModelProto with MatMulNBits, new GraphSpec, weight nodes left in FP32)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    candidates = weight_nodes(model, ("MatMul",))
    with quiet_logger():
        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                         accuracy_level=4, quant_format=QuantFormat.QOperator)
        quantizer.process()
    converted = quantizer.model.model
    remaining = {n.name for n in converted.graph.node if n.op_type in QUANTIZED_OPS}
    kept = sorted(n for n in weight_nodes(model) if n in remaining or n not in candidates)
    return converted, dataclasses.replace(spec, file=variant_file(spec, "int8wo"), external_data=None), kept
