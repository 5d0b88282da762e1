"""`export(ExportConfig)`: checkpoint -> three validated ONNX graphs + manifest.json, written atomically.

Everything is written into a hidden sibling folder (`.NAME.partial-*`) that is renamed onto the
output only after every graph validated, so an interrupted or failed export never leaves a folder
that looks complete.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from calibration.data import calibration_data
from calibration.feeds import calibration_feeds
from exporter.graphs.bounds import BoundsError, load_tolerances
from exporter.precision.mixed import OVERFLOW_FRACTION, SearchBudget
from exporter.precision.transforms import PRECISIONS
from exporter.precision.reduced import EndToEnd, make_variant
from exporter.graphs.specs import NAMES, check_limits, graph_specs, model_info
from exporter.graphs.trace import EXTERNAL_DATA_THRESHOLD, PROTOBUF_LIMIT, export_graph, remove_graph, trace_args, write_graph
from exporter.graphs.validate import ValidationCase, reference_cases, validate
from runtime.cpu import describe as cpu_description
from runtime.errors import ExportError, ValidationError
from runtime.manifest import MANIFEST_NAME, GraphSpec, Limits, Manifest, Variant
from runtime.files import atomic_folder
from runtime.prompts import PromptEncoder
from runtime.reference import sources as loading
from runtime.reference.modules import graph_modules

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ExportConfig:
    output: Path
    model: str | None = None  # None: the embedded default; see runtime.reference.sources
    seed: int = 0
    opset: int = 18
    max_batch: int = 8
    max_images: int = 4
    max_seq_len: int | None = None  # None: the model's max_position_embeddings, at most 2048
    force: bool = False
    validate: bool = True
    progress: bool = True
    precisions: tuple[str, ...] = ()  # reduced-precision variants to add: "fp16", "int8"
    calibration_images: Path | None = None  # INT8 calibration photos (None: the built-in set)
    calibration_size: int = 16
    calibration_prompts: Path | None = None
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    # also write decoder.ort.onnx (exporter.ort.decoder) and vision.ort.onnx (exporter.ort.encoders):
    # manifest.ort_optimized
    ort_optimized: bool = False
    tolerances: Path | None = None  # JSON overriding exporter.graphs.bounds.TOLERANCES (as idefics-check --thresholds)
    search: SearchBudget = SearchBudget()  # mixed-precision search budget of the reduced precisions
    fp16_overflow_fraction: float = OVERFLOW_FRACTION  # of 65504: FP16 nodes past it on calibration stay FP32
    # write the graphs layer by layer from the checkpoint's tensors (exporter.stream): memory follows
    # one layer; None: only where the whole model would not fit in memory (random:9b, random:80b)
    stream: bool | None = None
    fp32: bool = False  # streamed: also write FP32 when reduced precisions are asked (a whole export always does)

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output))
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ExportError(f"unknown precision(s) {unknown}; choose from {list(PRECISIONS)}")
        if self.precisions and not self.validate:
            raise ExportError("--fp16/--int8 need validation (their accuracy is measured against PyTorch); a "
                              "variant that misses its bounds keeps more nodes at higher precision (--search-rounds, "
                              "--search-nodes), or widen the bounds with --tolerances FILE")
        if not 0 <= self.external_data_threshold <= PROTOBUF_LIMIT - 1024**2:
            raise ExportError(f"--external-data-threshold {self.external_data_threshold}: choose 0 to "
                              f"{PROTOBUF_LIMIT - 1024**2} bytes (a graph file cannot pass protobuf's 2 GB)")
        if not 0 < self.fp16_overflow_fraction <= 1:
            raise ExportError(f"fp16_overflow_fraction must lie in (0, 1], got {self.fp16_overflow_fraction}")
        if self.calibration_size < 1:
            raise ExportError(f"--calibration-size must be at least 1, got {self.calibration_size}")
        if not 14 <= self.opset <= 23:
            raise ExportError(f"--opset {self.opset}: supported opsets are 14 to 23")
        for name in ("max_batch", "max_images", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def export(config: ExportConfig) -> Manifest:
    out = config.output
    _check_output(out, config.force)
    streamed = _streams(config)
    if streamed:
        _check_streamable(config)
        into, steps = _stream_into, 3
    else:
        into = _export_into
        steps = 1 + 3 + (5 if config.validate else 0) + 1 + len(config.precisions) * (3 + 1) + (
            config.ort_optimized and "int8" in config.precisions)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, desc="idefics-export", unit="step", disable=not config.progress)
    try:
        with atomic_folder(out, mode=0o777 & ~_umask()) as tmp:  # the export gets the user's usual mode
            manifest = into(tmp, config, bar)
            _usual_modes(tmp)
    except BaseException:
        for folder in created:  # the parents this call made, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        bar.close()
    log.debug("export written to %s", out)
    return manifest


def _export_into(tmp: Path, config: ExportConfig, bar) -> Manifest:
    # Read the bounds and the calibration data first: a bad file or folder should fail before
    # minutes of export, not after.
    try:
        bounds = load_tolerances(config.tolerances)
    except BoundsError as exc:
        raise ExportError(f"--tolerances {exc}") from exc
    calibration = None
    # INT8 calibrates on it, FP16 looks for overflow, the int8wo ORT decoder sets its INT8 cache's scales
    if {"fp16", "int8", "int4wo"} & set(config.precisions) or (config.ort_optimized and "int8wo" in config.precisions):
        calibration = calibration_data(config.calibration_images, config.calibration_size, config.calibration_prompts)
    bar.set_postfix_str("loading model")
    source = loading.parse_source(config.model, config.seed)
    loaded = loading.load(source)
    model = loaded.model
    cfg = model.config
    bar.update(1)

    info = model_info(cfg, _image_token_ids(loaded.processor))
    limits = Limits(
        max_batch=config.max_batch, max_images=config.max_images,
        max_seq_len=config.max_seq_len or min(cfg.max_position_embeddings, 2048),
    )
    check_limits(info, limits, cfg.max_position_embeddings)
    specs = graph_specs(cfg, info)
    modules = graph_modules(model)
    traced_with = trace_args(info)

    graphs: dict[str, GraphSpec] = {}
    for name, spec in specs.items():
        bar.set_postfix_str(f"exporting {name}")
        graph = spec.graph_spec()
        graphs[name] = export_graph(modules[name], traced_with[name], graph, tmp, config.opset,
                                    config.external_data_threshold)
        bar.update(1)

    report: dict = {}
    cases = reference_cases(graphs, modules, info, ValidationCase()) if config.validate else []
    if config.validate:
        bar.set_postfix_str("validating in ONNX Runtime")
        try:
            report = validate(tmp, graphs, modules, info, "fp32", progress=bar, bound=bounds["fp32"], cases=cases)
        except ValidationError as exc:
            log.error("validation failed; nothing was written to %s", config.output)
            raise exc

    manifest = Manifest(
        # through JSON so the returned manifest equals the one read back (int dict keys become str)
        source={**source.to_dict(), "config": json.loads(json.dumps(cfg.to_dict()))},
        precision="fp32", opset=config.opset, model=info, limits=limits, graphs=graphs, names=NAMES,
        versions=library_versions(), processor_files=_save_processor(loaded.processor, tmp),
        # the CPU the graphs were validated on, and the INT8 kernel its sessions used (runtime.cpu)
        validation={"precision": "fp32", "report": report, "cpu": cpu_description()} if report else {},
    )
    int8_reference = None  # the PyTorch decoder's results the INT8 ORT decoder is judged by (built after the model is freed)
    if config.ort_optimized:  # FP32, and FP16 / INT8 weight-only (MatMulNBits) when --fp16 / --int8-weight-only ask
        from exporter.ort.decoder import PROMPT_FILES, decoder_reference
        from exporter.ort.refusal import Refused

        # the vision (and perceiver, where a fusion applies) through onnxruntime.transformers' fusions
        for precision in ("fp32", *(p for p in config.precisions if p in ("fp16", "int8wo"))):
            encoders = _ort_encoders(tmp, graphs, cfg, cases, config, bar, bounds[precision], precision)
            if encoders is not None:
                manifest.ort_optimized[precision] = encoders
        for precision in ("fp32", *(p for p in config.precisions if p in ("fp16", "int8wo"))):
            # a decoder ONNX Runtime refuses to load or run (a fused kernel that does not take the
            # model's shapes: exporter.ort.refusal) is left out: the portable graphs serve ONNX Runtime too
            try:
                if precision == "int8wo":  # with an INT8 KV cache where one meets the bound
                    variant = _ort_int8wo_variant(tmp, manifest, modules["decoder"], limits, calibration, config, bar,
                                                  bounds[precision])
                    if variant is None:  # the portable int8wo decoder serves
                        continue
                else:
                    variant = _ort_variant(tmp, modules["decoder"], info, limits, config, bar, precision,
                                           bounds[precision])
            except Refused as exc:
                also = " (nor decoder.ort.int8.onnx, which is built from it)" if precision == "fp32" and \
                    "int8" in config.precisions else ""
                log.warning("--ort-optimized: %s; not written%s, an %s Session decodes in the portable %s decoder",
                            exc, also, precision, precision)
                continue
            if precision in PROMPT_FILES:  # its prompt graph: INT8 products for many rows, K/V out in FP32
                prompt = _ort_prompt_variant(tmp, modules["decoder"], info, limits, config, bar, precision,
                                             bounds[precision])
                if prompt is not None:
                    variant.graphs["prompt"] = prompt.graphs["decoder"]
                    variant.devices["prompt"] = prompt.devices["decoder"]
                    if "decoder" in prompt.accuracy:  # (none under --no-validate)
                        variant.accuracy["prompt"] = prompt.accuracy["decoder"]
            if precision in manifest.ort_optimized:  # beside the precision's vision / perceiver graphs
                held = manifest.ort_optimized[precision]
                held.graphs.update(variant.graphs)
                held.accuracy.update(variant.accuracy)
                held.devices.update(variant.devices)
                held.calibration = variant.calibration or held.calibration  # the INT8 cache's
            else:
                manifest.ort_optimized[precision] = variant
        if "decoder" in manifest.ort_graphs("fp32") and "int8" in config.precisions and config.validate:
            # judged on the validation photos' cross K/V, as the portable INT8 decoder is
            perceiver = next(c for c in cases if c.graph == "perceiver")
            int8_reference = decoder_reference(modules["decoder"], info,
                                               cross=[perceiver.expected[o.name] for o in graphs["perceiver"].outputs])
    # The PyTorch model is done with (the cases hold its outputs): free it before the variants, which
    # hold ONNX copies of the weights (at 9B widths each copy of the decoder is 5 GB).
    del model, modules, loaded
    gc.collect()
    end_to_end = EndToEnd(tmp, manifest) if config.precisions else None
    for precision in config.precisions:
        manifest.variants[precision] = _make_variant(precision, tmp, manifest, cases, bounds[precision], config, bar,
                                                     calibration, end_to_end)
    if "int4wo" in manifest.variants:
        _int4_trt_form(tmp, manifest.variants["int4wo"], config)
    if "int8" in config.precisions and "decoder" in manifest.ort_graphs("fp32"):
        variant = _ort_int8_variant(tmp, manifest, int8_reference, calibration, config, bar, bounds["int8"])
        if variant is not None:
            manifest.ort_optimized["int8"] = variant
    # the default a Session loads: the reduced precision asked for (FP16 first: it is the safer one)
    manifest.precision = next((p for p in PRECISIONS if p in config.precisions), "fp32")

    bar.set_postfix_str("writing manifest")
    manifest.record_files(tmp)
    manifest.write(tmp)  # last: a folder with a manifest is a complete export
    bar.update(1)
    return manifest


# ---------------------------------------------------------------- the layer-streamed export
STREAMED = ("fp32", "fp16", "int8", "int8wo", "int4wo")  # what exporter.stream.writer writes


def _streams(config: ExportConfig) -> bool:
    """Whether the export goes layer by layer: --stream, or (unasked) a model that would not fit
    in memory whole (the whole-model path holds its FP32 weights about three times)."""
    if config.stream is not None:
        return config.stream
    source = loading.parse_source(config.model, config.seed)
    if source.kind != "preset":
        return False
    config_ = loading.build_config(source.ref)
    need, avail = 3 * 4 * loading.approx_params(config_), loading.available_memory()
    if avail and need > avail:
        log.warning("random:%s needs about %.0f GiB to export whole and this machine has %.0f GiB available: "
                    "exporting it layer by layer (--stream)", source.ref, need / 2**30, avail / 2**30)
        return True
    return False


def _check_streamable(config: ExportConfig) -> None:
    """The streamed export (exporter.stream) writes the same folder layout and manifest, layer by
    layer from a tensor source, in the precisions it knows; the others are refused by name."""
    refused = [flag for flag, on in (("--ort-optimized", config.ort_optimized),
                                     ("--calibration-images", config.calibration_images is not None),
                                     ("--calibration-prompts", config.calibration_prompts is not None)) if on]
    if refused:
        raise ExportError(f"the streamed export (--stream, or a model too large to export whole) writes "
                          f"{', '.join(STREAMED)} graphs, calibrated on its own prefill of built-in photos; "
                          f"{', '.join(refused)} not yet (issue 27)")


def _stream_into(tmp: Path, config: ExportConfig, bar) -> Manifest:
    from exporter.precision.transforms import BACKENDS
    from exporter.stream.sources import tensor_source
    from exporter.stream.writer import stream_graphs

    try:
        bounds = load_tolerances(config.tolerances)
    except BoundsError as exc:
        raise ExportError(f"--tolerances {exc}") from exc
    bar.set_postfix_str("opening the checkpoint")
    source = loading.parse_source(config.model, config.seed)
    tensors, processor, record = tensor_source(source, config.progress)
    bar.update(1)
    with tensors:
        cfg = tensors.config
        info = model_info(cfg, _image_token_ids(processor))
        limits = Limits(max_batch=config.max_batch, max_images=config.max_images,
                        max_seq_len=config.max_seq_len or min(cfg.max_position_embeddings, 2048))
        check_limits(info, limits, cfg.max_position_embeddings)
        specs = graph_specs(cfg, info)
        precisions = [p for p in STREAMED if p in config.precisions or (
            p == "fp32" and (config.fp32 or not config.precisions))]
        if "int4wo" in precisions:
            log.warning("--stream --int4-weight-only fits each MatMul by AWQ or GPTQ on a calibration prefill carried "
                        "through the layers, but without the whole-model export's search that keeps some MatMuls "
                        "at 8 bits: check its end-to-end top-1 (scripts/real_size.py) before serving it")
        bar.set_postfix_str(f"writing {', '.join(precisions)} layer by layer")
        result = stream_graphs(tensors, info, specs, tmp, precisions, opset=config.opset, validate=config.validate,
                               progress=config.progress, bounds=bounds)
    bar.update(1)
    manifest = Manifest(
        source={**record, "config": json.loads(json.dumps(cfg.to_dict()))},
        precision="fp32", opset=config.opset, model=info, limits=limits,
        graphs=result.graphs.get("fp32") or {name: spec.graph_spec() for name, spec in specs.items()},
        names=NAMES, versions=library_versions(), processor_files=_save_processor(processor, tmp),
        # per piece (exporter.stream.writer): each layer against transformers' own layer, fed the
        # reference hidden states of the one before
        validation={"precision": "per piece", "pieces": result.table, "cpu": cpu_description()}
        if config.validate else {},
        streamed={"precisions": precisions},
    )
    for precision in precisions:
        if precision != "fp32":
            # its accuracy: manifest.validation["pieces"], the rows of this precision
            manifest.variants[precision] = Variant(
                precision=precision, graphs=result.graphs[precision], backends=list(BACKENDS[precision]),
                search={"streamed": True, "bound": bounds[precision],
                        **({"int4": "AWQ or GPTQ per MatMul on a calibration prefill (exporter.stream.writer.CALIBRATION_CASE), "
                                   "blocks of 32; no 8-bit search"} if precision == "int4wo" else {}),
                        **({"fp16": "the FP16 rule and each piece's overflow nodes, no accuracy search"}
                           if precision == "fp16" else {}),
                        **({"int8": "per piece: SmoothQuant alpha chosen on its calibration prefill and validation "
                                    "cases, quantize_static on the prefill; no accuracy search"}
                           if precision == "int8" else {})},
                calibration={"source": "exporter.stream.writer.CALIBRATION_CASE (built-in photos, random-token "
                                       "prompts)"} if precision in ("int8", "int4wo") else {},
                kept_nodes=_streamed_kept(result.table) if precision == "fp16" else {})
    manifest.precision = next((p for p in PRECISIONS if p in precisions), "fp32")
    bar.set_postfix_str("writing manifest")
    manifest.record_files(tmp)
    manifest.write(tmp)
    bar.update(1)
    return manifest


def _streamed_kept(table: list[dict]) -> dict[str, list[dict]]:
    """graph -> the nodes the streamed FP16 pieces keep in FP32 for overflow (exporter.stream.writer.
    overflow_kept), each named as written in the graph."""
    kept: dict[str, list[dict]] = {}
    for row in table:
        if row["precision"] == "fp16":
            kept.setdefault(row["graph"], []).extend(row.get("fp32_kept", []))
    return kept


def _int4_trt_form(tmp: Path, variant: Variant, config: ExportConfig) -> None:
    """Write the TensorRT form of the int4wo graphs (NAME.int4wo.trt.onnx: the same INT4 weights
    through opset-21 block-wise DequantizeLinear, exporter.precision.transforms.to_int4_trt) and
    list them in the variant's `calibration["tensorrt_form"]` (hashed with the export's files).
    Checked with onnx.checker; ONNX Runtime's CPU provider is not asked to run them here."""
    import onnx

    from exporter.precision.transforms import to_int4_trt

    files = []
    for spec in variant.graphs.values():
        model, trt_spec = to_int4_trt(onnx.load(str(tmp / spec.file)), spec)
        written = write_graph(model, tmp, trt_spec, config.external_data_threshold)
        files += [written.file, *([written.external_data] if written.external_data else [])]
    variant.calibration["tensorrt_form"] = {
        "files": files, "note": "INT4 weights (symmetric, blocks of 32 along K) -> DequantizeLinear(axis 0, "
        "block_size) -> MatMul, opset 21, as NVIDIA ModelOpt writes weight-only INT4; the weights of the "
        "MatMulNBits graphs bit for bit; for TensorRT (not validated on a GPU by the export)"}


