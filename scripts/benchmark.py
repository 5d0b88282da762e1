"""Session vs transformers' eager generate, side by side in one run on the same weights.

    python scripts/benchmark.py [--preset medium] [--out bench/] [--tokens 16]

For batch 1 and 4, 1 and 4 images, prompt length 64 and 1024 it measures time to first token and
decode ms/token (median over the generated tokens after the first) for both, on a random-weight
preset (default: medium, hidden 768, 8 layers, 257 image tokens per image), and writes
benchmark.json and benchmark.png into --out. Both sides get the same threads (torch and ONNX
Runtime default to the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporter.export import ExportConfig, export
from exporter.load import build_random
from runtime import Session
from runtime.loop import Timings, generate_tokens
from runtime.sampling import SamplingConfig


class _Clock:
    """transformers streamer that timestamps every token it is given."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def make_inputs(cfg, batch: int, images: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size = cfg.vision_config.image_size
    ids = rng.integers(3, cfg.vocab_size, (batch, length), dtype=np.int64)
    image_mask = np.zeros((batch, length, images), np.int64)
    for k in range(images):  # image k after token 1 + 3k; later tokens see only the latest image
        image_mask[:, 1 + 3 * k:] = 0
        image_mask[:, 1 + 3 * k:, k] = 1
    return dict(
        input_ids=ids, attention_mask=np.ones_like(ids), image_attention_mask=image_mask,
        pixel_values=rng.standard_normal((batch, images, 3, size, size), dtype=np.float32),
    )


def settle() -> None:
    # Let the other side's idle threads (torch's OpenMP, ONNX Runtime's pools) stop spinning, so
    # neither measurement starts on cores still busy from the previous one.
    time.sleep(0.5)


def time_hf(model, inputs, tokens: int) -> tuple[float, float]:
    settle()
    clock = _Clock()
    batch = {k: torch.from_numpy(v) for k, v in inputs.items()}
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock)
    return clock.stamps[0] - start, statistics.median(np.diff(clock.stamps))


def time_session(session, inputs, tokens: int) -> tuple[float, float]:
    from runtime.session import check_request

    cfg = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    settle()
    start = time.perf_counter()
    request = check_request(session.manifest, **inputs)
    stamps = [time.perf_counter() for _ in generate_tokens(session.graphs, request, cfg, Timings())]
    return stamps[0] - start, statistics.median(np.diff(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium", help="random-weight preset to measure (default: medium)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for benchmark.json/.png")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per measurement")
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precisions", nargs="+", default=["fp32"],
                        help="Session precisions to measure: fp32, fp16, int8, int8wo, or DECODE/PREFILL such as "
                             "int8wo/fp32 (decode with int8wo, prefill with fp32); default: fp32")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_random(args.preset, seed=0)
    cfg = model.config
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "out"
        model.save_pretrained(ckpt)
        wanted = {part for p in args.precisions for part in p.split("/")}
        variants = tuple(p for p in ("fp16", "int8", "int8wo") if p in wanted)
        export(ExportConfig(output=out, model=str(ckpt), max_images=max(args.images), max_batch=max(args.batches),
                            precisions=variants))
        sessions = {p: Session(out, precision=p.split("/")[0], prefill_precision=(p.split("/") + [None])[1])
                    for p in args.precisions}
        time_hf(model, make_inputs(cfg, 1, 1, 8), 2)  # warm-up for transformers too
        for batch in args.batches:
            for images in args.images:
                for position in args.positions:
                    inputs = make_inputs(cfg, batch, images, position)
                    hf_ttft, hf_tok = time_hf(model, inputs, args.tokens)
                    for precision, session in sessions.items():
                        time_session(session, inputs, 2)  # warm-up: first-run allocations
                        s_ttft, s_tok = time_session(session, inputs, args.tokens)
                        row = dict(batch=batch, images=images, position=position, precision=precision,
                                   hf_ttft_s=hf_ttft, session_ttft_s=s_ttft,
                                   hf_decode_ms=hf_tok * 1e3, session_decode_ms=s_tok * 1e3,
                                   decode_speedup=hf_tok / s_tok, ttft_speedup=hf_ttft / s_ttft)
                        rows.append(row)
                        print(f"batch {batch} images {images} position {position} {precision}: decode "
                              f"{row['hf_decode_ms']:.1f} -> {row['session_decode_ms']:.1f} ms/token "
                              f"({row['decode_speedup']:.2f}x), TTFT {hf_ttft:.2f} -> {s_ttft:.2f} s "
                              f"({row['ttft_speedup']:.2f}x)", flush=True)
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cores=torch.get_num_threads(), torch=torch.__version__)
    result = dict(preset=args.preset, tokens=args.tokens, machine=machine, rows=rows)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "benchmark.png", args.preset)
    print(table(rows))


def table(rows) -> str:
    lines = ["| batch | images | position | Session precision | decode ms/token HF | Session | speed-up | TTFT s HF | "
             "Session | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['images']} | {r['position']} | {r['precision']} | {r['hf_decode_ms']:.1f} | "
                     f"{r['session_decode_ms']:.1f} | {r['decode_speedup']:.2f}x | {r['hf_ttft_s']:.2f} | "
                     f"{r['session_ttft_s']:.2f} | {r['ttft_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows, path: Path, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b{r['batch']} i{r['images']} p{r['position']} {r['precision']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    for ax, (hf, ours, title) in zip(axes, [("hf_decode_ms", "session_decode_ms", "decode ms/token"),
                                            ("hf_ttft_s", "session_ttft_s", "time to first token (s)")]):
        ax.bar(x - 0.2, [r[hf] for r in rows], 0.4, label="transformers eager")
        ax.bar(x + 0.2, [r[ours] for r in rows], 0.4, label="Session (ONNX Runtime, precision as labelled)")
        ax.set_xticks(x, labels, rotation=45, ha="right")
        ax.set_title(f"{title}, random:{preset}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
