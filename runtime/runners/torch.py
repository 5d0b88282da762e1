"""PyTorch runner: the exporter's graph modules over the checkpoint named in the manifest.

The reference backend (and a third one for the same generation loop): it runs exactly the
modules the ONNX graphs were traced from, so Session(backend="torch") separates a graph problem
from a loop problem. Unlike the other runners it needs torch, transformers and the exporter
(imported lazily), and the checkpoint the export was made from.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from runtime.errors import ToolkitError
from runtime.manifest import GraphSpec, Manifest
from runtime.runners.base import BoundCall, CopyingBoundCall, Runner


def load_modules(manifest: Manifest, model: str | None = None) -> dict:
    """{graph: torch module} rebuilt from the manifest's source (or `model`)."""
    try:
        from exporter.check import load_reference
        from exporter.graphs import graph_modules
    except ImportError as exc:
        raise ToolkitError("backend='torch' needs the export extra: pip install 'idefics-toolkit[export]'") from exc
    return graph_modules(load_reference(manifest, model).model)


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: GraphSpec, module):
        super().__init__(spec)
        self.module = module

    def activate_impl(self) -> None:
        self.module.eval()

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.asarray(feed[t.name], dtype=np.float32 if t.dtype.startswith("float") else None))
                for t in self.spec.inputs]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.numpy().astype(t.dtype) for t, o in zip(self.spec.outputs, out)}

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        return CopyingBoundCall(self, inputs, outputs)
