"""SmoothQuant (Xiao et al., 2023) on an FP32 ONNX graph, before INT8 quantization.

Activations have outlier channels (a few input channels of a MatMul much larger than the rest), and a
per-tensor INT8 scale set by those leaves the other channels a handful of steps. Weights are easy to
quantize per output channel. So, per input channel k of each weight MatMul Y = X W (W: [K, N]):

    s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)        X' = X / s,   W' = diag(s) W,   X' W' = X W

with max|X_k| measured on the calibration feeds. MatMuls that read the same activation (q/k/v,
gate/up, every cross-attention layer's k/v) share one s, taken over all their weights. 1/s is folded
into the LayerNormalization (scale and bias), RMSNorm (the Mul by its weight) or ONNX Runtime's
(Skip)SimplifiedLayerNormalization (its weight) that produces X
when X feeds only those MatMuls, so the graph gains no op; otherwise an explicit Mul by 1/s is put in
front of them. alpha is chosen per graph on the calibration data (exporter.export: the value whose
quantized graph is closest to FP32 on the calibration feeds, or no smoothing at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALPHAS = (0.25, 0.5, 0.75)  # tried per graph, with no smoothing, on the calibration data
SCALE_RANGE = (1e-4, 1e4)  # s is clipped: a dead channel (max|X_k| = 0) must not divide by zero
# ONNX Runtime's RMSNorm ops (the ORT decoder's) and the input slot of their weight; only their
# output 0 is the normed tensor (SkipSimplifiedLayerNormalization's output 3 is the residual sum)
SIMPLIFIED_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


@dataclass
class Group:
    activation: str  # the tensor X the MatMuls read
    matmuls: list[str]
    weights: list[str]  # initializer [K, N] of each MatMul (same order)


@dataclass
class Smoothing:
    alpha: float | None
    groups: list[dict] = field(default_factory=list)  # activation, matmuls, folded into (node or "Mul")

    def summary(self) -> dict:
        folded = sum(g["folded_into"] != "Mul" for g in self.groups)
        return {"alpha": self.alpha, "matmuls": sum(len(g["matmuls"]) for g in self.groups),
                "activations": len(self.groups), "folded": folded, "explicit_mul": len(self.groups) - folded}


def groups(model, targets: list[str]) -> list[Group]:
    """Weight MatMuls among `targets` whose weight is an initializer [K, N], grouped by the tensor
    they read."""
    inits = {t.name: t for t in model.graph.initializer}
    by_activation: dict[str, Group] = {}
    wanted = set(targets)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in wanted or node.input[1] not in inits:
            continue
        if len(inits[node.input[1]].dims) != 2:
            continue
        group = by_activation.setdefault(node.input[0], Group(node.input[0], [], []))
        group.matmuls.append(node.name)
        group.weights.append(node.input[1])
    return list(by_activation.values())


def smooth(model, found: list[Group], channel_max: dict[str, np.ndarray], alpha: float):
    """A copy of `model` with every group smoothed by `alpha`; returns (model, Smoothing)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Shape":  # reads the shape only: smoothing X does not change it
            continue
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    record = Smoothing(alpha)
    added: list = []

    def initializer(name: str):
        name = identity.get(name, name)
        return inits.get(name)

    for group in found:
        x_max = channel_max.get(group.activation)
        weights = [numpy_helper.to_array(inits[w]).astype(np.float64) for w in group.weights]
        if x_max is None or x_max.shape[0] != weights[0].shape[0]:
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.power(np.maximum(x_max, 1e-8), alpha) / np.power(np.maximum(w_max, 1e-8), 1.0 - alpha)
        s = np.clip(s, *SCALE_RANGE)
        for matmul, w_name, w in zip(group.matmuls, group.weights, weights):
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32), f"{w_name}.smoothed.{matmul}")
            added.append(scaled)
            nodes[matmul].input[1] = scaled.name
        readers = {n.name for n in consumers.get(group.activation, [])}
        norm = producer.get(group.activation)
        if norm is not None and norm.op_type in SIMPLIFIED_NORMS and norm.output[0] != group.activation:
            norm = None
        folded = _fold(norm, readers == set(group.matmuls), s, initializer, added)
        if folded is None:
            inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{group.activation}.smooth_inverse")
            added.append(inverse)
            smoothed = f"{group.activation}.smoothed"
            mul = onnx.helper.make_node("Mul", [group.activation, inverse.name], [smoothed],
                                        name=f"{group.matmuls[0]}.smooth")
            graph.node.append(mul)
            for matmul in group.matmuls:
                nodes[matmul].input[0] = smoothed
            folded = "Mul"
        record.groups.append({"activation": group.activation, "matmuls": list(group.matmuls), "folded_into": folded})
    graph.initializer.extend(added)
    _drop_unused_initializers(graph)
    from exporter.precision.transforms import topological_sort

    topological_sort(graph)
    return out, record


def _fold(node, exclusive: bool, s: np.ndarray, initializer, added: list) -> str | None:
    """Divide the norm that produces X by s (LayerNormalization scale and bias; RMSNorm's Mul by its
    weight), writing new initializers (norm weights may be shared through Identity); the node's
    name, or None when X does not come from a norm or has other readers."""
    from onnx import numpy_helper

    if node is None or not exclusive:
        return None
    if node.op_type == "LayerNormalization":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        params = [initializer(name) for name in node.input[1:3]]
        if axis != -1 or params[0] is None or any(p is None for p in params[1:len(node.input) - 1]):
            return None
        for slot, param in enumerate(params, start=1):
            if param is None:
                continue
            value = numpy_helper.to_array(param).astype(np.float64)
            if value.shape != s.shape:
                return None
            new = numpy_helper.from_array((value / s).astype(np.float32), f"{node.name}.smoothed.{slot}")
            added.append(new)
            node.input[slot] = new.name
        return node.name
    if node.op_type in SIMPLIFIED_NORMS:  # ONNX Runtime's RMSNorm ops: X is the normed output 0
        slot = SIMPLIFIED_NORMS[node.op_type]
        param = initializer(node.input[slot])
        if param is None or tuple(param.dims) != s.shape:
            return None
        value = numpy_helper.to_array(param).astype(np.float64)
        new = numpy_helper.from_array((value / s).astype(np.float32), f"{node.name}.smoothed")
        added.append(new)
        node.input[slot] = new.name
        return node.name
    if node.op_type == "Mul":
        for slot, name in enumerate(node.input):
            param = initializer(name)
            if param is not None and tuple(param.dims) == s.shape:
                value = numpy_helper.to_array(param).astype(np.float64)
                new = numpy_helper.from_array((value / s).astype(np.float32), f"{node.name}.smoothed")
                added.append(new)
                node.input[slot] = new.name
                return node.name
    return None


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
