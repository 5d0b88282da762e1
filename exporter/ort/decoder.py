"""The ONNX Runtime flavour of the decoder: the portable decoder's math (runtime.reference.modules.
DecoderGraph) written directly as an ONNX graph from the checkpoint's weights, with ONNX Runtime's
fused contrib ops, as onnxruntime-genai's model builder does. TensorRT cannot read it; the portable
graph stays the reference and the TensorRT input.

  self-attention: com.microsoft.GroupQueryAttention over ONE buffer per layer that is both past and
                  present (the caller binds the same [B,H,slots,hd] array to past_key.i and
                  present_key.i), packed QKV, rotary inside (do_rotary, cos/sin caches of
                  max_seq_len positions), per-row lengths in `seqlens_k`. Each row's cache fills
                  from slot 0 (the in-flight pool's layout), so a row's positions are its slots.
  norms:          SimplifiedLayerNormalization / com.microsoft.SkipSimplifiedLayerNormalization
                  (the residual add fused into the next norm).
  cross-attention: com.microsoft.MultiHeadAttention over the perceiver's cross K/V (already per
                  head, BNSH), the image mask as its additive attention bias, then the gate.
  INT8 KV cache:  the int8wo decoder's shared buffers are INT8 (GroupQueryAttention quantizes each
                  new K/V with static per-channel scales, calibrated at export: kv_scales, and
                  dequantizes what it reads): a decode step reads a quarter of the FP32 cache bytes.

IO (ORT_DECODER_IO):
  input_ids [batch, seq] int64          this call's tokens, right-padded where rows are shorter
  seqlens_k [batch] int32               per row: tokens in the cache after this call, minus 1
  total_sequence_length [] int32        max over rows of seqlens_k + 1
  image_attention_mask [batch, seq, images] int64,  logits_positions [kept_seq] int64
  cross_key.j / cross_value.j           as the portable decoder's
  past_key.i / past_value.i [batch, H, slots, hd]   the shared buffers (slots >= total_sequence_length;
                                        float32, float16 in the FP16 graph, int8 in the int8wo one)
  -> logits [batch, kept_seq, vocab], present_key.i / present_value.i [batch, H, slots, hd]

A prefill is a call with seq == total_sequence_length (every row starts at slot 0; shorter rows are
right-padded and their padding positions' outputs are meaningless); a decode step is a call with
seq == 1 and seqlens_k = the row's length before the step.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from exporter.graphs.bounds import TOLERANCES, describe, judge, measure
from exporter.graphs.comparison import ort_session
from exporter.ort.refusal import ort_errors, refused
from exporter.precision.transforms import matmul_nbits, per_token_int8, to_fp16
from exporter.graphs.trace import remove_graph
from runtime.errors import ExportError, ValidationError
from runtime.manifest import GraphSpec, ModelInfo, TensorSpec

FLAVOUR = "ort"  # the manifest's name for these graphs: variant "fp32-ort"
ORT_BACKENDS = ["onnxruntime"]
# per precision: the bound against the PyTorch FP32 decoder, the portable graphs' (exporter.graphs.bounds)
BOUNDS = {p: dict(TOLERANCES[p]) for p in ("fp32", "fp16", "int8wo")}
FP32_BOUND = BOUNDS["fp32"]
# the devices whose ONNX Runtime provider runs each precision's decoder (manifest Variant.devices):
# CUDA's GroupQueryAttention takes FP16/BF16 only; int8wo's prompt graph (MatMulInteger) is the CPU's too
# (int8: exporter.ort.int8, the FP32 decoder quantized with Q/DQ; TensorRT is INT8's GPU path)
DEVICES = {"fp32": ["cpu"], "fp16": ["cpu", "cuda"], "int8wo": ["cpu"], "int8": ["cpu"]}
FILES = {"fp32": "decoder.ort.onnx", "fp16": "decoder.ort.fp16.onnx", "int8wo": "decoder.ort.int8wo.onnx"}
# The prompt graph of int8wo (manifest graph "prompt"): the same decoder, its MatMuls per-token
# dynamic INT8 (exporter.precision.transforms.per_token_int8, MatMulInteger on AMX / VNNI) instead of
# MatMulNBits, which at a prompt's hundreds of rows runs no faster than FP32 on the CPU. It writes
# its K/V in FP32, which the Session quantizes into the decode graph's INT8 cache (as an FP32
# prompt's): GroupQueryAttention over an INT8 cache is slow on prompts (a 1024-token prompt of
# random:medium: 1.6-1.7 s with it, 0.78 s with an FP32 cache).
PROMPT_FILES = {"int8wo": "decoder.ort.int8wo.prompt.onnx"}
# the cross-attention bias where a token may not see an image token: FP32's lowest, or -1e4 in the
# FP16 graph (FP16's lowest, -65504, plus a negative score rounds to -inf: a row that sees no image
# would then softmax to NaN, which its zero gate does not cancel)
MASK_VALUE = {"fp32": np.finfo(np.float32).min, "fp16": -1e4}
SLOTS = "slots"
OPSET = 18
# The int8wo decoder's INT8 cache: symmetric per-channel scales (GroupQueryAttention's PER_CHANNEL:
# one per head and channel, q = clip(round(x / scale), -128, 127)), set KV_MARGIN over the largest
# value calibration saw, as headroom for tokens it did not see.
KV_QUANT = "PER_CHANNEL"
KV_MARGIN = 2.0
# The margins the export tries, in order, until the decoder meets its bound; past the last the cache
# stays FP32 (with a warning). At 9B widths (random:9b-slice) 2x clipped layer 0's values on the
# validation's random cross-attention K/V (max|err| 1.1 rms against the bound's 1.0).
KV_MARGINS = (KV_MARGIN, 2 * KV_MARGIN)


def ort_decoder_spec(info: ModelInfo, file: str = "decoder.ort.onnx", cache_dtype: str = "float32") -> GraphSpec:
    specs = [
        TensorSpec("input_ids", "int64", ("batch", "seq")),
        TensorSpec("seqlens_k", "int32", ("batch",)),
        TensorSpec("total_sequence_length", "int32", ()),
        TensorSpec("image_attention_mask", "int64", ("batch", "seq", "images")),
        TensorSpec("logits_positions", "int64", ("kept_seq",)),
    ]
    for j in range(info.num_cross_layers):
        specs += [TensorSpec(n, "float32", ("batch", info.num_heads, "image_tokens", info.head_dim))
                  for n in (f"cross_key.{j}", f"cross_value.{j}")]
    cache = [TensorSpec(n, cache_dtype, ("batch", info.num_heads, SLOTS, info.head_dim))
             for i in range(info.num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]
    outputs = [TensorSpec("logits", "float32", ("batch", "kept_seq", info.vocab_size))]
    outputs += [dataclasses.replace(s, name=s.name.replace("past_", "present_")) for s in cache]
    return GraphSpec(name="decoder", file=file, inputs=tuple(specs + cache), outputs=tuple(outputs))


class _Builder:
    """Nodes and weights written straight into one ModelProto: each weight's bytes are held once
    (helper.make_graph / make_model copy every initializer: two more copies of a 5 GB decoder)."""

    def __init__(self):
        from onnx import ModelProto

        self.model = ModelProto()
        self.graph = self.model.graph  # a reference into the model, not a copy
        self.nodes, self._n = [], 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value) -> str:
        from onnx import helper

        name = self.name(stem)
        array = np.ascontiguousarray(value)
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # ONNX: little-endian
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        from onnx import helper

        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 and outputs is None else outs

    def linear(self, x: str, layer: torch.nn.Linear, stem: str) -> str:
        return self.matmul(x, [layer], stem)

    def matmul(self, x: str, layers, stem: str) -> str:
        """x @ [W1; W2; ...]^T (+ bias): nn.Linear weights packed into one MatMul."""
        weight = torch.cat([layer.weight.detach().float() for layer in layers]).T.contiguous().numpy()
        y = self.op("MatMul", [x, self.const(f"{stem}.weight", weight)])
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat([layer.bias.detach().float() if layer.bias is not None
                              else torch.zeros(layer.weight.shape[0]) for layer in layers]).numpy()
            y = self.op("Add", [y, self.const(f"{stem}.bias", bias)])
        return y


class _Residual:
    """The residual stream with its pending addend, fused into the next norm (SkipSimplifiedLayerNorm)."""

    def __init__(self, g: _Builder, hidden: str):
        self.g, self.hidden, self.pending = g, hidden, None

    def add(self, delta: str) -> None:
        self.flush()
        self.pending = delta

    def flush(self) -> str:
        if self.pending is not None:
            self.hidden = self.g.op("Add", [self.hidden, self.pending])
            self.pending = None
        return self.hidden

    def norm(self, module, stem: str) -> str:
        g = self.g
        gamma = g.const(f"{stem}.weight", module.weight.detach().float().numpy())
        eps = float(module.variance_epsilon)
        if self.pending is None:
            return g.op("SimplifiedLayerNormalization", [self.hidden, gamma], axis=-1, epsilon=eps,
                        stash_type=1)
        out, total = g.name("norm"), g.name("residual")
        g.op("SkipSimplifiedLayerNormalization", [self.pending, self.hidden, gamma], domain="com.microsoft",
             outputs=[out, "", "", total], epsilon=eps)
        self.hidden, self.pending = total, None
        return out


def _rms(g: _Builder, x: str, module, stem: str) -> str:
    gamma = g.const(f"{stem}.weight", module.weight.detach().float().numpy())
    return g.op("SimplifiedLayerNormalization", [x, gamma], axis=-1, epsilon=float(module.variance_epsilon),
                stash_type=1)


def _mlp(g: _Builder, x: str, mlp, act: str, stem: str) -> str:
    gate = g.linear(x, mlp.gate_proj, f"{stem}.gate_proj")
    up = g.linear(x, mlp.up_proj, f"{stem}.up_proj")
    if act == "silu":
        gate = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    elif act == "gelu":
        gate = g.op("Gelu", [gate], domain="com.microsoft")
    else:
        raise ExportError(f"the ONNX Runtime decoder has no activation {act!r} (it writes silu and gelu)")
    return g.linear(g.op("Mul", [gate, up]), mlp.down_proj, f"{stem}.down_proj")


def build_ort_decoder(module, info: ModelInfo, max_seq_len: int, mask_value: float = MASK_VALUE["fp32"],
                      kv_scales: list[np.ndarray] | None = None):
    """(ModelProto, GraphSpec) of the FP32 ONNX Runtime decoder over a DecoderGraph's weights;
    with `kv_scales` (kv_scales(): one [1,H,1,hd] per buffer, past_key.0, past_value.0, ...) its
    shared cache is INT8. Whether ONNX Runtime's kernels take the model's shapes (GroupQueryAttention's
    head size) is not decided here: write_ort_decoder runs the graph (exporter.ort.refusal)."""
    from onnx import TensorProto, helper

    if kv_scales is not None and len(kv_scales) != 2 * info.num_layers:
        raise ValueError(f"kv_scales: {len(kv_scales)} scales for the {2 * info.num_layers} cache buffers")

    cfg = module.cfg
    g = _Builder()
    spec = ort_decoder_spec(info, cache_dtype="float32" if kv_scales is None else "int8")
    h, hd = info.num_heads, info.head_dim
    min_value = np.float32(mask_value)

    hidden = g.op("Gather", [g.const("embed_tokens", module.embed_weight.detach().float().numpy()), "input_ids"],
                  axis=0)
    # cross mask [B,1,T,I*L] and gate [B,T,1], as DecoderGraph computes them
    allowed = g.op("Cast", ["image_attention_mask"], to=TensorProto.BOOL)  # [B,T,I]
    tokens = g.op("Expand", [g.op("Unsqueeze", [allowed, g.const("axis3", np.array([3]))]),
                             g.const("image_seq", np.array([1, 1, 1, module.image_seq_len]))])
    tokens = g.op("Reshape", [tokens, g.const("shape", np.array([0, 0, -1]))])
    cross_mask = g.op("Where", [tokens, g.const("zero", np.float32(0)), g.const("min", min_value)])
    cross_mask = g.op("Unsqueeze", [cross_mask, g.const("axis1", np.array([1]))])
    gate = g.op("ReduceMax", [g.op("Cast", [allowed], to=TensorProto.FLOAT), g.const("last", np.array([-1]))],
                keepdims=1)

    # rotary caches [max_seq_len, hd/2], LLaMA's rotate_half layout (not interleaved)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = t[:, None] * module.inv_freq.float()[None]
    cos = g.const("cos_cache", (freqs.cos() * module.rope_scaling).numpy().astype(np.float32))
    sin = g.const("sin_cache", (freqs.sin() * module.rope_scaling).numpy().astype(np.float32))
    heads_shape = g.const("heads", np.array([0, 0, h, hd]))
    merge_shape = g.const("merge", np.array([0, 0, h * hd]))

    stream = _Residual(g, hidden)
    for idx, layer in enumerate(module.layers):
        if idx % module.interval == 0:
            j = idx // module.interval
            block = module.cross_layers[j]
            attn = block.cross_attn
            stem = f"cross.{j}"
            x = stream.norm(block.input_layernorm, f"{stem}.input_layernorm")
            q = g.linear(x, attn.q_proj, f"{stem}.q_proj")  # [B,T,H*hd]
            if cfg.qk_layer_norms:  # per head: over hd of [B,T,H,hd]
                q = g.op("Reshape", [_rms(g, g.op("Reshape", [q, heads_shape]), attn.q_layer_norm,
                                          f"{stem}.q_layer_norm"), merge_shape])
            # the perceiver's K/V are already per head [B,H,I*L,hd] (BNSH): MultiHeadAttention reads
            # them as cross-attention K/V; the image mask is its additive attention bias [B,1,T,I*L]
            out = g.op("MultiHeadAttention", [q, f"cross_key.{j}", f"cross_value.{j}", "", "", cross_mask],
                       domain="com.microsoft", num_heads=h, scale=float(attn.scaling))
            out = g.op("Mul", [g.linear(out, attn.o_proj, f"{stem}.o_proj"), gate])
            stream.add(g.op("Mul", [out, g.const("alpha", torch.tanh(block.alpha_cross_attn.detach().float()).numpy())]))
            x = stream.norm(block.post_attention_layernorm, f"{stem}.post_attention_layernorm")
            mlp = _mlp(g, x, block.mlp, cfg.hidden_act, f"{stem}.mlp")
            stream.add(g.op("Mul", [mlp, g.const("alpha", torch.tanh(block.alpha_dense.detach().float()).numpy())]))

        attn = layer.self_attn
        stem = f"layers.{idx}"
        x = stream.norm(layer.input_layernorm, f"{stem}.input_layernorm")
        qkv = g.matmul(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{stem}.qkv_proj")
        inputs = [qkv, "", "", f"past_key.{idx}", f"past_value.{idx}", "seqlens_k", "total_sequence_length", cos, sin]
        quant = {}
        if kv_scales is not None:  # after position_ids, attention_bias, head_sink: k_scale, v_scale
            inputs += ["", "", "", g.const(f"{stem}.k_scale", kv_scales[2 * idx].astype(np.float32)),
                       g.const(f"{stem}.v_scale", kv_scales[2 * idx + 1].astype(np.float32))]
            quant = dict(k_quant_type=KV_QUANT, v_quant_type=KV_QUANT, kv_cache_bit_width=8)
        out = g.op("GroupQueryAttention", inputs, domain="com.microsoft",
                   outputs=[g.name("attention"), f"present_key.{idx}", f"present_value.{idx}"],
                   num_heads=h, kv_num_heads=h, scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0,
                   **quant)[0]
        stream.add(g.linear(out, attn.o_proj, f"{stem}.o_proj"))
        x = stream.norm(layer.post_attention_layernorm, f"{stem}.post_attention_layernorm")
        stream.add(_mlp(g, x, layer.mlp, cfg.hidden_act, f"{stem}.mlp"))

    kept = g.op("Gather", [stream.flush(), "logits_positions"], axis=1)
    normed = _rms(g, kept, module.norm, "norm")
    g.op("MatMul", [normed, g.const("lm_head", module.lm_head_weight.detach().float().T.contiguous().numpy())],
         outputs=["logits"])

    def value(s: TensorSpec):
        return helper.make_tensor_value_info(s.name, helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)), list(s.shape))

    model, graph = g.model, g.graph
    graph.name = "idefics_decoder_ort"
    graph.node.extend(g.nodes)
    graph.input.extend(value(s) for s in spec.inputs)
    graph.output.extend(value(s) for s in spec.outputs)
    model.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    model.producer_name = "idefics-toolkit"
    model.ir_version = 9
    return model, spec


# ---- the INT8 KV cache's scales


def kv_scales(calibration: list[tuple[list[np.ndarray], np.ndarray]], info: ModelInfo,
              margin: float = KV_MARGIN) -> list[np.ndarray]:
    """Per-channel INT8 scales [1,H,1,hd] (float32) of every cache buffer (past_key.0, past_value.0,
    past_key.1, ...) from calibration K/V: (the 2 * layers present K/V [B,H,T,hd] of a prompt batch
    in that order, keys after rotary; its attention_mask [B,T]: padding is left out). Rotary turns a
    key's channels d and d + hd/2 into each other with the position, so both get the peak of their
    pair's norm: no position takes a key past the peak. Values: each channel's peak.
    scale = margin * peak / 127."""
    half = info.head_dim // 2
    peaks = [np.zeros((info.num_heads, info.head_dim), np.float64) for _ in range(2 * info.num_layers)]
    seen = 0
    for presents, mask in calibration:
        if len(presents) != len(peaks):
            raise ValueError(f"kv_scales: {len(presents)} K/V arrays per batch for {len(peaks)} cache buffers")
        for r in range(mask.shape[0]):
            filled = np.flatnonzero(mask[r])
            seen += len(filled)
            for i, array in enumerate(presents):
                x = np.abs(np.asarray(array[r][:, filled], np.float64))  # [H, n, hd]
                if i % 2 == 0:  # a key: the norm of each rotary pair, for both of its channels
                    pair = np.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
                    x = np.concatenate([pair, pair], axis=-1)
                np.maximum(peaks[i], x.max(axis=1, initial=0.0), out=peaks[i])
    if not seen:
        raise ValueError("kv_scales: the calibration prompts have no tokens")
    tiny = np.finfo(np.float32).tiny  # a channel that never moved: any scale holds its zeros
    return [np.maximum(margin * p / 127.0, tiny).astype(np.float32)[None, :, None, :] for p in peaks]


def calibration_kv(module, spec: GraphSpec, feeds: list[dict]) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """(present K/V, attention_mask) of the PyTorch decoder (DecoderGraph) on the portable decoder's
    prefill feeds of calibration prompts (calibration.feeds), as kv_scales reads them."""
    out = []
    for feed in feeds:
        with torch.no_grad():
            outputs = module(*[torch.from_numpy(np.asarray(feed[t.name])) for t in spec.inputs])
        out.append(([o.numpy() for o in outputs[1:]], np.asarray(feed["attention_mask"])))
    return out


# ---- validation against the PyTorch module


def ort_feeds(ids, seqlens_k, total, image_attention_mask, logits_positions, cross, buffers, spec: GraphSpec):
    """Name -> array feed of the ORT decoder (the shared buffers are fed as past and rebound as present)."""
    names = [s.name for s in spec.inputs]
    values = [ids, np.asarray(seqlens_k, np.int32), np.asarray(total, np.int32), image_attention_mask,
              logits_positions, *cross, *buffers]
    return dict(zip(names, values))


def run_shared(session, feed: dict, spec: GraphSpec, buffers: list[np.ndarray], run_options=None) -> np.ndarray:
    """One call with IO binding: each past buffer is also its present output, written in place."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_output("logits")  # first: copy_outputs_to_cpu()[0]
    past = [s.name for s in spec.inputs if s.name.startswith("past_")]
    for name, value in feed.items():
        if name not in past:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, buffer in zip(past, buffers):
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
    session.run_with_iobinding(binding, run_options)
    return binding.copy_outputs_to_cpu()[0]