def _make_variant(precision: str, tmp: Path, manifest: Manifest, cases, bound: dict, config: ExportConfig, bar,
                  data=None, end_to_end: EndToEnd | None = None) -> Variant:
    feeds, calibration = None, {}
    if precision in ("fp16", "int8", "int4wo"):  # int4wo: AWQ's activation statistics
        bar.set_postfix_str("calibrating")
        encoder = PromptEncoder(tmp) if manifest.processor_files else None
        feeds = calibration_feeds(tmp, manifest, data, encoder)
        calibration = _calibration_record(data, config, "MinMax, symmetric" if precision == "int8" else
                                          "mean |x| per input channel (AWQ)" if precision == "int4wo" else
                                          f"FP32 activation peaks: nodes past {config.fp16_overflow_fraction:g} x "
                                          "65504 stay FP32")
    try:
        return make_variant(precision, tmp, manifest, cases, bound, config.search,
                            lambda proto, spec: write_graph(proto, tmp, spec, config.external_data_threshold), feeds, end_to_end, bar,
                            config.fp16_overflow_fraction, calibration)
    except ValidationError:
        log.error("%s graphs are past their accuracy bounds; nothing was written to %s", precision, config.output)
        raise


def _ort_int8wo_variant(tmp: Path, manifest: Manifest, decoder, limits: Limits, data, config: ExportConfig, bar,
                        bound: dict) -> Variant | None:
    """int8wo's ORT decoder with an INT8 KV cache: its scales from the PyTorch decoder's K/V on the
    calibration prompts and photos (exporter.ort.decoder.kv_scales), at each of KV_MARGINS x the
    peaks in turn until the decoder meets the bound; past the last, with an FP32 cache and a warning
    that names what missed; None (and a warning) where that misses too. An INT8 cache ONNX Runtime
    refuses (exporter.ort.refusal) goes to the FP32 cache at once; a refused FP32 one raises Refused."""
    from exporter.ort.decoder import FILES as ORT_FILES
    from exporter.ort.decoder import KV_MARGINS, KV_QUANT, calibration_kv, kv_scales
    from exporter.ort.refusal import Refused

    bar.set_postfix_str("calibrating the INT8 KV cache")
    encoder = PromptEncoder(tmp) if manifest.processor_files else None
    feeds = calibration_feeds(tmp, manifest, data, encoder)["decoder"]
    calibration = calibration_kv(decoder, manifest.graphs["decoder"], feeds)
    missed, why = [], "misses the int8wo bound"
    for margin in KV_MARGINS:
        record = _calibration_record(data, config, f"KV cache: INT8 {KV_QUANT.lower().replace('_', '-')} symmetric, "
                                     f"{margin:g} x the peak (keys: the norm of each rotary pair)")
        try:
            return _ort_variant(tmp, decoder, manifest.model, limits, config, bar, "int8wo", bound,
                                (kv_scales(calibration, manifest.model, margin), record), retry=True)
        except ValidationError as exc:
            missed.append(f"scales {margin:g} x the calibration peaks: {exc}")
        except Refused as exc:  # no scale helps: try the FP32 cache (its refusal is the caller's)
            missed.append(str(exc))
            why = "is refused by ONNX Runtime"
            break
    log.warning("the int8wo ONNX Runtime decoder's INT8 KV cache %s; its cache stays FP32 "
                "(a decode step reads 4x the bytes):\n  %s", why, "\n  ".join(missed))
    try:
        return _ort_variant(tmp, decoder, manifest.model, limits, config, bar, "int8wo", bound, retry=True)
    except ValidationError as exc:
        remove_graph(tmp, ORT_FILES["int8wo"])
        log.warning("%s misses the int8wo bound with an FP32 cache too; not written, an int8wo Session decodes in "
                    "the portable int8wo decoder:\n  %s", ORT_FILES["int8wo"], exc)
        return None


