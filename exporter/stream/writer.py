"""Graphs written piece by piece: each piece (exporter.stream.pieces) traced alone, put in each
precision asked, checked against its PyTorch module in ONNX Runtime while that module is in memory,
and appended to the graph: its names prefixed (but those that connect pieces), its initializers'
bytes appended to the graph's one external-data file, so the graph being built holds only nodes
and references and memory follows one piece, not the model.

Precisions, applied to each piece's graph before it is appended, by the whole-graph transforms of
exporter.precision.transforms:
  fp32     as traced;
  fp16     to_fp16, the whole graph's rule piece by piece (matmuls, the residual stream and the caches in
           FP16; norms, softmax with its mask, rotary tables in FP32), plus the piece's nodes whose FP32
           values reach OVERFLOW_FRACTION of FP16's range on its reference inputs. The tensors between
           pieces are typed as the whole FP16 graph types them: hidden states FP16; the masks, the
           cross-attention gate and the rotary tables (PIECE_FP32) FP32, as their producers compute them.
           The whole-graph export's mixed-precision search (nodes kept FP32 until the end-to-end top-1
           holds) needs the whole model; a streamed FP16 graph keeps only the rule and the overflows;
  int8     explicit Q/DQ (int8_piece): SmoothQuant at the alpha the piece's calibration prefill and
           validation cases prefer, then quantize_static calibrated on the prefill and the INT8 weights
           GPTQ-rounded where held-out prefill rows prefer it, as the whole-graph export does; its search
           that unquantizes MatMuls until the end-to-end top-1 holds needs the whole model: not done here;
  int8wo   to_int8_weight_only: every weight MatMul (lm_head included) as 8-bit MatMulNBits, blocks of 128;
  int4wo   to_int4_weight_only, 4-bit blocks of 32 (INT4_BLOCK), each weight MatMul fitted as the whole-graph
           export fits it (AWQ or GPTQ, int4_calibrate) on its input's activations in a calibration
           prefill (CALIBRATION_CASE: real photos) carried through the pieces with the reference chain.
           The whole-graph export's search that keeps some MatMuls in 8 bits needs the whole model:
           not done here.

Per-layer validation (issue 27 item 3) follows the reference chain: every piece is fed the PyTorch
outputs of the piece before it (real photos, a prefill and a decode step with a non-empty past), so
a row that fails is that piece's own error.

Sizes measured: the tiny config variants only. One FP32 decoder layer of idefics-80b is about
3.9 GB (its MLP 2.8 GB), past protobuf's 2 GB: tracing and writing such a piece keep its weights out
of any serialized proto, but ONNX Runtime's MatMulNBits quantizer (int8wo) may run onnx shape
inference on it, which refuses protos past 2 GB; not tried at that size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from exporter.graphs.bounds import TOLERANCES, judge, measure
from exporter.graphs.comparison import ort_session
from exporter.graphs.inputs import next_step, sample_pixels, sample_prompt
from exporter.graphs.trace import pin_io_shapes, trace_args
from exporter.graphs.validate import ValidationCase
from exporter.precision.activations import cast_feed
from exporter.precision.transforms import (
    FP32_IO,
    to_fp16,
    to_int4_weight_only,
    to_int8_weight_only,
    variant_file,
)
from exporter.stream.checkpoint import TensorSource
from exporter.stream.pieces import Piece, graph_pieces, intermediate_axes
from runtime.console import quiet_logger
from runtime.errors import ExportError, ValidationError
from runtime.manifest import GraphSpec, ModelInfo

log = logging.getLogger(__name__)

STREAM_PRECISIONS = ("fp32", "fp16", "int8", "int8wo", "int4wo")
CALIBRATED = ("int8", "int4wo")  # the precisions that read the calibration prefill
# int4wo: GPTQ only where its float64 Hessian work fits this (transforms.gptq_bytes), AWQ alone past it:
# at 9B widths every MatMul but down_proj (K = 11008: 3.0 GiB); at 80B widths q, k, v, o (2.0 GiB) but not the MLP
GPTQ_MAX_BYTES = 2 * 2**30
# tensors between pieces that stay FP32 in an FP16 graph: the additive masks hold finfo(float32).min
# (-inf in FP16, and NaN rows after softmax), the rotary tables and the gate are built in FP32
PIECE_FP32 = ("self_mask", "cross_mask", "cross_gate", "rope_cos", "rope_sin")
ALIGNMENT = 64  # bytes: each initializer starts at a multiple of it in FILE.data
GRAPHS = ("vision", "perceiver", "decoder")
DEFAULT_CASE = ValidationCase()
# int4wo's calibration prefill: 8 real photos, one per prompt, 128 tokens (1024 decoder rows, 8 x 257 vision rows)
CALIBRATION_CASE = ValidationCase(batch=8, images=1, seq=128, seed=1)


# ---------------------------------------------------------------- one piece to ONNX
def trace_piece(module: torch.nn.Module, args: tuple, piece: Piece, spec: GraphSpec, opset: int, scratch: Path):
    """The ModelProto of `module` traced on `args` (as exporter.graphs.trace.export_graph traces a
    whole graph), its IO named as the piece's, weights in memory. Once the graph is read back,
    `module` is moved to the meta device: its weights are then in the proto only, not in both (an
    80B layer is 3.2 GB in FP32). Not before: past 2 GB the traced file's weights were then short
    when read (an 8192x8192 weight of 19.9M values), as if the exporter's writes still used them."""
    import onnx

    axes = {}
    for name in (*piece.inputs, *piece.outputs):
        try:
            axes[name] = next(s for s in (*spec.inputs, *spec.outputs) if s.name == name).dynamic_axes()
        except StopIteration:
            axes[name] = intermediate_axes(name)
    path = scratch / "piece.onnx"
    try:
        with warnings.catch_warnings(), quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python values
            torch.onnx.export(module, args, str(path), input_names=list(piece.inputs),
                              output_names=list(piece.outputs), dynamic_axes=axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(path))  # with the weights the exporter wrote beside it past 2 GB
        module.to(torch.device("meta"))
    except Exception as exc:
        raise ExportError(f"tracing the {spec.name} graph's piece {piece.label!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        for leftover in scratch.iterdir():
            leftover.unlink()
    return proto


def in_precision(proto, spec: GraphSpec, precision: str, keep_input: bool = True, keep: tuple[str, ...] = (),
                 calibrated: dict | None = None):
    """A piece's graph in `precision` (a new ModelProto). `keep_input`: `proto` is left as it is,
    else the int8wo quantizer (or the FP16 converter) may work on it in place (one copy of the
    weights fewer). `keep`: fp16's nodes kept in FP32 beyond the rule (overflow_kept).
    `calibrated`: int4wo's fitted INT4 weights (int4_fit); plain rounding without."""
    from onnx import ModelProto

    def copied():
        if not keep_input:
            return proto
        copy = ModelProto()
        copy.CopyFrom(proto)
        return copy

    if precision == "fp32":
        return copied()
    if precision == "fp16":
        io = [v.name for v in (*proto.graph.input, *proto.graph.output)]
        keep_io = [n for n in io if n in FP32_IO or n in PIECE_FP32]
        return to_fp16(copied(), spec, (*keep, *_computing(proto, [n for n in keep_io if n in PIECE_FP32])),
                       keep_io=keep_io, chains=True)[0]
    if precision == "int8wo":
        return to_int8_weight_only(copied(), spec)[0]  # ONNX Runtime's quantizer edits the model it is given
    if precision == "int4wo":
        return to_int4_weight_only(proto, spec, calibrated=calibrated)[0]  # leaves `proto` as it is
    raise ExportError(f"precision {precision!r}: the streamed export writes {list(STREAM_PRECISIONS)}")


def _computing(proto, names: list[str]) -> list[str]:
    """Every node the outputs `names` are computed from (the head's mask, gate and rotary
    construction: no weights, a few elementwise ops), kept FP32: converted, the finfo(float32).min
    constant of a mask's Where would become FP16's -65504 (or -inf), and the traced `.to(dtype)`
    after it an FP16 Cast."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found, pending = {}, list(names)
    while pending:
        node = producer.get(pending.pop())
        if node is not None and node.name not in found:
            found[node.name] = None
            pending.extend(node.input)
    return list(found)


def rename(graph, prefix: str, keep: set[str]) -> None:
    """Prefix every node, value and initializer name of `graph` but those in `keep` (the names
    that connect pieces), so pieces appended to one graph never collide."""
    def new(name: str) -> str:
        return name if not name or name in keep else prefix + name

    for node in graph.node:
        if any(a.g.node or a.graphs for a in node.attribute):
            raise ExportError(f"node {node.name} ({node.op_type}) has a subgraph; pieces are flat graphs")
        node.name = prefix + node.name
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = new(tensor.name)
    del graph.value_info[:]  # intermediate shapes: ONNX Runtime infers them again


# ---------------------------------------------------------------- one graph, piece by piece
@dataclass
class GraphWriter:
    """The graph `file` in `folder` being built: `model` holds nodes and external references only;
    the bytes go to `file`.data as pieces are appended."""

    folder: Path
    spec: GraphSpec  # the graph's IO (file: this precision's file name)
    model: object = None  # onnx.ModelProto
    offset: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of each initializer

    def __post_init__(self):
        from onnx import ModelProto

        self.model = ModelProto()
        self.model.graph.name = self.spec.name
        self.data_name = f"{self.spec.file}.data"
        self.data_path = self.folder / self.data_name
        # open across appends, closed by finish / close; "wb": a graph written again starts an empty file
        self._data = open(self.data_path, "wb")  # noqa: SIM115

    def append(self, proto, prefix: str, keep: set[str]) -> list:
        """Add a piece's graph; return its initializers, now references into the data file."""
        rename(proto.graph, prefix, keep)
        for tensor in proto.graph.initializer:
            self._externalize(tensor)
        self.model.graph.node.extend(proto.graph.node)
        self.model.graph.initializer.extend(proto.graph.initializer)
        self.model.ir_version = max(self.model.ir_version, proto.ir_version)
        opsets = {o.domain: o for o in self.model.opset_import}
        for o in proto.opset_import:
            if o.domain not in opsets:
                self.model.opset_import.add(domain=o.domain, version=o.version)
            elif o.version > opsets[o.domain].version:
                opsets[o.domain].version = o.version
        self._data.flush()
        return list(proto.graph.initializer)

    def _externalize(self, tensor) -> None:
        from onnx import TensorProto, numpy_helper

        if tensor.data_location == TensorProto.EXTERNAL:
            raise ExportError(f"{self.spec.file}: initializer {tensor.name} still refers to a file; load it first")
        data = tensor.raw_data if tensor.HasField("raw_data") else \
            numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        pad = -self.offset % ALIGNMENT
        self._data.write(b"\0" * pad)
        self.offset += pad
        self._data.write(data)
        self.ranges.append((self.offset, len(data)))
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(name)
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)

    def finish(self, io_types: dict[str, int]) -> GraphSpec:
        """Write the graph: IO in the spec's order with its shapes (pin_io_shapes), onnx.checker by path."""
        import onnx
        from onnx import helper

        self._data.close()
        graph = self.model.graph
        for specs, target in ((self.spec.inputs, graph.input), (self.spec.outputs, graph.output)):
            for s in specs:
                target.append(helper.make_tensor_value_info(s.name, io_types[s.name], list(s.shape)))
        pin_io_shapes(self.model, self.spec)
        path = self.folder / self.spec.file
        onnx.save_model(self.model, str(path))
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise ExportError(f"{path.name}: the streamed graph fails onnx.checker: {exc}") from exc

        def typed(t):  # the spec's IO in the types written (an FP16 graph's are FP16 but FP32_IO)
            return dataclasses.replace(t, dtype=str(helper.tensor_dtype_to_np_dtype(io_types[t.name])))

        return dataclasses.replace(self.spec, external_data=self.data_name, inputs=tuple(map(typed, self.spec.inputs)),
                                   outputs=tuple(map(typed, self.spec.outputs)))

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


