"""Mixed precision driven by accuracy: which nodes of a reduced-precision graph to keep at the higher
precision (FP32 inside an FP16 graph, unquantized inside an INT8 graph), and why.

Three reasons a node is kept, recorded per node in the manifest (Variant.kept_nodes):
  rule      the transform's fixed rule (exporter.precision.transforms: FP16 keeps norms, softmax, masks in
            FP32; INT8 leaves the lm_head and the activation-by-activation MatMuls unquantized);
  overflow  FP16 only: on the calibration data the FP32 graph's values at the node's inputs or
            outputs come within OVERFLOW_FRACTION of FP16's largest value (65504), where FP16
            would turn them into inf (as ModelOpt AutoCast keeps large-magnitude nodes in FP32);
  accuracy  the search below found the node responsible for a missed bound.

The search (exporter.export runs it per graph, then on the end-to-end top-1):
  1. build the graph with the nodes kept so far; measure it against its bounds (exporter.graphs.bounds);
  2. if it misses, localise on the worst case: run the reduced and the FP32 graph with every node
     output marked (exporter.precision.activations) and measure every tensor against its FP32 twin, in units
     of the bound; a node's *gain* is its output's error minus the largest error of its inputs:
     the error it adds, rather than the error it inherits (ranking by the error itself would always
     blame the graph's last nodes). Polygraphy's `debug precision` and onnxconverter-common's
     auto_convert_mixed_precision bisect instead; one localisation run ranks every node at once;
  3. a node with gain that can change precision is kept itself; one that cannot (a Softmax, kept
     in FP32 by rule, amplifying the error of its FP16 input) passes the blame back to the nodes
     that compute that input, up to and including the weight MatMuls that start the chain;
  4. keep the culprits of the largest gains, measure again; stop when the graph passes, or fail
     once the budget (rounds, nodes per graph) is spent or no culprit is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


FP16_MAX = 65504.0
OVERFLOW_FRACTION = 0.25  # keep a node in FP32 when calibration reaches a quarter of FP16's range
INSERTED = ("Cast", "QuantizeLinear", "DequantizeLinear")  # ops the transforms add around nodes
BLAME_DEPTH = 16  # how far back through non-weight nodes an amplifier's blame travels
# Ops that cannot change precision here but amplify the error of their input for good: an
# exponential turns an absolute error of its input into a relative error of its output. The error
# others appear to add (x^2 in a norm doubles a relative error that the mean and the square root
# then undo) does not last, so only these pass blame back to the nodes computing their input.
AMPLIFIERS = frozenset({"Softmax", "LogSoftmax", "Exp", "Erf", "Sigmoid", "Tanh"})


@dataclass(frozen=True)
class SearchBudget:
    rounds: int = 16  # measurements after the first, all graphs and the end-to-end phase together
    nodes: int = 64  # nodes a search may keep per graph, beyond the rule and overflow ones
    per_round: int = 8  # culprit groups kept per round

    def __post_init__(self):
        for key, value in asdict(self).items():
            if not isinstance(value, int) or value < (1 if key == "per_round" else 0):
                raise ValueError(f"search budget {key} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Kept:
    node: str
    op: str
    reason: str  # "rule" | "overflow" | "accuracy"
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- FP16 overflow
def overflow_nodes(model, absmax: dict[str, float], candidates: set[str],
                   fraction: float = OVERFLOW_FRACTION, base_dir: str | None = None) -> list[Kept]:
    """Candidates whose float inputs, outputs or weights reached `fraction` x 65504 in FP32 on the
    calibration data. `base_dir`: where the model's external data lies, when its weights are there
    (each is read alone)."""
    limit = fraction * FP16_MAX
    from onnx import numpy_helper

    weights = {t.name: float(np.abs(numpy_helper.to_array(t, base_dir=base_dir or "")).max())
               for t in model.graph.initializer if t.data_type == 1 and t.dims}
    found = []
    for node in model.graph.node:
        if node.name not in candidates:
            continue
        peaks = [(absmax.get(t, 0.0), t) for t in (*node.input, *node.output) if t]
        peaks += [(weights[t], t) for t in node.input if t in weights]
        peak, tensor = max(peaks, default=(0.0, ""))
        if peak >= limit:
            found.append(Kept(node.name, node.op_type, "overflow",
                              f"|{tensor}| reaches {peak:.3g} on the calibration data (FP16 max {FP16_MAX:g}, "
                              f"kept above {fraction:g} of it)"))
    return found


# ---------------------------------------------------------------- localisation
def tensor_error(ref: np.ndarray, got: np.ndarray, bound: dict) -> float:
    """A tensor's error in units of the bound (max|err| / rms and mean|err| / rms, as
    exporter.graphs.bounds.measure): 1.0 is at the limit; inf when not finite."""
    ref = ref.astype(np.float32, copy=False)
    diff = np.abs(ref - got.astype(np.float32, copy=False))
    if not np.isfinite(diff).all():
        return float("inf")
    rms = float(np.sqrt(np.mean(np.square(ref, dtype=np.float64))))
    largest, mean = float(diff.max()), float(diff.mean(dtype=np.float64))
    if rms == 0:
        return 0.0 if largest == 0 else float("inf")
    return max(largest / rms / bound["max_rel"], mean / rms / bound["mean_rel"])


@dataclass
class Blame:
    gain: float  # error the node adds, in units of the bound
    node: str  # where the error appears
    op: str
    culprits: list[str]  # the nodes to keep for it


def rank(model, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], candidates: set[str],
         weight_ops: set[str], bound: dict) -> list[Blame]:
    """Every node that adds error, largest gain first, with the candidates to keep for it.

    `model`: the reduced graph (node names as in the FP32 graph; the transforms' Casts and Q/DQ
    are seen through); `ref`/`got`: the FP32 and reduced graphs' tensors on one feed."""
    producer = {o: n for n in model.graph.node for o in n.output}
    errors: dict[str, float] = {}

    def original(name: str) -> str | None:
        # the FP32 tensor a reduced-graph tensor stands for: through the Casts and Q/DQ added
        for _ in range(4):
            if name in ref:
                return name
            node = producer.get(name)
            if node is None or node.op_type not in INSERTED:
                return None
            name = node.input[0]
        return name if name in ref else None

    def error(name: str | None) -> float | None:
        if name is None or name not in got or name not in ref:
            return None
        if name not in errors:
            a, b = ref[name], got[name]
            floating = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
            errors[name] = tensor_error(a, b, bound) if floating and a.shape == b.shape and a.size > 1 else None
        return errors[name]

    blames = []
    for node in model.graph.node:
        outs = [e for e in (error(o) for o in node.output) if e is not None]
        if not outs:  # an op the transform added, or no float output
            continue
        e_out = max(outs)
        e_in = max([e for e in (error(original(i)) for i in node.input if i) if e is not None], default=0.0)
        if np.isinf(e_out):
            gain = 0.0 if np.isinf(e_in) else float("inf")
        else:
            gain = e_out - e_in
        if gain > 0 and (node.name in candidates or node.op_type in AMPLIFIERS):
            culprits = [node.name] if node.name in candidates else _upstream(node, producer, candidates, weight_ops)
            if culprits:
                blames.append(Blame(gain, node.name, node.op_type, culprits))
    blames.sort(key=lambda b: -b.gain)
    return blames


