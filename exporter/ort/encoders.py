"""The ONNX Runtime flavour of the vision and perceiver graphs: the exported FP32 graphs rewritten by
`onnxruntime.transformers`' optimizer (its Python fusions only, opt_level 0, so the file holds no
provider-specific rewrite and runs on ONNX Runtime's CPU and CUDA providers alike). TensorRT cannot
read the com.microsoft ops; the portable graphs stay the reference and the TensorRT input.

  vision:     model_type "clip" (IDEFICS's vision tower is a CLIP ViT): each layer's attention
              becomes com.microsoft.Attention (packed QKV), the residual adds fold into
              SkipLayerNormalization, the MLP's activation into BiasGelu (gelu) or QuickGelu
              (quick_gelu). "bert" and "vit" find the norms and the activation but not the attention
              (CLIP's scaled query does not match their pattern).
  perceiver:  the resampler's attention reads keys and values of [context; latents] (neither the
              self-attention "clip" fuses nor a pattern the optimizer knows) and its MLP is ReLU;
              torch already exports its LayerNorms as LayerNormalization. Nothing fuses in the
              IDEFICS resampler, so no perceiver.ort.onnx is written unless a fusion does apply:
              with qk_layer_norms, the cross-attention keys' RMSNorm becomes
              SimplifiedLayerNormalization (an op ONNX Runtime registers in the ONNX domain, unknown
              to onnx.checker: loading the graph in ONNX Runtime is its check).

int8wo (--int8-weight-only): the fused vision and the perceiver (fused or not) with every weight
MatMul and Attention quantized dynamically (exporter.precision.transforms.dynamic_int8: INT8 weights per
channel, activations per call; MatMulInteger / QAttention), NAME.ort.int8wo.onnx, validated with
the int8wo bound: an image's hundreds of tokens are where the CPU's INT8 units pay (random:medium's
vision, one image: 25-35 ms against 80-140 FP32 and 80-105 in transformers, the same minutes).

Each graph keeps its portable twin's IO (names, dtypes, shapes), is validated against the PyTorch
module on the export's reference cases, and is recorded in manifest.ort_optimized["fp32"]. With
--fp16 the fused graph is also converted to FP16 by the portable FP16 graphs' rule
(exporter.precision.transforms.to_fp16: their IO, norms and softmax in FP32) as NAME.ort.fp16.onnx, validated
with the fp16 bound (ONNX Runtime's CPU runs the fused ops in FP16 too), recorded in
manifest.ort_optimized["fp16"]; one that misses the bound is left out with a warning (the
portable FP16 graph, whose nodes the export's search may keep in FP32, then runs).

Every graph written is loaded and run once in ONNX Runtime (first_run), validated or not: one that
ONNX Runtime refuses (a fused kernel that does not take the model's shapes; exporter.ort.refusal)
is left out with a warning naming the op and ONNX Runtime's reason, in every precision: the
portable graph serves.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable
from pathlib import Path

from exporter.graphs.bounds import TOLERANCES, describe
from exporter.ort.refusal import Refused, ort_errors, refused
from exporter.graphs.trace import remove_graph
from runtime.errors import ExportError, ValidationError
from runtime.manifest import GraphSpec

log = logging.getLogger(__name__)

GRAPHS = ("vision", "perceiver")
FILES = {"vision": "vision.ort.onnx", "perceiver": "perceiver.ort.onnx"}
PRECISIONS = ("fp32", "fp16", "int8wo")
# the devices whose ONNX Runtime provider runs each precision's encoders (manifest Variant.devices):
# int8wo's QAttention has a CPU kernel only (its INT8 products are for the CPU's AMX / VNNI units)
DEVICES = {"fp32": ["cpu", "cuda"], "fp16": ["cpu", "cuda"], "int8wo": ["cpu"]}
MODEL_TYPE = "clip"
# the op types the optimizer's fusions write: a graph counts as fused when one of them grew in number
FUSED_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
             "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "GemmFastGelu")


def file_for(graph: str, precision: str = "fp32") -> str:
    """vision.ort.onnx, vision.ort.fp16.onnx, ..."""
    return FILES[graph] if precision == "fp32" else FILES[graph].replace(".onnx", f".{precision}.onnx")


def encoder_shapes(cfg) -> dict[str, tuple[int, int]]:
    """{graph: (num_heads, hidden_size)} the optimizer's attention fusion expects, from an
    IdeficsConfig (or its to_dict()): the vision tower's heads and embed dim; the resampler's heads
    and inner width (heads x head_dim), or without a resampler (the perceiver graph is then only the
    cross-attention K/V projections) the decoder's heads and width."""
    get = (lambda obj, key: obj[key]) if isinstance(cfg, dict) else getattr
    vision, perceiver = get(cfg, "vision_config"), get(cfg, "perceiver_config")
    shapes = {"vision": (int(get(vision, "num_attention_heads")), int(get(vision, "embed_dim")))}
    if get(cfg, "use_resampler"):
        heads = int(get(perceiver, "resampler_n_heads"))
        shapes["perceiver"] = (heads, heads * int(get(perceiver, "resampler_head_dim")))
    else:
        shapes["perceiver"] = (int(get(cfg, "num_attention_heads")), int(get(cfg, "hidden_size")))
    return shapes