def attention(info: ModelInfo) -> str:
    """The shapes the decoder's attention kernels are given, as a refusal names them."""
    return f"this model's attention: {info.num_heads} heads of head size {info.head_dim}"


def first_run(session, info: ModelInfo, spec: GraphSpec, batch: int = 2, prompt: int = 3) -> None:
    """Run the ORT decoder once as a Session would, on a small feed of zeros: a right-padded prefill
    of `batch` rows from slot 0, then one decode step. ONNX Runtime checks some of a kernel's limits
    only when it runs (GroupQueryAttention's head size): a graph it refuses fails here, whether the
    export validates or not (exporter.ort.refusal), without ONNX Runtime's own error log (the export's
    warning says it)."""
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    cache = np.dtype(spec.input("past_key.0").dtype)
    cross_names = [s.name for s in spec.inputs if s.name.startswith("cross_")]
    cross_dtype = np.dtype(spec.input(cross_names[0]).dtype) if cross_names else cache
    cross = [np.zeros((batch, info.num_heads, info.image_seq_len, info.head_dim), cross_dtype) for _ in cross_names]
    buffers = [np.zeros((batch, info.num_heads, prompt + 2, info.head_dim), cache)
               for s in spec.inputs if s.name.startswith("past_")]
    lengths = np.array([prompt - r % prompt for r in range(batch)])  # the first row full, the others shorter
    ids = np.full((batch, prompt), info.bos_token_id or 0, np.int64)
    images = np.zeros((batch, prompt, 1), np.int64)
    images[:, 1:] = 1  # every token after the first sees the image
    run_shared(session, ort_feeds(ids, lengths - 1, prompt, images, np.arange(prompt), cross, buffers, spec), spec,
               buffers, quiet)
    run_shared(session, ort_feeds(ids[:, :1], lengths, int(lengths.max()) + 1, images[:, :1], np.arange(1), cross,
                                  buffers, spec), spec, buffers, quiet)


