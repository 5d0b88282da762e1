"""Run every exported graph in ONNX Runtime against its PyTorch module and compare outputs.

Each graph is fed the PyTorch outputs of the graph before it, so a failure is attributed to the
graph that caused it. All mismatches are collected, then one ValidationError lists each tensor's
difference against its tolerance (the optimum-exporters habit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.inputs import TextBatch, next_step, sample_pixels, sample_prompt
from exporter.precision import TOLERANCES
from runtime.errors import ValidationError
from runtime.manifest import GraphSpec, ModelInfo

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ValidationCase:
    batch: int = 2
    images: int = 2
    seq: int = 12
    seed: int = 0


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


def reference_cases(graphs: dict[str, GraphSpec], modules: dict[str, torch.nn.Module], info: ModelInfo,
                    case: ValidationCase = ValidationCase()) -> list[Case]:
    """Every graph's cases: real photos, left padding, several images, prefill, decode, static cache.
    Each graph is fed the PyTorch outputs of the graph before it, so a failure is its own."""
    cases: list[Case] = []

    def run(graph: str, name: str, args: tuple) -> tuple:
        with torch.no_grad():
            out = modules[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        spec = graphs[graph]
        cases.append(Case(graph, name, {i.name: a.numpy() for i, a in zip(spec.inputs, args)},
                          {o.name: t.numpy() for o, t in zip(spec.outputs, out)}))
        return out

    b, n = case.batch, case.images
    pixels = sample_pixels(info, b, n).flatten(0, 1)
    (hidden,) = run("vision", "photos", (pixels,))
    cross = run("perceiver", "photos", (hidden.view(b, n, *hidden.shape[1:]),))
    prompt = sample_prompt(info, b, n, case.seq, case.seed)
    empty = torch.zeros(b, info.num_heads, 0, info.head_dim)
    outputs = run("decoder", "prefill", _decoder_args(prompt, cross, tuple(empty for _ in range(2 * info.num_layers))))
    step = next_step(prompt)
    presents = tuple(outputs[1:])
    run("decoder", "decode", _decoder_args(step, cross, presents))
    # The same step against a static cache: the prompt's K/V in a longer buffer whose unfilled slots
    # hold garbage that attention_mask must hide.
    static, static_step = _static_cache(presents, step, extra=3)
    run("decoder", "decode-static", _decoder_args(static_step, cross, static))
    return cases


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


def validate(folder: Path, graphs: dict[str, GraphSpec], modules: dict[str, torch.nn.Module], info: ModelInfo,
             precision: str = "fp32", case: ValidationCase = ValidationCase(), progress=None) -> dict:
    """Return {graph: {case: {output: row}}}; raise ValidationError if any row fails."""
    tol = TOLERANCES[precision]
    report, _ = run_cases(folder, graphs, reference_cases(graphs, modules, info, case), tol, progress)
    failed = failures(report, tol)
    if failed:
        raise ValidationError(
            f"{len(failed)} output(s) differ from PyTorch past the {precision} tolerance "
            f"(atol {tol['atol']}, rtol {tol['rtol']}, cosine {tol['cosine']}):\n  " + "\n  ".join(failed),
            report,
        )
    return report


def _static_cache(presents, step: TextBatch, extra: int) -> tuple[tuple, TextBatch]:
    gen = torch.Generator().manual_seed(2)
    buffers = []
    for filled in presents:
        b, h, t, d = filled.shape
        buffer = torch.randn(b, h, t + extra, d, generator=gen) * 10
        buffer[:, :, :t] = filled
        buffers.append(buffer)
    past_mask = step.attention_mask[:, :-1]
    mask = torch.cat([past_mask, torch.zeros(past_mask.shape[0], extra, dtype=torch.long), step.attention_mask[:, -1:]], 1)
    return tuple(buffers), TextBatch(step.input_ids, mask, step.position_ids, step.image_attention_mask)


def _decoder_args(text: TextBatch, cross, past) -> tuple:
    keep = torch.tensor([text.input_ids.shape[1]])  # compare the logits of every position
    return (text.input_ids, text.attention_mask, text.position_ids, text.image_attention_mask, keep, *cross, *past)


def summarize(report: dict) -> list[tuple[str, str, str, float, float, float, bool]]:
    """Rows (graph, case, output, max_abs_diff, limit, cosine, ok) for printing."""
    return [
        (graph, case_name, name, row["max_abs_diff"], row["limit"], row["cosine"], row["ok"])
        for graph, cases in report.items()
        for case_name, rows in cases.items()
        for name, row in rows.items()
    ]

