"""ONNX Runtime-only graphs that ONNX Runtime refuses.

The --ort-optimized graphs (exporter.ort.decoder, exporter.ort.encoders, exporter.ort.int8) use ONNX
Runtime's fused contrib kernels, whose limits are the kernels' own and change with ONNX Runtime's
version and the CPU: GroupQueryAttention's CPU kernel of ONNX Runtime 1.32 takes head sizes that are
multiples of 16 only ("head_size shall be a multiple of 16. Got head_size % 16 == 8"), where a rule
written here said 8. So what a kernel accepts is found by running it: each such graph is loaded and
run on a small feed as soon as it is written (and then validated); a graph that ONNX Runtime refuses
to load or to run raises Refused, which names the graph, the op and ONNX Runtime's reason. The export
then leaves that graph out with a warning (as one that misses its accuracy bound: no file, not in
the manifest) and the portable graphs serve instead.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from runtime.errors import ExportError


class Refused(ExportError):
    """ONNX Runtime refuses to load or run an ONNX Runtime-only graph (`file`): `op` is the op type its
    message names (None where it names none), `reason` its message."""

    def __init__(self, file: str, op: str | None, reason: str, stage: str = "run", detail: str = ""):
        self.file, self.op, self.reason, self.stage = file, op, reason, stage
        what = f"its {op} node" if op else "the graph"
        super().__init__(f"{file}: ONNX Runtime {_version()} refuses to {stage} {what}: {reason}"
                         + (f" ({detail})" if detail else ""))


@functools.lru_cache(maxsize=1)
def _version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@functools.lru_cache(maxsize=1)
def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises when it loads or runs a graph: its pybind errors (Fail,
    InvalidArgument, InvalidGraph, NotImplemented, ..., subclasses of Exception only) and RuntimeError
    (what InferenceSession.run_with_iobinding raises)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = {value for value in vars(state).values()
             if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == state.__name__}
    return (RuntimeError, *sorted(found, key=lambda t: t.__name__))


_RUNNING = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
_NO_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")
_NODE_OP = re.compile(r"Node \(([^)]*)\) Op \((\w+)\)")
_PREFIX = re.compile(r"^(\[ONNXRuntimeError\] : \d+ : \w+ : |Error in execution: )+")


def explain(exc: BaseException) -> tuple[str | None, str]:
    """(op type, reason) from ONNX Runtime's message: "... while running GroupQueryAttention node.
    Name:'GroupQueryAttention_7' Status Message: head_size shall be ..." gives ("GroupQueryAttention",
    "head_size shall be ... (node GroupQueryAttention_7)"); a message naming no op gives (None, it)."""
    text = " ".join(str(exc).split())
    for pattern, op_at, name_at, reason_at in ((_RUNNING, 1, 2, 3), (_NO_KERNEL, 1, 2, None), (_NODE_OP, 2, 1, None)):
        found = pattern.search(text)
        if found:
            reason = found.group(reason_at).strip() if reason_at else _PREFIX.sub("", text)
            name = found.group(name_at)
            return found.group(op_at), reason + (f" (node {name})" if name else "")
    return None, _PREFIX.sub("", text) or type(exc).__name__


def refused(file: str | Path, exc: BaseException, stage: str = "run", detail: str = "") -> Refused:
    """The Refused of ONNX Runtime's error `exc` on the graph `file` ("load" or "run"); `detail`: the
    model's shapes the kernels were given (its attention heads and head size)."""
    op, reason = explain(exc)
    return Refused(Path(file).name, op, reason, stage, detail)