def run_or_refuse(folder: Path, spec: GraphSpec, info: ModelInfo, reference: Reference | None = None,
                  bound=FP32_BOUND, kv_scales: list[np.ndarray] | None = None) -> dict:
    """Load the ORT decoder `spec` written in `folder`, run it once (first_run) and, given a
    `reference` (decoder_reference, computed before: only ONNX Runtime's errors are a refusal),
    compare it (compare_reference); return that report ({} without a reference). A graph ONNX
    Runtime refuses to load or run (a kernel that does not take the model's shapes) is removed and
    raises exporter.ort.refusal.Refused naming the op, the reason and the model's attention."""
    path = Path(folder) / spec.file
    stage, session = "load", None
    try:
        session = ort_session(path)  # past 1 GB without constant folding's and prepacking's copies
        stage = "run"
        first_run(session, info, spec)
        return compare_reference(session, reference, spec, bound, kv_scales) if reference is not None else {}
    except ort_errors() as exc:
        session = None  # ONNX Runtime's hold on the graph goes before its file does
        remove_graph(folder, spec.file)
        raise refused(path, exc, stage, attention(info)) from exc


def _compare(name: str, ref, got, bound=FP32_BOUND) -> dict:
    return judge(measure(ref, got), bound)


@dataclasses.dataclass
class Reference:
    """reference_check's case and the PyTorch decoder's results on it (decoder_reference): kept
    apart from the module, so a graph built after the model is freed (the INT8 one) is judged too."""

    lengths: tuple[int, ...]
    steps: int
    ids: np.ndarray  # [B, T + steps]: each row's prompt right-padded to T, then its step tokens
    image_mask: list[np.ndarray]  # per row: the image mask over its own positions [n + steps, I]
    cross: list[np.ndarray]  # FP32 cross K/V
    buffers: list[np.ndarray]  # FP32 garbage the shared buffers start with
    logits: dict[str, list[np.ndarray]]  # "prefill" / "decode{s}": per row
    cache: list[list[np.ndarray]]  # per row: every layer's K/V [H, n + steps, hd]


