"""`idefics-export`: a thin CLI over exporter.export.export()."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from exporter.precision import TOLERANCES
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
  (omitted)                    the embedded tiny default, built offline from --seed
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
                        f"checked against PyTorch (cosine >= {TOLERANCES['fp16']['cosine']}). "
                        "Becomes the default a Session loads")
    p.add_argument("--int8", action="store_true",
                   help="also write INT8 graphs (NAME.int8.onnx) with explicit symmetric Q/DQ: per-channel "
                        "weights and per-tensor activations on every weight MatMul/Conv but the lm_head, "
                        f"calibrated on real photos (cosine >= {TOLERANCES['int8']['cosine']})")
    p.add_argument("--int8-weight-only", action="store_true",
                   help="also write ONNX Runtime graphs (NAME.int8wo.onnx) whose weight MatMuls, lm_head "
                        "included, are INT8 MatMulNBits (symmetric, blocks of 32): the fastest CPU decode; "
                        "TensorRT cannot read them")
    p.add_argument("--calibration-images", type=Path, default=None, metavar="DIR",
                   help="folder of images for INT8 calibration (default: the built-in scikit-image photos)")
    p.add_argument("--calibration-size", type=int, default=16, metavar="N",
                   help="number of calibration images, cycled if the folder has fewer (default: 16)")
    p.add_argument("--calibration-prompts", type=Path, default=None, metavar="FILE",
                   help="text file, one prompt per line, paired with the calibration images "
                        "(default: built-in instructions)")
    p.add_argument("--engines", action="store_true",
                   help="then build TensorRT engines from the FP16 (or INT8) graphs, as idefics-build-engines "
                        "does (needs TensorRT and an NVIDIA GPU; checked before exporting)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it already holds an export (never touches other folders)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the ONNX Runtime vs PyTorch check (not recommended)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from exporter.export import ExportConfig, export  # heavy imports after --help

        if args.engines:
            from exporter.engines import EngineError, require_tensorrt

            require_tensorrt()  # before minutes of export, not after
            if not (args.fp16 or args.int8):
                raise EngineError("--engines builds from reduced-precision graphs: add --fp16 or --int8")

        config = ExportConfig(
            output=args.output, model=args.model, seed=args.seed, opset=args.opset,
            max_batch=args.max_batch, max_images=args.max_images, max_seq_len=args.max_seq_len,
            force=args.force, validate=not args.no_validate, progress=not args.quiet,
            precisions=tuple(p for p, flag in (("fp16", args.fp16), ("int8", args.int8),
                                               ("int8wo", args.int8_weight_only)) if flag),
            calibration_images=args.calibration_images, calibration_size=args.calibration_size,
            calibration_prompts=args.calibration_prompts,
        )
        manifest = export(config)
        if args.engines:
            from exporter.engines import BuildConfig, build_engines

            build_engines(args.output, BuildConfig(precision="fp16" if args.fp16 else "int8"))
    except ToolkitError as exc:
        print(f"idefics-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idefics-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(format_report(manifest))
    return 0


def format_report(manifest) -> str:
    precisions = ", ".join(["fp32", *manifest.variants])
    lines = [f"exported {', '.join(manifest.graphs)} ({precisions}; default {manifest.precision}; opset {manifest.opset})"]
    report = manifest.validation.get("report")
    lines += _report_lines("fp32", report) if report else ["validation skipped (--no-validate)"]
    for precision, variant in manifest.variants.items():
        lines += _report_lines(precision, variant.accuracy)
    return "\n".join(lines)


def _report_lines(precision: str, report: dict) -> list[str]:
    from exporter.comparison import summarize

    lines = [f"{precision} vs PyTorch fp32:"]
    if report:
        lines.append(f"{'graph':<10} {'case':<13} {'output':<22} {'max abs diff':>12} {'limit':>10} {'cosine':>10}  ok")
        for graph, case, name, diff, limit, cos, ok in summarize(report):
            lines.append(f"{graph:<10} {case:<13} {name:<22} {diff:>12.3e} {limit:>10.1e} {cos:>10.6f}  "
                         f"{'yes' if ok else 'NO'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
