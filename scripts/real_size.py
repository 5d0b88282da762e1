"""The published sizes on this machine: the layer-streamed export (idefics-export --stream) of a
random preset in each precision asked, then a Session of it, against a layer-streamed FP32 reference.

    python scripts/real_size.py --model random:9b --precisions int8wo int4wo --json docs/real-size-9b-cpu.json
    python scripts/real_size.py --model random:80b --precisions int4wo --no-session    # the export alone
    python scripts/real_size.py --model random:9b-slice --precisions fp32 int8wo --against-transformers
    python scripts/real_size.py --model random:tiny --precisions fp32 int8wo --prompts 2 --tokens 4  # seconds (CI)

Per precision, all in one run on one machine:
  export     `idefics-export --stream --model M --PRECISION` in a child process under /usr/bin/time -v:
             wall seconds, peak resident memory (the child's), the export's disk, seconds per piece
             (vision, perceiver, decoder head / layers / tail: whether time grows linearly with depth)
             and the per-layer validation table's worst rows. The random checkpoint of a preset is
             written once before the first export (timed apart: it is not the export's).
  session    runtime.Session(precision) in a child process: load seconds, peak resident memory,
             ms/token of greedy decoding; each of `--prompts` prompts (a built-in photo each) is
             generated `--tokens` greedy tokens and read back teacher-forced.
  top-1      the FP32 reference of those sequences, transformers' modules run one layer at a time
             from the checkpoint (exporter.stream.reference): the share of positions where the
             Session's argmax is FP32's. The sequences are the Session's own greedy tokens (an FP32
             greedy generation at 9B would be one streamed pass per token), so the context is the
             reduced precision's; each next token is judged against FP32 on it.
  same      (--against-transformers, FP32) transformers' own model loaded whole from the same
             checkpoint, greedy on the same prompts: its tokens against the FP32 Session's.
The export folder is removed after its Session ran (--keep DIR keeps it there), so a 9B run needs
the disk of one precision's export at a time, plus the random checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("real_size")
ROOT = Path(__file__).resolve().parents[1]
FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"], "int8wo": ["--int8-weight-only"], "int4wo": ["--int4-weight-only"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:9b", help="a random: preset (default: random:9b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", nargs="+", default=["int8wo", "int4wo"], choices=list(FLAGS))
    p.add_argument("--prompts", type=int, default=4, help="prompts read teacher-forced (default: 4)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default: 32)")
    p.add_argument("--max-batch", type=int, default=1, help="the export's --max-batch (default: 1; the Session's "
                   "cache is sized by it and --max-seq-len)")
    p.add_argument("--max-seq-len", type=int, default=512, help="the export's --max-seq-len (default: 512)")
    p.add_argument("--no-session", action="store_true", help="measure the export only")
    p.add_argument("--against-transformers", action="store_true",
                   help="also load the whole transformers model from the checkpoint (where it fits in memory: "
                        "random:9b-slice, not random:9b) and compare its greedy tokens with the fp32 Session's")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep each export in DIR/PRECISION")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if not args.model.startswith("random:"):
        p.error("--model: a random: preset (the script writes and reads its random checkpoint)")
    return args


def machine() -> dict:
    from runtime import cpu

    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:")), 0)
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "cpu": cpu.describe(), "platform": platform.platform()}


def checkpoint(args) -> dict:
    """The preset's random checkpoint, written once (timed), or made on the fly (random:80b)."""
    from exporter.stream import sources
    from runtime.reference.sources import parse_source

    preset = parse_source(args.model, args.seed).ref
    if preset in sources.ON_THE_FLY:
        return {"folder": None, "on_the_fly": True}
    folder = sources.random_checkpoint_folder(preset, args.seed)
    started = time.perf_counter()
    existed = (folder / "model.safetensors.index.json").is_file()
    sources.ensure_random_checkpoint(preset, args.seed, progress=False)
    return {"folder": str(folder), "written_now": not existed, "seconds": None if existed else time.perf_counter() - started,
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}


