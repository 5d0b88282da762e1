"""`idefics-triton`: write a Triton model repository for an export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import ToolkitError

DESCRIPTION = """\
Write a Triton Inference Server model repository for an idefics-export output: an `idefics`
model (Python backend, decoupled) that runs the toolkit's in-flight batching engine and streams
tokens as they come, with every config.pbtxt generated from the manifest. By default
(--graphs inprocess) the graphs run inside that model's process, with the caches in device
memory; --graphs bls adds vision, perceiver and decoder models (ONNX Runtime graphs or TensorRT
engines) that it calls through BLS, and --graphs bls-python writes those as Python models
running ONNX Runtime (for servers without the onnxruntime backend, such as nvidia-pytriton's).
Serve it with
  idefics-serve REPO          (or tritonserver --model-repository=REPO in NVIDIA's container)
and query it with scripts/triton_client.py; REPO/README.txt says how.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-triton", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an idefics-export output folder")
    p.add_argument("repository", type=Path, help="model repository folder to write")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="onnxruntime_onnx graphs or tensorrt_plan engines (build them first with "
                        "idefics-build-engines); default: onnxruntime")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8", "int8wo", "int4wo"],
                   help="which graphs to serve (default: the export's default precision)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances of each model (default: 1)")
    p.add_argument("--graphs", default="inprocess", choices=["inprocess", "bls", "bls-python"],
                   help="where the graphs run: inside the idefics model (default), or in graph models it "
                        "calls through BLS (bls: onnxruntime/tensorrt models; bls-python: Python models "
                        "running ONNX Runtime)")
    p.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"],
                   help="where the graphs run: KIND_GPU (default; in-process: the idefics instance's GPU, "
                        "onnxruntime-gpu or TensorRT) or KIND_CPU (ONNX Runtime on the CPU)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="request rows in flight in the idefics model, and the dynamic-batching limit of "
                        "the BLS vision and perceiver models (default and maximum: the export's)")
    p.add_argument("--max-queued", type=int, default=64, metavar="N",
                   help="requests waiting for rows; past it a request gets an error at once (default: 64)")
    p.add_argument("--image-cache-bytes", type=int, default=256 * 2**20, metavar="N",
                   help="bound of the cache of images' cross-attention K/V across requests; 0 turns it off "
                        "(default: 256 MiB)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="largest max_new_tokens a request may ask for (default: 256)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, metavar="N",
                   help="largest encoded image a request may send (default: 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest decoded image, width x height (default: 4096 x 4096)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="run a joining request in pieces between the running streams' decode steps: each "
                        "image's vision and perceiver, then the prompt N tokens at a time (default: off, the whole "
                        "join at once; measured on the CPU: lower inter-token p95, lower throughput, see the docs' "
                        "performance page)")
    p.add_argument("--force", action="store_true", help="replace REPOSITORY if idefics-triton wrote it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from exporter.triton.repository import RepositoryConfig, write_repository

        config = RepositoryConfig(backend=args.backend, precision=args.precision, instances=args.instances,
                                  kind=args.kind, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                                  max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                                  graphs=args.graphs, max_queued=args.max_queued,
                                  image_cache_bytes=args.image_cache_bytes, prefill_chunk=args.prefill_chunk)
        repo = write_repository(args.export, args.repository, config, force=args.force)
    except ToolkitError as exc:
        print(f"idefics-triton: error: {exc}", file=sys.stderr)
        return 2
    models = "idefics (python, decoupled, graphs in-process)" if args.graphs == "inprocess" else \
        f"idefics (python, decoupled) + vision, perceiver, decoder ({'python' if args.graphs == 'bls-python' else args.backend}, BLS)"
    print(f"wrote {repo}: {models}; serve it with: idefics-serve {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
