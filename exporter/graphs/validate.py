"""Run every exported graph in ONNX Runtime against its PyTorch module and compare outputs.

The comparison itself (exporter.graphs.comparison) needs no torch; this module builds the PyTorch side.

Each graph is fed the PyTorch outputs of the graph before it, so a failure is attributed to the
graph that caused it. All mismatches are collected, then one ValidationError lists each tensor's
difference against its tolerance (the optimum-exporters habit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.graphs.comparison import Case, compare, cosine_similarity, failures, ort_session, run_cases, summarize
from exporter.graphs.inputs import TextBatch, next_step, sample_pixels, sample_prompt
from exporter.graphs.bounds import TOLERANCES, describe
from runtime.errors import ValidationError
from runtime.manifest import GraphSpec, ModelInfo

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ValidationCase:
    batch: int = 2
    images: int = 2
    seq: int = 12
    seed: int = 0


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


def validate(folder: Path, graphs: dict[str, GraphSpec], modules: dict[str, torch.nn.Module], info: ModelInfo,
             precision: str = "fp32", case: ValidationCase = ValidationCase(), progress=None,
             bound: dict | None = None, cases: list[Case] | None = None) -> dict:
    """Return {graph: {case: {output: row}}}; raise ValidationError if any row fails. `bound`: the
    precision's exporter.graphs.bounds entry (default: TOLERANCES); `cases`: reference_cases computed before."""
    tol = bound or TOLERANCES[precision]
    cases = cases if cases is not None else reference_cases(graphs, modules, info, case)
    report, _ = run_cases(folder, graphs, [c for c in cases if c.graph in graphs], tol, progress)
    failed = failures(report, tol)
    if failed:
        raise ValidationError(
            f"{len(failed)} output(s) differ from PyTorch past the {precision} tolerance "
            f"({describe(tol)}):\n  " + "\n  ".join(failed),
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
    every = torch.arange(text.input_ids.shape[1])  # compare the logits of every position
    return (text.input_ids, text.attention_mask, text.position_ids, text.image_attention_mask, every, *cross, *past)


__all__ = ["Case", "ValidationCase", "compare", "cosine_similarity", "failures", "ort_session", "reference_cases",
           "run_cases", "summarize", "validate"]
