"""TensorRT engine files: where they live, what is recorded beside them, and whether one may be loaded.

Shared by the builder (exporter.engines.build) and the runner (runtime.runners.tensorrt); needs neither
TensorRT nor a GPU except `require_tensorrt` / `gpu_identity`, which import them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import ToolkitError

ENGINE_DIR = "engines"


class EngineError(ToolkitError):
    """An engine cannot be built or loaded (TensorRT missing, wrong precision, built elsewhere)."""


@dataclass
class EngineInfo:
    graph: str
    precision: str
    onnx_file: str
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str  # e.g. "9.0"
    device: str
    profiles: list[dict[str, list[list[int]]]] = field(default_factory=list)
    built: str = ""


# ---------------------------------------------------------------- metadata and compatibility
def engine_paths(folder: Path, graph: str, precision: str) -> tuple[Path, Path]:
    # not Path.with_suffix: "vision.fp16" would lose its ".fp16" and every precision share one file
    folder = Path(folder) / ENGINE_DIR
    return folder / f"{graph}.{precision}.engine", folder / f"{graph}.{precision}.json"


def check_compatible(info: EngineInfo, onnx_sha256: str, tensorrt_version: str, compute_capability: str) -> None:
    """Refuse an engine built for another graph, TensorRT or GPU, saying to rebuild."""
    problems = []
    if info.onnx_sha256 != onnx_sha256:
        problems.append(f"it was built from another {info.onnx_file} (sha256 {info.onnx_sha256[:12]}, "
                        f"now {onnx_sha256[:12]})")
    if info.tensorrt_version != tensorrt_version:
        problems.append(f"it was built with TensorRT {info.tensorrt_version}, this is {tensorrt_version}")
    if info.compute_capability != compute_capability:
        problems.append(f"it was built for compute capability {info.compute_capability} ({info.device}), "
                        f"this GPU is {compute_capability}")
    if problems:
        raise EngineError(f"engine {info.graph}.{info.precision}: " + "; ".join(problems)
                          + ". Rebuild it: idefics-build-engines <export folder>")


def read_info(path: Path) -> EngineInfo:
    try:
        return EngineInfo(**json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise EngineError(f"{path}: unreadable engine metadata ({exc}); rebuild with idefics-build-engines") from exc


def require_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(
            "TensorRT is not installed: pip install tensorrt (needs an NVIDIA GPU and driver); "
            "ONNX Runtime needs no engines"
        ) from exc
    return tensorrt


def gpu_identity(device: str = "cuda") -> tuple[str, str]:
    """(compute capability "major.minor", device name) of a CUDA device (through PyTorch)."""
    try:
        import torch
    except ImportError as exc:
        raise EngineError("TensorRT engines need PyTorch with CUDA for device memory: pip install torch") from exc
    if not torch.cuda.is_available():
        raise EngineError("no CUDA device: TensorRT engines are built on, and run on, an NVIDIA GPU")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}", torch.cuda.get_device_name(device)
