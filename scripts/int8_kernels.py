"""What each way of making INT8 exact on every x86-64 CPU costs (issue 26), side by side in one run.

    python scripts/int8_kernels.py                                   # random:medium
    python scripts/int8_kernels.py --model random:tiny --json int8-kernels.json --repeats 1

ONNX Runtime's u8 x s8 kernel saturates on CPUs without AVX-512 VNNI (runtime.cpu). The ways out:
  - u8u8: 8-bit weights as exported; sessions set session.x64quantprecision where VNNI is missing
    (ONNX Runtime's u8 x u8 kernel, which cannot saturate). The toolkit's choice. Its cost is the
    u8 x u8 kernel's speed, paid only on such CPUs: measured here by forcing it
    (IDEFICS_TOOLKIT_INT8_KERNELS=exact) against this CPU's default kernel, Session against Session
    on the same graphs, taking turns (decode ms/token after a one-image prompt, and time to first
    token, which holds the vision encoder, the perceiver and the prompt).
  - 7-bit weights (quantize_static's reduce_range: weights in [-64, 64], 255 x 64 x 2 < 32767):
    exact with the default kernel on any CPU, at the accuracy of one bit less per weight. Its cost
    is accuracy: the portable INT8 export made again with 7-bit weights, and its search's
    end-to-end top-1 against FP32 (first round: every MatMul INT8; last: after the nodes the
    search kept FP32), with the same budget.
Top-1 is the export's own measure (8 real-photo prompts x 32 greedy tokens, teacher-forced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path


from calibration.images import builtin_images, synthetic_prompts
from exporter.export import ExportConfig, export
from runtime import Session, cpu
from runtime.errors import ValidationError

log = logging.getLogger("int8_kernels")
PROMPT = "Describe this image in detail.<end_of_utterance>\nAssistant:"


@contextlib.contextmanager
def seven_bit_weights():
    """quantize_static with reduce_range=True (7-bit weights) for the exports made inside."""
    import onnxruntime.quantization as quantization

    original = quantization.quantize_static

    def reduced(*args, **kwargs):
        return original(*args, **{**kwargs, "reduce_range": True})

    quantization.quantize_static = reduced
    try:
        yield
    finally:
        quantization.quantize_static = original


class Rounds(logging.Handler):
    """The search's "int8 round N: ... (end-to-end top-1 X% < 95% ...)" lines: the top-1 measured
    before each round, kept whether or not the export succeeds."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.top1: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"^int8 round \d+: .*end-to-end top-1 ([\d.]+)%", record.getMessage())
        if found:
            self.top1.append(float(found.group(1)) / 100)


def exported(config: ExportConfig) -> tuple[object | None, dict]:
    """(manifest or None, the INT8 search's record): an export that misses its bounds after the
    whole search budget is a result here, not an error."""
    rounds, source = Rounds(), logging.getLogger("exporter")
    level = source.level
    source.addHandler(rounds)
    source.setLevel(logging.INFO)  # whatever the root logger's level: the round lines are INFO
    try:
        manifest = export(config)
    except ValidationError as exc:
        log.info("not written: %s", exc)
        manifest = None
    finally:
        source.removeHandler(rounds)
        source.setLevel(level)
    record = {"written": manifest is not None, "rounds": len(rounds.top1),
              "top1_all_int8": rounds.top1[0] if rounds.top1 else None,
              "top1_best_searched": max(rounds.top1, default=None)}
    if manifest is not None:
        variant = manifest.variants["int8"]
        record["top1"] = variant.search.get("top1")
        if not rounds.top1:  # no search needed: the first measure was the last
            record["top1_all_int8"] = record["top1_best_searched"] = record["top1"]
        record["kept_for_accuracy"] = {graph: sum(1 for k in nodes if k.get("reason") == "accuracy")
                                       for graph, nodes in variant.kept_nodes.items()}
        record["weights"] = weight_range(config.output, "int8", manifest)
    return manifest, record


