"""Every intermediate tensor of a graph, read by marking each node's outputs as graph outputs (as
Polygraphy's `--onnx-outputs mark all` does), for two uses:

- localisation: a reduced-precision graph's tensors against the FP32 graph's tensors of the same
  name, on one feed (mixed-precision search, idefics-check);
- statistics over the calibration feeds: the largest magnitude of every tensor (FP16 overflow) and
  the largest magnitude per channel of chosen tensors (SmoothQuant).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from runtime.cpu import exact_int8

# Ops whose outputs are their inputs moved about: they add no error and decide no precision.
# Values this large are mask sentinels (finfo(float32).min added before a softmax), meant to
# saturate, not activations: statistics leave them out.
SENTINEL = 1e30
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Slice",
                           "Concat", "Split", "Gather", "Expand", "Tile", "Cast"})


def marked_session(model, threads: int = 0):
    """An ONNX Runtime CPU session over `model` (a ModelProto, or the path of a graph file) with
    every node output marked as a graph output.

    Given the path of a graph whose weights are external (past 2 GB), only its structure is loaded
    and marked, and the marked copy is saved for a moment beside the graph, reading the same .data
    file: the weights are never copied in memory or on disk (a 9B-wide decoder's are 5 GB)."""
    import onnx
    import onnxruntime as ort
    from polygraphy import constants
    from polygraphy.backend.onnx import modify_outputs

    options = exact_int8(ort.SessionOptions())  # the tensors the runtime's sessions compute
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # every tensor is an output, so little would fuse anyway; unoptimized, each keeps its node's value
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, (str, Path)):
        path = Path(model)
        model = onnx.load(str(path), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            marked = modify_outputs(model, outputs=constants.MARK_ALL)  # the structure alone: small
            handle, name = tempfile.mkstemp(prefix=f".{path.stem}.marked-", suffix=".onnx", dir=path.parent)
            os.close(handle)
            try:
                onnx.save_model(marked, name)  # external references stay relative: the same .data file
                return ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
            finally:
                os.unlink(name)
    marked = modify_outputs(_copy(model), outputs=constants.MARK_ALL)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "marked.onnx"
        # external data: a marked copy of a graph past 2 GB must still save
        onnx.save_model(marked, str(path), save_as_external_data=True, location="marked.onnx.data", size_threshold=1024)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def cast_feed(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FP32 reference inputs in the dtypes the session takes (FP16 graphs take some in FP16)."""
    types = {i.name: i.type for i in session.get_inputs()}
    return {k: v.astype(np.float16) if types.get(k) == "tensor(float16)" else v for k, v in feed.items() if k in types}


def intermediates(model, feed: dict[str, np.ndarray], session=None) -> dict[str, np.ndarray]:
    """{tensor name: value} of every node output (and graph input) of `model` (a ModelProto or a
    graph file's path, as marked_session takes) on `feed`."""
    session = session or marked_session(model)
    names = [o.name for o in session.get_outputs()]
    fed = cast_feed(session, feed)
    return {**fed, **dict(zip(names, session.run(names, fed)))}


def statistics(model, feeds: list[dict[str, np.ndarray]], channels: frozenset[str] | set[str] = frozenset()):
    """(largest |x| of every float tensor over `feeds`, largest |x| per last-axis channel of the
    tensors named in `channels`); mask sentinels (|x| >= SENTINEL) are left out. `model`: a
    ModelProto or a graph file's path (marked_session)."""
    session = marked_session(model)
    names = [o.name for o in session.get_outputs()]
    absmax: dict[str, float] = {}
    per_channel: dict[str, np.ndarray] = {}
    for feed in feeds:
        fed = cast_feed(session, feed)
        values = {**fed, **dict(zip(names, session.run(names, fed)))}
        for name, value in values.items():
            if not np.issubdtype(value.dtype, np.floating) or not value.size:
                continue
            magnitude = np.abs(value.astype(np.float32))
            magnitude[magnitude >= SENTINEL] = 0.0
            absmax[name] = max(absmax.get(name, 0.0), float(magnitude.max()))
            if name in channels and value.ndim:
                channel = magnitude.reshape(-1, value.shape[-1]).max(axis=0)
                per_channel[name] = np.maximum(per_channel[name], channel) if name in per_channel else channel
        del values
    return absmax, per_channel


def matmul_inputs(model, feeds: list[dict[str, np.ndarray]], channels, rows: int = 512, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Up to `rows` rows (last axis kept, the others flattened; drawn at random, the same draw for
    every feed's share) of each float tensor named in `channels`, over `feeds`: the activations
    AWQ's per-layer search weighs a quantized weight's error with."""
    session = marked_session(model)
    names = [o.name for o in session.get_outputs()]
    wanted = set(channels)
    parts: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(seed)
    share = max(1, rows // max(1, len(feeds)))
    for feed in feeds:
        fed = cast_feed(session, feed)
        values = {**fed, **dict(zip(names, session.run(names, fed)))}
        for name in wanted & set(values):
            value = values[name]
            if not np.issubdtype(value.dtype, np.floating) or not value.size or not value.ndim:
                continue
            flat = value.astype(np.float32).reshape(-1, value.shape[-1])
            flat = flat[np.all(np.abs(flat) < SENTINEL, axis=1)]
            if len(flat) > share:
                flat = flat[rng.choice(len(flat), share, replace=False)]
            parts.setdefault(name, []).append(flat)
        del values
    return {name: np.concatenate(p) for name, p in parts.items()}