def _ort_int8_variant(tmp: Path, manifest: Manifest, reference, data, config: ExportConfig, bar,
                      bound: dict) -> Variant | None:
    """The INT8 ORT decoder (exporter.ort.int8): the FP32 ORT decoder quantized with the portable INT8
    decoder's smoothing and kept MatMuls; None (no file, a warning) where it misses the bound or ONNX
    Runtime refuses it: an INT8 Session then decodes in the portable INT8 decoder."""
    from exporter.ort.decoder import DEVICES, ORT_BACKENDS
    from exporter.ort.int8 import FILE, write_ort_int8_decoder
    from exporter.ort.refusal import Refused

    bar.set_postfix_str("ONNX Runtime-optimized int8 decoder")
    portable = manifest.variants["int8"]
    encoder = PromptEncoder(tmp) if manifest.processor_files else None
    feeds = calibration_feeds(tmp, manifest, data, encoder)["decoder"]
    alpha = portable.calibration.get("smoothing", {}).get("decoder", {}).get("alpha")
    try:
        spec, report, record = write_ort_int8_decoder(
            tmp, manifest.ort_graphs("fp32")["decoder"], manifest.graphs["decoder"], portable.graphs["decoder"],
            alpha, feeds, manifest.model, lambda proto, s: write_graph(proto, tmp, s, config.external_data_threshold, check=False),
            reference, bound)
    except ValidationError as exc:
        remove_graph(tmp, FILE)
        log.warning("%s misses the int8 bound; not written, an int8 Session decodes in the portable int8 decoder:"
                    "\n  %s", FILE, exc)
        return None
    except Refused as exc:  # (the file is removed)
        log.warning("--ort-optimized: %s; not written, an int8 Session decodes in the portable int8 decoder", exc)
        return None
    finally:
        bar.update(1)
    calibration = _calibration_record(data, config, "MinMax, symmetric (as the portable int8 decoder)")
    return Variant(precision="int8", graphs={"decoder": spec}, accuracy={"decoder": report} if report else {},
                   backends=list(ORT_BACKENDS), calibration={**calibration, "quantization": record},
                   devices={"decoder": list(DEVICES["int8"])})


