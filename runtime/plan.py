"""Which graphs a `Session` loads: `plan_graphs` chooses them from the manifest, the backend, the
device and the options, without reading a graph file; `GraphPlan` says what it chose.

    plan = plan_graphs(Manifest.load("out/"), "onnxruntime", "cpu", precision="int8wo")
    plan.decoder.file, plan.flavour   # 'decoder.ort.int8wo.onnx', 'ort' (an --ort-optimized export)

The rules (the Session loads exactly what the plan names):

- `precision` (default: `runtime.manifest.default_precision`, the fastest the export has for the
  backend and device) is the precision the decoder decodes in.
- `prefill_precision`, when given and different, is the precision the images and the prompt run
  in: vision and perceiver of that precision, and its portable decoder for prompts (`prefill`).
- On backend="onnxruntime", unless `portable`: the ONNX Runtime-optimized graphs (idefics-export
  --ort-optimized) that the manifest lists for the device (`Variant.devices`) replace the portable
  ones: vision / perceiver of the precision the images run in, the decoder of the decode precision.
  With an ORT decoder, prompts run in the ORT prompt (or decoder) graph of their precision when
  there is one, else in the portable decoder, and `prefill` is the portable decoder of whole
  sequences (teacher forcing).
- backend="torch" runs the FP32 PyTorch modules the FP32 graphs were traced from: FP32 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ManifestError
from runtime.manifest import GRAPH_NAMES, GraphSpec, Manifest, default_precision
from runtime.runners import BACKENDS


@dataclass(frozen=True)
class PlannedGraph:
    """One graph a Session loads.

    Attributes:
        spec: The graph's manifest entry (file, IO names and dtypes).
        precision: The precision it comes from: "fp32", "fp16", "int8", "int8wo" or "int4wo".
        ort: True for an ONNX Runtime-optimized graph (`Manifest.ort_optimized`, idefics-export
            --ort-optimized), False for a portable one (`Manifest.graphs` or a variant's).
    """

    spec: GraphSpec
    precision: str
    ort: bool = False

    @property
    def file(self) -> str:
        """The graph's file name in the export folder."""
        return self.spec.file


@dataclass(frozen=True)
class GraphPlan:
    """The graphs a Session loads, their precisions, and where they run (`plan_graphs` makes it).

    Every graph runs on `device` through `backend`; an ONNX Runtime-optimized graph is chosen only
    where the manifest says it runs on that device.

    Attributes:
        backend: "onnxruntime", "tensorrt" or "torch".
        device: "cpu", "cuda" or "cuda:N".
        precision: The precision the decoder decodes in (`Session.precision`).
        prefill_precision: The other precision the images and prompts run in, or None when they
            run in `precision`.
        defaulted: True when `precision` was not asked for but chosen by
            `runtime.manifest.default_precision`.
        vision: The vision encoder.
        perceiver: The perceiver resampler.
        decoder: The decoder of decode steps.
        prefill: The decoder of whole sequences, or None when it is `decoder`: the portable decoder
            of `prefill_precision`, or, when `decoder` is an ONNX Runtime-optimized one (which
            decodes over a shared cache), the portable decoder of `precision` (teacher forcing,
            calibration; loaded on first use) or of `prefill_precision`.
        prompt: The decoder prompts run in when `decoder` is ONNX Runtime-optimized: an ORT prompt
            or decoder graph of the prompt's precision (possibly `decoder` itself); None where
            prompts run in `prefill` (or, when that is None too, in `decoder`).
        quantize_prompt_kv: True when `prompt` writes its K/V in another dtype than `decoder`'s
            cache (a float prompt before int8wo's INT8 cache): they are quantized into it with the
            decoder's cache scales.
    """

    backend: str
    device: str
    precision: str
    prefill_precision: str | None
    defaulted: bool
    vision: PlannedGraph
    perceiver: PlannedGraph
    decoder: PlannedGraph
    prefill: PlannedGraph | None = None
    prompt: PlannedGraph | None = None
    quantize_prompt_kv: bool = False

    @property
    def flavour(self) -> str:
        """"ort" when any ONNX Runtime-optimized graph runs, else "portable"."""
        return "ort" if any(g.ort for g in (self.vision, self.perceiver, self.decoder)) else "portable"

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        """{"vision", "perceiver", "decoder": spec}: the graphs that get a runner each."""
        return {name: getattr(self, name).spec for name in GRAPH_NAMES}

    @property
    def prompt_is_decoder(self) -> bool:
        """True when prompts run in the decode graph itself (one ONNX Runtime session for both)."""
        return self.prompt is not None and self.prompt.file == self.decoder.file

    @property
    def files(self) -> list[str]:
        """Every file the plan reads (graphs, then their external data), each once: what
        `Manifest.verify_files` checks."""
        specs = [self.vision.spec, self.perceiver.spec, self.decoder.spec,
                 *(g.spec for g in (self.prefill, self.prompt) if g is not None)]
        names = [s.file for s in specs] + [s.external_data for s in specs if s.external_data]
        return list(dict.fromkeys(names))


def plan_graphs(manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu",
                precision: str | None = None, prefill_precision: str | None = None, portable: bool = False,
                folder: str | Path | None = None) -> GraphPlan:
    """Choose the graphs a Session loads (the module docstring states the rules); reads no file.

    Args:
        manifest: The export's manifest.
        backend: "onnxruntime", "tensorrt" or "torch".
        device: "cpu", "cuda" or "cuda:N".
        precision: The decode precision; None: `default_precision(manifest, backend, device)`.
        prefill_precision: Run images and prompts in this precision instead (None: in `precision`).
        portable: Load the portable graphs only, never the ONNX Runtime-optimized ones.
        folder: The export folder, named in error messages.

    Returns:
        The plan.

    Raises:
        ValueError: An unknown backend or device; backend="tensorrt" off CUDA; `prefill_precision`
            or a precision other than fp32 on backend="torch".
        ManifestError: A precision the export has no graphs of (naming the idefics-export flag that
            writes them), or a manifest that lists no vision, perceiver or decoder graph.

    Example:
        ```python
        plan = plan_graphs(Manifest.load("out/"), "onnxruntime", "cpu", precision="int8wo", prefill_precision="fp32")
        plan.vision.precision, plan.decoder.precision   # ('fp32', 'int8wo')
        ```
    """
    check_backend(backend, device)
    defaulted = precision is None
    if precision is None:  # torch: fp32, the modules the FP32 graphs were traced from
        precision = default_precision(manifest, backend, device)
    graphs = manifest.graphs_for(precision)
    missing = [name for name in GRAPH_NAMES if name not in graphs]
    if missing:
        where = f"{folder}: " if folder is not None else ""
        raise ManifestError(f"{where}the manifest lists no {', '.join(missing)} graph")
    decode = PlannedGraph(graphs["decoder"], precision)
    split = prefill_precision if prefill_precision and prefill_precision != precision else None
    images_in = split or precision  # the precision of everything that runs once per request
    encoders = {name: PlannedGraph(graphs[name], precision) for name in ("vision", "perceiver")}
    prefill = prompt = None
    if split:
        if backend == "torch":
            raise ValueError("prefill_precision needs backend='onnxruntime' or 'tensorrt'")
        first = manifest.graphs_for(split)
        encoders = {name: PlannedGraph(first[name], split) for name in ("vision", "perceiver")}
        prefill = PlannedGraph(first["decoder"], split)
    if backend == "onnxruntime" and not portable:
        # those that run on this device (the manifest says which: CUDA's GroupQueryAttention takes
        # FP16 only, int8wo's INT8 products are the CPU's): vision / perceiver (fused Attention,
        # SkipLayerNormalization, Gelu) of the precision they run in, the decoder (GroupQueryAttention
        # over a shared cache) of the decode precision
        first = manifest.ort_graphs(images_in, device)
        encoders.update({name: PlannedGraph(first[name], images_in, ort=True)
                         for name in ("vision", "perceiver") if name in first})
        ort_decoder = manifest.ort_graphs(precision, device).get("decoder")
        if ort_decoder is not None:
            # decode in it, and run prompts in the ORT graph of their precision when there is one
            # (straight into the shared cache; int8wo's has a prompt graph of its own: INT8 products
            # for a prompt's many rows), else in the portable decoder; the portable decoder of whole
            # sequences (teacher forcing) is loaded on first use only
            spec = first.get("prompt") or first.get("decoder")
            prompt = PlannedGraph(spec, images_in, ort=True) if spec is not None else None
            prefill = prefill or decode
            decode = PlannedGraph(ort_decoder, precision, ort=True)
    if backend == "torch" and precision != "fp32":
        raise ValueError(f"backend='torch' runs the FP32 PyTorch modules; precision {precision!r} "
                         "is an ONNX graph variant (use backend='onnxruntime')")
    past = manifest.names.past(0)[0]
    quantize = prompt is not None and prompt.spec.input(past).dtype != decode.spec.input(past).dtype
    return GraphPlan(backend=backend, device=device, precision=precision, prefill_precision=split,
                     defaulted=defaulted, vision=encoders["vision"], perceiver=encoders["perceiver"],
                     decoder=decode, prefill=prefill, prompt=prompt, quantize_prompt_kv=quantize)


def check_backend(backend: str, device: str) -> None:
    """Raise ValueError for an unknown backend or device, or TensorRT off CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if backend == "tensorrt" and kind != "cuda":
        raise ValueError("backend='tensorrt' runs on an NVIDIA GPU: pass device='cuda'")
