"""A stand-in for the `tensorrt` module, for testing the TensorRT runner on a machine without it.

It implements the slice of the TensorRT 10/11 Python API the runner uses, with TensorRT's
contracts as its documentation states them, and computes with ONNX Runtime on CPU:
- an "engine file" is JSON naming the ONNX graph, its IO (names, dtypes, named axes), the
  optimisation profiles (min/opt/max shapes) and which inputs are shape tensors (none for the
  current graphs); `write_engine` makes one from the builder's own profile function;
- `set_input_shape` refuses shapes outside the context's profile; `get_tensor_shape` of an output
  is -1 until every input shape is set (then what shape inference gives);
- `execute_async_v3` reads every input from its raw address, runs the graph and writes every
  output to its raw address, so a wrong address, shape or profile gives wrong numbers or an error.
The runner's own logic (profile choice, binding, rebinding, host vs device buffers) is what runs.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np

__version__ = "11.0.0.fake"


class Logger:
    WARNING = 2

    def __init__(self, severity=WARNING):
        self.severity = severity


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def write_engine(path: Path, folder: Path, spec, profiles: list[dict], shape_inputs=()) -> None:
    io = [dict(name=t.name, dtype=t.dtype, shape=list(t.shape), mode="INPUT") for t in spec.inputs]
    io += [dict(name=t.name, dtype=t.dtype, shape=list(t.shape), mode="OUTPUT") for t in spec.outputs]
    path.write_text(json.dumps(dict(onnx=str(Path(folder) / spec.file), io=io, profiles=profiles,
                                    shape_inputs=list(shape_inputs))))


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            return _Engine(json.loads(data))
        except (ValueError, KeyError):
            return None  # TensorRT returns None for an engine it cannot read


class _Engine:
    def __init__(self, desc: dict):
        import onnxruntime

        self.desc = desc
        self.io = {t["name"]: t for t in desc["io"]}
        self.session = onnxruntime.InferenceSession(desc["onnx"], providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.desc["io"])

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.desc["profiles"])

    def get_tensor_name(self, i: int) -> str:
        return self.desc["io"][i]["name"]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode[self.io[name]["mode"]]

    def is_shape_inference_io(self, name: str) -> bool:
        return name in self.desc["shape_inputs"]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return self.desc["profiles"][profile][name]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.runs = 0

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(shape)
        if len(shape) != len(lo) or any(not a <= x <= b for a, x, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def _read(self, name: str, shape) -> np.ndarray:
        dtype = np.dtype(self.engine.io[name]["dtype"])
        count = int(np.prod(shape))
        if count == 0:
            return np.zeros(shape, dtype)
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype).reshape(shape).copy()

    def _output_shapes(self) -> dict[str, tuple] | None:
        """What shape inference gives for the current input shapes (None while one is unset): the
        graph run on zeros of those shapes, cached."""
        inputs = [(n, t) for n, t in self.engine.io.items() if t["mode"] == "INPUT"]
        if any(n not in self.shapes for n, _ in inputs):
            return None
        key = tuple((n, self.shapes[n]) for n, _ in inputs)
        if getattr(self, "_shape_key", None) != key:
            feed = {n: np.zeros(self.shapes[n], np.dtype(t["dtype"])) for n, t in inputs}
            outputs = self.engine.session.run(None, feed)
            self._shape_key = key
            self._shape_cache = {m.name: tuple(v.shape) for m, v in zip(self.engine.session.get_outputs(), outputs)}
        return self._shape_cache

    def get_tensor_shape(self, name: str):
        t = self.engine.io[name]
        if t["mode"] == "INPUT":
            return self.shapes.get(name, tuple(-1 if isinstance(d, str) else d for d in t["shape"]))
        shapes = self._output_shapes()
        return shapes[name] if shapes else tuple(-1 if isinstance(d, str) else d for d in t["shape"])

    def execute_async_v3(self, stream: int) -> bool:
        feed = {}
        for name, t in self.engine.io.items():
            if t["mode"] != "INPUT":
                continue
            shape = self.shapes.get(name)
            if shape is None or name not in self.addresses:
                return False  # TensorRT fails the enqueue when an input is unset
            feed[name] = self._read(name, shape)
        results = self.engine.session.run(None, feed)
        for meta, value in zip(self.engine.session.get_outputs(), results):
            expected = self.get_tensor_shape(meta.name)
            if tuple(value.shape) != tuple(expected) or meta.name not in self.addresses:
                return False
            value = np.ascontiguousarray(value, np.dtype(self.engine.io[meta.name]["dtype"]))
            ctypes.memmove(self.addresses[meta.name], value.ctypes.data, value.nbytes)
        self.runs += 1
        return True


def as_module() -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    for name in ("__version__", "Logger", "TensorIOMode", "Runtime"):
        setattr(module, name, globals()[name])
    return module
