"""TensorRT runner: one engine per graph, inputs and outputs bound by address, one CUDA stream.

Written against the TensorRT 10/11 Python API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`). The engine beside the export (`engines/<graph>.<precision>.engine`) is loaded
only after its metadata matches this TensorRT, this GPU and the manifest's sha256 of the ONNX
file it was built from (else an EngineError saying to rebuild).

- One execution context per optimisation profile (the decoder has a prefill-shaped profile 0 and
  a decode-shaped profile 1); a bound call picks the first profile whose ranges hold its shapes.
- Every input and output is bound to device memory, the loop's own buffers (KV cache written in
  place, no copies). The graphs have no shape-tensor inputs and no data-dependent output shapes
  (the decoder's logits length comes from the *shape* of `logits_positions`), so output shapes
  are known once input shapes are set and no output allocator is needed.
- `infer` (host arrays in and out) copies through temporary device tensors, as Polygraphy's
  TrtRunner does; the generation loop uses `bind`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.engines import EngineError, check_compatible, engine_paths, gpu_identity, read_info, require_tensorrt
from runtime.manifest import GraphSpec, Manifest, sha256_file
from runtime.memory import TorchMemory, buffer_info
from runtime.runners.base import BoundCall, Runner


def precision_of(manifest: Manifest, spec: GraphSpec) -> str:
    """The precision whose graphs include `spec`'s file."""
    for precision in ("fp32", *manifest.variants):
        if any(g.file == spec.file for g in manifest.graphs_for(precision).values()):
            return precision
    raise EngineError(f"{spec.file} is not a graph of this export's manifest")


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, spec: GraphSpec, folder: str | Path, manifest: Manifest, device: str = "cuda",
                 stream: int = 0):
        """`stream`: the cudaStream_t (as an int) the loop's memory works on; 0 uses a stream of the
        runner's own. `device` is where bound buffers must live."""
        super().__init__(spec)
        self.folder, self.manifest, self.device, self.stream = Path(folder), manifest, device, stream
        self.precision = precision_of(manifest, spec)
        self.engine_path, self.info_path = engine_paths(self.folder, spec.name, self.precision)
        self.engine = self.contexts = self.memory = None
        self.lock = threading.Lock()
        self.owner: dict[int, BoundCall] = {}  # profile -> the call whose addresses its context holds

    def activate_impl(self) -> None:
        trt = require_tensorrt()
        rebuild = f"idefics-build-engines {self.folder} --precision {self.precision}"
        if not self.engine_path.exists() or not self.info_path.exists():
            raise EngineError(f"no TensorRT engine for the {self.precision} {self.spec.name} graph "
                              f"({self.engine_path} and its .json); build it: {rebuild}")
        capability, _ = gpu_identity(self.device)
        onnx_sha256 = self.manifest.files.get(self.spec.file) or sha256_file(self.folder / self.spec.file)
        check_compatible(read_info(self.info_path), onnx_sha256, trt.__version__, capability)
        self.memory = TorchMemory(self.device)
        if not self.stream:
            self.stream = self.memory.stream_handle
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{self.engine_path}: TensorRT could not deserialize it; rebuild it: {rebuild}")
        self.inputs = [n for n in self._names() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        shape_inputs = [n for n in self.inputs if self.engine.is_shape_inference_io(n)]
        if shape_inputs:
            raise EngineError(f"{self.engine_path}: inputs {shape_inputs} are shape tensors, which this runner does "
                              f"not bind; the graph comes from an older export: export again, then {rebuild}")
        expected = {t.name for t in self.spec.inputs} | {t.name for t in self.spec.outputs}
        if set(self._names()) != expected:
            raise EngineError(f"{self.engine_path}: engine tensors {sorted(self._names())} differ from the graph's "
                              f"{sorted(expected)}; rebuild it: {rebuild}")
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream)
            self.contexts.append(context)
        if self.memory.device.type == "cuda":  # the profile switches are enqueued; infer() uses another stream
            self.memory.torch.cuda.synchronize(self.memory.device)

    def deactivate_impl(self) -> None:
        self.contexts = self.engine = None
        self.owner.clear()

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def profile_for(self, inputs: Mapping[str, object]) -> int:
        """The first optimisation profile whose ranges hold every input's shape."""
        reasons = []
        for profile in range(self.engine.num_optimization_profiles):
            misfit = None
            for name in self.inputs:
                lo, _, hi = self.engine.get_tensor_profile_shape(name, profile)
                actual = list(inputs[name].shape)
                if len(actual) != len(lo) or any(not a <= x <= b for a, x, b in zip(lo, actual, hi)):
                    misfit = f"{name} {actual} outside {list(lo)}..{list(hi)}"
                    break
            if misfit is None:
                return profile
            reasons.append(f"profile {profile}: {misfit}")
        raise EngineError(f"{self.engine_path.name}: no optimisation profile fits this call ({'; '.join(reasons)}); "
                          "rebuild with larger export limits (idefics-export --max-batch/--max-images/--max-seq-len)")

    def bind_impl(self, inputs: Mapping[str, object], outputs: Mapping[str, object]) -> BoundCall:
        return _TrtBoundCall(self, inputs, outputs, self.stream)

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        memory = self.memory
        with memory.scope():
            inputs = {n: memory.from_host(v) for n, v in feed.items()}
            call = _TrtBoundCall(self, inputs, None, memory.stream_handle)
            call.run()
            return {name: memory.to_host(tensor) for name, tensor in call.outputs.items()}


