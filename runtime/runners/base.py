"""One runner interface over every backend (Polygraphy's shape: activate / infer / deactivate).

The generation loop only sees this interface. `infer` is the simple call (feed in, outputs out);
`bind` prepares a call whose inputs and outputs live in caller-owned buffers, so a decode step
is one `run()` with no allocation and no copy (ONNX Runtime IO binding; TensorRT tensor addresses).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from runtime.manifest import GraphSpec
from runtime.memory import assign, buffer_info


class BoundCall:
    """A call whose inputs/outputs are bound to buffers; the buffers may change in place between runs."""

    def run(self) -> None:
        raise NotImplementedError


class Runner:
    backend = "base"

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.is_active = False

    # context manager, as Polygraphy runners
    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        return self.infer_impl(feed)

    def bind(self, inputs: Mapping[str, object], outputs: Mapping[str, object]) -> BoundCall:
        """Inputs and outputs are numpy arrays or torch tensors (on the runner's device), contiguous."""
        self._check_feed(inputs)
        expected = {t.name for t in self.spec.outputs}
        if set(outputs) != expected:
            raise ValueError(f"graph {self.spec.name!r}: outputs to bind {sorted(outputs)}, the graph has {sorted(expected)}")
        return self.bind_impl(inputs, outputs)

    def _check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self.backend} runner for {self.spec.name!r} is not active; call activate()")
        expected = [s.name for s in self.spec.inputs]
        missing = [n for n in expected if n not in feed]
        extra = [n for n in feed if n not in expected]
        if missing or extra:
            raise ValueError(f"graph {self.spec.name!r}: missing inputs {missing}, unexpected inputs {extra}")
        for spec in self.spec.inputs:
            array = feed[spec.name]
            dtype = array.dtype if isinstance(array, np.ndarray) else buffer_info(spec.name, array).dtype
            if dtype != np.dtype(spec.dtype) or len(array.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, array.shape)
            ):
                raise ValueError(
                    f"graph {self.spec.name!r}, input {spec.name}: received {dtype} {tuple(array.shape)}; "
                    f"expected {spec.dtype} {tuple(spec.shape)}"
                )

    # backend hooks; activation is a no-op for runners that hold nothing to open or release
    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        raise NotImplementedError


class CopyingBoundCall(BoundCall):
    """A bound call for runners that cannot bind memory (PyTorch, Triton BLS): each run reads the
    input buffers as they are now and copies the outputs into the bound output buffers."""

    def __init__(self, runner: Runner, inputs: Mapping[str, object], outputs: Mapping[str, object]):
        self.runner, self.inputs, self.outputs = runner, dict(inputs), dict(outputs)

    def run(self) -> None:
        results = self.runner.infer_impl(self.inputs)
        for name, buffer in self.outputs.items():
            assign(buffer, results[name])
