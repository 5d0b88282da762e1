"""Session vs transformers' generate, side by side in one run on the same weights.

    python scripts/benchmark.py [--preset medium] [--out bench/] [--tokens 16]
    python scripts/benchmark.py --device cuda [--backends onnxruntime tensorrt] [--precisions fp16 int8]
    python scripts/benchmark.py --precisions fp32 int8wo --flavours portable ort

For every batch, image count and prompt length asked for it measures time to first token and
decode ms/token (median over the generated tokens after the first; with --repeats, the median of
that many turns, transformers and every Session taking turns) for both, on a random-weight
preset (default: medium, hidden 768, 8 layers, 257 image tokens per image), and writes
benchmark.json and benchmark.png into --out.

CPU mode (--device cpu, the default): transformers runs eager in FP32; the Session runs ONNX
Runtime's CPU provider, by default the FP32 graphs; batch 1 and 4, 1 and 4 images, prompt length
64 and 1024. Both sides get the same threads (torch and ONNX Runtime default to the machine's cores).
Both decoder flavours side by side (--flavours): "portable" (the standard-op graphs) and "ort" (the
export's --ort-optimized graphs: the decoder with GroupQueryAttention over a shared cache, prompts
and decode steps, in fp32 / fp16 / int8wo on ONNX Runtime's CPU and in fp16 on CUDA; the fused
vision graph).

GPU mode (--device cuda): transformers runs the same random model in FP16 on the GPU (eager, its
timestamps taken after torch.cuda.synchronize()); the Session runs each of --backends (ONNX
Runtime's CUDA provider and/or TensorRT engines, which are built into the export after it) on the
FP16 graphs by default; batch 1 and 8 by default. The project's targets on GPU: decode at least
2x faster than transformers FP16 (decode_speedup >= 2), and within 1.5x of the memory-bandwidth
floor (floor_ratio <= 1.5).

The memory-bandwidth floor: decoding one token reads every decoder weight at least once, so it
cannot take less than weight bytes / memory bandwidth. The bandwidth is measured once per run (the
best of a few device-to-device copies of a large buffer, counting read and write), the weight bytes
are those of the decoder's ONNX file(s) of the precision decoded with, less the token-embedding
table (a step gathers only its tokens' rows); floor_ms = weight bytes /
bandwidth and floor_ratio = Session decode ms/token / floor_ms. The floor leaves out the KV cache
and cross-attention K/V reads (which grow with batch, images and position), so it is a lower
bound; a copy's bandwidth can sit a little under what a multi-threaded read reaches, so a ratio
just under 1 on CPU is possible.

All figures that matter are ratios (speed-ups, floor_ratio) measured side by side in one run on one
machine: absolute times vary with the machine, its load and its clocks, the ratios much less. Compare
absolute numbers only between runs on the same machine; benchmark.json records the machine (with
the GPU's name and the measured bandwidth) and the date.
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
from exporter.precision.mixed import SearchBudget
from runtime import Session
from runtime.loop import Timings, generate_tokens
from runtime.manifest import Manifest
from runtime.reference.sources import build_random
from runtime.sampling import SamplingConfig

PRECISIONS = ("fp32", "fp16", "int8", "int8wo")
TENSORRT_PRECISIONS = ("fp16", "int8")  # TensorRT builds from the strongly typed FP16/INT8 graphs only
DEFAULTS = {  # per device, for the options left out
    "cpu": dict(precisions=["fp32"], batches=[1, 4], flavours=["portable", "ort"]),
    "cuda": dict(precisions=["fp16"], batches=[1, 8], flavours=["portable"]),
}
FLAVOURS = ("portable", "ort")
BANDWIDTH_BYTES = {"cpu": 256 * 1024**2, "cuda": 1024**3}  # buffer measure_bandwidth copies by default


class _Clock:
    """transformers streamer that timestamps every token it is given (after the GPU's work is done
    when `sync`)."""

    def __init__(self, sync: bool = False):
        self.stamps: list[float] = []
        self.prompt_seen = False
        self.sync = sync

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.sync:
            torch.cuda.synchronize()
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


def time_hf(model, inputs, tokens: int, device: str = "cpu") -> tuple[float, float]:
    cuda = device != "cpu"
    settle()
    clock = _Clock(sync=cuda)
    batch = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    if cuda:
        batch["pixel_values"] = batch["pixel_values"].half()
        torch.cuda.synchronize()
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
    # greedy steps copy each step's token ids to the host, which waits for the device: the stamps
    # on cuda are taken after the step's work is done
    stamps = [time.perf_counter() for _ in generate_tokens(session.graphs, request, cfg, Timings())]
    return stamps[0] - start, statistics.median(np.diff(stamps))


def measure_bandwidth(device: str = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth of `device` in bytes/s: the best of `repeats` copies of an `nbytes` buffer
    into another (default 256 MiB on cpu, 1 GiB on cuda), counting the read and the write."""
    cuda = device != "cpu"
    nbytes = nbytes or BANDWIDTH_BYTES["cuda" if cuda else "cpu"]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # written once: pages are mapped
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: maps dst's pages, loads the copy kernel
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def decoder_weight_bytes(out: Path, precision: str, flavour: str = "portable") -> int:
    """Bytes of weights one decode step reads: the decoder's ONNX file and its external data (if
    any) in export `out` minus the token-embedding table (a step gathers only B of its rows), for
    the precision decoded with: "fp32", "fp16", ... or "DECODE/PREFILL" such as "int8wo/fp32";
    flavour "ort": the --ort-optimized decoder of that precision."""
    manifest = Manifest.load(out)
    decode = precision.split("/")[0]
    ort = manifest.ort_graphs(decode).get("decoder") if flavour == "ort" else None
    spec = ort or manifest.graphs_for(decode)["decoder"]  # "ort" without an ORT decoder decodes portable
    files = [spec.file] + ([spec.external_data] if spec.external_data else [])
    return sum((Path(out) / name).stat().st_size for name in files) - embedding_bytes(Path(out) / spec.file)


