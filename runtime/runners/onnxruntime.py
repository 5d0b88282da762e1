"""ONNX Runtime runner: one InferenceSession per graph, IO binding for bound calls."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.cpu import exact_int8
from runtime.errors import ToolkitError
from runtime.manifest import GraphSpec
from runtime.memory import buffer_info
from runtime.runners.base import BoundCall, Runner

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
        raise ToolkitError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
    return onnxruntime


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, spec: GraphSpec, path: str | Path, device: str = "cpu", threads: int | None = None,
                 spin: bool = True, stream: int = 0):
        """`stream`: on CUDA, the cudaStream_t (as an int) the loop's memory uses; ONNX Runtime runs
        on it, so its work is ordered with the loop's in-place cache writes."""
        super().__init__(spec)
        # Idle intra-op threads spin for a while after a run. Good for a graph called in a tight loop
        # (the decoder); for graphs run once per request (vision, perceiver) the spinning threads
        # would compete for the cores with the graph that runs next.
        self.spin = spin
        kind, _, index = device.partition(":")
        if kind not in PROVIDERS or (index and not index.isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.path = Path(path)
        self.device, self.device_id = kind, int(index or 0)
        self.threads = threads
        self.stream = stream
        self.session = None

    def activate_impl(self) -> None:
        ort = _ort()
        if self.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ToolkitError(
                "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider not available): "
                "pip uninstall onnxruntime && pip install onnxruntime-gpu"
            )
        options = exact_int8(ort.SessionOptions())  # INT8 products exact on CPUs without VNNI too
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN libraries of the nvidia-* wheels (e.g. PyTorch's), when present
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers())
        except Exception as exc:
            raise ToolkitError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc
        if self.device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU, with only a log line, when CUDA's libraries fail to load
            raise ToolkitError(f"{self.path}: ONNX Runtime's CUDA provider did not load (providers in use: "
                               f"{self.session.get_providers()}); onnxruntime-gpu needs the CUDA and cuDNN "
                               "libraries of its build (pip install onnxruntime-gpu[cuda,cudnn], or PyTorch's)")

    def providers(self) -> list:
        if self.device == "cpu":
            return PROVIDERS["cpu"]
        # FP32 graphs are the accuracy reference: no TF32 (FP16 graphs are the fast GPU path)
        cuda = {"device_id": self.device_id, "use_tf32": "0"}
        if self.stream:
            cuda["user_compute_stream"] = str(self.stream)
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.spec.outputs]
        return dict(zip(names, self.session.run(names, dict(feed))))

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        return _OrtBoundCall(self.session, inputs, outputs)


class _OrtBoundCall(BoundCall):
    def __init__(self, session, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        self.session = session
        self.binding = session.io_binding()
        self.keep = [*inputs.values(), *outputs.values()]  # the binding holds raw pointers into these
        for name, array in inputs.items():
            b = buffer_info(name, array)
            self.binding.bind_input(name, b.device, b.device_id, b.dtype, list(b.shape), b.address)
        for name, array in outputs.items():
            b = buffer_info(name, array)
            self.binding.bind_output(name, b.device, b.device_id, b.dtype, list(b.shape), b.address)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
