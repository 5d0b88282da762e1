"""`idefics-triton`: write a Triton model repository for an export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import ToolkitError

DESCRIPTION = """\
Write a Triton Inference Server model repository for an idefics-export output: vision,
perceiver and decoder models (ONNX Runtime graphs or TensorRT engines) with config.pbtxt
generated from the manifest, and an `idefics` model (Python backend, decoupled) that runs the
toolkit's generation loop and calls the three through BLS. Serve it with
  tritonserver --model-repository=REPO
and query it with scripts/triton_client.py.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-triton", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an idefics-export output folder")
    p.add_argument("repository", type=Path, help="model repository folder to write")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime_onnx graphs or tensorrt_plan engines (build them first with "
                        "idefics-build-engines); default: onnxruntime")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8", "int8wo"],
                   help="which graphs to serve (default: the export's default precision)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances of each model (default: 1)")
    p.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"],
                   help="where the graph models run (default: KIND_GPU)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="dynamic-batching limit of vision and perceiver (default and maximum: the export's)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="largest max_new_tokens a request may ask for (default: 256)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, metavar="N",
                   help="largest encoded image a request may send (default: 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest decoded image, width x height (default: 4096 x 4096)")
    p.add_argument("--force", action="store_true", help="replace REPOSITORY if idefics-triton wrote it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from exporter.triton import RepositoryConfig, write_repository

        config = RepositoryConfig(backend=args.backend, precision=args.precision, instances=args.instances,
                                  kind=args.kind, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                                  max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels)
        repo = write_repository(args.export, args.repository, config, force=args.force)
    except ToolkitError as exc:
        print(f"idefics-triton: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {repo}: vision, perceiver, decoder ({args.backend}), idefics (python, decoupled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
