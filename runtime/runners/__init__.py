"""Runners: one interface over ONNX Runtime and PyTorch (the reference); TensorRT next."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import GraphSpec
from runtime.runners.base import BoundCall, Runner

BACKENDS = ("onnxruntime", "torch")


def create_runner(backend: str, spec: GraphSpec, folder: str | Path, device: str = "cpu",
                  threads: int | None = None, hot: bool = True) -> Runner:
    """`hot`: the graph runs in a tight loop (the decoder), so its idle threads may spin."""
    if backend == "onnxruntime":
        from runtime.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, Path(folder) / spec.file, device=device, threads=threads, spin=hot)
    if backend == "torch":
        raise ValueError("backend='torch' runners wrap PyTorch modules: use runtime.runners.torch.TorchRunner")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


__all__ = ["BoundCall", "Runner", "create_runner", "BACKENDS"]
