"""`idefics-build-engines`: TensorRT engines for an existing export."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from runtime.console import console_logging
from runtime.errors import ToolkitError

DESCRIPTION = """\
Build one TensorRT engine per graph of an idefics-export output, from its strongly typed FP16 or
INT8 ONNX graphs (TensorRT 11 reads precision from the graphs; no precision flags are set).
Optimisation profiles come from the manifest's limits (batch, images, sequence); the decoder gets
a prefill-shaped and a decode-shaped profile. Engines go to EXPORT/engines/ with a JSON beside
each recording the TensorRT version, the GPU's compute capability and the ONNX file's sha256;
an engine built for another TensorRT, GPU or graph is refused at load with a message to rebuild.
Needs TensorRT and an NVIDIA GPU (the engine is specific to the GPU it is built on).
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 8G or 512M, got {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-build-engines", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an idefics-export output folder")
    p.add_argument("--precision", default=None, choices=["fp16", "int8", "fp32"],
                   help="which graphs to build (default: what a TensorRT Session loads, fp16, else int8); "
                        "fp32 engines are the accuracy reference on the GPU")
    p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE",
                   help="builder workspace limit, e.g. 8G (default: TensorRT's)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                   help="timing cache to load and update (default: EXPORT/engines/timing.cache)")
    p.add_argument("--verbose", action="store_true",
                   help="the toolkit's debug messages and the libraries' (Polygraphy's, TensorRT's) info messages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console_logging(logging.DEBUG if args.verbose else logging.INFO, verbose=args.verbose, model_bars=False):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        from exporter.engines.build import BuildConfig, build_engines
        from runtime.manifest import Manifest, default_precision

        precision = args.precision
        if precision is None:  # what Session(backend="tensorrt") loads; without fp16/int8, --fp16 is named
            default = default_precision(Manifest.load(args.export), "tensorrt", "cuda")
            precision = default if default in ("fp16", "int8") else "fp16"
        infos = build_engines(args.export, BuildConfig(precision, args.memory_limit, args.timing_cache))
    except ToolkitError as exc:
        print(f"idefics-build-engines: error: {exc}", file=sys.stderr)
        return 2
    for info in infos:
        print(f"{info.graph}.{info.precision}.engine: TensorRT {info.tensorrt_version}, "
              f"compute capability {info.compute_capability} ({info.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
