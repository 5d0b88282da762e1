"""FP32 vs FP16 vs INT8 of one export, side by side: size on disk, Session load time, decode
speed, and agreement with FP32 on real-photo prompts (README's precision table).

    python scripts/precision_report.py                       # the embedded default
    python scripts/precision_report.py --model random:medium --json medium.json

Agreement (runtime.compare): free-running greedy token share and first divergence, teacher-forced
next-token top-1 agreement, and the share of FP32 positions whose top-2 logits are within 1e-2
(near ties that any reduced precision may flip; random weights have many).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from calibration.images import builtin_images
from exporter.export import ExportConfig, export
from runtime import Session
from runtime.compare import compare_sessions
from runtime.loop import Timings, generate_tokens
from runtime.sampling import SamplingConfig
from runtime.session import check_request

QUESTIONS = ("Describe this image.", "What is in the picture?", "What colours do you see?", "Where was this taken?")


def prompts_request(session, n: int):
    photos = builtin_images(n)
    info = session.manifest.model
    if session.encoder is not None:
        prompts = [["User:", photos[i], f"{QUESTIONS[i % 4]}<end_of_utterance>\nAssistant:"] for i in range(n)]
        enc = session.encoder.encode(prompts)
        return check_request(session.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values,
                             enc.image_attention_mask)
    from calibration.images import synthetic_prompts

    batch = synthetic_prompts([[photo] for photo in photos], info.image_size, info.vocab_size - len(info.image_token_ids))
    return check_request(session.manifest, *batch)


def decode_ms(session, request, tokens: int = 24) -> float:
    one = type(request)(request.input_ids[:1], request.attention_mask[:1],
                        None if request.pixel_values is None else request.pixel_values[:1],
                        request.image_attention_mask[:1])
    cfg = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    list(generate_tokens(session.graphs, one, SamplingConfig(max_new_tokens=2), Timings()))  # warm-up
    stamps = [time.perf_counter() for _ in generate_tokens(session.graphs, one, cfg, Timings())]
    return statistics.median(np.diff(stamps)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="as idefics-export --model (default: the embedded default)")
    parser.add_argument("--export", type=Path, help="an existing export with fp16 and int8 variants to reuse")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.export
        if folder is None:
            folder = Path(tmp) / "out"
            export(ExportConfig(output=folder, model=args.model, precisions=("fp16", "int8", "int8wo"),
                                max_batch=args.prompts, progress=False))
        rows = measure(folder, args.prompts, args.tokens)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def measure(folder: Path, n: int, tokens: int) -> dict:
    reference = Session(folder, precision="fp32")
    rows = {}
    request = prompts_request(reference, n)
    for precision in ("fp32", *reference.manifest.variants):
        start = time.perf_counter()
        session = reference if precision == "fp32" else Session(folder, precision=precision)
        load_s = time.perf_counter() - start if precision != "fp32" else None
        graphs = session.graphs.decoder.spec, session.graphs.vision.spec, session.graphs.perceiver.spec
        size = sum((folder / g.file).stat().st_size + ((folder / g.external_data).stat().st_size
                   if g.external_data else 0) for g in graphs)
        row = dict(size_mb=size / 1e6, decode_ms=decode_ms(session, request))
        if precision == "fp32":
            start = time.perf_counter()
            Session(folder, precision="fp32")
            row["load_s"] = time.perf_counter() - start
        else:
            row["load_s"] = load_s
            row.update(compare_sessions(reference, session, request, tokens).as_dict())
        rows[precision] = row
    return rows


def table(rows: dict) -> str:
    lines = ["| precision | size MB | load s | decode ms/token | greedy tokens equal | first divergence (min / median) "
             "| top-1 next-token agreement | FP32 near ties |", "|---|---|---|---|---|---|---|---|"]
    for precision, r in rows.items():
        if precision == "fp32":
            lines.append(f"| fp32 | {r['size_mb']:.1f} | {r['load_s']:.2f} | {r['decode_ms']:.1f} | - | - | - | - |")
            continue
        fd = r["first_divergence"]
        lines.append(f"| {precision} | {r['size_mb']:.1f} | {r['load_s']:.2f} | {r['decode_ms']:.1f} | "
                     f"{r['token_share']:.1%} | {min(fd)} / {int(np.median(fd))} | {r['top1_share']:.1%} | "
                     f"{r['near_tie_share']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
