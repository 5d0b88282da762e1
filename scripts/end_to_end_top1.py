"""The export's end-to-end top-1 of its reduced precisions, measured again on this CPU.

    python scripts/end_to_end_top1.py out/ [--precisions int8 int8wo] [--json top1.json]
    ../shared/cpu/avx2 .venv/bin/python scripts/end_to_end_top1.py out/     # on an emulated AVX2 CPU

The measure is the export's own (exporter.precision.reduced.EndToEnd: the FP32 graphs generate 32 greedy
tokens for 8 real-photo prompts, each precision's graphs read that sequence teacher-forced, and
their argmax is compared with FP32's), run in this process's ONNX Runtime with the toolkit's INT8
kernels for this CPU (runtime.cpu). An export validated on one CPU kind and measured here on the
other shows whether its INT8 graphs keep their accuracy there. No PyTorch model is loaded.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.export)
    precisions = args.precisions or list(manifest.variants)
    for precision in precisions:
        manifest.graphs_for(precision)  # names a precision the export lacks
    started = time.perf_counter()
    measure = EndToEnd(args.export, manifest)
    result = {"export": str(args.export), "cpu": cpu.describe(), "export_cpu": manifest.validation.get("cpu"),
              "prompts": measure.prompts, "tokens": measure.tokens, "top1": {}, "recorded_top1": {}}
    for precision in precisions:
        result["top1"][precision] = measure.top1(manifest.graphs_for(precision))
        result["recorded_top1"][precision] = manifest.variants[precision].search.get("top1")
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
