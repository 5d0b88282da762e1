"""One decode step's self-attention alone, on ONNX Runtime's CPU provider: what a growing cache costs.

    python scripts/attention_bench.py [--heads 12] [--head-dim 64] [--slots 1100]
                                      [--positions 64 1024] [--threads 1 2] [--out attention.json]
    python scripts/attention_bench.py --decoder out/ [--precision int8wo] [--images 1]

Issue 15's per-token target (a step at position ~1000 within 1.15x of one at 64) is decided by
how fast one layer's attention over the cache runs. This measures the node by itself, for one
layer of random:medium's shape by default (12 heads of 64, 1100 cache slots), batch 1, one new
token:

  gqa-fp32   com.microsoft.GroupQueryAttention over one FP32 buffer bound as both past and present
             (IO binding, as runtime.session binds the ORT decoder's cache): reads the filled slots
  gqa-int8   the same over an INT8 buffer with PER_CHANNEL scales (the int8wo ORT decoder's cache)
  plain      standard ops over the whole static buffer, K stored transposed ([B,H,hd,slots]):
             MatMul, Softmax, MatMul; reads every slot whatever the position (the portable way)
  plain-sliced  the same after Slice to the filled length: reads only the filled slots, but Slice
             copies them first

With --evict MB each timed step follows a read of an MB-sized buffer, which pushes the cache out of
the CPU's caches as a decoder's weights do between one layer's attention and the next.

Each variant's output is checked against NumPy's attention before it is timed (ValueError if not).
The variants take turns (--repeats turns of --iterations runs each; the median per variant), so
a slow minute on the machine falls on all of them. It reports ms per layer, the attention's
arithmetic rate (GFLOP/s: 4 * heads * position * head_dim per step) and the cache bytes read per
second. Multiply by the decoder's layers for a step's attention cost.

With --decoder OUT it profiles instead a whole decode step of an export's ONNX Runtime-optimized
decoder (idefics-export --ort-optimized; --precision picks its fp32 / fp16 / int8wo graph), its
cache bound as the Session binds it, at each of --positions with --images images of random
cross-attention K/V: ms per step (unprofiled, median over the turns) and microseconds per step of
each op type (ONNX Runtime's profiler). Set against the node alone, it shows what the rest of the
step (the weights streaming through the caches) does to attention's cost.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("attention_bench")
VARIANTS = ("gqa-fp32", "gqa-int8", "plain", "plain-sliced")
WARMUP = 5  # decoder steps run before each position's timed ones, left out of the figures


@dataclass(frozen=True)
class Shape:
    heads: int = 12
    head_dim: int = 64
    slots: int = 1100


def _session(model, threads: int, profile: Path | None = None):
    """An ONNX Runtime CPU session of `model` (a ModelProto or a path) on `threads` intra-op threads;
    with `profile`, its profiler writes there (prefix)."""
    import onnxruntime as ort

    from runtime.cpu import exact_int8

    options = exact_int8(ort.SessionOptions())  # as the Session: exact INT8 products on any x86 CPU
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    if profile is not None:
        options.enable_profiling, options.profile_file_prefix = True, str(profile)
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _median_ms(run, iterations: int, before=None) -> float:
    """Median ms of `iterations` calls of `run`, each after an untimed call of `before` (if given)."""
    times = []
    for _ in range(iterations):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _model(nodes, inputs, outputs, inits=(), contrib=False):
    from onnx import helper

    graph = helper.make_graph(nodes, "attention", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return helper.make_model(graph, opset_imports=opsets)


def gqa_model(shape: Shape, int8: bool, scale: np.ndarray | None = None):
    """GroupQueryAttention for one new token: packed qkv [1,1,3*H*hd], the cache [1,H,slots,hd] in and out."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    h, d, s = shape.heads, shape.head_dim, shape.slots
    cache = T.INT8 if int8 else T.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, 3 * h * d]),
              helper.make_tensor_value_info("past_key", cache, [1, h, s, d]),
              helper.make_tensor_value_info("past_value", cache, [1, h, s, d]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", T.INT32, [])]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    attrs, inits = {"num_heads": h, "kv_num_heads": h, "scale": float(d ** -0.5)}, []
    if int8:  # after cos_cache, sin_cache, position_ids, attention_bias, head_sink: k_scale, v_scale
        names += ["", "", "", "", "", "k_scale", "v_scale"]
        inits = [numpy_helper.from_array(scale.astype(np.float32), n) for n in ("k_scale", "v_scale")]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"],
                            domain="com.microsoft", **attrs)
    outputs = [helper.make_tensor_value_info("out", T.FLOAT, None),
               helper.make_tensor_value_info("present_key", cache, None),
               helper.make_tensor_value_info("present_value", cache, None)]
    return _model([node], inputs, outputs, inits, contrib=True)