def op_counts(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def fusions(before, after) -> dict[str, int]:
    """{fused op type: nodes added} between a graph and its optimized copy (ModelProtos)."""
    old, new = op_counts(before), op_counts(after)
    return {op: new[op] - old[op] for op in FUSED_OPS if new[op] > old[op]}


def fuse(path: Path, num_heads: int, hidden_size: int, model_type: str = MODEL_TYPE):
    """(optimized ModelProto, {fused op type: nodes added}) of the graph at `path`."""
    import onnx
    from onnx import helper
    from onnxruntime.transformers.optimizer import optimize_model

    from runtime.console import quiet_logger

    original = onnx.load(str(path), load_external_data=False)  # the structure, to count ops in
    chatter = io.StringIO()  # the optimizer prints when its shape inference gives up (harmless here)
    try:
        with quiet_logger(), contextlib.redirect_stdout(chatter):
            optimized = optimize_model(str(path), model_type=model_type, num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=0, use_gpu=False).model
    except Exception as exc:
        raise ExportError(f"{Path(path).name}: onnxruntime.transformers' optimizer failed "
                          f"({type(exc).__name__}: {exc})") from exc
    if chatter.getvalue().strip():
        log.debug("%s: optimizer output: %s", Path(path).name, chatter.getvalue().strip())
    if any(n.domain == "com.microsoft" for n in optimized.graph.node) and \
            not any(o.domain == "com.microsoft" for o in optimized.opset_import):
        optimized.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return optimized, fusions(original, optimized)


def check_io(model, spec: GraphSpec) -> None:
    """Raise ExportError unless the graph's IO names and dtypes are the spec's, in order."""
    from onnx import helper

    def io(values):
        return [(v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in values]

    want = ([(t.name, t.dtype) for t in spec.inputs], [(t.name, t.dtype) for t in spec.outputs])
    got = (io(model.graph.input), io(model.graph.output))
    if got != want:
        raise ExportError(f"the ONNX Runtime-optimized {spec.name} graph's IO {got} differs from {spec.file}'s {want}")


def first_run(folder: Path, spec: GraphSpec, seed: int = 0, detail: str = ""):
    """Load the graph `spec` in `folder` in ONNX Runtime and run it once on a small random feed (every
    dynamic axis 2): a fused kernel that does not take the model's shapes fails here, at load or at
    run, as exporter.ort.refusal.Refused (with `detail`), validated or not. Returns the session."""
    import numpy as np
    import onnxruntime as ort

    from exporter.graphs.comparison import ort_session

    path = Path(folder) / spec.file
    try:
        session = ort_session(path)
    except ort_errors() as exc:
        raise refused(path, exc, "load", detail) from exc
    rng = np.random.default_rng(seed)
    feed = {t.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in t.shape]).astype(t.dtype)
            for t in spec.inputs}
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # ONNX Runtime's own error log: the export's warning says it
    try:
        session.run(None, feed, quiet)
    except ort_errors() as exc:
        raise refused(path, exc, "run", detail) from exc
    return session