def _calibration_record(data, config: ExportConfig, method: str) -> dict:
    """What the manifest records of the calibration data a variant was set on."""
    return {"digest": data.digest, "images": len(data.images), "prompts": len(data.prompts),
            "source": str(config.calibration_images) if config.calibration_images else "built-in photos",
            "method": method}


def _ort_prompt_variant(tmp: Path, decoder, info, limits: Limits, config: ExportConfig, bar, precision: str,
                        bound: dict) -> Variant | None:
    """The precision's ORT prompt graph (exporter.ort.decoder.PROMPT_FILES), or None with a warning
    (and no file) where it misses the bound or ONNX Runtime refuses it: prompts then run in the
    precision's decode graph."""
    from exporter.ort.decoder import PROMPT_FILES
    from exporter.ort.refusal import Refused

    try:
        return _ort_variant(tmp, decoder, info, limits, config, bar, precision, bound, prompt=True, retry=True)
    except ValidationError as exc:
        file = PROMPT_FILES[precision]
        remove_graph(tmp, file)
        log.warning("%s misses the %s bound; not written, prompts run in the %s decode graph:\n  %s", file,
                    precision, precision, exc)
        return None
    except Refused as exc:  # (the file is removed)
        log.warning("--ort-optimized: %s; not written, prompts run in the %s decode graph", exc, precision)
        return None