def embedding_bytes(path: Path) -> int:
    """Bytes of the initializer the graph's Gather over input_ids reads (the token embedding)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" \
                and node.input[0] in initializers:
            table = initializers[node.input[0]]
            itemsize = helper.tensor_dtype_to_np_dtype(table.data_type).itemsize
            return int(np.prod(table.dims)) * itemsize
    raise ValueError(f"{path}: no Gather of input_ids over an initializer (the token embedding)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium",
                        help="random-weight preset of runtime/reference/presets.py to measure (default: medium)")
    parser.add_argument("--out", type=Path, default=Path("bench"),
                        help="folder for benchmark.json and benchmark.png (default: bench)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both sides run: cpu (transformers FP32, ONNX Runtime's CPU provider) or cuda "
                             "(transformers FP16 on the GPU, the Session's --backends on the GPU); default: cpu")
    parser.add_argument("--backends", nargs="+", choices=["onnxruntime", "tensorrt"], default=["onnxruntime"],
                        help="Session backends to measure, each against the same transformers run; tensorrt needs "
                             "--device cuda and fp16/int8 precisions, and builds the engines after the export "
                             "(default: onnxruntime)")
    parser.add_argument("--tokens", type=int, default=16,
                        help="tokens generated per measurement; decode ms/token is the median over all but the "
                             "first (default: 16)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measurements of every cell, transformers and each Session taking turns; each figure "
                             "is the median over them (default: 1; this project's 2-core VM moves by up to 1.5x "
                             "between minutes, so the README's figures use 3)")
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 1024],
                        help="prompt lengths in tokens (default: 64 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default: 1 4 on cpu, 1 8 on cuda)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4],
                        help="images per prompt (default: 1 4)")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="Session precisions to measure: fp32, fp16, int8, int8wo, or DECODE/PREFILL such as "
                             "int8wo/fp32 (decode with int8wo, prefill with fp32); default: fp32 on cpu, fp16 on cuda")
    parser.add_argument("--flavours", nargs="+", choices=FLAVOURS, default=None,
                        help="graph flavours to measure side by side: portable (standard ops) and ort (the "
                             "--ort-optimized graphs: the decoder on ONNX Runtime's CPU in fp32, fp16 and int8wo, "
                             "on CUDA in fp16); default: both on cpu, portable on cuda")
    parser.add_argument("--search-rounds", type=int, default=SearchBudget.rounds, metavar="N",
                        help="the export's mixed-precision search budget for fp16 / int8 (idefics-export "
                             f"--search-rounds; default: {SearchBudget.rounds}). random:medium's random weights are "
                             "harsh on INT8: its search can need more rounds than a trained model's")
    args = parser.parse_args(argv)
    if args.search_rounds < 0:
        parser.error(f"--search-rounds must be 0 or more, got {args.search_rounds}")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value))
    for precision in args.precisions:
        parts = precision.split("/")
        if len(parts) > 2 or any(p not in PRECISIONS for p in parts):
            parser.error(f"--precisions {precision}: use one of {', '.join(PRECISIONS)} or DECODE/PREFILL of two")
        if "tensorrt" in args.backends and any(p not in TENSORRT_PRECISIONS for p in parts):
            parser.error(f"--backends tensorrt cannot run {precision}: TensorRT engines are built from the "
                         f"{' and '.join(TENSORRT_PRECISIONS)} graphs only")
    if "tensorrt" in args.backends and args.device != "cuda":
        parser.error("--backends tensorrt runs on an NVIDIA GPU: pass --device cuda")
    if "ort" in args.flavours and "onnxruntime" not in args.backends:
        parser.error("--flavours ort: the ONNX Runtime-optimized graphs run on --backends onnxruntime only")
    for key in ("tokens", "positions", "batches", "images", "repeats"):
        values = getattr(args, key)
        if min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{key} must be at least 1")
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (decode time is measured between tokens)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"

    bandwidth = measure_bandwidth(args.device)  # first, while the device's memory is still free
    model = build_random(args.preset, seed=0)
    cfg = model.config
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "out"
        model.save_pretrained(ckpt)
        wanted = {part for p in args.precisions for part in p.split("/")}
        variants = tuple(p for p in ("fp16", "int8", "int8wo") if p in wanted)
        export(ExportConfig(output=out, model=str(ckpt), max_images=max(args.images), max_batch=max(args.batches),
                            precisions=variants, ort_optimized="ort" in args.flavours,
                            search=SearchBudget(rounds=args.search_rounds)))
        if "tensorrt" in args.backends:
            from exporter.engines.build import BuildConfig, build_engines

            for precision in variants:  # only fp16/int8 get past parse_args with tensorrt
                build_engines(out, BuildConfig(precision))
        if cuda:
            model.to("cuda", torch.float16)
        manifest = Manifest.load(out)
        searches = {p: {k: v.search.get(k) for k in ("rounds", "top1", "top1_prompts")} | {
                        "kept": {g: len(nodes) for g, nodes in v.high_precision_nodes.items()}}
                    for p, v in manifest.variants.items()}
        # (backend, flavour, precision) -> Session; "ort" where the export has that precision's ORT decoder
        sessions = {(backend, flavour, p): Session(out, backend=backend, device=args.device, precision=p.split("/")[0],
                                                   prefill_precision=(p.split("/") + [None])[1],
                                                   portable=flavour == "portable")
                    for backend in args.backends for flavour in args.flavours for p in args.precisions
                    if flavour == "portable" or (backend == "onnxruntime" and manifest.ort_graphs(p.split("/")[0]))}
        weight_bytes = {(f, p): decoder_weight_bytes(out, p, f) for _, f, p in sessions}
        time_hf(model, make_inputs(cfg, 1, 1, 8), 2, args.device)  # warm-up for transformers too
        for batch in args.batches:
            for images in args.images:
                for position in args.positions:
                    inputs = make_inputs(cfg, batch, images, position)
                    for session in sessions.values():
                        time_session(session, inputs, 2)  # warm-up: first-run allocations
                    # transformers and every Session take turns, so a slow minute on this machine
                    # falls on all of them; each figure is the median of its turns
                    hf_runs, runs = [], {key: [] for key in sessions}
                    for _ in range(args.repeats):
                        hf_runs.append(time_hf(model, inputs, args.tokens, args.device))
                        for key_, session in sessions.items():
                            runs[key_].append(time_session(session, inputs, args.tokens))
                    hf_ttft, hf_tok = (statistics.median(values) for values in zip(*hf_runs))
                    for (backend, flavour, precision), session in sessions.items():
                        key = f"{backend}:{precision}" + ("" if flavour == "portable" else f" ({flavour})")
                        s_ttft, s_tok = (statistics.median(values) for values in zip(*runs[(backend, flavour, precision)]))
                        floor_ms = weight_bytes[(flavour, precision)] / bandwidth * 1e3
                        row = dict(batch=batch, images=images, position=position, backend=backend,
                                   precision=precision, flavour=session.flavour, hf_ttft_s=hf_ttft,
                                   session_ttft_s=s_ttft,
                                   hf_decode_ms=hf_tok * 1e3, session_decode_ms=s_tok * 1e3,
                                   decode_speedup=hf_tok / s_tok, ttft_speedup=hf_ttft / s_ttft,
                                   weight_bytes=weight_bytes[(flavour, precision)], floor_ms=floor_ms,
                                   floor_ratio=s_tok * 1e3 / floor_ms)
                        rows.append(row)
                        print(f"batch {batch} images {images} position {position} {key}: decode "
                              f"{row['hf_decode_ms']:.1f} -> {row['session_decode_ms']:.1f} ms/token "
                              f"({row['decode_speedup']:.2f}x, {row['floor_ratio']:.2f}x the "
                              f"{floor_ms:.2f} ms floor), TTFT {hf_ttft:.2f} -> {s_ttft:.2f} s "
                              f"({row['ttft_speedup']:.2f}x)", flush=True)
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cores=torch.get_num_threads(), torch=torch.__version__, device=args.device,
                   bandwidth_gb_s=bandwidth / 1e9, date=time.strftime("%Y-%m-%d"))
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name()
    reference = "transformers eager FP16" if cuda else "transformers eager FP32"
    result = dict(preset=args.preset, tokens=args.tokens, repeats=args.repeats, device=args.device, reference=reference,
                  search_rounds=args.search_rounds, searches=searches, machine=machine, rows=rows)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "benchmark.png", args.preset, reference)
    print(table(rows))


def table(rows) -> str:
    lines = ["| batch | images | position | Session | decode ms/token HF | Session | speed-up | floor ratio | "
             "TTFT s HF | Session | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['images']} | {r['position']} | {_label(r)} | "
                     f"{r['hf_decode_ms']:.1f} | {r['session_decode_ms']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{r['floor_ratio']:.2f}x | {r['hf_ttft_s']:.2f} | {r['session_ttft_s']:.2f} | "
                     f"{r['ttft_speedup']:.2f}x |")
    return "\n".join(lines)


def _label(r) -> str:
    flavour = r.get("flavour", "portable")
    return f"{r['backend']}:{r['precision']}" + ("" if flavour == "portable" else f" ({flavour})")


def plot(rows, path: Path, preset: str, reference: str = "transformers eager FP32") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b{r['batch']} i{r['images']} p{r['position']} {_label(r)}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    for ax, (hf, ours, title) in zip(axes, [("hf_decode_ms", "session_decode_ms", "decode ms/token"),
                                            ("hf_ttft_s", "session_ttft_s", "time to first token (s)")]):
        ax.bar(x - 0.2, [r[hf] for r in rows], 0.4, label=reference)
        ax.bar(x + 0.2, [r[ours] for r in rows], 0.4, label="Session (backend:precision as labelled)")
        if hf == "hf_decode_ms":
            ax.scatter(x + 0.2, [r["floor_ms"] for r in rows], marker="_", s=200, color="black", zorder=3,
                       label="memory-bandwidth floor")
        ax.set_xticks(x, labels, rotation=45, ha="right")
        ax.set_title(f"{title}, random:{preset}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