class _TrtBoundCall(BoundCall):
    def __init__(self, runner: TensorRTRunner, inputs: Mapping[str, object], outputs: Mapping[str, object] | None,
                 stream: int):
        self.runner, self.stream = runner, stream
        self.profile = runner.profile_for(inputs)
        self.context = runner.contexts[self.profile]
        self.keep = dict(inputs)  # the context holds raw addresses into these
        self.shapes, self.addresses = {}, {}
        for name in runner.inputs:
            info = buffer_info(name, inputs[name])
            if info.device != runner.memory.device.type:
                raise EngineError(f"{runner.engine_path.name}: input {name} is in {info.device} memory; "
                                  f"bind {runner.device} buffers")
            self.shapes[name], self.addresses[name] = info.shape, info.address
        with runner.lock:  # the context is shared with other calls (other requests, other threads)
            self._apply_inputs()
            expected = {t.name: tuple(self.context.get_tensor_shape(t.name)) for t in runner.spec.outputs}
            if outputs is None:  # infer(): allocate what TensorRT says the outputs are
                outputs = {n: runner.memory.zeros(shape, runner.spec.output(n).dtype) for n, shape in expected.items()}
            for name, shape in expected.items():
                info = buffer_info(name, outputs[name])
                if info.shape != shape:
                    raise EngineError(f"{runner.engine_path.name}: output {name} is {list(shape)} for these inputs; "
                                      f"the bound buffer is {list(info.shape)}")
                self.addresses[name] = info.address
            self.outputs = dict(outputs)
            self._apply_outputs()

    def _apply_inputs(self) -> None:
        for name, shape in self.shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"{self.runner.engine_path.name}: TensorRT refused shape {list(shape)} "
                                  f"for input {name} (profile {self.profile})")
        for name in self.shapes:
            self.context.set_tensor_address(name, self.addresses[name])

    def _apply_outputs(self) -> None:
        for name in self.outputs:
            self.context.set_tensor_address(name, self.addresses[name])
        self.runner.owner[self.profile] = self

    def run(self) -> None:
        with self.runner.lock:
            if self.runner.owner.get(self.profile) is not self:  # another call bound this context since
                self._apply_inputs()
                self._apply_outputs()
            if not self.context.execute_async_v3(self.stream):
                raise EngineError(f"{self.runner.engine_path.name}: execute_async_v3 failed (see TensorRT's log)")