def run_export(args, precision: str, out: Path) -> dict:
    command = [sys.executable, "-m", "exporter.cli", "--stream", "--model", args.model, "--seed", str(args.seed),
               "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len),
               *FLAGS[precision], "--quiet", str(out)]
    timed = ["/usr/bin/time", "-v", *command] if Path("/usr/bin/time").exists() else command
    started = time.perf_counter()
    done = subprocess.run(timed, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"idefics-export failed ({done.returncode}):\n{done.stderr[-4000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    from runtime.manifest import Manifest

    manifest = Manifest.load(out)
    table = manifest.validation.get("pieces", [])
    rows = [r for r in table if r["precision"] == precision]
    layers = [r["seconds"] for r in rows if r["graph"] == "decoder" and r["piece"].startswith("layer")]
    return {
        "command": " ".join(["idefics-export", *command[3:]]), "seconds": wall,
        "peak_rss_gib": int(peak.group(1)) / 2**20 if peak else None,
        "disk_gib": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30,
        "pieces": len(rows), "all_ok": all(r["ok"] for r in rows),
        "piece_seconds": {"vision": sum(r["seconds"] for r in rows if r["graph"] == "vision"),
                          "perceiver": sum(r["seconds"] for r in rows if r["graph"] == "perceiver"),
                          "decoder": sum(r["seconds"] for r in rows if r["graph"] == "decoder"),
                          "decoder_layer_median": float(np.median(layers)) if layers else None,
                          "decoder_layer_max": max(layers, default=None)},
        "worst": sorted(rows, key=lambda r: -r["max_rel"])[:3],
        # over every piece: FP16's nodes kept FP32 for overflow, int4wo's AWQ / GPTQ choices, int8's alphas
        "fp32_kept": sum(len(r.get("fp32_kept", [])) for r in rows),
        "int4_methods": {m: sum(r.get("int4", {}).get(m, 0) for r in rows) for m in ("awq", "gptq")},
        "smoothing_alphas": dict(Counter(str((r.get("smoothing") or {}).get("alpha")) for r in rows
                                         if "smoothing" in r)),
    }


SESSION_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from exporter.precision.reduced import _requests
from runtime import Session
from runtime.compare import teacher_forced_logits
from runtime.manifest import Manifest

out, precision, prompts, tokens, save = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
started = time.perf_counter()
session = Session(out, precision=precision)
load = time.perf_counter() - started
load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
requests, _ = _requests(Path(out), session.manifest, prompts)
decode, sequences, argmax, gaps = [], {}, {}, {}
for i, request in enumerate(requests):
    kwargs = dict(input_ids=request.input_ids, attention_mask=request.attention_mask,
                  pixel_values=request.pixel_values, image_attention_mask=request.image_attention_mask)
    result = session.generate(**kwargs, max_new_tokens=tokens, min_new_tokens=tokens)
    decode += result.timings.get("decode", [])
    seq = result.sequences
    logits = teacher_forced_logits(session, request, seq, tokens)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    sequences[f"sequence_{i}"], argmax[f"argmax_{i}"] = seq, logits.argmax(-1)
    gaps[f"gap_{i}"] = top2[..., 1] - top2[..., 0]
np.savez(save, **sequences, **argmax, **gaps)
session.close()
print(json.dumps({"load_seconds": load, "load_peak_rss_gib": load_rss,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "ms_per_token": 1000 * float(np.median(decode)) if decode else None,
                  "decode_tokens_timed": len(decode)}))
"""


def run_session(args, precision: str, out: Path, save: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", SESSION_CHILD, str(out), precision, str(args.prompts),
                           str(args.tokens), str(save)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"the {precision} Session failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def top1(args, out: Path, save: Path) -> dict:
    """The Session's teacher-forced argmax against the layer-streamed FP32 reference's."""
    from exporter.precision.reduced import _requests
    from exporter.stream.reference import teacher_forced_logits
    from exporter.stream.sources import tensor_source
    from runtime.manifest import Manifest
    from runtime.reference.sources import parse_source

    manifest = Manifest.load(out)
    requests, _ = _requests(out, manifest, args.prompts)
    started = time.perf_counter()
    agree, ties = [], []
    tensors, _, _ = tensor_source(parse_source(args.model, args.seed), progress=False)
    with tensors, np.load(save) as saved:
        for i, request in enumerate(requests):
            reference = teacher_forced_logits(tensors, manifest, request, saved[f"sequence_{i}"], args.tokens)
            agree.append((reference.argmax(-1) == saved[f"argmax_{i}"]).ravel())
            top2 = np.sort(reference, axis=-1)[..., -2:]
            ties.append(((top2[..., 1] - top2[..., 0]) < 1e-2).ravel())
    agree, ties = np.concatenate(agree), np.concatenate(ties)
    return {"top1": float(agree.mean()), "positions": int(agree.size), "near_ties": float(ties.mean()),
            "top1_off_ties": float(agree[~ties].mean()) if (~ties).any() else None,
            "reference_seconds": time.perf_counter() - started}


def against_transformers(args, out: Path, save: Path) -> dict:
    """transformers' IdeficsForVisionText2Text, loaded whole from the checkpoint the export read, greedy
    on the same prompts: its tokens against the FP32 Session's (the streamed graphs' same answers)."""
    import torch
    from transformers import IdeficsForVisionText2Text

    from exporter.precision.reduced import _requests
    from runtime.manifest import Manifest

    manifest = Manifest.load(out)
    folder = manifest.source.get("checkpoint")
    if not folder:
        raise SystemExit("--against-transformers: the preset is made on the fly (no checkpoint folder to load)")
    started = time.perf_counter()
    model = IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    requests, _ = _requests(out, manifest, args.prompts)
    same = []
    with np.load(save) as saved, torch.no_grad():
        for i, request in enumerate(requests):
            inputs = {"input_ids": torch.from_numpy(request.input_ids),
                      "attention_mask": torch.from_numpy(request.attention_mask),
                      "pixel_values": torch.from_numpy(request.pixel_values),
                      "image_attention_mask": torch.from_numpy(request.image_attention_mask)}
            tokens = model.generate(**inputs, do_sample=False, max_new_tokens=args.tokens,
                                    min_new_tokens=args.tokens).numpy()
            same.append(bool(np.array_equal(tokens, saved[f"sequence_{i}"])))
    return {"identical_prompts": sum(same), "prompts": len(same), "load_seconds": load,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {"model": args.model, "seed": args.seed, "machine": machine(), "prompts": args.prompts,
              "tokens": args.tokens, "checkpoint": checkpoint(args), "precisions": {}}
    log.info("checkpoint: %s", result["checkpoint"])
    for precision in args.precisions:
        scratch = Path(tempfile.mkdtemp(prefix=f"real-size-{precision}-"))
        out = (args.keep / precision) if args.keep else scratch / "out"
        try:
            row = {"export": run_export(args, precision, out)}
            log.info("%s export: %s", precision, json.dumps(row["export"]["piece_seconds"]))
            if not args.no_session:
                row["session"] = run_session(args, precision, out, scratch / "session.npz")
                row["top1"] = top1(args, out, scratch / "session.npz")
                if precision == "fp32" and args.against_transformers:
                    row["transformers"] = against_transformers(args, out, scratch / "session.npz")
                log.info("%s session: %s; top-1 %s", precision, row["session"], row["top1"])
            result["precisions"][precision] = row
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