def decoder_reference(module, info: ModelInfo, lengths=(9, 6), images: int = 2, steps: int = 2, spare: int = 5,
                      seed: int = 0, cross: list[np.ndarray] | None = None) -> Reference:
    """The PyTorch DecoderGraph on reference_check's case: each row alone, unpadded (its positions
    0..n-1, as the pool lays rows out), a prefill then `steps` decode steps against its own K/V.
    `cross`: the rows' cross-attention K/V (the perceiver's outputs on real photos, in its output
    order) in place of random ones: INT8 activations are calibrated on those, and random K/V
    (std 1) drive the cross-attention outputs outside their calibrated range."""
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    slots = t + steps + spare
    vocab = module.cfg.vocab_size
    ids = torch.randint(3, vocab, (b, t + steps), generator=gen)
    image_mask = torch.zeros(b, t + steps, images, dtype=torch.long)
    for row, n in enumerate(lengths):  # each token sees the most recent image before it, if any
        for k in range(images):
            at = 1 + 3 * k + row
            if at < n:
                image_mask[row, at:] = 0
                image_mask[row, at:, k] = 1
        if module.cfg.additional_vocab_size:
            ids[row, 0] = info.vocab_size - 1
    shape = (b, info.num_heads, images * info.image_seq_len, info.head_dim)
    # drawn with or without `cross`, so that the cache garbage below is the same either way
    randn = [torch.randn(shape, generator=gen) for _ in range(2 * info.num_cross_layers)]
    if cross is None:
        cross = randn
    elif len(cross) != len(randn) or any(tuple(c.shape) != shape for c in cross):
        raise ValueError(f"decoder_reference: cross must be {len(randn)} arrays of shape {shape}, got "
                         f"{[tuple(c.shape) for c in cross]}")
    else:
        cross = [torch.from_numpy(np.ascontiguousarray(c)) for c in cross]
    buffers = [(torch.randn(b, info.num_heads, slots, info.head_dim, generator=gen) * 10).numpy()
               for _ in range(2 * info.num_layers)]
    logits = {"prefill": [], **{f"decode{s}": [] for s in range(steps)}}
    cache, row_image = [], []
    for row, n in enumerate(lengths):
        total = n + steps
        row_ids = torch.cat([ids[row, :n], ids[row, t:t + steps]])[None]
        row_mask = torch.cat([image_mask[row, :n], image_mask[row, n - 1:n].expand(steps, -1)])[None]
        row_image.append(row_mask[0].numpy())
        past = [torch.zeros(1, info.num_heads, 0, info.head_dim) for _ in range(2 * info.num_layers)]
        logits_all = []
        for start, stop in [(0, n), *[(n + s, n + s + 1) for s in range(steps)]]:
            with torch.no_grad():
                out = module(row_ids[:, start:stop], torch.ones(1, stop, dtype=torch.long),
                             torch.arange(start, stop)[None], row_mask[:, start:stop],
                             torch.arange(stop - start), *[c[row:row + 1] for c in cross], *past)
            logits_all.append(out[0][0].numpy())
            past = [torch.cat([p, k], dim=2) for p, k in zip(past, out[1:])]
        logits["prefill"].append(logits_all[0])
        for s in range(steps):
            logits[f"decode{s}"].append(logits_all[1 + s][0])
        cache.append([p[0, :, :total].numpy() for p in past])
    return Reference(tuple(lengths), steps, ids.numpy(), row_image, [c.numpy() for c in cross], buffers, logits,
                     cache)


