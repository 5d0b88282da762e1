"""The INT8 (Q/DQ) ONNX Runtime decoder, decoder.ort.int8.onnx: the FP32 ONNX Runtime decoder
(decoder.ort.onnx: GroupQueryAttention over the shared cache, fused norms) quantized as the portable
INT8 decoder is, so both carry the same decisions:

  - the same SmoothQuant alpha (the portable decoder's choice; the activation peaks are measured
    again on this graph, with the same calibration prompts and photos), folded into the
    (Skip)SimplifiedLayerNormalization that produces each activation;
  - the same MatMuls kept FP32: the portable search's choices (and its lm_head rule), matched to
    this graph's MatMuls by their weights (the ORT decoder packs q/k/v into one MatMul: it stays
    FP32 if any of the three does);
  - static symmetric INT8 Q/DQ, per-channel weights and per-tensor activations, through the same
    quantizer (exporter.precision.transforms.to_int8: each MatMul its own activation pair, so ONNX Runtime's CPU
    runs every one as MatMulIntegerToFloat), its weights rounded to nearest: the portable decoder's
    GPTQ rounding (transforms.gptq_int8_qdq), tried here on the embedded default, lowered this
    decoder's agreement with transformers on random-token prompts from 58 to 50 of 64 positions
    (the portable one's stayed at 58), 2026-12-07.

The shared cache stays FP32 (GroupQueryAttention's INT8 cache is the int8wo decoder's) and only the
CPU runs it: CUDA's GroupQueryAttention takes FP16 only; TensorRT, INT8's GPU path, reads the
portable graphs. It is built after the portable INT8 variant (whose search it takes), when the
PyTorch model is already freed, so the export validates it against a Reference of the PyTorch decoder
taken before (exporter.ort.decoder.decoder_reference)."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exporter.precision import activations, smoothing
from exporter.graphs.bounds import TOLERANCES, describe
from exporter.ort.decoder import Reference, check_report, ort_feeds, run_or_refuse
from exporter.precision.transforms import int8_targets, to_int8, weight_nodes
from runtime.errors import ExportError, ValidationError
from runtime.loop import slot0_rows
from runtime.manifest import GraphSpec, ModelInfo

log = logging.getLogger(__name__)

FILE = "decoder.ort.int8.onnx"
BOUND = dict(TOLERANCES["int8"])


def ort_calibration_feeds(feeds: list[dict[str, np.ndarray]], spec: GraphSpec,
                          info: ModelInfo) -> list[dict[str, np.ndarray]]:
    """The portable decoder's calibration feeds (left-padded prompts with an empty past,
    calibration.feeds) as the ORT decoder's: each row from slot 0, a cache of the prompt's width."""
    cross = [s.name for s in spec.inputs if s.name.startswith("cross_")]
    out = []
    for feed in feeds:
        ids, image_mask, lengths = slot0_rows(np.asarray(feed["input_ids"]), np.asarray(feed["attention_mask"]),
                                              np.asarray(feed["image_attention_mask"]))
        b, width = ids.shape
        buffers = [np.zeros((b, info.num_heads, width, info.head_dim), np.float32) for _ in range(2 * info.num_layers)]
        out.append(ort_feeds(ids, lengths - 1, width, image_mask, np.arange(width, dtype=np.int64),
                             [np.asarray(feed[name]) for name in cross], buffers, spec))
    return out


def _weights(model, folder: Path) -> dict[str, np.ndarray]:
    """node -> its weight [K, N] for every weight MatMul of `model` (loaded without its external data:
    those weights are memory-mapped from their file, so the matching reads only what it compares)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def array(tensor) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        where = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(folder / where["location"], dtype=dtype, mode="r", offset=int(where.get("offset", 0)),
                         shape=tuple(tensor.dims))

    out = {}
    nodes = {n.name: n for n in model.graph.node}
    for name in weight_nodes(model, ("MatMul",)):
        value, transposed = nodes[name].input[1], False
        while value not in inits and value in producer and producer[value].op_type in ("Identity", "Transpose"):
            transposed ^= producer[value].op_type == "Transpose"
            value = producer[value].input[0]
        if value in inits and len(inits[value].dims) == 2:
            w = array(inits[value])
            out[name] = w.T if transposed else w
    return out


def matched_matmuls(portable_path: Path, ort_path: Path) -> dict[str, str]:
    """portable decoder MatMul -> the ORT decoder MatMul that computes it (the one whose weight holds
    the same [K, N] block of columns: q, k and v sit side by side in the packed qkv weight). Found
    by the weights' values, the only thing the two exporters share; every portable weight MatMul
    must be found."""
    import onnx

    portable = onnx.load(str(portable_path), load_external_data=False)
    ort = onnx.load(str(ort_path), load_external_data=False)
    theirs = _weights(portable, portable_path.parent)
    ours = _weights(ort, ort_path.parent)
    index: dict[tuple[int, float], list[tuple[str, int]]] = {}  # (K, value of row 0) -> (node, column)
    for node, w in ours.items():
        for column, value in enumerate(np.asarray(w[0])):
            index.setdefault((w.shape[0], float(value)), []).append((node, column))
    found, missing = {}, []
    for node, w in theirs.items():
        k, n = w.shape
        row0 = np.asarray(w[0])
        match = next((ort_node for ort_node, c in index.get((k, float(row0[0])), [])
                      if c + n <= ours[ort_node].shape[1] and np.array_equal(ours[ort_node][0, c:c + n], row0)
                      and np.array_equal(ours[ort_node][:, c:c + n], w)), None)
        if match is None:
            missing.append(node)
        else:
            found[node] = match
    if missing:
        raise ExportError(f"{ort_path.name}: no MatMul computes the portable decoder's {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} (their weights are nowhere in it)")
    return found


