"""Comparison of graph outputs with expected ones, without torch: shared by the export's validation
(expected = PyTorch), idefics-check against PyTorch and idefics-check against golden results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.graphs.bounds import cosine_similarity, judge, measure  # noqa: F401 (cosine_similarity: re-exported)
from runtime.cpu import exact_int8
from runtime.manifest import GraphSpec


LARGE_GRAPH_BYTES = 1 << 30


def ort_session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session for measuring a graph. Past LARGE_GRAPH_BYTES of weights it trades
    speed for memory: no constant folding (which would keep an FP32 copy of every FP16 weight the
    CPU provider casts) and no MatMul weight prepacking (another copy): a 9B-wide FP16 decoder's
    session then holds its 2.5 GB instead of about 12 GB."""
    import onnxruntime as ort

    path = Path(path)
    options = exact_int8(ort.SessionOptions())  # as the runtime's sessions: exact INT8 on any x86 CPU
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    extra = {}
    if sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists()) > LARGE_GRAPH_BYTES:
        options.add_session_config_entry("session.disable_prepacking", "1")
        extra["disabled_optimizers"] = ["ConstantFolding"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **extra)


def compare(names, expected, actual, bound: dict) -> dict:
    """{name: row}: exporter.graphs.bounds.measure of each output against its expected value, judged by
    `bound` (max_rel, mean_rel, cosine)."""
    return {name: judge(measure(ref, got), bound) for name, ref, got in zip(names, expected, actual)}


@dataclass
class Case:
    """One graph call: its FP32 feed and the PyTorch FP32 module's outputs for it."""

    graph: str
    name: str
    feed: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def run_cases(folder: Path, graphs: dict[str, GraphSpec], cases: list[Case], tolerance: dict,
              progress=None, session_factory=None) -> tuple[dict, dict]:
    """Run each case's graph in ONNX Runtime; return ({graph: {case: {output: row}}}, actual outputs)."""
    report: dict[str, dict] = {}
    actual_outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    sessions: dict = {}
    make = session_factory or ort_session
    for case in cases:
        spec = graphs[case.graph]
        session = sessions.setdefault(case.graph, make(folder / spec.file))
        # reduced-precision graphs take some inputs in FP16: cast the FP32 reference inputs to the spec
        feed = {k: v.astype(spec.input(k).dtype) for k, v in case.feed.items()}
        names = [o.name for o in spec.outputs]
        actual = session.run(names, feed)
        actual_outputs[(case.graph, case.name)] = dict(zip(names, actual))
        report.setdefault(case.graph, {})[case.name] = compare(
            names, [case.expected[n] for n in names], actual, tolerance)
        if progress is not None:
            progress.update(1)
    return report, actual_outputs


def failures(report: dict, tolerance: dict) -> list[str]:
    return [
        f"{graph}/{case_name}: {name} max|err| {row['max_rel']:.3g} rms (limit {tolerance['max_rel']:g}; "
        f"{row['max_abs_diff']:.3g} of rms {row['rms']:.3g}), mean|err| {row['mean_rel']:.3g} rms "
        f"(limit {tolerance['mean_rel']:g}), cosine {row['cosine']:.6f} (min {tolerance['cosine']})"
        + ("" if row.get("finite", True) else ", not finite") + (f" ({row['note']})" if "note" in row else "")
        for graph, cases in report.items()
        for case_name, rows in cases.items()
        for name, row in rows.items()
        if not row["ok"]
    ]


def summarize(report: dict) -> list[tuple[str, str, str, float, float, float, bool]]:
    """Rows (graph, case, output, max_abs_diff, limit, cosine, ok) for printing."""
    return [
        (graph, case_name, name, row["max_abs_diff"], row["limit"], row["cosine"], row["ok"])
        for graph, cases in report.items()
        for case_name, rows in cases.items()
        for name, row in rows.items()
    ]

