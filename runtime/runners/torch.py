"""PyTorch runner: the graph modules (runtime.reference) over the checkpoint named in the manifest.

The reference backend (and a third one for the same generation loop): it runs exactly the
modules the ONNX graphs were traced from, so Session(backend="torch") separates a graph problem
from a loop problem. Unlike the other runners it needs torch and transformers (runtime.reference,
imported lazily), and the checkpoint the export was made from.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from runtime.console import progress_bars
from runtime.errors import ToolkitError
from runtime.manifest import GraphSpec, Manifest
from runtime.runners.base import BoundCall, CopyingBoundCall, Runner


def load_modules(manifest: Manifest, model: str | None = None) -> dict:
    """{graph: torch module} rebuilt from the manifest's source (or `model`)."""
    try:
        from runtime.reference.modules import graph_modules
        from runtime.reference.sources import load_reference
    except ImportError as exc:
        raise ToolkitError("backend='torch' needs the export extra: pip install 'idefics-toolkit[export]'") from exc
    with progress_bars(transformers=False):  # no "Loading weights" bar on a library user's console
        return graph_modules(load_reference(manifest, model).model)


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: GraphSpec, module, device: str = "cpu"):
        super().__init__(spec)
        self.module, self.device = module, device

    def activate_impl(self) -> None:
        self.module.to(self.device).eval()

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feed(feed)
        return {name: value.cpu().numpy() for name, value in self.infer_impl(feed).items()}

    def infer_impl(self, feed: Mapping[str, object]) -> dict:
        """numpy arrays or tensors in, tensors (on the runner's device) out."""
        import torch

        args = []
        for t in self.spec.inputs:
            value = feed[t.name]
            value = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            args.append(value.to(self.device, torch.float32 if value.is_floating_point() else None))
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.to(getattr(torch, t.dtype)) for t, o in zip(self.spec.outputs, out)}

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        return CopyingBoundCall(self, inputs, outputs)