def reference_check(session, module, info: ModelInfo, spec: GraphSpec, lengths=(9, 6), images: int = 2,
                    steps: int = 2, spare: int = 5, seed: int = 0, bound=FP32_BOUND,
                    kv_scales: list[np.ndarray] | None = None) -> dict:
    """Run the ORT decoder against the PyTorch DecoderGraph: a right-padded prefill of rows of
    `lengths` tokens from slot 0 (garbage in every unfilled slot), then `steps` decode steps at
    per-row positions. The reference runs each row unpadded (its positions 0..n-1, as the pool
    lays rows out) and each decode step against its own K/V. An INT8 cache is compared dequantized
    with its `kv_scales`. Returns {case: {output: row}}."""
    return compare_reference(session, decoder_reference(module, info, lengths, images, steps, spare, seed), spec,
                             bound, kv_scales)


def compare_reference(session, ref: Reference, spec: GraphSpec, bound=FP32_BOUND,
                      kv_scales: list[np.ndarray] | None = None) -> dict:
    """reference_check against a Reference computed before (decoder_reference)."""
    lengths, steps = ref.lengths, ref.steps
    b, t = len(lengths), max(lengths)
    cache_dtype = np.dtype(spec.input("past_key.0").dtype)  # FP16 graphs: cache and cross K/V in FP16
    cross_dtype = np.dtype(spec.input("cross_key.0").dtype) if ref.cross else cache_dtype
    buffers = [buffer.astype(cache_dtype) for buffer in ref.buffers]
    cross = [c.astype(cross_dtype) for c in ref.cross]
    row_image = ref.image_mask
    report = {}
    # prefill: right-padded rows, logits at every position (compared at each row's valid ones)
    prefill_mask = np.zeros((b, t, row_image[0].shape[1]), np.int64)
    for r, n in enumerate(lengths):
        prefill_mask[r, :n] = row_image[r][:n]
    feed = ort_feeds(ref.ids[:, :t], [n - 1 for n in lengths], t, prefill_mask, np.arange(t), cross, buffers, spec)
    logits = run_shared(session, feed, spec, buffers)
    report["prefill"] = {f"logits[row {r}]": _compare("logits", ref.logits["prefill"][r], logits[r, :n], bound)
                         for r, n in enumerate(lengths)}
    for s in range(steps):
        seqlens = [n + s for n in lengths]  # tokens before this step = the new token's slot
        step_mask = np.stack([row_image[r][n + s:n + s + 1] for r, n in enumerate(lengths)])
        feed = ort_feeds(ref.ids[:, t + s:t + s + 1], seqlens, max(seqlens) + 1, step_mask, np.arange(1), cross,
                         buffers, spec)
        logits = run_shared(session, feed, spec, buffers)
        report[f"decode{s}"] = {f"logits[row {r}]": _compare("logits", ref.logits[f"decode{s}"][r][None], logits[r],
                                                             bound) for r in range(b)}
    # the shared buffers hold every row's K/V (after rotary) at its slots
    report["cache"] = {}
    if cache_dtype == np.int8 and kv_scales is None:
        raise ValueError(f"{spec.file} keeps an INT8 cache: reference_check needs its kv_scales")
    for i, buffer in enumerate(buffers):
        name = spec.outputs[1 + i].name
        got = np.concatenate([buffer[r, :, :n + steps] for r, n in enumerate(lengths)], axis=1).astype(np.float32)
        if cache_dtype == np.int8:
            got = got * kv_scales[i][0]  # [H,1,hd] over [H, tokens, hd]
        expected = np.concatenate([ref.cache[r][i] for r in range(b)], axis=1)
        report["cache"][name] = _compare(name, expected, got, bound)
    return report


