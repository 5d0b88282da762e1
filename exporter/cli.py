"""`idefics-export`: a thin CLI over exporter.export.export()."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from exporter.graphs.bounds import TOLERANCES
from exporter.precision.mixed import SearchBudget
from runtime.console import console_logging
from runtime.errors import ToolkitError

log = logging.getLogger("idefics-export")

DESCRIPTION = """\
Export an IDEFICS model (transformers' IdeficsForVisionText2Text) to three ONNX graphs:

  vision.onnx     pixel_values [N,3,H,W] -> image hidden states [N,S,Dv]
  perceiver.onnx  image hidden states [B,I,S,Dv] -> cross-attention key/value of every gated
                  cross-attention layer, computed once per prompt
  decoder.onnx    token ids, masks, position ids, cross K/V and past K/V -> logits and present K/V
                  (one graph for prefill and decode)

plus manifest.json (IO names, dtypes, dynamic axes, limits, versions, sha256 of every file) and
the model's processor files. Every graph is checked in ONNX Runtime against PyTorch before
anything is written; the output appears only when the export is complete.
"""

EPILOG = """\
model sources (--model):
  (omitted)                    the embedded tiny default, built offline from --seed (random weights:
                               it answers nonsense words; up to --max-seq-len 512 tokens, prompt and
                               answer together, --max-batch 8 prompts, --max-images 4 per prompt)
  random:tiny|medium|9b|80b    random weights in that shape (non-zero gates), no processor
  path/to/checkpoint           a local save_pretrained folder (config.json + weights)
  HuggingFaceM4/idefics-9b     a Hugging Face hub id (needs access to the hub)

examples:
  idefics-export out/
  idefics-export --model ./my-idefics --max-seq-len 1024 out/
  idefics-export --model random:medium --force out/
  idefics-export --fp16 --int8 --calibration-images photos/ out/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idefics-export", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", type=Path, help="folder to write the export into (created; see --force)")
    p.add_argument("--model", default=None, metavar="SOURCE",
                   help="checkpoint folder, hub id or random:PRESET (default: the embedded tiny model)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the embedded default and random:PRESET weights (default: 0)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="largest batch the export promises to serve; recorded in the manifest (default: 8)")
    p.add_argument("--max-images", type=int, default=4, metavar="N",
                   help="most images per prompt (default: 4)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="most tokens per sequence, prompt plus generated "
                        "(default: the model's max_position_embeddings, at most 2048)")
    p.add_argument("--fp16", action="store_true",
                   help="also write mixed-precision FP16 graphs (NAME.fp16.onnx): MatMul/Conv, weights, "
                        "residual stream and caches in FP16; norms, softmax and masks in FP32; "
                        f"checked against PyTorch (cosine >= {TOLERANCES['fp16']['cosine']}, errors within "
                        f"{TOLERANCES['fp16']['max_rel']:g} of each output's RMS, end-to-end top-1 >= "
                        f"{TOLERANCES['fp16']['top1'] * 100:.0f}%%); nodes that would overflow or miss the bounds stay "
                        "FP32 (see --search-rounds). The default a GPU Session loads")
    p.add_argument("--int8", action="store_true",
                   help="also write INT8 graphs (NAME.int8.onnx) with explicit symmetric Q/DQ: per-channel "
                        "weights and per-tensor activations on every weight MatMul/Conv but the lm_head, "
                        f"calibrated on real photos after SmoothQuant smoothing (cosine >= "
                        f"{TOLERANCES['int8']['cosine']}, end-to-end top-1 >= "
                        f"{TOLERANCES['int8']['top1'] * 100:.0f}%%); "
                        "MatMuls that cost accuracy stay unquantized. The GPU default without --fp16")
    p.add_argument("--int8-weight-only", action="store_true",
                   help="also write ONNX Runtime graphs (NAME.int8wo.onnx) whose weight MatMuls, lm_head "
                        "included, are INT8 MatMulNBits (symmetric, blocks of 128): the fastest CPU decode and "
                        "the default a CPU Session loads; TensorRT cannot read them")
    p.add_argument("--int4-weight-only", action="store_true",
                   help="also write ONNX Runtime graphs (NAME.int4wo.onnx) whose weight MatMuls are 4-bit "
                        "MatMulNBits (symmetric, blocks of 32, fitted per MatMul by AWQ or GPTQ on the calibration "
                        f"images; end-to-end top-1 >= {TOLERANCES['int4wo']['top1'] * 100:.0f}%%, MatMuls that "
                        "cost accuracy stay at 8 bits), and their TensorRT form NAME.int4wo.trt.onnx (INT4 weights "
                        "through opset-21 block-wise DequantizeLinear, as ModelOpt writes them): about an eighth "
                        "of the FP32 weight bytes")
    p.add_argument("--calibration-images", type=Path, default=None, metavar="DIR",
                   help="folder of images for INT8 calibration and the int8wo ORT decoder's KV cache scales "
                        "(default: the built-in scikit-image photos)")
    p.add_argument("--calibration-size", type=int, default=16, metavar="N",
                   help="number of calibration images, cycled if the folder has fewer (default: 16)")
    p.add_argument("--calibration-prompts", type=Path, default=None, metavar="FILE",
                   help="text file, one prompt per line, paired with the calibration images "
                        "(default: built-in instructions)")
    p.add_argument("--tolerances", type=Path, default=None, metavar="FILE",
                   help='JSON overriding the accuracy bounds per precision, the format of idefics-check '
                        '--thresholds: {"int8": {"top1": 0.9, "max_rel": 1.5}} (keys max_rel, mean_rel: '
                        'max and mean abs error over the output\'s RMS; cosine; top1: end-to-end '
                        'teacher-forced top-1 agreement with FP32)')
    p.add_argument("--search-rounds", type=int, default=SearchBudget.rounds, metavar="N",
                   help="mixed-precision search: at most N rounds of keeping the nodes that cost accuracy at "
                        "the higher precision and measuring again, per precision (default: "
                        f"{SearchBudget.rounds}; 0: no search, the bounds must hold as converted)")
    p.add_argument("--search-nodes", type=int, default=SearchBudget.nodes, metavar="N",
                   help=f"mixed-precision search: at most N nodes kept per graph (default: {SearchBudget.nodes})")
    p.add_argument("--engines", action="store_true",
                   help="then build TensorRT engines from the FP16 (or INT8) graphs, as idefics-build-engines "
                        "does (needs TensorRT and an NVIDIA GPU; checked before exporting)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it already holds an export (never touches other folders)")
    p.add_argument("--ort-optimized", action="store_true",
                   help="also write ONNX Runtime-only graphs: a decoder (decoder.ort.onnx) with "
                        "GroupQueryAttention over one shared past/present buffer per layer with per-row lengths, "
                        "rotary inside, fused RMSNorms, and the vision graph with "
                        "onnxruntime.transformers' fusions (vision.ort.onnx); each validated against PyTorch like "
                        "every graph. With --fp16 also their FP16 twins (NAME.ort.fp16.onnx: the CUDA decoder), "
                        "with --int8-weight-only decoder.ort.int8wo.onnx (MatMulNBits and an INT8 KV cache whose "
                        "per-channel scales are calibrated on the calibration images and prompts) and, for what "
                        "runs once per request, INT8 products on the CPU's AMX / VNNI units: "
                        "decoder.ort.int8wo.prompt.onnx (per-token INT8 activations, the prompt's K/V quantized "
                        "into that cache) and vision / perceiver.ort.int8wo.onnx (dynamic INT8); with --int8 "
                        "decoder.ort.int8.onnx (the CPU's: quantized as the portable INT8 decoder is, its smoothing "
                        "and kept MatMuls, FP32 cache; left out with a warning where it misses the int8 bound). "
                        "Each is run in ONNX Runtime as it is written: one that ONNX Runtime refuses to load or "
                        "run (GroupQueryAttention's head size, for one) is left out with a warning naming the op and "
                        "ONNX Runtime's reason; the portable graphs serve instead")
    p.add_argument("--external-data-threshold", type=int, default=None, metavar="BYTES",
                   help="keep a graph's weights in NAME.onnx.data beside it when they pass BYTES (default: "
                        "just under 2 GB, protobuf's limit; 0: always)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="write the graphs layer by layer from the checkpoint's tensors (safetensors read tensor by "
                        "tensor; random:PRESET weights written once as bf16 shards, random:80b made on the fly): "
                        "memory follows one layer, not the model; each layer is validated against transformers' "
                        "own layer fed the reference hidden states of the one before. Writes only the precisions "
                        "asked for (FP32 when none; --fp32 adds it): FP32, --fp16 (the FP16 rule and each layer's overflow "
                        "nodes, without the accuracy search), --int8 (SmoothQuant and Q/DQ per layer, calibrated on a "
                        "built-in prefill: not --calibration-images / --calibration-prompts), --int8-weight-only, "
                        "--int4-weight-only (AWQ / GPTQ per layer, without the 8-bit search); not --ort-optimized. Default: on where the model would not fit in memory whole "
                        "(random:9b, random:80b); --no-stream refuses instead")
    p.add_argument("--fp32", action="store_true",
                   help="with --stream and a reduced precision: also write the FP32 graphs (a whole-model export "
                        "always writes them)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the ONNX Runtime vs PyTorch check (not recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no report: warnings and errors only")
    p.add_argument("--verbose", action="store_true",
                   help="also the export's steps (search rounds, calibration, caches), the nodes kept at higher "
                        "precision and why, the accuracy of every output, and the libraries' own messages and "
                        "progress bars (default: the progress bar, the report's summary, and warnings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the default console: the progress bar, the report and warnings; the steps only with --verbose
    level = logging.DEBUG if args.verbose else logging.WARNING
    with console_logging(level, verbose=args.verbose, quiet=args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        from exporter.export import ExportConfig, export  # heavy imports after --help

        if args.engines:
            from exporter.engines.build import EngineError, require_tensorrt

            require_tensorrt()  # before minutes of export, not after
            if not (args.fp16 or args.int8):
                raise EngineError("--engines builds from reduced-precision graphs: add --fp16 or --int8")

        config = ExportConfig(
            output=args.output, model=args.model, seed=args.seed, opset=args.opset,
            max_batch=args.max_batch, max_images=args.max_images, max_seq_len=args.max_seq_len,
            force=args.force, validate=not args.no_validate, progress=not args.quiet,
            stream=args.stream, fp32=args.fp32,
            ort_optimized=args.ort_optimized,
            precisions=tuple(p for p, flag in (("fp16", args.fp16), ("int8", args.int8),
                                               ("int8wo", args.int8_weight_only),
                                               ("int4wo", args.int4_weight_only)) if flag),
            calibration_images=args.calibration_images, calibration_size=args.calibration_size,
            calibration_prompts=args.calibration_prompts, tolerances=args.tolerances,
            search=_budget(args.search_rounds, args.search_nodes),
            **({} if args.external_data_threshold is None
               else {"external_data_threshold": args.external_data_threshold}),
        )
        manifest = export(config)
        if args.engines:
            from exporter.engines.build import BuildConfig, build_engines

            build_engines(args.output, BuildConfig(precision="fp16" if args.fp16 else "int8"))
    except ToolkitError as exc:
        print(f"idefics-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idefics-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"idefics-export: export written to {args.output}", file=sys.stderr)  # beside the bar
        print(format_report(manifest, every_output=args.verbose))
    return 0


def _budget(rounds: int, nodes: int) -> SearchBudget:
    try:
        return SearchBudget(rounds=rounds, nodes=nodes)
    except ValueError as exc:
        raise ToolkitError(f"--search-rounds / --search-nodes: {exc}") from exc


def format_report(manifest, every_output: bool = False) -> str:
    """What was exported (the --ort-optimized graphs included), its limits, which precision a
    Session loads where, and the accuracy against PyTorch: the worst output of each graph and case
    (one screen), or every output and every node kept at higher precision (`every_output`)."""
    from runtime.manifest import default_precision

    precisions = ", ".join([*(["fp32"] if manifest.wrote("fp32") else []), *manifest.variants])
    cpu, gpu = default_precision(manifest, "onnxruntime", "cpu"), default_precision(manifest, "tensorrt", "cuda")
    limits = manifest.limits
    lines = [f"exported {', '.join(manifest.graphs)} ({precisions}; opset {manifest.opset}); "
             f"a Session loads {cpu} on the CPU, {gpu} on a GPU by default"]
    if manifest.ort_optimized:
        lines.append("ONNX Runtime-optimized graphs (--ort-optimized): " + "; ".join(
            f"{precision} {', '.join(spec.file for spec in variant.graphs.values())}"
            for precision, variant in manifest.ort_optimized.items()))
    lines.append(f"limits: {limits.max_seq_len} tokens (prompt and answer together), batch {limits.max_batch}, "
                 f"{limits.max_images} images per prompt (--max-seq-len, --max-batch, --max-images)")
    if manifest.streamed:
        return "\n".join(lines + _piece_lines(manifest, every_output))
    report = manifest.validation.get("report")
    if not report:
        lines.append("validation skipped (--no-validate)")
    reports = {"fp32": report, **{p: v.accuracy for p, v in manifest.variants.items()}}
    if every_output:
        for precision, part in reports.items():
            if part:
                lines += _report_lines(precision, part)
        return "\n".join(lines + _search_lines(manifest))
    lines += _summary_lines({p: part for p, part in reports.items() if part})
    return "\n".join(lines + _search_lines(manifest, every_node=False))


def _piece_lines(manifest, every_piece: bool) -> list[str]:
    """A streamed export's per-piece validation: the table (`every_piece`), else the worst piece of
    each graph and precision."""
    from exporter.stream.writer import format_table

    table = manifest.validation.get("pieces")
    if not table:
        return ["exported layer by layer (--stream); validation skipped (--no-validate)"]
    head = "exported layer by layer (--stream); each piece against transformers' own, fed PyTorch's outputs of the one before"
    if every_piece:
        return [head + ":", format_table(table)]
    worst = {}
    for row in table:
        key = (row["graph"], row["precision"])
        if key not in worst or (not row["ok"], row["max_rel"]) > (not worst[key]["ok"], worst[key]["max_rel"]):
            worst[key] = row
    return [head + "; the worst piece of each graph (--verbose: every piece):", format_table(list(worst.values()))]


def _search_lines(manifest, every_node: bool = True) -> list[str]:
    """Per variant: the end-to-end top-1, and the nodes kept at higher precision and why (a table
    with `every_node`, else their count)."""
    from exporter.precision.mixed import format_kept

    lines = []
    for precision, variant in manifest.variants.items():
        search = variant.search
        if not search:
            continue
        top1 = search.get("top1")
        draws = search.get("top1_draws") or []  # the spread another CPU's rounding gives (reduced.Agreement)
        spread = (f" in each read; {len(draws)} more with the photos nudged, as another CPU rounds: "
                  f"{min(draws):.1%}-{max(draws):.1%}") if draws else ""
        figure = "-" if top1 is None else f"{top1:.1%} (min {search['bound']['top1']:.0%}{spread})"
        line = f"{precision}: end-to-end top-1 vs fp32 {figure}; search rounds {search['rounds']} of {search['budget']['rounds']}"
        if every_node:
            lines += [line, format_kept(variant.kept_nodes)]
        else:
            searched = sum(k["reason"] != "rule" for items in variant.kept_nodes.values() for k in items)
            lines.append(f"{line}; {searched} node(s) kept at higher precision for overflow or accuracy "
                         "(--verbose: which and why)")
    return lines


def _summary_lines(reports: dict[str, dict]) -> list[str]:
    """One row per precision, graph and case: its worst output (largest max abs diff against its
    limit) and the lowest cosine of its outputs."""
    if not reports:
        return []
    lines = ["accuracy vs PyTorch fp32, worst output of each graph and case (--verbose: every output):",
             f"{'prec':<6} {'graph':<10} {'case':<13} {'outputs':>7}  {'worst output':<20} {'max abs diff':>12} "
             f"{'limit':>9} {'min cosine':>11}  ok"]
    for precision, report in reports.items():
        for graph, cases in report.items():
            for case, outputs in cases.items():
                name, worst = max(outputs.items(), key=lambda kv: kv[1]["max_abs_diff"] / max(kv[1]["limit"], 1e-30))
                cosine = min(r["cosine"] for r in outputs.values())
                ok = all(r["ok"] for r in outputs.values())
                lines.append(f"{precision:<6} {graph:<10} {case:<13} {len(outputs):>7}  {name:<20} "
                             f"{worst['max_abs_diff']:>12.3e} {worst['limit']:>9.1e} {cosine:>11.6f}  "
                             f"{'yes' if ok else 'NO'}")
    return lines


def _report_lines(precision: str, report: dict) -> list[str]:
    from exporter.graphs.comparison import summarize

    lines = [f"{precision} vs PyTorch fp32:"]
    if report:
        lines.append(f"{'graph':<10} {'case':<13} {'output':<22} {'max abs diff':>12} {'limit':>10} {'cosine':>10}  ok")
        for graph, case, name, diff, limit, cos, ok in summarize(report):
            lines.append(f"{graph:<10} {case:<13} {name:<22} {diff:>12.3e} {limit:>10.1e} {cos:>10.6f}  "
                         f"{'yes' if ok else 'NO'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