def write_ort_encoders(folder: Path, graphs: dict[str, GraphSpec], shapes: dict[str, tuple[int, int]],
                       write: Callable, cases=None, bound: dict | None = None, precision: str = "fp32",
                       ) -> tuple[dict[str, GraphSpec], dict]:
    """Optimize the FP32 vision and perceiver graphs in `folder` (those `shapes` names), save each
    that fused (in `precision`: "fp32", "fp16" converted after the fusions, or "int8wo" quantized
    after them by exporter.precision.transforms.dynamic_int8, every graph of `shapes` whether it fused or not) as
    file_for(graph, precision) through `write(proto, spec) -> GraphSpec` (the export's writer: IO
    shapes pinned, weights beside it past the external-data threshold) and, given
    `cases` (exporter.graphs.validate.reference_cases), validate it against the PyTorch outputs within
    `bound` (default: the precision's). A graph ONNX Runtime refuses to load or run is removed and
    left out with a warning. Returns ({graph: GraphSpec}, {graph: {case: {output: row}}})."""
    from exporter.graphs.comparison import failures, run_cases
    from exporter.precision.transforms import dynamic_int8, to_fp16, variant_file

    if precision not in PRECISIONS:
        raise ExportError(f"the ONNX Runtime-optimized encoders are written in {', '.join(PRECISIONS)}, "
                          f"not {precision!r}")
    bound = bound or TOLERANCES[precision]
    folder = Path(folder)
    written, report = {}, {}
    for name in GRAPHS:
        if name not in shapes:
            continue
        portable = graphs[name]
        heads, hidden = shapes[name]
        model, fused = fuse(folder / portable.file, heads, hidden)
        if not fused and precision != "int8wo":
            log.debug("%s: no ONNX Runtime fusion applies (model_type %s, %d heads, hidden %d); not written",
                      portable.file, MODEL_TYPE, heads, hidden)
            continue
        file = file_for(name, precision)
        log.debug("%s: fused %s", file, ", ".join(f"{op} x{n}" for op, n in fused.items()))
        check_io(model, portable)
        spec = portable
        if precision == "fp16":
            model, spec, _ = to_fp16(model, portable)
        elif precision == "int8wo":  # MatMulInteger: INT8 products on the CPU's AMX / VNNI units
            model = dynamic_int8(model)
        spec = write(model, dataclasses.replace(spec, file=file, external_data=None))
        del model
        mine = [c for c in cases or () if c.graph == name]
        detail = f"this model's {name} attention: {heads} heads of head size {hidden // heads}"
        try:  # ONNX Runtime must load and run it, validated or not (exporter.ort.refusal)
            session = first_run(folder, spec, detail=detail)
            rows = run_cases(folder, {name: spec}, mine, bound, session_factory=lambda _, s=session: s)[0] if mine else {}
            del session
        except (Refused, *ort_errors()) as exc:  # the portable graph of the precision serves instead
            exc = exc if isinstance(exc, Refused) else refused(spec.file, exc, "run", detail)
            log.warning("%s; not written, Sessions run %s", exc,
                        portable.file if precision == "fp32" else variant_file(portable, precision))
            remove_graph(folder, spec.file)
            continue
        if mine:
            failed = [f"{file}: {line}" for line in failures(rows, bound)]
            if failed and precision != "fp32":  # the portable graph of the precision serves instead
                log.warning("%s misses the %s bound; not written, Sessions run %s:\n  %s", file, precision,
                            variant_file(portable, precision), "\n  ".join(failed))
                remove_graph(folder, spec.file)
                continue
            if failed:
                raise ValidationError(f"{len(failed)} output(s) of the ONNX Runtime-optimized {name} graph differ "
                                      f"from PyTorch past the {precision} tolerance ({describe(bound)}):\n  "
                                      + "\n  ".join(failed), rows)
            report[name] = rows[name]
        written[name] = spec
    return written, report