def _upstream(node, producer: dict, candidates: set[str], weight_ops: set[str]) -> list[str]:
    """The candidates that compute `node`'s inputs: back through every producer, to the weight
    MatMuls/Convs (included) where the chain starts, or BLAME_DEPTH nodes."""
    found: list[str] = []
    seen = set()
    stack = [(name, 0) for name in node.input if name]
    while stack:
        name, depth = stack.pop()
        source = producer.get(name)
        if source is None or source.name in seen or depth > BLAME_DEPTH:
            continue
        seen.add(source.name)
        if source.name in candidates:
            found.append(source.name)
        if source.name in weight_ops:
            continue
        stack.extend((i, depth + 1) for i in source.input if i)
    return found


def choose(blames: list[Blame], kept: set[str], room: int, per_round: int) -> list[tuple[Blame, list[str]]]:
    """The culprits to keep this round: those of the largest gains (at least half the largest), at
    most `per_round` groups and `room` nodes."""
    picked: list[tuple[Blame, list[str]]] = []
    top = next((b.gain for b in blames if set(b.culprits) - kept), None)
    if top is None:
        return picked
    taken = set(kept)
    for blame in blames:
        if len(picked) >= per_round or room <= 0 or blame.gain < 0.5 * top:
            break
        new = [c for c in dict.fromkeys(blame.culprits) if c not in taken]
        if not new:
            continue
        new = new[:room]
        picked.append((blame, new))
        taken.update(new)
        room -= len(new)
    return picked


# ---------------------------------------------------------------- reporting
def format_kept(kept: dict[str, list[dict]], reasons: tuple[str, ...] = ("overflow", "accuracy"),
                limit: int | None = 16) -> str:
    """A short table of the nodes kept at higher precision for `reasons`, at most `limit` rows (the
    rule's are many and always the same: counted, not listed; the manifest lists every node)."""
    lines = []
    counts = {reason: {graph: sum(k["reason"] == reason for k in items) for graph, items in kept.items()}
              for reason in ("rule", *reasons)}
    for graph, items in kept.items():
        for k in items:
            if k["reason"] in reasons:
                lines.append(f"  {graph:<10} {k['node'][-40:]:<40} {k['op']:<10} {k['reason']:<9} {k['detail']}")
    head = "  kept: " + "; ".join(f"{reason} " + ", ".join(f"{g} {n}" for g, n in by_graph.items())
                                  for reason, by_graph in counts.items())
    if not lines:
        return head
    more = [] if limit is None or len(lines) <= limit else [f"  ... and {len(lines) - limit} more (manifest.json: "
                                                           "variants.*.kept_nodes)"]
    return "\n".join([head, f"  {'graph':<10} {'node':<40} {'op':<10} {'reason':<9} detail",
                      *lines[:limit], *more])