def plain_model(shape: Shape, sliced: bool):
    """Standard ops over the transposed K [1,H,hd,slots] and V [1,H,slots,hd]; `length` [1] int64
    (the filled slots, the new token's included) slices them when `sliced`, else masks by -inf."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    h, d, s = shape.heads, shape.head_dim, shape.slots
    inputs = [helper.make_tensor_value_info("q", T.FLOAT, [1, h, 1, d]),
              helper.make_tensor_value_info("key_t", T.FLOAT, [1, h, d, s]),
              helper.make_tensor_value_info("value", T.FLOAT, [1, h, s, d]),
              helper.make_tensor_value_info("length", T.INT64, [1]),
              helper.make_tensor_value_info("bias", T.FLOAT, [1, 1, 1, s])]
    c = lambda n, v: numpy_helper.from_array(np.asarray(v), n)
    inits = [c("zero", np.array([0], np.int64)), c("axis3", np.array([3], np.int64)),
             c("axis2", np.array([2], np.int64)), c("scale", np.array(d ** -0.5, np.float32))]
    nodes = [helper.make_node("Mul", ["q", "scale"], ["qs"])]
    if sliced:
        nodes += [helper.make_node("Slice", ["key_t", "zero", "length", "axis3"], ["k"]),
                  helper.make_node("Slice", ["value", "zero", "length", "axis2"], ["v"]),
                  helper.make_node("MatMul", ["qs", "k"], ["scores"])]
        v = "v"
    else:
        nodes += [helper.make_node("MatMul", ["qs", "key_t"], ["raw"]),
                  helper.make_node("Add", ["raw", "bias"], ["scores"])]
        v = "value"
    nodes += [helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", v], ["out"])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", T.FLOAT, None)], inits)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(hd)) v per head: q [H,hd], k / v [H,L,hd] -> [H,hd] (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("hd,hld->hl", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hl,hld->hd", p / p.sum(-1, keepdims=True), v)


class Case:
    """One variant at one position, ready to run: `run()` executes one step, `output()` is its
    attention as [H,hd], `expected` NumPy's for the same cache."""

    def __init__(self, variant: str, shape: Shape, position: int, threads: int, seed: int = 0):
        import onnxruntime as ort

        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        if not 1 <= position <= shape.slots:
            raise ValueError(f"position {position} is outside the cache's 1..{shape.slots} slots")
        h, d, s = shape.heads, shape.head_dim, shape.slots
        rng = np.random.default_rng(seed)
        keys = rng.standard_normal((h, s, d)).astype(np.float32)
        values = rng.standard_normal((h, s, d)).astype(np.float32)
        q = rng.standard_normal((h, d)).astype(np.float32)
        n = position  # the new token goes to slot n-1 and attends to slots 0..n-1
        if variant.startswith("gqa"):
            int8 = variant == "gqa-int8"
            scale = (np.abs(np.concatenate([keys, values], 1)).max(1, keepdims=True) / 127).astype(np.float32)
            if int8:  # the cache holds q = round(x / scale); the new token is quantized by the node itself
                stored_k = np.clip(np.round(keys / scale), -128, 127).astype(np.int8)
                stored_v = np.clip(np.round(values / scale), -128, 127).astype(np.int8)
                keys, values = stored_k * scale, stored_v * scale  # what the node reads back
            else:
                stored_k, stored_v = keys, values
            self.scale = scale if int8 else None  # [H,1,hd]
            self.sess = _session(gqa_model(shape, int8, self.scale), threads)
            packed = np.concatenate([q.reshape(-1), keys[:, n - 1].reshape(-1), values[:, n - 1].reshape(-1)])
            # the K and V buffers [1,H,slots,hd], each bound as past and present
            self.cache = [ort.OrtValue.ortvalue_from_numpy(b[None].copy()) for b in (stored_k, stored_v)]
            binding = self.sess.io_binding()
            binding.bind_cpu_input("qkv", packed.reshape(1, 1, -1).astype(np.float32))
            binding.bind_ortvalue_input("past_key", self.cache[0])
            binding.bind_ortvalue_input("past_value", self.cache[1])
            binding.bind_cpu_input("seqlens_k", np.array([n - 1], np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(n, np.int32))
            binding.bind_output("out")  # first: copy_outputs_to_cpu() lists outputs as bound
            binding.bind_ortvalue_output("present_key", self.cache[0])
            binding.bind_ortvalue_output("present_value", self.cache[1])
            self.run = lambda: self.sess.run_with_iobinding(binding)
            self.output = lambda: binding.copy_outputs_to_cpu()[0].reshape(h, d)
            cache_bytes = 2 * h * n * d * (1 if int8 else 4)
        else:
            self.sess = _session(plain_model(shape, sliced=variant == "plain-sliced"), threads)
            bias = np.where(np.arange(s) < n, 0, -np.inf).astype(np.float32).reshape(1, 1, 1, s)
            feed = {"q": q.reshape(1, h, 1, d), "key_t": np.ascontiguousarray(keys.transpose(0, 2, 1))[None],
                    "value": values[None], "length": np.array([n], np.int64), "bias": bias}
            self._last = None

            def run():
                self._last = self.sess.run(None, feed)[0]

            self.run = run
            self.output = lambda: self._last.reshape(h, d)
            cache_bytes = 2 * h * (n if variant == "plain-sliced" else s) * d * 4
        self.inputs = (q, keys[:, :n], values[:, :n])  # what the step attends with: [H,hd], [H,n,hd] x 2
        self.expected = reference(*self.inputs)
        self.variant, self.position, self.threads, self.cache_bytes = variant, position, threads, cache_bytes
        self.flops = 4 * h * n * d

    def check(self, tolerance: float = 2e-3) -> float:
        """Runs one step and returns max|err| against NumPy; ValueError past `tolerance`."""
        self.run()
        err = float(np.abs(self.output() - self.expected).max())
        if not err <= tolerance:
            raise ValueError(f"{self.variant} at position {self.position}: max|err| {err:.3g} against NumPy's "
                             f"attention exceeds {tolerance}")
        return err

    def time(self, iterations: int, evict: np.ndarray | None = None) -> float:
        """Median ms of `iterations` steps; with `evict`, each step timed after reading that buffer
        (as a decoder's weights stream through the caches between one layer's attention and the next)."""
        return _median_ms(self.run, iterations, None if evict is None else evict.sum)


def measure(shape: Shape, positions, threads, variants=VARIANTS, repeats: int = 5, iterations: int = 200,
            evict_mb: int = 0) -> list[dict]:
    rows = []
    evict = np.ones(evict_mb * 2**20 // 8) if evict_mb else None
    for t in threads:
        for position in positions:
            cases = [Case(v, shape, position, t) for v in variants]
            errors = {c.variant: c.check() for c in cases}
            for c in cases:
                c.time(max(1, iterations // 10))  # warm-up
            turns = {c.variant: [] for c in cases}
            for _ in range(repeats):
                for c in cases:
                    turns[c.variant].append(c.time(iterations, evict))
            for c in cases:
                ms = statistics.median(turns[c.variant])
                rows.append({"variant": c.variant, "position": position, "threads": t, "evict_mb": evict_mb, "ms": ms,
                             "gflops": c.flops / ms / 1e6, "cache_gb_s": c.cache_bytes / ms / 1e6,
                             "max_abs_err": errors[c.variant]})
                log.info("threads %d position %4d %-13s %.3f ms  %.1f GFLOP/s  %.1f GB/s of cache", t, position,
                         c.variant, ms, rows[-1]["gflops"], rows[-1]["cache_gb_s"])
    return rows


def _decoder_binding(sess, spec, info, position: int, images: int, cache: dict):
    """One decode step's IO binding: a token at slot position-1 attending to `position` slots."""
    binding = sess.io_binding()
    binding.bind_cpu_input("input_ids", np.array([[1]], np.int64))
    binding.bind_cpu_input("seqlens_k", np.array([position - 1], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(position, np.int32))
    binding.bind_cpu_input("image_attention_mask", np.ones((1, 1, images), np.int64))
    binding.bind_cpu_input("logits_positions", np.array([0], np.int64))
    rng = np.random.default_rng(0)
    for t in spec.inputs:
        if t.name.startswith("cross_"):
            shape = (1, info.num_heads, images * info.image_seq_len, info.head_dim)
            binding.bind_cpu_input(t.name, rng.standard_normal(shape).astype(t.dtype))
    binding.bind_output("logits")
    for name, value in cache.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
    return binding


def profile_decoder(folder: Path, precision: str, positions, images: int, threads: int,
                    repeats: int = 5, iterations: int = 50) -> list[dict]:
    """A decode step of the export's ONNX Runtime-optimized decoder at each position: ms per step
    (unprofiled) and microseconds per step of each op type (ONNX Runtime's profiler)."""
    import tempfile

    import onnxruntime as ort

    from runtime.manifest import Manifest

    manifest = Manifest.load(folder)
    spec = manifest.ort_graphs(precision).get("decoder")
    if spec is None:
        have = ", ".join(p for p, v in manifest.ort_optimized.items() if "decoder" in v.graphs) or "none"
        raise SystemExit(f"{folder}: no ONNX Runtime-optimized {precision} decoder (the export's: {have}); "
                         f"export with --ort-optimized")
    info, slots = manifest.model, manifest.limits.max_seq_len
    if not 1 <= images <= manifest.limits.max_images:
        raise SystemExit(f"--images {images} is outside the export's 1..{manifest.limits.max_images}")
    for p in positions:
        if not 1 <= p <= slots:
            raise SystemExit(f"--positions {p} is outside the export's 1..{slots} (its max_seq_len)")
    cache_specs = [t for t in spec.inputs if t.name.startswith("past_")]
    rng = np.random.default_rng(1)

    def cache_value(t):
        shape = (1, info.num_heads, slots, info.head_dim)
        data = (rng.integers(-64, 64, shape) if t.dtype == "int8" else rng.standard_normal(shape)).astype(t.dtype)
        return ort.OrtValue.ortvalue_from_numpy(data)

    cache = {t.name: cache_value(t) for t in cache_specs}

    def steps(sess, turns: int) -> dict[int, float]:
        """Per position, the median over `turns` of the median step ms (each turn: WARMUP steps, then
        `iterations` timed ones, position after position)."""
        bindings = {p: _decoder_binding(sess, spec, info, p, images, cache) for p in positions}
        ms = {p: [] for p in positions}
        for _ in range(turns):
            for p in positions:
                run = functools.partial(sess.run_with_iobinding, bindings[p])
                for _ in range(WARMUP):
                    run()
                ms[p].append(_median_ms(run, iterations))
        return {p: statistics.median(v) for p, v in ms.items()}

    path = folder / spec.file
    step_ms = steps(_session(path, threads), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _session(path, threads, profile=Path(tmp) / "profile")
        steps(profiled, 1)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    rows = []
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: list[dict[str, float]] = [{} for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            k = bisect.bisect_right(runs, e["ts"]) - 1
            op = e["args"]["op_name"]
            per_run[k][op] = per_run[k].get(op, 0.0) + e["dur"]
    per_position = WARMUP + iterations  # the runs of one position, in the order they ran
    for i, p in enumerate(positions):
        timed = per_run[i * per_position + WARMUP:(i + 1) * per_position]
        ops = {op: statistics.median(r.get(op, 0.0) for r in timed) for op in {o for r in timed for o in r}}
        rows.append({"position": p, "images": images, "threads": threads, "step_ms": step_ms[p],
                     "op_us": dict(sorted(ops.items(), key=lambda kv: -kv[1]))})
        log.info("position %4d, %d image(s): %.2f ms/step; per step (profiled): %s", p, images, step_ms[p],
                 ", ".join(f"{op} {us:.0f} us" for op, us in list(rows[-1]["op_us"].items())[:5]))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--head-dim", type=int, default=Shape.head_dim, help="one ONNX Runtime's GroupQueryAttention takes (1.32's CPU kernel: 16, 32, 64, ...)")
    parser.add_argument("--slots", type=int, default=Shape.slots, help="the static cache's length")
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 1024],
                        help="filled slots after the step, the new token's included")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime intra-op threads")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="turns of the variants taken in rotation")
    parser.add_argument("--iterations", type=int, default=200, help="steps per turn")
    parser.add_argument("--evict", type=int, default=0, metavar="MB",
                        help="read a buffer of MB megabytes before each timed step, so the cache is not "
                             "in the CPU's caches (as in a decoder, whose weights pass through them)")
    parser.add_argument("--decoder", type=Path, metavar="OUT",
                        help="profile a decode step of this export's ONNX Runtime-optimized decoder instead")
    parser.add_argument("--precision", default="int8wo", help="with --decoder: fp32, fp16 or int8wo")
    parser.add_argument("--images", type=int, default=1, help="with --decoder: images the step attends to")
    parser.add_argument("--out", type=Path, default=Path("attention.json"))
    args = parser.parse_args(argv)
    if args.head_dim % 16:  # ONNX Runtime 1.32's CPU GroupQueryAttention refuses 4, 8, 12, 24, 40 (exporter.ort.refusal)
        parser.error(f"--head-dim {args.head_dim} is not a multiple of 16, which GroupQueryAttention needs on the CPU")
    for p in args.positions:
        if not args.decoder and not 1 <= p <= args.slots:
            parser.error(f"--positions {p} is outside 1..--slots {args.slots}")
    if args.repeats < 1 or args.iterations < 1 or min(args.threads) < 1:
        parser.error("--repeats, --iterations and --threads must be at least 1")
    if args.evict < 0:
        parser.error(f"--evict {args.evict}: a size in MB, 0 or more")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    import onnxruntime as ort

    if args.decoder:
        rows = [r for t in args.threads
                for r in profile_decoder(args.decoder, args.precision, args.positions, args.images, t, args.repeats)]
        shape = {"decoder": str(args.decoder), "precision": args.precision}
    else:
        rows = measure(Shape(args.heads, args.head_dim, args.slots), args.positions, args.threads, args.variants,
                       args.repeats, args.iterations, args.evict)
        shape = Shape(args.heads, args.head_dim, args.slots).__dict__
    result = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__, "shape": shape,
                  "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count()}, "rows": rows}
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