# ---------------------------------------------------------------- reference inputs
def _cases(info: ModelInfo, case: ValidationCase, validate: bool,
           calibration: ValidationCase | None = None) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{graph: {case: feed}}: "trace" (exporter.graphs.trace's shapes: every dynamic axis distinct);
    when validating, the reference cases of exporter.graphs.validate: photos, prefill, decode; and
    with `calibration`, a larger prefill of real photos ("calibration": int4wo's AWQ / GPTQ
    activations, never validated against)."""
    traced = trace_args(info)
    cases: dict[str, dict[str, dict[str, torch.Tensor]]] = {g: {} for g in GRAPHS}
    cases["vision"]["trace"] = {"pixel_values": traced["vision"][0]}
    cases["perceiver"]["trace"] = {"image_hidden_states": traced["perceiver"][0]}
    cases["decoder"]["trace"] = dict(zip(_decoder_inputs(info), traced["decoder"]))
    if validate:
        b, n = case.batch, case.images
        cases["vision"]["photos"] = {"pixel_values": sample_pixels(info, b, n).flatten(0, 1)}
        prompt = sample_prompt(info, b, n, case.seq, case.seed)
        step = next_step(prompt)
        empty = torch.zeros(b, info.num_heads, 0, info.head_dim)
        for name, text in (("prefill", prompt), ("decode", step)):
            cases["decoder"][name] = {
                "input_ids": text.input_ids, "attention_mask": text.attention_mask, "position_ids": text.position_ids,
                "image_attention_mask": text.image_attention_mask,
                "logits_positions": torch.arange(text.input_ids.shape[1])}
        # prefill's past is empty; decode's past is prefill's presents, filled in as layers run
        cases["decoder"]["prefill"].update({n: empty for n in _decoder_inputs(info) if n.startswith("past_")})
    if calibration is not None:
        b, n = calibration.batch, calibration.images
        cases["vision"]["calibration"] = {"pixel_values": sample_pixels(info, b, n).flatten(0, 1)}
        text = sample_prompt(info, b, n, calibration.seq, calibration.seed)
        empty = torch.zeros(b, info.num_heads, 0, info.head_dim)
        cases["decoder"]["calibration"] = {
            "input_ids": text.input_ids, "attention_mask": text.attention_mask, "position_ids": text.position_ids,
            "image_attention_mask": text.image_attention_mask, "logits_positions": torch.arange(text.input_ids.shape[1]),
            **{name: empty for name in _decoder_inputs(info) if name.startswith("past_")}}
    return cases


def _decoder_inputs(info: ModelInfo) -> list[str]:
    from exporter.graphs.specs import cross_names, past_names

    return ["input_ids", "attention_mask", "position_ids", "image_attention_mask", "logits_positions",
            *(n for j in range(info.num_cross_layers) for n in cross_names(j)),
            *(n for i in range(info.num_layers) for n in past_names(i))]


def run_piece(module: torch.nn.Module, piece: Piece, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The piece's PyTorch module on the tensors of `feed` it takes: {output name: tensor}."""
    with torch.no_grad():
        out = module(*(feed[n] for n in piece.inputs))
    return dict(zip(piece.outputs, out if isinstance(out, tuple) else (out,)))


# ---------------------------------------------------------------- the entry point
@dataclass
class StreamResult:
    graphs: dict[str, dict[str, GraphSpec]]  # {precision: {graph: GraphSpec}}
    table: list[dict]  # per piece and precision: graph, piece, precision, max_rel, mean_rel, cosine, ok, worst


def stream_graphs(source: TensorSource, info: ModelInfo, specs: dict, folder: Path,
                  precisions: list[str] | tuple[str, ...] = ("fp32",), opset: int = 18, validate: bool = True,
                  progress: bool = True, case: ValidationCase = DEFAULT_CASE,
                  bounds: dict[str, dict[str, float]] | None = None,
                  calibration: ValidationCase | None = CALIBRATION_CASE) -> StreamResult:
    """Write the vision, perceiver and decoder graphs of `source` into `folder`, one piece in memory
    at a time, in each of `precisions` (STREAM_PRECISIONS): FILE (exporter.precision.
    transforms.variant_file for all but fp32, whose file is the spec's) and its weights in FILE.data.

    `specs`: exporter.graphs.specs.graph_specs(cfg, info) (or {name: GraphSpec}); the graphs' IO
    equal them. `validate`: every piece, in every precision, is run in ONNX Runtime against its
    PyTorch module on the reference chain's inputs and judged by `bounds` (default
    exporter.graphs.bounds.TOLERANCES); the table is logged at INFO, and ValidationError lists the
    failing rows once every piece is written. `calibration`: int4wo's AWQ / GPTQ activations, a
    prefill carried through the pieces as the validation cases are (None: plain rounding). Returns
    the graphs' specs per precision and the table."""
    unknown = [p for p in precisions if p not in STREAM_PRECISIONS]
    if unknown or not precisions:
        raise ExportError(f"precisions {list(precisions)}: the streamed export writes {list(STREAM_PRECISIONS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = bounds or TOLERANCES
    graph_spec = {name: (s.graph_spec() if hasattr(s, "graph_spec") else s) for name, s in specs.items()}
    plan = graph_pieces(source, info)
    cases = _cases(info, case, validate, calibration if set(CALIBRATED) & set(precisions) else None)
    # fp32 last: the other precisions are made from the traced FP32 piece before it is appended
    order = sorted(precisions, key=lambda p: p == "fp32")
    bar = tqdm(total=sum(len(v) for v in plan.values()), desc="stream graphs", unit="piece", disable=not progress)
    table: list[dict] = []
    written: dict[str, dict[str, GraphSpec]] = {p: {} for p in precisions}
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".stream-") as scratch:
            for name in GRAPHS:
                spec = graph_spec[name]
                _link_graph(name, cases, info)
                writers = {p: GraphWriter(folder, dataclasses.replace(
                    spec, file=spec.file if p == "fp32" else variant_file(spec, p))) for p in order}
                io_types: dict[str, dict[str, int]] = {}  # {precision: {graph IO name: ONNX elem type}}
                try:
                    for piece in plan[name]:
                        bar.set_postfix_str(f"{name} {piece.label}")
                        rows = _stream_piece(piece, spec, cases[name], writers, io_types, opset, Path(scratch),
                                             bounds if validate else None)
                        table += sorted(rows, key=lambda r: list(precisions).index(r["precision"]))
                        bar.update(1)
                    for p, writer in writers.items():
                        written[p][name] = writer.finish(io_types[p])
                finally:
                    for writer in writers.values():
                        writer.close()
    finally:
        bar.close()
    if validate:
        _report(table, bounds)
    return StreamResult(written, table)


def _link_graph(name: str, cases: dict, info: ModelInfo) -> None:
    """Feed a graph the PyTorch outputs of the graph before it (the reference chain across graphs)."""
    for photos, prompts in (("photos", ("prefill", "decode")), ("calibration", ("calibration",))):
        if name == "perceiver" and photos in cases["vision"]:
            hidden = cases["vision"][photos]["image_hidden_states"]
            b = cases["decoder"][prompts[0]]["input_ids"].shape[0]
            cases["perceiver"][photos] = {"image_hidden_states": hidden.view(b, -1, *hidden.shape[1:])}
        if name == "decoder" and photos in cases["perceiver"]:
            for case in prompts:
                cases["decoder"][case].update({k: v for k, v in cases["perceiver"][photos].items()
                                               if k.startswith("cross_")})


def _stream_piece(piece: Piece, spec: GraphSpec, feeds: dict, writers: dict, io_types: dict, opset: int,
                  scratch: Path, bounds: dict | None) -> list[dict]:
    """The piece in every precision: appended to its graphs, and its rows (each with the seconds the
    whole piece took: building, PyTorch, tracing, converting, writing and checking, all precisions)."""
    started = time.perf_counter()
    module = piece.build()
    expected = {}
    for case, feed in feeds.items():
        out = run_piece(module, piece, feed)
        if case == "calibration":  # read by the int4wo fit only: no K/V kept, nothing validated
            feed.update({k: v for k, v in out.items() if not k.startswith("present_")})
            continue
        feed.update(out)
        expected[case] = out
        if case == "prefill":  # decode's past is prefill's present (the layer's own, from PyTorch)
            feeds["decode"].update({k.replace("present_", "past_"): v for k, v in out.items()
                                    if k.startswith("present_")})
    fp32 = trace_piece(module, tuple(feeds["trace"][n] for n in piece.inputs), piece, spec, opset, scratch)
    del module  # from here on, the piece's weights live in its ONNX graph only
    keep = set(piece.inputs) | set(piece.outputs)
    kept = overflow_kept(fp32, piece, feeds) if "fp16" in writers else []
    fitted = int4_fit(fp32, piece, feeds["calibration"]) if "int4wo" in writers and "calibration" in feeds else None
    int8, smoothing = int8_piece(fp32, piece, spec, feeds, expected, bounds, scratch) if "int8" in writers \
        else (None, None)
    rows = []
    last = list(writers)[-1]  # FP32 last where it is asked: every other precision is made from it first
    for precision, writer in writers.items():
        proto = fp32 if precision == "fp32" else int8 if precision == "int8" else in_precision(
            fp32, spec, precision, keep_input=precision != last, keep=tuple(k.node for k in kept), calibrated=fitted)
        if precision == "int8":
            int8 = None
        if precision == last:
            fp32 = None  # nothing else is made from it: the traced piece's weights go now, not at the end
        for value in (*proto.graph.input, *proto.graph.output):
            io_types.setdefault(precision, {})[value.name] = value.type.tensor_type.elem_type
        io = ([*proto.graph.input], [*proto.graph.output])
        initializers = writer.append(proto, f"{piece.key}", keep)
        if bounds is not None:
            rows.append(_check_piece(piece, precision, writer, proto.graph.node, initializers, io, proto,
                                     feeds, expected, bounds[precision], scratch))
            if precision == "fp16":
                rows[-1]["fp32_kept"] = [{**k.to_dict(), "node": piece.key + k.node} for k in kept]  # as written
            if precision == "int8":
                rows[-1]["smoothing"] = smoothing
            if precision == "int4wo":
                rows[-1]["int4"] = {m: sum(v["method"] == m for v in (fitted or {}).values()) for m in ("awq", "gptq")}
        del proto
    seconds = time.perf_counter() - started
    _release_freed_memory()
    memory = _memory_gib()
    return [{**row, "seconds": seconds, **memory} for row in rows]


def overflow_kept(proto, piece: Piece, feeds: dict) -> list:
    """The piece's nodes an FP16 graph keeps in FP32 beyond the rule: those whose FP32 inputs,
    outputs or weights reach OVERFLOW_FRACTION of FP16's range (exporter.precision.mixed.
    overflow_nodes, the whole-graph export's check) on the piece's reference inputs (the trace
    case's alone when not validating)."""
    from exporter.precision import activations, mixed
    from exporter.precision.reduced import fp16_candidates

    cases = [c for c in feeds if c != "trace"] or ["trace"]
    inputs = [{n: feeds[c][n].numpy() for n in piece.inputs} for c in cases]
    absmax, _ = activations.statistics(proto, inputs)
    kept = mixed.overflow_nodes(proto, absmax, fp16_candidates(proto, absmax))
    for k in kept:
        log.info("%s %s: %s kept in FP32 (%s)", piece.graph, piece.label, k.node, k.detail)
    return kept


def int8_piece(proto, piece: Piece, spec: GraphSpec, feeds: dict, expected: dict, bounds: dict | None,
               scratch: Path) -> tuple:
    """The piece as explicit Q/DQ INT8 (TensorRT's strongly typed form), as the whole-graph export
    makes it (exporter.precision.reduced.int8_plan): SmoothQuant at the alpha (or none) that keeps
    the piece furthest inside INT8's bound on both its calibration prefill and its validation
    cases, then ONNX Runtime's quantize_static (symmetric per-channel weights, per-tensor
    activations calibrated on the prefill, one Q/DQ pair per MatMul; the INT8 weights re-rounded by
    GPTQ where held-out rows prefer it, within GPTQ_MAX_BYTES); the lm_head stays FP32.
    Returns (ModelProto, the smoothing summary). A piece with no weight MatMul / Conv is FP32 as traced."""
    from onnx import ModelProto
    from onnx.external_data_helper import load_external_data_for_model

    from exporter.graphs.bounds import TOLERANCES, excess
    from exporter.precision.reduced import _outputs, _save, int8_plan
    from exporter.precision.transforms import int8_targets

    if not int8_targets(proto):
        copy = ModelProto()
        copy.CopyFrom(proto)
        return copy, {"alpha": None, "note": "nothing to quantize"}
    bound = (bounds or TOLERANCES)["int8"]
    calibration = [{n: feeds["calibration"][n].numpy() for n in piece.inputs}]
    checks = [(case, {n: feeds[case][n].numpy() for n in piece.inputs}) for case in expected if case != "trace"]
    names = [o.name for o in proto.graph.output]

    def score(trial, _spec) -> float:
        if not checks:
            return 0.0
        got = _outputs(trial, [feed for _, feed in checks])
        return max(excess(measure(expected[case][name].numpy(), value), bound)
                   for (case, _), values in zip(checks, got) for name, value in zip(names, values))

    with tempfile.TemporaryDirectory(dir=scratch, prefix="int8-") as tmp:
        folder = Path(tmp)
        src = folder / "piece.onnx"
        _save(proto, src)
        large = src.with_name("piece.onnx.data").exists()
        if large:  # saving moved `proto`'s weights to the file: back into memory, where the other precisions read them
            load_external_data_for_model(proto, str(folder))
        plan, summary = int8_plan("piece", src, dataclasses.replace(spec, external_data="x" if large else None),
                                  calibration, folder, score, bound["mean_rel"], gptq_max_bytes=GPTQ_MAX_BYTES)
        quantized = plan.build(set())[0]
        load_external_data_for_model(quantized, str(folder))  # the writer externalizes them into FILE.data
    return quantized, summary


def int4_fit(proto, piece: Piece, feed: dict) -> dict:
    """The piece's weight MatMuls fitted to INT4 on its calibration activations, as the whole-graph
    int4wo export fits them (transforms.int4_calibrate: AWQ or GPTQ per MatMul, whichever predicts
    held-out rows better; up to transforms.GPTQ_ROWS rows of each MatMul's input), GPTQ only within
    GPTQ_MAX_BYTES."""
    from exporter.precision import activations
    from exporter.precision.transforms import GPTQ_ROWS, int4_calibrate

    inputs = {n: feed[n].numpy() for n in piece.inputs}
    weights = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    channels = {n.input[0] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    if not channels:
        return {}
    rows = activations.matmul_inputs(proto, [inputs], channels, rows=GPTQ_ROWS)
    fitted = int4_calibrate(proto, rows, gptq_max_bytes=GPTQ_MAX_BYTES)
    log.debug("%s %s: int4 %s", piece.graph, piece.label,
              {m: sum(v["method"] == m for v in fitted.values()) for m in ("awq", "gptq")})
    return fitted


def _release_freed_memory() -> None:
    """Hand the piece's freed heap back to the OS (glibc keeps freed arenas otherwise, and the
    resident memory of a streamed export would grow with every layer it has written)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _memory_gib() -> dict:
    """The process's resident memory now and at its peak, in GiB, after a piece (Linux; {} elsewhere)."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return {}
    return {"rss_gib": resident / 2**30, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _check_piece(piece, precision, writer: GraphWriter, nodes, initializers, io, proto, feeds, expected,
                 bound: dict, scratch: Path) -> dict:
    """The piece's ONNX graph (its bytes as written to the data file) in ONNX Runtime against PyTorch."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(list(nodes), piece.key, list(io[0]), list(io[1]), list(initializers))
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    path = writer.folder / f".{writer.spec.file}.piece.onnx"  # beside FILE.data: its references resolve
    onnx.save_model(model, str(path))
    try:
        session = ort_session(path)
        names = [o.name for o in session.get_outputs()]
        rows = []
        for case, want in expected.items():
            if case == "trace":
                continue
            # FP16 pieces take their FP16 inputs as PyTorch's FP32 values rounded (the reference chain)
            feed = cast_feed(session, {i.name: feeds[case][i.name].numpy() for i in session.get_inputs()})
            for name, got in zip(names, session.run(names, feed)):
                rows.append({**judge(measure(want[name].numpy(), got), bound), "at": f"{case}: {name}"})
        del session
    finally:
        path.unlink(missing_ok=True)
    failing = [r for r in rows if not r["ok"]]
    worst = failing[0] if failing else max(rows, key=lambda r: r["max_rel"])
    return {"graph": piece.graph, "piece": piece.label, "precision": precision, "max_rel": max(r["max_rel"] for r in rows),
                "mean_rel": max(r["mean_rel"] for r in rows), "cosine": min(r["cosine"] for r in rows),
                "ok": not failing, "worst": worst["at"]}


def format_table(table: list[dict]) -> str:
    lines = [f"{'graph':<10} {'piece':<24} {'precision':<9} {'max_rel':>9} {'mean_rel':>9} {'cosine':>9}  ok"]
    lines += [f"{r['graph']:<10} {r['piece']:<24} {r['precision']:<9} {r['max_rel']:>9.3g} {r['mean_rel']:>9.3g} "
              f"{r['cosine']:>9.6f}  {'yes' if r['ok'] else 'NO (' + r['worst'] + ')'}" for r in table]
    return "\n".join(lines)


def _report(table: list[dict], bounds: dict) -> None:
    log.info("per-piece validation against PyTorch (each piece fed PyTorch's outputs of the one before):\n%s",
             format_table(table))
    failed = [r for r in table if not r["ok"]]
    if failed:
        raise ValidationError(
            f"{len(failed)} piece(s) differ from PyTorch past their precision's bound:\n  " + "\n  ".join(
                f"{r['graph']} {r['piece']} ({r['precision']}): max|err| {r['max_rel']:.3g} rms "
                f"(limit {bounds[r['precision']]['max_rel']:g}), mean|err| {r['mean_rel']:.3g} rms "
                f"(limit {bounds[r['precision']]['mean_rel']:g}), cosine {r['cosine']:.6f} "
                f"(min {bounds[r['precision']]['cosine']}); worst at {r['worst']}" for r in failed),
            {"pieces": table})


__all__ = ["GraphWriter", "StreamResult", "format_table", "in_precision", "rename", "stream_graphs", "trace_piece"]