def _ort_variant(tmp: Path, decoder, info, limits: Limits, config: ExportConfig, bar,
                 precision: str = "fp32", bound: dict | None = None, kv: tuple[list, dict] | None = None,
                 prompt: bool = False, retry: bool = False) -> Variant:
    """The ONNX Runtime decoder of a precision (`prompt`: its prompt graph), validated against the
    PyTorch decoder unless --no-validate; `kv`: (scales, calibration record) of an INT8 KV cache
    (_ort_int8wo_variant); `retry`: a ValidationError is the caller's to handle (no error logged)."""
    from exporter.ort.decoder import DEVICES, ORT_BACKENDS, write_ort_decoder

    bar.set_postfix_str(f"ONNX Runtime-optimized {precision} {'prompt' if prompt else 'decoder'}")
    try:
        spec, report = write_ort_decoder(decoder, info, limits.max_seq_len, tmp,
                                         lambda proto, s: write_graph(proto, tmp, s, config.external_data_threshold, check=False),
                                         validate=config.validate, precision=precision, bound=bound,
                                         kv_scales=kv[0] if kv else None, prompt=prompt)
    except ValidationError:
        if not retry:
            log.error("the ONNX Runtime-optimized %s decoder differs from PyTorch; nothing was written to %s",
                      precision, config.output)
        raise
    return Variant(precision=precision, graphs={"decoder": spec}, accuracy={"decoder": report} if report else {},
                   backends=list(ORT_BACKENDS), calibration=kv[1] if kv else {},
                   devices={"decoder": list(DEVICES[precision])})