def int8_matmuls(model) -> set[str]:
    """The MatMuls of a Q/DQ graph whose activation and weight both come through DequantizeLinear."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and n.input[0] in dequantized and n.input[1] in dequantized}


def _declare_activation_types(model, nodes: list[str]) -> None:
    """Declare FP32 the activation each of `nodes` reads. onnxruntime.quantization reads a tensor's type
    from the graph's type information, which ONNX's inference cannot give the outputs of ONNX Runtime's
    contrib ops (the ORT decoder's norms and attention): without it the quantizer skips the activation
    and leaves the MatMul weight-only."""
    from onnx import TensorProto, helper

    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    wanted = set(nodes)
    for node in model.graph.node:
        if node.name in wanted and node.input[0] not in known:
            model.graph.value_info.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
            known.add(node.input[0])


def write_ort_int8_decoder(folder: Path, fp32: GraphSpec, portable: GraphSpec, portable_int8: GraphSpec,
                           alpha: float | None, feeds: list[dict[str, np.ndarray]], info: ModelInfo,
                           write: Callable, reference: Reference | None, bound: dict | None = None,
                           ) -> tuple[GraphSpec, dict, dict]:
    """Quantize the FP32 ORT decoder `fp32` in `folder` as the portable INT8 decoder (`portable`
    quantized into `portable_int8`, smoothed by `alpha`) is, calibrated on the portable decoder's
    calibration `feeds`, and save it through `write(proto, spec) -> GraphSpec`; validated against
    `reference` (None: not validated). Returns (GraphSpec, report, record: what was quantized and
    kept). ValidationError where it misses `bound`; exporter.ort.refusal.Refused (the file removed)
    where ONNX Runtime does not load or run it."""
    import onnx

    folder = Path(folder)
    bound = bound or BOUND
    source = folder / fp32.file
    mapping = matched_matmuls(folder / portable.file, source)
    quantized = int8_matmuls(onnx.load(str(folder / portable_int8.file), load_external_data=False))
    model = onnx.load(str(source))
    targets = int8_targets(model)
    unmatched = sorted(set(targets) - set(mapping.values()))
    if unmatched:
        raise ExportError(f"{fp32.file}: MatMul(s) {', '.join(unmatched[:5])} compute nothing of the portable decoder")
    kept = sorted({ours for theirs, ours in mapping.items() if theirs not in quantized and ours in targets})
    chosen = [n for n in targets if n not in kept]
    calibration = ort_calibration_feeds(feeds, fp32, info)
    record = {"alpha": alpha, "matmuls": len(targets), "kept_fp32": kept,
              "from": f"the portable int8 decoder ({portable_int8.file}): its smoothing alpha and the MatMuls "
                      "its search kept"}
    if alpha is not None:
        found = smoothing.groups(model, targets)
        _, channel_max = activations.statistics(model, calibration, {g.activation for g in found})
        model, smoothed = smoothing.smooth(model, found, channel_max, alpha)
        record.update(smoothed.summary())
    _declare_activation_types(model, chosen)
    spec = dataclasses.replace(fp32, file=FILE, external_data=None)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ort-int8-") as scratch:
        src, dst = Path(scratch) / "smoothed.onnx", Path(scratch) / "int8.onnx"
        onnx.save_model(model, str(src), save_as_external_data=fp32.external_data is not None,
                        location="smoothed.onnx.data")
        del model
        to_int8(src, dst, fp32, calibration, chosen)  # its weights beside it where the FP32 graph's are
        quantized_model = onnx.load(str(dst))
        both = int8_matmuls(quantized_model)
        if set(chosen) - both:
            raise ExportError(f"{FILE}: the quantizer left {len(set(chosen) - both)} of the {len(chosen)} MatMuls it was "
                              f"given without INT8 activations ({', '.join(sorted(set(chosen) - both)[:5])})")
        spec = write(quantized_model, spec)
        del quantized_model
    report = run_or_refuse(folder, spec, info, reference, bound)  # loaded and run, validated or not
    if reference is not None:
        failed = check_report(report, bound)
        if failed:
            raise ValidationError(f"{len(failed)} output(s) of the int8 ONNX Runtime decoder differ from PyTorch past "
                                  f"the int8 tolerance ({describe(bound)}):\n  " + "\n  ".join(failed), report)
    log.info("%s: %d of %d weight MatMuls INT8, %d kept FP32 as in %s", spec.file, len(chosen), len(targets),
             len(kept), portable_int8.file)
    return spec, report, record
