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
  - graph IO keeps FP32 for pixel_values (user input) and logits (sampling precision);
  - plus the nodes exporter.precision.reduced keeps in FP32 for overflow or accuracy (`keep`); between two
    FP32 nodes the value stays FP32 (the converter's FP16 round trip there is removed).
INT8 (onnxruntime.quantization.quantize_static, QDQ format): symmetric (zero point 0) per-channel
INT8 weights and symmetric per-tensor INT8 activations on the inputs of every MatMul/Gemm/Conv that
has a weight, calibrated on real photos (after SmoothQuant, exporter.precision.smoothing), the INT8
weights then re-rounded by GPTQ at the same scales where that predicts held-out calibration rows
better (gptq_int8_qdq: random:medium's top-1 91.0 % -> 93.4 % before any search); the lm_head stays
FP32 (its output is the logits), and so do the MatMuls the search unquantizes (`unquantize`). This
is the graph TensorRT builds. After quantize_static, own_activation_qdq gives each quantized node its
own activation Q/DQ pair: ONNX Runtime's CPU provider fuses DQ -> MatMul into MatMulIntegerToFloat
only where a Q/DQ pair feeds a single node, and the shared pairs left most weights dequantized at
every step (16 of 52 fused on random:medium's decoder; slower than FP32 until this rewrite).
INT8 weight-only ("int8wo", ONNX Runtime only): every weight MatMul, lm_head included, becomes
ONNX Runtime's MatMulNBits (8 bits, symmetric, blocks of 128 along K) with accuracy level 4
(activations quantized per block on the fly): decode on CPU is memory bound, and this reads a
quarter of the FP32 weight bytes. TensorRT cannot read MatMulNBits, so the manifest says so.
INT4 weight-only ("int4wo"): the same with 4 bits in blocks of INT4_BLOCK along K (an eighth of
the FP32 weight bytes, plus one FP32 scale per block): what fits a large model in a small memory.
Plain rounding of a 4-bit block loses more than INT8's, so each weight MatMul's INT4 values are
fitted on its calibration activations (int4_calibrate): AWQ (input channels scaled by
s = mean|x|^alpha, the activation divided by s in a Mul in front, per-block clipping) or GPTQ
(rounding errors spread over the rows not yet rounded), whichever predicts held-out rows better;
the search's MatMuls go 8-bit (same blocks). The TensorRT form of the same weights
(to_int4_trt): INT4 initializers through an opset-21 block-wise DequantizeLinear (block_size along
K) into the MatMul, as NVIDIA's ModelOpt writes weight-only INT4.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from exporter.graphs.bounds import TOLERANCES  # noqa: F401 (re-exported: the table's old home)
from runtime.console import quiet_logger
from runtime.manifest import GraphSpec, TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8", "int8wo", "int4wo")
# Which backends can read each precision's graphs: int8wo and int4wo use ONNX Runtime's MatMulNBits
# contrib op (int4wo's TensorRT form is a separate graph, NAME.int4wo.trt.onnx, see to_int4_trt).
BACKENDS = {"fp32": ["onnxruntime", "tensorrt"], "fp16": ["onnxruntime", "tensorrt"],
            "int8": ["onnxruntime", "tensorrt"], "int8wo": ["onnxruntime"], "int4wo": ["onnxruntime"]}
# The accuracy bounds of each precision live in exporter.graphs.bounds (one table, shared with idefics-check).

FP32_OPS = (
    "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div", "Softmax",
    "Cos", "Sin", "Where", "Range", "CumSum",
)
FP32_IO = ("pixel_values", "logits")
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def variant_file(spec: GraphSpec, precision: str) -> str:
    return f"{spec.name}.{precision}.onnx"


# ---------------------------------------------------------------- FP16
def to_fp16(model, spec: GraphSpec, keep: Iterable[str] = (), keep_io: Iterable[str] | None = None,
            chains: bool = False):
    """Return (fp16 ModelProto, new GraphSpec, node names kept in FP32): the rule's, and `keep`
    (nodes the mixed-precision search or the overflow check keep in FP32). `keep_io`: the graph
    inputs and outputs that stay FP32 (default: those of `spec` in FP32_IO; a piece of a streamed
    graph passes its FP32 masks and rotary tables too).

    A model with more than IN_PLACE_BYTES of weights is converted in place (`model` becomes the
    FP16 graph): the converter's shape inference would serialize it, which protobuf refuses past
    2 GB, and a copy would double the memory. Its types are inferred on its structure instead."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = [*softmax_mask_adds(model), *keep]
    kept = {n.name for n in model.graph.node if n.op_type in FP32_OPS or n.name in blocked}
    keep_io = [t.name for t in (*spec.inputs, *spec.outputs) if t.name in FP32_IO] if keep_io is None else list(keep_io)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > IN_PLACE_BYTES
    if large:
        infer_types_in_place(model)
    converted = convert_float_to_float16(
        model, keep_io_types=keep_io, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=list(dict.fromkeys(blocked)), disable_shape_infer=large,
    )

    _drop_round_trips(converted.graph, chains)
    topological_sort(converted.graph)  # the converter appends its Casts; ONNX and TensorRT need order

    def retype(t: TensorSpec) -> TensorSpec:
        return dataclasses.replace(t, dtype="float16") if t.dtype == "float32" and t.name not in keep_io else t

    new_spec = dataclasses.replace(
        spec, file=variant_file(spec, "fp16"), external_data=None,
        inputs=tuple(map(retype, spec.inputs)), outputs=tuple(map(retype, spec.outputs)),
    )
    return converted, new_spec, sorted(kept)


IN_PLACE_BYTES = 1 << 30


def infer_types_in_place(model) -> None:
    """onnx shape inference for a model of any size: run on a copy whose large initializers carry
    only their names, types and dims, its value_info written back onto `model`."""
    import onnx
    from onnx import helper, shape_inference

    g = model.graph
    stubs = [t if len(t.raw_data) <= 1 << 16 else onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
             for t in g.initializer]
    light = helper.make_model(helper.make_graph(g.node, g.name, g.input, g.output, initializer=stubs,
                                                value_info=g.value_info),
                              opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = shape_inference.infer_shapes(light)
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)


def _drop_round_trips(graph, chains: bool = False) -> None:
    """Between two FP32 nodes the converter may still pass the value through FP16 (a Cast to FP16
    after the first, a Cast back to FP32 before the second: it retypes every tensor it has a
    value_info for). Rounded, or beyond 65504 and so inf, the value would lose what keeping both
    nodes in FP32 was for: FP32 readers read the FP32 value itself; FP16 readers keep the Cast.

    `chains` (a streamed piece's, exporter.stream.writer): also through a traced `.to(float32)`
    the converter retyped to FP16 between the two, from an input kept FP32 too, and for an output
    kept FP32. A piece's masks arrive as an input holding finfo(float32).min, which FP16 makes
    -inf (NaN rows after softmax). The whole graph is left as it was: its masks are built inside
    it from FP16-converted constants (-65504), and the FP16 rounding after the mask Add is what
    makes a fully masked (left-padding) row's softmax uniform, as PyTorch's finfo.min mask makes it:
    through chains, the whole tiny decoder missed its prefill bounds (max|err| 0.36 rms on the
    logits, 0.15-0.24 on padded rows' K/V), the scores showing through -65504."""
    producer = {o: n for n in graph.node for o in n.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == 1}
    outputs = {o.name for o in graph.output}
    rename = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != 1:
            continue
        # up the chain of float Casts in front of it (the converter's, and a traced `.to(float32)` it
        # retyped to FP16): the converter names a blocked node's FP32 output NAME_cast_to_fp16 and casts
        # it to NAME in FP16; an input kept FP32 (keep_io_types) it casts to FP16 for every reader
        origin, through_fp16 = node.input[0], False
        while (first := producer.get(origin)) is not None and first.op_type == "Cast" and _cast_to(first) in (1, 10):
            through_fp16 |= _cast_to(first) == 10
            origin = first.input[0]
            if not chains:
                break
        if through_fp16 and (origin.endswith("_cast_to_fp16") or (chains and origin in fp32_inputs)):
            if node.output[0] in outputs and chains:  # an output kept FP32: its Cast reads the FP32 value (a copy)
                node.input[0] = origin
            else:
                rename[node.output[0]] = origin  # an FP32 -> FP16 -> FP32 round trip
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def fp16_rule(model) -> list[str]:
    """The nodes the FP16 rule keeps in FP32 (FP32_OPS and the Softmax mask Adds)."""
    masks = set(softmax_mask_adds(model))
    return [n.name for n in model.graph.node if n.op_type in FP32_OPS or n.name in masks]


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


def int8_targets(model) -> list[str]:
    """The nodes INT8 quantizes: every weight MatMul/Gemm/Conv but the lm_head."""
    candidates = weight_nodes(model)
    excluded = [n for n in (output_node(model, "logits"),) if n in candidates]
    return [n for n in candidates if n not in excluded]


def to_int8(src: Path, dst: Path, spec: GraphSpec, feeds: list[dict[str, np.ndarray]],
            nodes: list[str] | None = None):
    """Quantize the FP32 graph at `src` into `dst`; return (new GraphSpec, node names left in FP32).
    `nodes`: the nodes to quantize (default: int8_targets)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    chosen = int8_targets(model) if nodes is None else list(nodes)
    with quiet_logger():  # quantize_static logs a generic "consider pre-processing" at WARNING
        _quantize(src, dst, feeds, chosen, spec)
    quantized = onnx.load(str(dst), load_external_data=False)  # the weights stay where they are
    if own_activation_qdq(quantized):
        _prune(quantized.graph)
        onnx.save(quantized, str(dst))
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
        # Q/DQ on the inputs of each MatMul/Conv only, as NVIDIA ModelOpt places them for TensorRT: a
        # Q/DQ on the output too would round the result once more before the next op (measured on the
        # default model: logits mean|err| 5.3% -> 4.8% of their RMS without it)
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
        use_external_data_format=spec.external_data is not None,
    )


def own_activation_qdq(model) -> int:
    """Give each quantized MatMul/Gemm/Conv a Q/DQ pair of its own on its activation input, with
    scale and zero point initializers of its own (in place; returns how many were given one).
    quantize_static puts one pair on an activation that several MatMuls read (q/k/v, gate/up, the
    cross layers' k/v). ONNX Runtime's CPU provider fuses DQ -> MatMul into MatMulIntegerToFloat
    (INT8 products, INT8 weights read) only where the pair feeds that one node, and its
    common-subexpression pass merges identical Q nodes again unless their scale initializers differ
    by name. Measured on random:medium's INT8 decoder: 16 of 52 quantized MatMuls fused before, all
    52 after. The function is unchanged (the same scale quantizes the same tensor), and TensorRT
    reads either form."""
    import onnx

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    before: dict[int, list] = {}
    for node in graph.node:
        dq = producer.get(node.input[0]) if node.op_type in QUANTIZED_OPS and node.input else None
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or (readers[dq.output[0]] == 1 and readers[q.output[0]] == 1):
            continue
        if any(name not in constants for name in q.input[1:]) or list(q.input[1:]) != list(dq.input[1:]):
            continue  # not a static pair (scale and zero point shared by Q and DQ)
        tag = node.name or node.output[0]
        own = []
        for name in q.input[1:]:
            copy = onnx.TensorProto()
            copy.CopyFrom(constants[name])
            copy.name = f"{name}/{tag}"
            graph.initializer.append(copy)
            own.append(copy.name)
        new_q = onnx.helper.make_node("QuantizeLinear", [q.input[0], *own], [f"{q.output[0]}/{tag}"],
                                      name=f"{q.name}/{tag}")
        new_dq = onnx.helper.make_node("DequantizeLinear", [new_q.output[0], *own], [f"{dq.output[0]}/{tag}"],
                                       name=f"{dq.name}/{tag}")
        new_q.attribute.extend(q.attribute)
        new_dq.attribute.extend(dq.attribute)
        node.input[0] = new_dq.output[0]
        before[id(node)] = [new_q, new_dq]
    if before:  # each new pair right before its MatMul: the order stays topological
        nodes = [n for node in graph.node for n in (*before.get(id(node), ()), node)]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(before)


def unquantize(model, reference, nodes: Iterable[str]):
    """A copy of the Q/DQ `model` in which `nodes` compute unquantized again: they read the tensors
    and FP32 weights they read in `reference` (the graph before quantization), and the Q/DQ nodes
    and quantized weights no node reads any more are dropped. This is what quantizing without them
    gives, without quantizing the whole graph again."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = set(nodes)
    if not nodes:
        return out
    before = {n.name: list(n.input) for n in reference.graph.node if n.name in nodes}
    missing = nodes - set(before) - {n.name for n in out.graph.node}
    if missing:
        raise ValueError(f"unquantize: no node(s) {sorted(missing)} in the graph")
    have = {t.name for t in out.graph.initializer}
    wanted = set()
    for node in out.graph.node:
        if node.name in before:
            del node.input[:]
            node.input.extend(before[node.name])
            wanted.update(before[node.name])
    out.graph.initializer.extend(t for t in reference.graph.initializer if t.name in wanted and t.name not in have)
    _prune(out.graph)
    return out


def _prune(graph) -> None:
    """Drop the nodes whose outputs nothing reads (Q/DQ left behind), then unread initializers."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---------------------------------------------------------------- INT8 weight-only (ONNX Runtime)
# Blocks of 128 along K, not ORT's default 32: one step of random:medium's int8wo ORT decoder on the
# 2-core CPU takes 3.4-4.0 ms with blocks of 128 against 4.9-5.9 ms with 32 (measured side by side,
# past 64), the FP32 scales shrink from 1/8 of the INT8 bytes to 1/32, and symmetric INT8 keeps
# the error of a 128-wide block small (export validation and the top-1 check judge it).
WEIGHT_ONLY_BLOCK = 128


def matmul_nbits(model, bits: int = 8, block_size: int = WEIGHT_ONLY_BLOCK, exclude=()):
    """`model` with every MatMul whose second input is an initializer (but those named in
    `exclude`) as MatMulNBits of `bits` bits (symmetric, blocks of `block_size` along K, accuracy
    level 4: the activation is quantized per block on the fly and the products run in INT8)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quiet_logger():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4, quant_format=QuantFormat.QOperator,
                                         nodes_to_exclude=list(exclude))
        quantizer.process()
    return quantizer.model.model


# The ONNX Runtime encoders of int8wo (exporter.ort.encoders): their MatMuls see hundreds of rows per
# image, where MLAS's U8S8 MatMulInteger runs on the CPU's AMX / VNNI INT8 units. One [257,768] x
# [768,3072] MatMul on the 2-core Sapphire Rapids VM: 4.6-5.4 ms FP32 (PyTorch's SGEMM the same),
# 4.6 ms MatMulNBits accuracy 4 (VNNI), 1.1 ms MatMulInteger; at one row (decode) MatMulNBits and
# MatMulInteger read the same bytes in the same 0.04 ms.
DYNAMIC_OPS = ("MatMul", "Attention")


def dynamic_int8(model):
    """`model` with every MatMul whose second input is an initializer, and every com.microsoft
    Attention, quantized dynamically (onnxruntime.quantization.quantize_dynamic): INT8 weights
    symmetric per output channel, UINT8 activations quantized per tensor at each call
    (DynamicQuantizeLinear + MatMulInteger, QAttention)."""
    import tempfile

    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, quiet_logger():
        path = Path(tmp) / "quantized.onnx"
        quantize_dynamic(model, path, op_types_to_quantize=list(DYNAMIC_OPS), per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
        return onnx.load(str(path))  # external data read in while the folder exists


def per_token_int8(model):
    """`model` (modified in place and returned) with every MatMul whose second input is a 2-D FP32
    initializer as per-token dynamic INT8 x per-channel INT8: each row of the activation gets its
    own scale (its absmax / 127, computed in the graph), the weight one per output column, and
    MLAS's U8S8 MatMulInteger (zero point 128) computes the products on the CPU's AMX / VNNI units:

        s = max(ReduceMax(|x|, -1) / 127, eps); q = uint8(Round(x / s) + 128)
        y = float(MatMulInteger(q, Wq, 128)) * s * s_w

    Per row, not per tensor (DynamicQuantizeLinear's one scale per call): in a prompt, a token with
    activations far above the others (LLaMA's first token is one) would otherwise set the step of
    every row. MatMuls that read the same activation share its quantization. On random:medium's
    int8wo ORT decoder, a 64-token prompt takes 33 ms this way against 24 ms per tensor and 54 ms in
    MatMulNBits (1024 tokens with an FP32 cache: 0.78 / 0.64 s; FP32 weights 1.0-1.2 s)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    names = iter(range(1 << 62))

    def fresh(stem: str) -> str:
        return f"pt8.{stem}.{next(names)}"

    def const(stem: str, value: np.ndarray) -> str:
        name = fresh(stem)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    inv127, eps = const("inv127", np.array(1 / 127, np.float32)), const("eps", np.array(1e-12, np.float32))
    last, offset = const("axes", np.array([-1], np.int64)), const("offset", np.array(128, np.float32))
    zero_point = const("zero_point", np.array(128, np.uint8))
    nodes, dropped, quantized = [], set(), {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantized:
            t = {k: fresh(k) for k in ("abs", "max", "step", "scale", "div", "round", "shift", "q")}
            nodes += [helper.make_node("Abs", [x], [t["abs"]]),
                      helper.make_node("ReduceMax", [t["abs"], last], [t["max"]], keepdims=1),
                      helper.make_node("Mul", [t["max"], inv127], [t["step"]]),
                      helper.make_node("Max", [t["step"], eps], [t["scale"]]),
                      helper.make_node("Div", [x, t["scale"]], [t["div"]]),
                      helper.make_node("Round", [t["div"]], [t["round"]]),
                      helper.make_node("Add", [t["round"], offset], [t["shift"]]),
                      helper.make_node("Cast", [t["shift"]], [t["q"]], to=TensorProto.UINT8)]
            quantized[x] = (t["q"], t["scale"])
        q, scale = quantized[x]
        w = numpy_helper.to_array(weight)
        column = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
        wq = const("weight", np.clip(np.round(w / column), -127, 127).astype(np.int8))
        ws = const("weight_scale", column.astype(np.float32))
        if readers[node.input[1]] == 1:
            dropped.add(node.input[1])
        t = {k: fresh(k) for k in ("int32", "float", "rows")}
        nodes += [helper.make_node("MatMulInteger", [q, wq, zero_point], [t["int32"]], name=node.name),
                  helper.make_node("Cast", [t["int32"]], [t["float"]], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [t["float"], scale], [t["rows"]]),
                  helper.make_node("Mul", [t["rows"], ws], [node.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def to_int8_weight_only(model, spec: GraphSpec):
    """Return (ModelProto with MatMulNBits, new GraphSpec, weight nodes left in FP32)."""
    candidates = weight_nodes(model, ("MatMul",))
    converted = matmul_nbits(model)
    remaining = {n.name for n in converted.graph.node if n.op_type in QUANTIZED_OPS}
    kept = sorted(n for n in weight_nodes(model) if n in remaining or n not in candidates)
    return converted, dataclasses.replace(spec, file=variant_file(spec, "int8wo"), external_data=None), kept


# ---------------------------------------------------------------- INT4 weight-only
# Blocks of 32 along K (ORT's and ModelOpt's usual INT4 block): a 4-bit step is 16x an 8-bit one,
# so the block is kept small; its FP32 scale costs 1 bit per weight on top of the 4.
INT4_BLOCK = 32
def int4_blocks(w: np.ndarray, block: int = INT4_BLOCK, clip: np.ndarray | float = 1.0):
    """Symmetric block-wise INT4 of a [K, N] weight: (q [K', N] int8 in [-8, 7], scale [K'/block, N]
    float32), K' = K rounded up to the block. Per block, the element of largest |w| (times `clip`,
    per block and column or one value) maps to -8: scale = m / -8, q = clip(round(w / scale), -8, 7)
    (INT4's 16 levels, the sign trick ONNX Runtime's quantizer uses)."""
    k, n = w.shape
    padded = -(-k // block) * block
    wp = np.zeros((padded, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(-1, block, n)
    where = np.abs(blocks).argmax(axis=1)  # [blocks, N]
    m = np.take_along_axis(blocks, where[:, None, :], axis=1)[:, 0, :] * clip
    scale = (m / -8.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round(blocks / safe[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(padded, n), scale


def int4_dequantize(q: np.ndarray, scale: np.ndarray, block: int, k: int) -> np.ndarray:
    """The [K, N] FP32 weight of int4_blocks' (q, scale)."""
    n = q.shape[1]
    return (q.reshape(-1, block, n).astype(np.float32) * scale[:, None, :]).reshape(-1, n)[:k]


AWQ_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # AWQ's exponents, per MatMul
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # AWQ's weight clipping ratios, per block and column


def awq_search(w: np.ndarray, x: np.ndarray, block: int = INT4_BLOCK, alphas=AWQ_GRID, clips=CLIP_GRID):
    """AWQ for one MatMul y = x w (w [K, N], x [rows, K] calibration activations): the input-channel
    scales s = mean|x|^alpha (geometric mean 1), alpha the grid value whose INT4 (w * s) gives the
    least squared error of y on x, then per block and output column the clipping ratio of the
    block's largest |w| with the least squared error of that block's share of y. Returns (s,
    clip [K'/block, N])."""
    k, n = w.shape
    x = x.astype(np.float32)
    y = x @ w
    mean = np.maximum(np.abs(x).mean(axis=0), 1e-5)
    best = None
    for alpha in alphas:
        s = mean ** alpha
        s = (s / np.exp(np.mean(np.log(s)))).astype(np.float32)
        q, scale = int4_blocks(w * s[:, None], block)
        err = float(np.square((x / s) @ int4_dequantize(q, scale, block, k) - y).sum())
        if best is None or err < best[0]:
            best = (err, s)
    s = best[1]
    ws, xs = w * s[:, None], x / s
    padded = -(-k // block) * block
    xp = np.zeros((len(x), padded), np.float32)
    xp[:, :k] = xs
    wp = np.zeros((padded, n), np.float32)
    wp[:k] = ws
    blocks = padded // block
    errors = np.empty((len(clips), blocks, n), np.float64)
    for i, ratio in enumerate(clips):
        q, scale = int4_blocks(ws, block, ratio)
        diff = wp - int4_dequantize(q, scale, block, padded)
        for g in range(blocks):  # each block's share of y's error: x_g (w_g - q_g)
            part = xp[:, g * block:(g + 1) * block] @ diff[g * block:(g + 1) * block]
            errors[i, g] = np.square(part).sum(axis=0)
    clip = np.asarray(clips, np.float32)[errors.argmin(axis=0)]
    return s, clip


def gptq_bytes(k: int, n: int) -> int:
    """About the most memory gptq_int4 holds for a [K, N] weight: x^T x, its inverse and Cholesky
    factor (K x K each) and the weight being rounded (K x N), all float64."""
    return 8 * (3 * k * k + k * n)


def int4_calibrate(model, inputs: dict[str, np.ndarray], nodes: Iterable[str] | None = None,
                   block: int = INT4_BLOCK, gptq_max_bytes: int | None = None) -> dict[str, dict]:
    """For each weight MatMul (`nodes`, default all) whose activation has rows in `inputs` (tensor
    -> [rows, K]): AWQ (awq_search) and GPTQ (gptq_int4) are fitted on half the rows and the one
    with the smaller error of x w on the other half is kept, refitted on all rows: node ->
    {"method", "s" (AWQ's input scales or None), "q", "scale"} (int4_blocks' layout).
    `gptq_max_bytes`: AWQ alone where GPTQ would hold more (gptq_bytes; a streamed export's memory
    follows one layer: idefics-9b's down_proj, K = 11008, would take 3.3 GB)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    wanted = None if nodes is None else set(nodes)
    rng = np.random.default_rng(0)
    out = {}
    for node, weight in _int4_weights(model, initializers):
        x = inputs.get(node.input[0])
        if (wanted is not None and node.name not in wanted) or x is None or x.shape[-1] != weight.dims[0]:
            continue
        w = numpy_helper.to_array(weight)
        order = rng.permutation(len(x))
        fit, held = x[order[: len(x) // 2]], x[order[len(x) // 2:]]
        y = held @ w
        scores = {}
        fits = gptq_max_bytes is None or gptq_bytes(*w.shape) <= gptq_max_bytes
        for method in ("awq", "gptq") if fits else ("awq",):
            s, q, scale = _int4_fit(method, w, fit, block)
            xs = held if s is None else held / s
            scores[method] = float(np.square(xs @ int4_dequantize(q, scale, block, w.shape[0]) - y).sum())
        method = min(scores, key=scores.get)
        s, q, scale = _int4_fit(method, w, x, block)
        out[node.name] = {"method": method, "s": s, "q": q, "scale": scale}
    return out


def _int4_fit(method: str, w: np.ndarray, x: np.ndarray, block: int):
    if method == "gptq":
        return (None, *gptq_int4(w, x, block))
    s, clip = awq_search(w, x, block)
    return (s, *int4_blocks(w * s[:, None], block, clip))


def _int4_weights(model, initializers):
    from onnx import TensorProto

    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2:
            yield node, weight


def int8_blocks(w: np.ndarray, block: int = INT4_BLOCK):
    """Symmetric block-wise INT8 of a [K, N] weight: (q [K', N] int8 in [-127, 127], scale
    [K'/block, N] = the block's largest |w| / 127)."""
    k, n = w.shape
    padded = -(-k // block) * block
    wp = np.zeros((padded, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(-1, block, n)
    scale = (np.abs(blocks).max(axis=1) / 127).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(blocks / safe[:, None, :]), -127, 127).astype(np.int8).reshape(padded, n), scale


def to_int4_weight_only(model, spec: GraphSpec, keep: Iterable[str] = (), calibrated: dict | None = None,
                        block_size: int = INT4_BLOCK, fp32_keep: Iterable[str] = ()):
    """Return (ModelProto with 4-bit MatMulNBits, new GraphSpec, weight nodes at higher precision):
    every MatMul with a 2-D FP32 initializer weight becomes a MatMulNBits of the same name (bits 4,
    symmetric: no zero points, blocks of `block_size` along K, accuracy level 4), but those in
    `keep` (the search's) are 8-bit MatMulNBits (same blocks) and those in `fp32_keep` stay FP32;
    where `calibrated` (int4_calibrate) names it, its INT4 values and scales are those fitted there
    (AWQ: with a Mul by 1/s in front; GPTQ), else plain rounding. `model` is not modified."""
    from onnx import ModelProto, helper, numpy_helper

    keep, calibrated = set(keep), calibrated or {}
    fp32 = set(fp32_keep)
    out = ModelProto()
    out.CopyFrom(model)
    initializers = {t.name: t for t in out.graph.initializer}
    readers = collections.Counter(name for node in out.graph.node for name in node.input)
    replaced, nodes, added = {}, [], []
    for node, weight in _int4_weights(out, initializers):
        if node.name not in fp32:
            replaced[node.name] = weight
    for node in out.graph.node:
        weight = replaced.get(node.name)
        if weight is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        k, n = w.shape
        if node.name in keep:  # kept by the search: INT8 blocks, plain rounding
            q, scale = int8_blocks(w, block_size)
            bname, sname = f"{node.name}.int8_B", f"{node.name}.int8_scales"
            added += [numpy_helper.from_array((q.T.reshape(n, -1, block_size).astype(np.int16) + 128).astype(np.uint8),
                                              bname),
                      numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), sname)]
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], bname, sname], list(node.output),
                                          name=node.name, domain="com.microsoft", K=k, N=n, bits=8,
                                          block_size=block_size, accuracy_level=4))
            readers[node.input[1]] -= 1
            continue
        fitted = calibrated.get(node.name)
        s = None if fitted is None else fitted["s"]
        x = node.input[0]
        if s is not None:
            inverse, x = f"{node.name}.awq_inverse", f"{node.name}.awq_input"
            added.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
            nodes.append(helper.make_node("Mul", [node.input[0], inverse], [x], name=f"{node.name}.awq_mul"))
        q, scale = int4_blocks(w, block_size) if fitted is None else (fitted["q"], fitted["scale"])
        nibbles = (q.T.reshape(n, -1, block_size) + 8).astype(np.uint8)  # [N, blocks, block]
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # low nibble first
        bname, sname = f"{node.name}.int4_B", f"{node.name}.int4_scales"
        added += [numpy_helper.from_array(np.ascontiguousarray(packed), bname),
                  numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1), sname)]
        nodes.append(helper.make_node("MatMulNBits", [x, bname, sname], list(node.output), name=node.name,
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size,
                                      accuracy_level=4))
        readers[node.input[1]] -= 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept_inits = [t for t in out.graph.initializer if readers.get(t.name, 0) > 0]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept_inits, *added])
    if replaced and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    kept = sorted(n for n in weight_nodes(model) if n not in replaced or n in keep)
    return out, dataclasses.replace(spec, file=variant_file(spec, "int4wo"), external_data=None), kept


TRT_OPSET = 21  # DequantizeLinear's block_size and INT4 tensors


def to_int4_trt(model, spec: GraphSpec):
    """The int4wo graph's TensorRT form from its ONNX Runtime one (`model`, with MatMulNBits):
    each 4-bit MatMulNBits becomes an INT4 [K, N] initializer (block-wise symmetric, no zero point;
    the search's 8-bit ones INT8) ->
    DequantizeLinear(axis 0, block_size) -> MatMul, as NVIDIA's ModelOpt writes weight-only INT4,
    the same weights bit for bit; the graph is raised to opset TRT_OPSET. Returns (ModelProto,
    GraphSpec of NAME.int4wo.trt.onnx)."""
    import copy

    from onnx import TensorProto, helper, numpy_helper, version_converter

    out = copy.deepcopy(model)
    initializers = {t.name: t for t in out.graph.initializer}
    dropped, nodes, added = set(), [], []
    for node in out.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]
        if len(node.input) > 3 and node.input[3]:
            raise ValueError(f"{node.name}: MatMulNBits with zero points (int4wo's are symmetric)")
        packed = numpy_helper.to_array(initializers[node.input[1]])
        if bits == 4:
            q = (np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.int8) - 8)[:, :k]
        else:  # the search's 8-bit nodes
            q = (packed.reshape(n, -1).astype(np.int16) - 128).astype(np.int8)[:, :k]  # [N, K]
        blocks = -(-k // block)
        scale = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)[:, :blocks]  # [N, K/block]
        qname, sname, wname = f"{node.name}.int{bits}_weight", f"{node.name}.int{bits}_scale", f"{node.name}.dq"
        # INT4 initializer [K, N]: make_tensor packs two values a byte (low nibble first)
        weight = helper.make_tensor(qname, TensorProto.INT4, [k, n], q.T.flatten().tolist()) if bits == 4 \
            else numpy_helper.from_array(np.ascontiguousarray(q.T), qname)
        added += [weight, numpy_helper.from_array(np.ascontiguousarray(scale.T).astype(np.float32), sname)]
        nodes += [helper.make_node("DequantizeLinear", [qname, sname], [wname], name=f"{node.name}.dq",
                                   axis=0, block_size=block),
                  helper.make_node("MatMul", [node.input[0], wname], [node.output[0]], name=node.name)]
        if len(node.input) > 5 and node.input[5]:  # a bias
            raise ValueError(f"{node.name}: MatMulNBits with a bias")
        dropped.update(node.input[1:3])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in out.graph.initializer if t.name not in dropped]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, *added])
    main = next((o for o in out.opset_import if o.domain in ("", "ai.onnx")), None)
    if main is not None and main.version < TRT_OPSET:
        try:
            out = version_converter.convert_version(out, TRT_OPSET)
        except Exception:  # noqa: BLE001 - the converter lacks an adapter: the ops are opset-21 valid as written
            main.version = TRT_OPSET
    return out, dataclasses.replace(spec, file=f"{spec.name}.int4wo.trt.onnx", external_data=None)


GPTQ_DAMP = 0.01  # GPTQ's dampening of the Hessian's diagonal (a fraction of its mean)
GPTQ_ROWS = 2048  # calibration rows per MatMul: GPTQ's Hessian x^T x needs more rows than input channels


def gptq_int4(w: np.ndarray, x: np.ndarray, block: int = INT4_BLOCK, damp: float = GPTQ_DAMP, lazy: int = 128):
    """GPTQ (Frantar et al.) of y = x w to symmetric block-wise INT4: the rows of w (input
    channels) are rounded one at a time and each rounding error is spread over the rows not yet
    rounded, weighted by the inverse Hessian x^T x of the calibration activations; each block's
    scale is set (int4_blocks' rule) from its rows as updated when the block starts. Returns
    (q [K', N] int8 in [-8, 7], scale [K'/block, N]) as int4_blocks does."""
    k, n = w.shape
    padded = -(-k // block) * block
    scale = np.zeros((padded // block, n), np.float32)

    def scale_of(i: int, ahead: np.ndarray) -> np.ndarray:
        if i % block == 0:
            rows = ahead[:block]
            where = np.abs(rows).argmax(axis=0)
            scale[i // block] = (rows[where, np.arange(n)] / -8.0).astype(np.float32)
        return scale[i // block]

    q = np.zeros((padded, n), np.int8)
    q[:k] = _gptq(w, x, scale_of, -8, 7, damp, max(block, lazy // block * block))
    return q, scale


def gptq_int8(w: np.ndarray, x: np.ndarray, scale: np.ndarray, damp: float = GPTQ_DAMP, lazy: int = 128,
              limit: int = 127):
    """GPTQ of y = x w to INT8 at fixed per-column scales `scale` [N] (those quantize_static gave
    the Q/DQ graph's weight): only the rounding changes, so the graph's form, its scales and what
    TensorRT builds from it stay as they are. Returns q [K, N] int8 in [-limit, limit] (the
    quantizer's own range: 64 with reduce_range's 7-bit weights)."""
    fixed = np.asarray(scale, np.float32)
    return _gptq(w, x, lambda i, ahead: fixed, -limit, limit, damp, lazy)


def _gptq(w: np.ndarray, x: np.ndarray, scale_of: Callable, low: int, high: int, damp: float, lazy: int
          ) -> np.ndarray:
    """GPTQ's rounding loop (lazy batches of rows, Cholesky form of the inverse Hessian): row i is
    rounded at scale_of(i, rows i.. as updated so far) [N] to [low, high]; returns q [K, N] int8."""
    k, n = w.shape
    x = x.astype(np.float64)
    h = x.T @ x
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work = w.astype(np.float64).copy()
    work[dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    q = np.zeros((k, n), np.int8)
    for b0 in range(0, k, lazy):
        b1 = min(b0 + lazy, k)
        w1, errors = work[b0:b1].copy(), np.zeros((b1 - b0, n))
        u1 = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            i = b0 + j
            s = scale_of(i, w1[j:]).astype(np.float64)
            safe = np.where(s == 0, 1.0, s)
            qi = np.clip(np.round(w1[j] / safe), low, high)
            q[i] = qi
            err = (w1[j] - qi * s) / u1[j, j]
            w1[j + 1:] -= np.outer(u1[j, j + 1:], err)
            errors[j] = err
        work[b1:] -= u[b0:b1, b1:].T @ errors
    return q


def gptq_int8_qdq(quantized, smoothed, inputs: dict[str, np.ndarray], gptq_max_bytes: int | None = None,
                  seed: int = 0) -> dict:
    """Re-round the INT8 weights of a Q/DQ graph (to_int8's, in place) by GPTQ at their own
    per-channel scales, per weight MatMul whose activation has rows in `inputs` (tensor of
    `smoothed`, the FP32 graph quantized -> [rows, K]). GPTQ is fitted on half the rows and kept
    only where it predicts the other half's x w better than rounding to nearest; it is then
    refitted on all rows. The activations of a few prompts can be nearly low-rank (an o_proj's
    input), where GPTQ fits its own rows far better than any other, hence the held-out test.
    Returns {"gptq": the MatMuls re-rounded, "nearest": how many kept nearest rounding, "error":
    GPTQ's held-out squared error over nearest's, summed over the MatMuls re-rounded}."""
    from onnx import numpy_helper

    weights = {t.name: t for t in smoothed.graph.initializer}
    matmuls = {n.name: n for n in smoothed.graph.node if n.op_type == "MatMul"}
    inits = {t.name: t for t in quantized.graph.initializer}
    producer = {out: node for node in quantized.graph.node for out in node.output}
    rng = np.random.default_rng(seed)
    refit, nearest_kept = [], 0
    before = after = 0.0
    for node in quantized.graph.node:
        source = matmuls.get(node.name)
        dq = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if source is None or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or source.input[1] not in weights or source.input[0] not in inputs:
            continue
        w = numpy_helper.to_array(weights[source.input[1]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        x = inputs[source.input[0]]
        if w.ndim != 2 or scale.shape != (w.shape[1],) or x.shape[-1] != w.shape[0] or len(x) < 2 \
                or (gptq_max_bytes is not None and gptq_bytes(*w.shape) > gptq_max_bytes):
            continue
        order = rng.permutation(len(x))
        fit, held = x[order[: len(x) // 2]], x[order[len(x) // 2:]]
        y = held @ w
        nearest = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
        limit = int(np.abs(nearest).max())  # the range the quantizer used: GPTQ stays inside it
        e_nearest = float(np.square(held @ (nearest * scale) - y).sum())
        e_gptq = float(np.square(held @ (gptq_int8(w, fit, scale, limit=limit).astype(np.float32) * scale) - y).sum())
        if e_gptq >= e_nearest:
            nearest_kept += 1
            continue
        refit.append(node.name)
        before, after = before + e_nearest, after + e_gptq
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(gptq_int8(w, x, scale, limit=limit), dq.input[0]))
    return {"gptq": sorted(refit), "nearest": nearest_kept, "error": round(after / before, 4) if before else None}
