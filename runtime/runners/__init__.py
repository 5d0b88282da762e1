"""Runners: one interface over ONNX Runtime, TensorRT and PyTorch (the reference)."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import GraphSpec, Manifest
from runtime.runners.base import BoundCall, Runner

BACKENDS = ("onnxruntime", "tensorrt", "torch")


def create_runner(backend: str, spec: GraphSpec, folder: str | Path, device: str = "cpu",
                  threads: int | None = None, hot: bool = True, stream: int = 0,
                  manifest: Manifest | None = None) -> Runner:
    """`hot`: the graph runs in a tight loop (the decoder), so its idle threads may spin.
    `stream`: the CUDA stream (cudaStream_t as an int) the loop's device memory uses."""
    if backend == "onnxruntime":
        from runtime.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, Path(folder) / spec.file, device=device, threads=threads, spin=hot,
                                 stream=stream)
    if backend == "tensorrt":
        from runtime.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(spec, folder, manifest or Manifest.load(folder), device=device, stream=stream)
    if backend == "torch":
        raise ValueError("backend='torch' runners wrap PyTorch modules: use runtime.runners.torch.TorchRunner")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BoundCall", "Runner", "create_runner", "BACKENDS"]