def check_report(report: dict, bound=FP32_BOUND) -> list[str]:
    """Every row of a reference_check report that misses `bound` (rows are judged again by it)."""
    return [f"decoder.ort/{case}: {name} max|err| {row['max_rel']:.3g} rms, mean|err| {row['mean_rel']:.3g} rms, "
            f"cosine {row['cosine']:.6f} (bound: {describe(bound)})" + (f" ({row['note']})" if "note" in row else "")
            for case, rows in report.items() for name, row in rows.items() if not judge(row, bound)["ok"]]


def write_ort_decoder(module, info: ModelInfo, max_seq_len: int, folder: Path, write: Callable,
                      validate: bool = True, precision: str = "fp32", bound: dict | None = None,
                      kv_scales: list[np.ndarray] | None = None, prompt: bool = False) -> tuple[GraphSpec, dict]:
    """Build, save and validate the ORT decoder of a precision ("fp32", "fp16" or "int8wo") in `folder`
    through `write(proto, spec) -> GraphSpec` (the export's writer: weights beside a graph past its
    threshold, no onnx.checker): (GraphSpec, report against the PyTorch FP32 decoder). `bound`:
    BOUNDS[precision] unless given (idefics-export --tolerances). `kv_scales` (int8wo only;
    kv_scales()): the cache is INT8 with these scales. `prompt`: the precision's prompt graph
    (PROMPT_FILES) instead of its decode graph. A graph ONNX Runtime does not load or run (first_run,
    then the validation) is removed and raises exporter.ort.refusal.Refused (an ExportError) naming
    the op and ONNX Runtime's reason: the export leaves it out with a warning."""
    if precision not in FILES:
        raise ExportError(f"the ONNX Runtime decoder is written in {', '.join(FILES)}, not {precision!r}")
    if prompt and precision not in PROMPT_FILES:
        raise ExportError(f"an ONNX Runtime prompt graph is written in {', '.join(PROMPT_FILES)}, not {precision!r}")
    if kv_scales is not None and precision != "int8wo":
        raise ValueError(f"an INT8 KV cache is the int8wo decoder's, not the {precision} one's")
    model, spec = build_ort_decoder(module, info, max_seq_len, MASK_VALUE["fp16" if precision == "fp16" else "fp32"],
                                    kv_scales)
    if precision == "int8wo":  # every weight MatMul, lm_head included; attention's stay FP32
        model = per_token_int8(model) if prompt else matmul_nbits(model)
    elif precision == "fp16":  # as the portable FP16 graphs take it: FP16 weights, activations, cross K/V
        model, spec, _ = to_fp16(model, spec)  # and shared cache, FP32 logits
    spec = write(model, dataclasses.replace(spec, file=(PROMPT_FILES if prompt else FILES)[precision]))
    del model  # saved: at 9B widths the proto holds the decoder's 5 GB (external data: its bytes are gone)
    gc.collect()
    # onnx.checker does not know SimplifiedLayerNormalization (ONNX Runtime registers it in the ONNX
    # domain); loading it in ONNX Runtime, and running it, is this graph's check
    bound = bound or BOUNDS[precision]
    report = run_or_refuse(folder, spec, info, decoder_reference(module, info) if validate else None, bound,
                           kv_scales)
    failed = check_report(report, bound)
    if failed:
        raise ValidationError(f"{len(failed)} output(s) of the {precision} ONNX Runtime decoder differ from PyTorch "
                              f"past the {precision} tolerance:\n  " + "\n  ".join(failed), report)
    return spec, report
