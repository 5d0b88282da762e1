"""A real-width export end to end: the published 9B widths (random:9b-slice: text 4096 wide, 32 heads,
MLP 11008; vision 1280 at 224 px, patch 14; 64 latents; cross-attention every 4 layers; 32000 + 2
vocabulary) with only four decoder layers, whose decoder graph passes 2 GB in FP32 and in FP16.

    python scripts/real_width.py                              # random:9b-slice, FP32 + FP16 (~15 min, ~17 GB)
    python scripts/real_width.py --json docs/real-width-cpu.json
    python scripts/real_width.py --model random:tiny --external-data-threshold 0 --new-tokens 4   # seconds (CI)
    python scripts/real_width.py --precisions fp32 int8wo --ort-optimized --json docs/real-width-int8wo-cpu.json

Steps, all in one run on one machine:
  export     `idefics-export --fp16` in a child process (validation against PyTorch included, as a
             user runs it): wall time and the child's peak resident memory.
  files      every graph and its external data file: sizes, onnx.checker on the path (the only way
             past 2 GB), every initializer of a graph with external data really in its .data file.
  reference  transformers' IdeficsForVisionText2Text built from the same preset and seed, greedy
             `generate` on one prompt with a real photo (scikit-image's astronaut): the tokens and
             the seconds.
  sessions   runtime.Session per precision (ONNX Runtime CPU): load seconds and peak memory while
             loading and generating, the same prompt's greedy tokens against transformers', and
             each reduced precision against FP32 (free-running token share, teacher-forced top-1),
             the seconds its images and its prompt took.

With --ort-optimized the export writes the ONNX Runtime-optimized graphs too, and each precision's
Session runs in both flavours (rows "fp32" / "fp16" with portable=True, "fp32-ort" / "fp16-ort").

Exits 1 when FP32 greedy tokens (either flavour) differ from transformers' (FP16 is reported, not
judged: a reduced precision may flip near ties).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("real_width")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:9b-slice", help="a random: preset (default: random:9b-slice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="export folder (default: a temporary one, removed)")
    p.add_argument("--reuse", action="store_true", help="use the export already in --out instead of exporting")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "int8wo"],
                   help="Session precisions to run (fp32 always runs: the others are compared with it); fp16 "
                        "exports with --fp16, int8wo with --int8-weight-only (default: fp32 fp16)")
    p.add_argument("--ort-optimized", action="store_true",
                   help="export with --ort-optimized too and run each precision's Session in both flavours "
                        "(the ORT decoder and fused vision, and portable=True)")
    p.add_argument("--external-data-threshold", type=int, default=None, metavar="BYTES",
                   help="passed to idefics-export (default: its own, just under 2 GB)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    args.precisions = ["fp32", *(x for x in dict.fromkeys(args.precisions) if x != "fp32")]
    return args


def peak_reset() -> None:
    """Reset this process's peak resident memory (VmHWM), so the next phase's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_export(args, out: Path) -> dict:
    command = [sys.executable, "-c", "import sys; from exporter.cli import main; sys.exit(main())",
               "--model", args.model, "--seed", str(args.seed), "--force", "--quiet"]
    if "fp16" in args.precisions:
        command.append("--fp16")
    if "int8wo" in args.precisions:
        command.append("--int8-weight-only")
    if args.ort_optimized:
        command.append("--ort-optimized")
    if args.external_data_threshold is not None:
        command += ["--external-data-threshold", str(args.external_data_threshold)]
    command.append(str(out))
    log.info("exporting: %s", " ".join(command[3:]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"idefics-export failed ({done.returncode}):\n{done.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    # what the export left out or changed (an ORT graph past its bound, an FP32 cache) is in its warnings
    warnings = []
    for line in done.stderr.splitlines():
        if line.startswith("WARNING"):
            warnings.append(line)
        elif warnings and line.startswith("  "):  # a warning's continuation lines
            warnings[-1] += "\n" + line
    return dict(seconds=round(seconds, 1), peak_rss_gib=round(peak, 2), warnings=warnings)


def check_files(out: Path) -> dict:
    """Per graph file: sizes, and (for external data) that onnx loads it by path and every
    initializer's bytes are in the .data file the manifest names."""
    import onnx

    from runtime.manifest import Manifest

    manifest = Manifest.load(out)
    # ONNX Runtime-only graphs hold ops onnx.checker does not know (SimplifiedLayerNormalization in
    # the ONNX domain): loading them in the Session is their check
    ort_only = {g.file for v in manifest.ort_optimized.values() for g in v.graphs.values()}
    files = {}
    for spec in manifest.all_graphs():
        path = out / spec.file
        row = dict(graph_mib=round(path.stat().st_size / 2**20, 2), external_data=spec.external_data)
        if spec.file in ort_only:
            row["checker"] = "skipped (ONNX Runtime-only ops; the Session loads it)"
        else:
            onnx.checker.check_model(str(path))  # by path: a ModelProto past 2 GB cannot be checked in memory
        if spec.external_data:
            data = out / spec.external_data
            row["data_gib"] = round(data.stat().st_size / 2**30, 3)
            proto = onnx.load(str(path), load_external_data=False)
            inits = list(proto.graph.initializer)
            outside = [{e.key: e.value for e in t.external_data} for t in inits
                       if t.data_location == onnx.TensorProto.EXTERNAL]
            locations = {entry["location"] for entry in outside}
            if locations != {spec.external_data}:
                raise SystemExit(f"{spec.file}: external data in {sorted(locations)}, the manifest says {spec.external_data}")
            extent = max(int(entry["offset"]) + int(entry["length"]) for entry in outside)
            if extent > data.stat().st_size:
                raise SystemExit(f"{spec.external_data}: {data.stat().st_size} bytes, its graph reads up to {extent}")
            row["external_initializers"] = f"{len(outside)}/{len(inits)}"
        files[spec.file] = row
    return files


def prompt(info, length: int):
    from calibration.images import builtin_images, synthetic_prompts

    photo = builtin_images(1)[0]
    return synthetic_prompts([[photo]], info.image_size, info.vocab_size - len(info.image_token_ids), length=length)


def reference(args, batch) -> dict:
    import torch

    from runtime.reference.sources import load, parse_source

    peak_reset()
    start = time.perf_counter()
    model = load(parse_source(args.model, args.seed)).model
    built = time.perf_counter() - start
    ids, mask, pixels, image_mask = (torch.from_numpy(x) for x in batch)
    start = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                   image_attention_mask=image_mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False).numpy()
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    return dict(tokens=sequences[:, ids.shape[1]:].tolist(), build_s=round(built, 1),
                generate_s=round(seconds, 2), peak_rss_gib=round(peak_gib(), 2))


def sessions(args, out: Path, batch, expected: np.ndarray) -> dict:
    from runtime import Session
    from runtime.compare import compare_sessions
    from runtime.session import check_request

    rows, loaded = {}, {}
    runs = [(p, flavour) for p in args.precisions for flavour in (("portable", "ort") if args.ort_optimized
                                                                   else ("portable",))]
    for precision, flavour in runs:
        key = precision if flavour == "portable" else f"{precision}-ort"
        peak_reset()
        start = time.perf_counter()
        session = Session(out, precision=precision, portable=flavour == "portable" and args.ort_optimized)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        result = session.generate(*batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        generate_s = time.perf_counter() - start
        tokens = result.new_tokens
        equal = tokens == expected
        rows[key] = dict(
            flavour=session.flavour, decoder=session.graphs.decoder.spec.file,
            load_s=round(load_s, 1), generate_s=round(generate_s, 2), peak_rss_gib=round(peak_gib(), 2),
            tokens=tokens.tolist(), equal_to_transformers=bool(equal.all()),
            token_share_vs_transformers=round(float(equal.mean()), 4),
            first_token_s=round(result.timings.get("first_token", float("nan")), 2),
            **{f"{phase}_s": round(result.timings[phase], 4) for phase in ("vision", "prefill")
               if isinstance(result.timings.get(phase), float)},
        )
        if key == "fp32" or precision != "fp32":  # FP32 portable is the others' reference
            loaded[key] = session
        else:  # one real-width decoder fewer in memory
            session.close()
    for key in [k for k in loaded if k != "fp32"] if "fp32" in loaded else []:
        request = check_request(loaded["fp32"].manifest, *batch)
        agreement = compare_sessions(loaded["fp32"], loaded[key], request, args.new_tokens)
        rows[key]["vs_fp32"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in agreement.as_dict().items()}
    for session in loaded.values():
        session.close()
    return rows


def machine() -> dict:
    import onnxruntime
    import torch
    import transformers

    return dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                python=platform.python_version(), onnxruntime=onnxruntime.__version__, torch=torch.__version__,
                transformers=transformers.__version__)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="real-width-") as scratch:
        out = args.out or Path(scratch) / "out"
        result = dict(model=args.model, seed=args.seed, machine=machine())
        if not args.reuse:
            result["export"] = run_export(args, out)
            log.info("export: %s", result["export"])
        result["files"] = check_files(out)
        for name, row in result["files"].items():
            log.info("%s: %s", name, row)

        from runtime.manifest import Manifest

        batch = prompt(Manifest.load(out).model, args.prompt_tokens)
        result["reference"] = reference(args, batch)
        log.info("transformers: %s", {k: v for k, v in result["reference"].items() if k != "tokens"})
        result["sessions"] = sessions(args, out, batch, np.asarray(result["reference"]["tokens"]))
        for precision, row in result["sessions"].items():
            log.info("Session %s: %s", precision, {k: v for k, v in row.items() if k != "tokens"})
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        log.info("wrote %s", args.json)
    differ = [key for key in ("fp32", "fp32-ort") if key in result["sessions"]
              and not result["sessions"][key]["equal_to_transformers"]]
    if differ:
        log.error("FP32 greedy tokens differ from transformers' (%s)", ", ".join(differ))
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
