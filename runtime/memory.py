"""Where the generation loop's buffers live: host numpy arrays, or PyTorch tensors on a device.

The loop allocates every buffer it binds (KV cache, cross K/V, logits, ids) through a `Memory`, so
on a GPU the caches stay in device memory and are written in place there; runners bind them by
address (ONNX Runtime IO binding, TensorRT tensor addresses). Both kinds index and assign alike
(`cache[:, :, s] = step[:, :, 0]` runs on the device for tensors), so the loop has one code path.

- `HostMemory`: numpy; the CPU default, needs nothing beyond numpy.
- `TorchMemory(device)`: torch tensors on `device` and, on CUDA, one stream that every device
  operation, ONNX Runtime's CUDA provider and TensorRT's `execute_async_v3` share. PyTorch is the
  device-memory library here (it is on every GPU host this toolkit targets); on "cpu" it runs the
  very code path the GPU takes, which is how the tests check it without a GPU.

Two kinds of data cross to the host per decode step: the sampled token ids (always) and the
logits (only when a processor or sampling needs them; plain greedy takes the argmax on the device).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import ToolkitError


@dataclass(frozen=True)
class BufferInfo:
    """What a runner needs to bind a buffer: where it is, its dtype, shape and address."""

    device: str  # "cpu" or "cuda"
    device_id: int
    dtype: np.dtype
    shape: tuple[int, ...]
    address: int


def is_host(array: Any) -> bool:
    return isinstance(array, np.ndarray)


def buffer_info(name: str, array: Any) -> BufferInfo:
    """Describe a numpy array or torch tensor for binding; refuses non-contiguous buffers."""
    if isinstance(array, np.ndarray):
        if not array.flags.c_contiguous:
            raise ValueError(f"{name}: bound buffers must be C-contiguous")
        return BufferInfo("cpu", 0, array.dtype, tuple(array.shape), array.ctypes.data)
    if hasattr(array, "data_ptr") and hasattr(array, "is_contiguous"):  # torch.Tensor
        if not array.is_contiguous():
            raise ValueError(f"{name}: bound buffers must be contiguous")
        device = array.device
        return BufferInfo(device.type, device.index or 0, _numpy_dtype(array.dtype), tuple(array.shape),
                          array.data_ptr())
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(array).__name__}")


def assign(destination: Any, value: Any) -> None:
    """destination[...] = value for numpy/torch on either side (a host value is copied over)."""
    if isinstance(destination, np.ndarray):
        np.copyto(destination, value if isinstance(value, np.ndarray) else value.detach().cpu().numpy())
    else:
        import torch

        destination.copy_(torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value)


class HostMemory:
    """numpy buffers in host memory (ONNX Runtime CPU, PyTorch CPU)."""

    device = "cpu"
    stream_handle = 0  # no stream

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def argmax(self, array: np.ndarray) -> np.ndarray:
        return np.argmax(array, axis=-1).astype(np.int64)

    def copy(self, array: np.ndarray) -> np.ndarray:
        return array.copy()

    def index(self, indices: np.ndarray) -> np.ndarray:
        """Host integer indices, ready to index this memory's arrays (x[rows, :, slots])."""
        return np.asarray(indices, np.int64)

    def quantize_int8(self, array: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Symmetric INT8 of `array` with `scale` (broadcast): clip(round(x / scale), -128, 127), as
        GroupQueryAttention writes its INT8 cache."""
        return np.clip(np.rint(array / scale), -128, 127).astype(np.int8)

    def scope(self):
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass


class TorchMemory:
    """torch tensors on `device` ("cpu", "cuda", "cuda:1"); on CUDA, one stream for all work."""

    def __init__(self, device: str = "cuda"):
        try:
            import torch
        except ImportError as exc:
            raise ToolkitError(f"device={device!r} keeps the loop's buffers in PyTorch tensors: "
                               "pip install torch (a CUDA build for GPUs)") from exc
        self.torch = torch
        self.device = torch.device(device)
        self.stream = None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ToolkitError(f"device={device!r}: PyTorch sees no CUDA device (torch {torch.__version__}, "
                                   f"built for CUDA {torch.version.cuda}); install a CUDA build of torch and "
                                   "check the NVIDIA driver (nvidia-smi)")
            self.stream = torch.cuda.Stream(device=self.device)

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    # Every operation runs on the memory's stream (scope()), whoever calls it: a zero-fill or copy
    # on the default stream would not be ordered with the runners' work on this one.
    def zeros(self, shape, dtype):
        shape = tuple(shape)
        with self.scope():
            if 0 in shape:  # an empty tensor may have a null address, which runners reject: view a real one
                return self.torch.zeros(1, dtype=_torch_dtype(dtype), device=self.device)[:0].view(shape)
            return self.torch.zeros(shape, dtype=_torch_dtype(dtype), device=self.device)

    def from_host(self, array: np.ndarray):
        if array.size == 0:
            return self.zeros(array.shape, array.dtype)
        with self.scope():
            return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_host(self, tensor) -> np.ndarray:
        with self.scope():
            return tensor.detach().cpu().numpy()  # waits for the stream's work on `tensor`

    def argmax(self, tensor) -> np.ndarray:
        with self.scope():
            return self.to_host(tensor.argmax(dim=-1)).astype(np.int64, copy=False)

    def copy(self, tensor):
        with self.scope():
            return tensor.clone()

    def index(self, indices: np.ndarray):
        with self.scope():
            return self.torch.from_numpy(np.asarray(indices, np.int64)).to(self.device)

    def quantize_int8(self, tensor, scale: np.ndarray):
        with self.scope():
            scale = self.torch.from_numpy(np.ascontiguousarray(scale)).to(self.device, tensor.dtype)
            return self.torch.clamp(self.torch.round(tensor / scale), -128, 127).to(self.torch.int8)

    def scope(self):
        return self.torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def memory_for(device: str) -> HostMemory | TorchMemory:
    """Host numpy for "cpu"; torch tensors on the GPU otherwise."""
    return HostMemory() if device == "cpu" else TorchMemory(device)


# dtypes named alike in numpy and torch, the ones graphs take
_DTYPES = frozenset({"float32", "float16", "int64", "int32", "bool", "int8", "uint8"})


def _torch_dtype(dtype):
    import torch

    return getattr(torch, np.dtype(dtype).name)


def _numpy_dtype(torch_dtype) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"tensor dtype {torch_dtype} has no numpy equivalent for binding")
    return np.dtype(name)
