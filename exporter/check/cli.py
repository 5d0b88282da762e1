"""`idefics-check`: a thin CLI over exporter.check.regression.run_check."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from runtime.console import console_logging
from runtime.errors import ToolkitError

DESCRIPTION = """\
Check an idefics-export output against the PyTorch model it was made from (rebuilt from the
manifest's source), or against golden results recorded earlier (no PyTorch needed).

Graph rows: every graph in every precision, on real photos, batch 2 with left padding, 1 and 2
images per row, prefill, a decode step and a decode step against a static cache; max abs error,
mean abs error and cosine similarity against the bounds of exporter.graphs.bounds.TOLERANCES
(errors relative to each output's RMS, cosine).
Generation rows: greedy generation on real-photo prompts and on text-only prompts: FP32 must
give transformers' tokens exactly; FP16/INT8 report the first divergence and must reach a share
of teacher-forced top-1 next-token agreement. When a graph fails, the first intermediate tensor
that diverges from a fresh export of the PyTorch module is named.

Exit status: 0 when every row passes, 1 when any fails, 2 when the check cannot run.
"""

EPILOG = """\
examples:
  idefics-check out/
  idefics-check out/ --save-golden golden/     # record today's outputs, tokens and versions
  idefics-check out/ --golden golden/          # later: compare with them, no PyTorch needed
  idefics-check out/ --precision fp16 --json report.json
  idefics-check out/ --device cuda                           # ONNX Runtime CUDA (onnxruntime-gpu)
  idefics-check out/ --backend tensorrt --device cuda --precision fp16   # after idefics-build-engines
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-check", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an idefics-export output folder")
    p.add_argument("--precision", action="append", choices=["fp32", "fp16", "int8", "int8wo", "int4wo"],
                   help="precision to check (repeatable; default: every precision in the export)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="runtime to check (default: onnxruntime)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    p.add_argument("--golden", type=Path, metavar="DIR", help="compare with golden results instead of PyTorch")
    p.add_argument("--save-golden", type=Path, metavar="DIR", help="record this run's outputs as golden results")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--thresholds", type=Path, metavar="FILE",
                   help='JSON overriding the bounds per precision, e.g. {"fp16": {"cosine": 0.9995}} (keys '
                        'max_rel, mean_rel, cosine, top1, check_top1; the format of idefics-export '
                        '--tolerances)')
    p.add_argument("--model", metavar="SOURCE", help="the checkpoint the export was made from, when the "
                   "manifest's source is not reachable from here (same forms as idefics-export --model)")
    p.add_argument("--no-generation", action="store_true", help="graph rows only")
    p.add_argument("--no-localise", action="store_true", help="do not search for the first diverging tensor")
    p.add_argument("--verbose", action="store_true",
                   help="the toolkit's info messages, the libraries' too, and transformers' progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # golden mode loads no PyTorch model: no transformers to import for its progress bars
    with console_logging(logging.INFO if args.verbose else logging.WARNING, verbose=args.verbose,
                         model_bars=not args.golden):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.backend == "tensorrt" and args.device != "cuda":
            raise ToolkitError("--backend tensorrt runs on an NVIDIA GPU: add --device cuda")
        from runtime.session import require_backend

        require_backend(args.backend, args.device)  # names the package to install before any work
        if args.golden and args.save_golden:
            raise ToolkitError("--golden and --save-golden are exclusive: record with PyTorch, compare later")
        from exporter.check.regression import run_check

        report = run_check(args.export, precisions=args.precision, golden=args.golden,
                           save_golden_to=args.save_golden, model=args.model, thresholds_file=args.thresholds,
                           generation=not args.no_generation, localise_failures=not args.no_localise,
                           backend=args.backend, device=args.device)
    except ToolkitError as exc:
        print(f"idefics-check: error: {exc}", file=sys.stderr)
        return 2
    notes = []
    if args.save_golden:
        notes.append(f"golden results written to {args.save_golden} (golden.json, inputs.json, outputs.json)"
                     + ("; recorded from a failing check" if not report.ok else ""))
    print(format_table(report, notes))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0 if report.ok else 1


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _cpu(described: dict) -> str:
    features = [name for name in ("avx2", "avx512f", "avx512_vnni") if described.get(name)]
    return f"{described.get('machine', '?')} ({', '.join(features) or 'none of avx2, avx512f, avx512_vnni'}), " \
           f"INT8 kernels {described.get('int8_kernels', '?')}"


def _cpu_lines(report) -> list[str]:
    """Which CPU ran the check and which validated the export: INT8 results depend on the kernel
    ONNX Runtime picks by CPU feature (runtime.cpu)."""
    lines = [f"cpu: {_cpu(report.cpu)}"] if report.cpu else []
    if report.export_cpu:
        lines.append(f"export validated on: {_cpu(report.export_cpu)}")
    return lines


def format_table(report, notes: list[str] = ()) -> str:
    """The rows ("-": no such figure for the row), localisation, `notes`, then PASS or FAIL last."""
    lines = [f"reference: {report.reference}", *_cpu_lines(report),
             f"{'kind':<10} {'prec':<6} {'graph':<9} {'case':<13} {'output':<20} {'max abs':>9} {'mean abs':>9} "
             f"{'cosine':>9} {'top-1':>6}  {'threshold':<28} ok"]
    for r in report.rows:
        lines.append(f"{r.kind:<10} {r.precision:<6} {r.graph:<9} {r.case:<13} {r.output:<20} "
                     f"{_num(r.max_abs, '9.2e'):>9} {_num(r.mean_abs, '9.2e'):>9} {_num(r.cosine, '9.6f'):>9} "
                     f"{_num(r.top1, '6.1%'):>6}  "
                     f"{r.threshold:<28} {'yes' if r.ok else 'NO'}" + (f"  ({r.note})" if r.note else ""))
    for where, hit in report.localisation.items():
        tensor = hit.get("tensor")
        lines.append(f"{where}: first diverging intermediate tensor: {tensor} "
                     f"(max abs {hit.get('max_abs_diff', float('nan')):.3g}, cosine {hit.get('cosine', float('nan')):.6f})"
                     if tensor else f"{where}: {hit.get('note')}")
    lines += notes
    failed = sum(not r.ok for r in report.rows)
    lines.append("PASS" if report.ok else f"FAIL: {failed} of {len(report.rows)} rows")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