def _ort_encoders(tmp: Path, graphs: dict[str, GraphSpec], cfg, cases, config: ExportConfig, bar,
                  bound: dict, precision: str = "fp32") -> Variant | None:
    """The Variant of the fused vision / perceiver graphs of `precision` (exporter.ort.encoders),
    validated against the PyTorch modules on the export's cases unless --no-validate; None when
    none fused."""
    from exporter.ort.decoder import ORT_BACKENDS
    from exporter.ort.encoders import DEVICES, encoder_shapes, write_ort_encoders

    bar.set_postfix_str(f"ONNX Runtime-optimized {precision} vision and perceiver")
    try:
        specs, report = write_ort_encoders(tmp, graphs, encoder_shapes(cfg),
                                           lambda proto, spec: write_graph(proto, tmp, spec, config.external_data_threshold, check=False),
                                           cases, bound, precision)
    except ValidationError:
        log.error("an ONNX Runtime-optimized graph differs from PyTorch; nothing was written to %s", config.output)
        raise
    if not specs:
        log.info("--ort-optimized: no ONNX Runtime fusion applies to the vision or perceiver graph")
        return None
    return Variant(precision=precision, graphs=specs, accuracy=report, backends=list(ORT_BACKENDS),
                   devices={name: list(DEVICES[precision]) for name in specs})


def _check_output(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; choose another output path")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"{out}: exists, is not empty and is not an idefics export (no {MANIFEST_NAME}); "
            "refusing to touch it: choose another folder or empty it"
        )
    if not force:
        raise ExportError(f"{out}: already holds an export; pass --force to overwrite it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Give every file the user's usual mode: onnx (1.23) creates external data files 0600, which a
    Triton server or a colleague running as another user could not read, unlike the graph beside it."""
    mode = 0o666 & ~_umask()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def _image_token_ids(processor) -> tuple[int, ...]:
    if processor is None:
        return ()
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<image>", "<fake_token_around_image>"])
    return tuple(i for i in ids if i is not None and i != tok.unk_token_id)


def _save_processor(processor, folder: Path) -> list[str]:
    if processor is None:
        return []
    before = {p for p in folder.rglob("*") if p.is_file()}
    processor.save_pretrained(str(folder))
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in before)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("idefics-toolkit", "torch", "transformers", "onnx", "onnxruntime", "optimum", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
