"""The export's end-to-end top-1 of its reduced precisions, measured again on this CPU.

    python scripts/end_to_end_top1.py out/ [--precisions int8 int8wo] [--json top1.json]
    ../shared/cpu/avx2 .venv/bin/python scripts/end_to_end_top1.py out/     # on an emulated AVX2 CPU

    # the FP32 side measured once, natively; the emulated CPU then runs only the teacher-forced reads
    python scripts/end_to_end_top1.py out/ --save-reference fp32.npz
    ../shared/cpu/avx2 .venv/bin/python scripts/end_to_end_top1.py out/ --reference fp32.npz \
        --precisions fp32 int8 int8wo

The measure is the export's own (exporter.precision.reduced.EndToEnd: the FP32 graphs generate 32 greedy
tokens for 8 real-photo prompts, each precision's graphs read that sequence teacher-forced, and
their argmax is compared with FP32's), run in this process's ONNX Runtime with the toolkit's INT8
kernels for this CPU (runtime.cpu). An export validated on one CPU kind and measured here on the
other shows whether its INT8 graphs keep their accuracy there. No PyTorch model is loaded.

Under qemu the FP32 greedy generation is most of the time (hours at random:medium), and the FP32
graphs hold no INT8 products, so `--save-reference` keeps FP32's tokens and argmax from a native run
and `--reference` reads them back (refused if they belong to another export or other prompts).
`--precisions fp32` with `--reference` then measures this CPU's FP32 against the saved one: the
near-ties that flip between two CPUs' float rounding alone, the floor under the others' figures.

`--draws N` reads each precision N more times with the photos' pixels nudged by 1e-7, as the export's
search does (exporter.precision.reduced.Agreement): another CPU's last-bit rounding moves an INT8
graph's activations across quantization steps, and a nudge does the same here, so the draws show
the spread of the figure over the CPUs an export may be served on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from exporter.precision.reduced import EndToEnd
from runtime import cpu
from runtime.manifest import Manifest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an idefics-export output folder")
    parser.add_argument("--precisions", nargs="+", help="default: every reduced precision of the export")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--prompts", type=int, default=8, metavar="N",
                        help="prompts measured (default 8, the export's own measure; fewer for an emulated CPU, "
                             "whose run takes hours per precision at random:medium: measure the native side with "
                             "the same N)")
    parser.add_argument("--save-reference", type=Path, metavar="FILE",
                        help="also write FP32's tokens and argmax to FILE (.npz) for --reference on another CPU")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each request's read as it ends (hours-long emulated runs)")
    parser.add_argument("--draws", type=int, default=0, metavar="N",
                        help="also read each precision N times with the photos nudged by 1e-7 (the export's search "
                             "does 4): the spread another CPU's rounding gives the figure (default 0)")
    parser.add_argument("--reference", type=Path, metavar="FILE",
                        help="read FP32's tokens and argmax from FILE (--save-reference) instead of generating them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("exporter").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    manifest = Manifest.load(args.export)
    precisions = args.precisions or list(manifest.variants)
    if "fp32" in precisions and args.reference is None:
        parser.error("--precisions fp32 needs --reference: FP32 against itself on one CPU is 100% by construction")
    for precision in precisions:
        manifest.graphs_for(precision)  # names a precision the export lacks
    started = time.perf_counter()
    if args.prompts < 1 or args.draws < 0:
        parser.error(f"--prompts must be at least 1 and --draws at least 0, got {args.prompts} and {args.draws}")
    measure = EndToEnd(args.export, manifest, prompts=args.prompts, reference=args.reference)
    if args.save_reference:
        measure.save_reference(args.save_reference)
    result = {"export": str(args.export), "cpu": cpu.describe(), "export_cpu": manifest.validation.get("cpu"),
              "prompts": measure.prompts, "tokens": measure.tokens, "top1": {}, "recorded_top1": {}}
    if args.draws:
        result["top1_draws"], result["recorded_top1_draws"] = {}, {}
    for precision in precisions:
        agreement = measure.agreement(manifest.graphs_for(precision), draws=args.draws)
        result["top1"][precision] = agreement.top1
        recorded = manifest.variants.get(precision)
        result["recorded_top1"][precision] = recorded.search.get("top1") if recorded else None
        if args.draws:
            result["top1_draws"][precision] = list(agreement.draws)
            result["recorded_top1_draws"][precision] = recorded.search.get("top1_draws") if recorded else None
        logging.info("%s: top-1 %.1f%%%s (%.0f s so far)", precision, 100 * agreement.top1,
                     f", nudged {', '.join(f'{d:.1%}' for d in agreement.draws)}" if args.draws else "",
                     time.perf_counter() - started)
        if args.json:  # each precision as it ends: an emulated run takes hours
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