def weight_range(folder: Path, precision: str, manifest) -> dict:
    """The INT8 weights' range in the decoder graph (checks which way the export went)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / manifest.variants[precision].graphs["decoder"].file))
    values = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    return {"min": int(min(v.min() for v in values)), "max": int(max(v.max() for v in values))} if values else {}


def one_turn(session: Session, tokens: int) -> tuple[float, float]:
    """(time to first token s: vision + perceiver + prompt, decode ms/token median) of one greedy
    request with one photo (a processor's prompt when the export has one, else random tokens)."""
    photo = builtin_images(1)[0]
    if session.encoder is not None:
        enc = session.encoder.encode([["User:", photo, PROMPT]])
        batch = (enc.input_ids, enc.attention_mask, enc.pixel_values, enc.image_attention_mask)
    else:
        info = session.manifest.model
        batch = synthetic_prompts([[photo]], info.image_size, info.vocab_size - len(info.image_token_ids))
    t = session.generate(*batch, max_new_tokens=tokens, min_new_tokens=tokens).timings
    return t["vision"] + t["perceiver"] + t["prefill"], statistics.median(t["decode"]) * 1e3


def open_with(folder: Path, precision: str, kernels: str) -> Session:
    os.environ[cpu.ENV] = kernels  # read when each ONNX Runtime session is created
    try:
        return Session(folder, precision=precision)
    finally:
        os.environ.pop(cpu.ENV, None)


def time_kernels(folder: Path, precision: str, repeats: int, tokens: int) -> dict:
    sessions = {mode: open_with(folder, precision, mode) for mode in ("auto", "exact")}
    try:
        for session in sessions.values():
            one_turn(session, 4)  # warm-up
        turns = {mode: [] for mode in sessions}
        for _ in range(repeats):
            for mode, session in sessions.items():
                turns[mode].append(one_turn(session, tokens))
    finally:
        for session in sessions.values():
            session.close()
    row = {"flavour": sessions["auto"].flavour}
    for mode, values in turns.items():
        row[mode] = {"ttft_s": statistics.median(v[0] for v in values), "decode_ms": statistics.median(v[1] for v in values)}
    row["ttft_ratio"] = row["exact"]["ttft_s"] / row["auto"]["ttft_s"]
    row["decode_ratio"] = row["exact"]["decode_ms"] / row["auto"]["decode_ms"]
    return row


def cpu_name() -> str:
    """The CPU's model name, for the record (its features come from CPUID: runtime.cpu)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:medium", help="as idefics-export --model (default: random:medium)")
    parser.add_argument("--out", type=Path, help="keep the two exports here (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5, help="turns of each Session (default: 5)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per turn (default: 24)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tokens < 2:
        parser.error(f"--repeats must be at least 1 and --tokens at least 2, got {args.repeats} and {args.tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        eight, seven = root / "int8-8bit", root / "int8-7bit"
        started = time.perf_counter()
        log.info("export 1/2: --int8 --int8-weight-only --ort-optimized (8-bit weights)")
        m8, r8 = exported(ExportConfig(output=eight, model=args.model, precisions=("int8", "int8wo"),
                                       ort_optimized=True, progress=False))
        if m8 is None:
            raise SystemExit("the 8-bit INT8 export missed its bounds: nothing to time")
        log.info("export 2/2: --int8 with 7-bit weights (reduce_range)")
        with seven_bit_weights():
            _, r7 = exported(ExportConfig(output=seven, model=args.model, precisions=("int8",), progress=False))
        exports_s = time.perf_counter() - started
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
            "cpu": cpu.describe(), "model": args.model, "repeats": args.repeats, "tokens": args.tokens,
            "exports_s": exports_s,
            "accuracy": {"8-bit weights": r8, "7-bit weights": r7},
            "speed": {},
        }
        for precision in ("int8", "int8wo"):
            log.info("timing %s: this CPU's default INT8 kernel against the u8 x u8 one, taking turns", precision)
            result["speed"][precision] = time_kernels(eight, precision, args.repeats, args.tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
