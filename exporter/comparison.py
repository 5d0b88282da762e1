"""Comparison of graph outputs with expected ones, without torch: shared by the export's validation
(expected = PyTorch), idefics-check against PyTorch and idefics-check against golden results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.manifest import GraphSpec


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(names, expected, actual, atol: float, rtol: float, cosine: float) -> dict:
    rows = {}
    for name, ref, got in zip(names, expected, actual):
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            rows[name] = dict(max_abs_diff=float("inf"), mean_abs_diff=float("inf"), limit=0.0, cosine=0.0, ok=False,
                              note=f"shape {got.shape} != expected {ref.shape}")
            continue
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        mean = float(np.mean(np.abs(ref - got))) if ref.size else 0.0
        limit = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
        cos = cosine_similarity(ref, got)
        rows[name] = dict(max_abs_diff=diff, mean_abs_diff=mean, limit=limit, cosine=cos, min_cosine=cosine,
                          ok=bool(diff <= limit and cos >= cosine and np.isfinite(got).all()))
    return rows


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:  # both zero (e.g. an all-masked output) is agreement; one zero is not
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


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
            names, [case.expected[n] for n in names], actual, **tolerance)
        if progress is not None:
            progress.update(1)
    return report, actual_outputs


def failures(report: dict, tolerance: dict) -> list[str]:
    return [
        f"{graph}/{case_name}: {name} max abs diff {row['max_abs_diff']:.3g} (limit {row['limit']:.3g}), "
        f"cosine {row['cosine']:.6f} (min {tolerance['cosine']})" + (f" ({row['note']})" if "note" in row else "")
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

