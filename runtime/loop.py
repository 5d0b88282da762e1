"""The generation loop, gpt-fast shaped: images once, prefill, then one bound decode call per token.

Vision and perceiver run once per request; the cross-attention K/V they produce are bound as
inputs of every decode step (transformers recomputes them at each step). The self-attention
cache is a StaticCache written in place; a decode step is one bound call with no allocation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from runtime.cache import StaticCache
from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.memory import HostMemory, TorchMemory, assign, is_host
from runtime.runners import Runner
from runtime.sampling import SamplingConfig, needs_scores, next_tokens, process


@dataclass
class Request:
    input_ids: np.ndarray  # [B,T] int64, left padded
    attention_mask: np.ndarray  # [B,T] int64
    pixel_values: np.ndarray | None  # [B,I,3,H,W] float32, or None for text only
    image_attention_mask: np.ndarray  # [B,T,I] int64, I >= 1


@dataclass
class Timings:
    vision: float = 0.0
    perceiver: float = 0.0
    prefill: float = 0.0
    decode: list[float] = field(default_factory=list)  # seconds per generated token after the first

    def as_dict(self) -> dict:
        return {"vision": self.vision, "perceiver": self.perceiver, "prefill": self.prefill, "decode": self.decode}


class Graphs:
    def __init__(self, manifest: Manifest, runners: dict[str, Runner], prefill: Runner | None = None,
                 memory: HostMemory | TorchMemory | None = None, prompt: Runner | None = None,
                 kv_scales: dict[str, np.ndarray] | None = None):
        """`prefill`: another decoder (e.g. FP32) for the prompt, when the decode one (e.g. INT8
        weight-only) is slower on long inputs; both must take the caches in the same dtypes. With
        the ONNX Runtime decoder (exporter.ort.decoder) it is the portable decoder of whole
        sequences (teacher forcing, calibration; activated on first use), and `prompt` the decoder
        prompts run in (default: `prefill`): the ONNX Runtime decoder itself, straight into the
        shared cache, or the portable one. `kv_scales` ({past name: scale}, runtime.cache.
        int8_cache_scales): the decode graph's INT8 cache scales, with which a float prompt graph's
        K/V are quantized into it.
        `memory`: where the loop's buffers live (host numpy by default; torch tensors on a GPU)."""
        self.manifest = manifest
        self.memory = memory or HostMemory()
        self.vision, self.perceiver, self.decoder = runners["vision"], runners["perceiver"], runners["decoder"]
        self.prefill_decoder = prefill or self.decoder
        self.prompt_decoder = prompt or self.prefill_decoder
        # FP16 graphs take their caches in FP16: buffers follow the graph's own IO dtypes
        decoder = self.decoder.spec
        if "logits_positions" not in {t.name for t in decoder.inputs}:
            raise ManifestError(f"{decoder.file} takes logits_to_keep: it comes from an older idefics-export; "
                                "export it again")
        past = self.manifest.names.past(0)[0]
        self.cache_dtype = np.dtype(decoder.input(past).dtype)
        # the whole-sequence decoder's own past (teacher forcing): the portable one of a shared-cache
        # decoder takes FP32 where the int8wo ORT decoder keeps an INT8 cache
        self.prefill_cache_dtype = np.dtype(self.prefill_decoder.spec.input(past).dtype)
        self.cross_dtype = np.dtype(decoder.input(self.manifest.names.cross(0)[0]).dtype) \
            if manifest.model.num_cross_layers else self.cache_dtype
        self.logits_dtype = np.dtype(decoder.output("logits").dtype)
        # The ONNX Runtime flavour (exporter.ort.decoder) decodes over one shared past/present buffer
        # per layer with per-row lengths (seqlens_k); prompts run in it too (shared_prefill) or in the
        # portable decoder, whose K/V then move to slot 0.
        self.shared_cache = _shared(decoder)
        self.shared_prefill = _shared(self.prompt_decoder.spec)
        self.prompt_cache_dtype = np.dtype(self.prompt_decoder.spec.input(past).dtype)
        self.kv_scales = kv_scales
        io = lambda spec: [(t.name, t.dtype) for t in (*spec.inputs, *spec.outputs)]  # noqa: E731
        if self.shared_prefill and not self.shared_cache:
            raise ValueError(f"prompt graph {self.prompt_decoder.spec.file} writes a shared cache; the decode "
                             f"graph {decoder.file} does not read one")
        if self.shared_cache:
            first = self.prefill_decoder.spec
            if prefill is None or _shared(first):
                raise ManifestError(f"{decoder.file} decodes over a shared cache; whole sequences need a portable "
                                    "decoder (Graphs(..., prefill=...))")
            # prompts write the decode cache: same dtype (the whole-sequence decoder has caches of its
            # own), or a float prompt's K/V quantized with the scales of the decode graph's INT8 cache
            quantized = self.cache_dtype == np.int8 and kv_scales is not None and self.shared_prefill
            if self.prompt_cache_dtype != self.cache_dtype and not quantized:
                raise ValueError(f"prompt graph {self.prompt_decoder.spec.file} writes its cache in "
                                 f"{self.prompt_cache_dtype} and "
                                 f"decode graph {decoder.file} reads {self.cache_dtype}: run prompts in the decode "
                                 "precision (no prefill_precision) or in the portable graphs (portable=True)")
        elif prompt is not None and prompt is not self.prefill_decoder:
            raise ValueError("Graphs(prompt=...) is for a decoder over a shared cache (exporter.ort.decoder)")
        elif io(self.prefill_decoder.spec) != io(decoder):
            raise ValueError(f"prefill graph {self.prefill_decoder.spec.file} and decode graph {decoder.file} "
                             "take different IO dtypes; choose precisions whose caches match (e.g. fp32 and int8wo)")

    def run(self, runner: Runner, inputs: dict) -> dict:
        """One bound call with fresh output buffers in the loop's memory; host inputs are copied
        there. Output sizes come from the spec's named axes, read off the inputs' shapes (the
        perceiver's image_tokens is images x image_seq_len)."""
        runner.activate()  # a no-op once active: the portable decoder of a shared-cache Session starts on first use
        inputs = {name: self.memory.from_host(value) if is_host(value) else value for name, value in inputs.items()}
        axes = {d: size for t in runner.spec.inputs for d, size in zip(t.shape, inputs[t.name].shape)
                if isinstance(d, str)}
        if "images" in axes:
            axes.setdefault("image_tokens", axes["images"] * self.manifest.model.image_seq_len)
        outputs = {t.name: self.memory.zeros([axes[d] if isinstance(d, str) else d for d in t.shape], t.dtype)
                   for t in runner.spec.outputs}
        with self.memory.scope():  # a PyTorch runner computes on the current stream
            runner.bind(inputs, outputs).run()
        return outputs


def _shared(spec) -> bool:
    return "seqlens_k" in {t.name for t in spec.inputs}


def encode_images(g: Graphs, req: Request, t: Timings) -> dict:
    """Cross-attention K/V of every cross layer [B,H,I*L,hd], in the loop's memory."""
    info, names = g.manifest.model, g.manifest.names
    b, _, n = req.image_attention_mask.shape
    cross_names = [name for j in range(info.num_cross_layers) for name in names.cross(j)]
    if req.pixel_values is None:
        # No images: every token's image mask is 0, so the gate zeroes cross-attention; K/V are unused.
        zeros = g.memory.zeros((b, info.num_heads, n * info.image_seq_len, info.head_dim), g.cross_dtype)
        return {name: zeros for name in cross_names}
    start = time.perf_counter()
    pixels = req.pixel_values.reshape(-1, *req.pixel_values.shape[2:])  # [B*I,3,H,W]
    (hidden,) = g.run(g.vision, {"pixel_values": pixels}).values()
    g.memory.synchronize()
    t.vision = time.perf_counter() - start
    start = time.perf_counter()
    cross = g.run(g.perceiver, {"image_hidden_states": hidden.reshape(b, n, *hidden.shape[1:])})
    g.memory.synchronize()
    t.perceiver = time.perf_counter() - start
    return cross


def prefill_feed(g: Graphs, input_ids, attention_mask, image_attention_mask, cross: dict, keep: int = 1,
                 past: dict | None = None) -> dict:
    """Decoder inputs for whole sequences [B,T] with an empty past (`past`: zero-length buffers to
    use for it); logits for the last `keep` positions."""
    info = g.manifest.model
    if past is None:
        empty = np.zeros((input_ids.shape[0], info.num_heads, 0, info.head_dim), g.prefill_cache_dtype)
        past = {name: empty for i in range(info.num_layers) for name in g.manifest.names.past(i)}
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions(attention_mask),
        "image_attention_mask": image_attention_mask,
        "logits_positions": np.arange(input_ids.shape[1] - keep, input_ids.shape[1], dtype=np.int64),
        **cross,
        **past,
    }


def prefill(g: Graphs, req: Request, cross: dict, cache: StaticCache):
    """input_ids [B,T] -> logits of the last position [B,V] (in the loop's memory); the prompt's
    K/V go into the cache (from slot 0, left padding dropped, when the prompt runs shared)."""
    if g.shared_prefill:
        return shared_prefill(g, req.input_ids, req.attention_mask, req.image_attention_mask, cross, cache.past)
    feed = prefill_feed(g, req.input_ids, req.attention_mask, req.image_attention_mask, cross,
                        past=cache.empty_past())
    out = g.run(g.prompt_decoder, feed)
    with g.memory.scope():  # the prompt's K/V are copied into the cache on the device
        cache.write_prompt(out, req.attention_mask)
    return out["logits"][:, -1]


def left_padding(attention_mask: np.ndarray) -> np.ndarray:
    """Each row's left padding [B] in a left-padded [B,T] attention mask: the index of its first 1."""
    return (np.asarray(attention_mask) != 0).argmax(axis=1)


def slot0_rows(input_ids, attention_mask, image_attention_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompts [B,T] (host) as the ONNX Runtime decoder takes them: each row from
    position 0, right-padded with zeros to the longest row. Returns (ids [B,W], image mask
    [B,W,I], lengths [B])."""
    b, t = input_ids.shape
    pads = left_padding(attention_mask)
    lengths = t - pads
    width = int(lengths.max())
    ids = np.zeros((b, width), np.int64)
    image_mask = np.zeros((b, width, image_attention_mask.shape[2]), np.int64)
    for r, pad in enumerate(pads):
        ids[r, :lengths[r]] = input_ids[r, pad:]
        image_mask[r, :lengths[r]] = image_attention_mask[r, pad:]
    return ids, image_mask, lengths


def shared_prefill(g: Graphs, input_ids, attention_mask, image_attention_mask, cross: dict,
                   buffers: dict):
    """Left-padded prompts [B,T] (host) through the ONNX Runtime decoder (g.prompt_decoder) in one
    call, each row moved to start at slot 0 (right-padded to the longest row; GroupQueryAttention
    reads row r's first n_r slots only): their K/V are written in place into `buffers` {past name:
    [B,H,slots,hd]} (the loop's memory, slots >= the longest row). Returns each row's last-token
    logits [B,V] in the loop's memory."""
    m = g.memory
    b = input_ids.shape[0]
    ids, image_mask, lengths = slot0_rows(input_ids, attention_mask, image_attention_mask)
    width = ids.shape[1]
    kept = np.unique(lengths - 1)  # the rows' last positions: logits of those only
    with m.scope():
        logits = m.zeros((b, len(kept), g.manifest.model.vocab_size), g.logits_dtype)
        inputs = {"input_ids": m.from_host(ids), "seqlens_k": m.from_host((lengths - 1).astype(np.int32)),
                  # a host scalar on every device: CUDA's GroupQueryAttention reads it on the CPU
                  "total_sequence_length": np.array(width, np.int32),
                  "image_attention_mask": m.from_host(image_mask), "logits_positions": m.from_host(kept.astype(np.int64)),
                  **cross}
        info = g.manifest.model
        pairs = g.manifest.names.cache_pairs(info.num_layers)
        quantize = g.prompt_cache_dtype != g.cache_dtype  # an FP32 prompt before INT8 steps
        written = {past: m.zeros((b, info.num_heads, width, info.head_dim), g.prompt_cache_dtype)
                   for past, _ in pairs} if quantize else buffers
        g.prompt_decoder.bind({**inputs, **written},
                              {"logits": logits, **{present: written[past] for past, present in pairs}}).run()
        if quantize:  # each row's K/V sit in its first lengths[r] slots of the prompt's buffers
            for past, _ in pairs:
                buffers[past][:, :, :width] = m.quantize_int8(written[past], g.kv_scales[past])
        return logits[m.index(np.arange(b)), m.index(np.searchsorted(kept, lengths - 1))]


def positions(attention_mask: np.ndarray) -> np.ndarray:
    # transformers: cumsum(mask) - 1, padding set to 1
    return np.where(attention_mask == 0, 1, np.cumsum(attention_mask, axis=-1) - 1).astype(np.int64)


class DecodeStep:
    """One token per row: writes into bound buffers, runs, moves the new K/V into the cache."""

    def __init__(self, g: Graphs, req: Request, cross: dict, cache: StaticCache):
        b = req.input_ids.shape[0]
        memory = self.memory = g.memory
        self.cache = cache
        self.ids = memory.zeros((b, 1), np.int64)
        self.pos = memory.zeros((b, 1), np.int64)
        self.logits = memory.zeros((b, 1, g.manifest.model.vocab_size), g.logits_dtype)
        inputs = {
            "input_ids": self.ids,
            "attention_mask": cache.mask,
            "position_ids": self.pos,
            # generated tokens attend to the images the prompt's last token attends to
            "image_attention_mask": memory.from_host(req.image_attention_mask[:, -1:]),
            "logits_positions": memory.zeros((1,), np.int64),  # the one token's logits
            **cross,
            **cache.past,
        }
        self.call = g.decoder.bind(inputs, {"logits": self.logits, **cache.step})
        with memory.scope():
            assign(self.pos[:, 0], positions(req.attention_mask)[:, -1])  # the prompt's last; each step adds 1

    def __call__(self, tokens: np.ndarray):
        # tokens: [B] host -> logits [B,V] in the loop's memory; positions advance where they live
        with self.memory.scope():
            assign(self.ids[:, 0], tokens)
            self.pos += 1
            self.call.run()
            self.cache.commit_step()
        return self.logits[:, 0]


class SharedDecodeStep:
    """DecodeStep for the ONNX Runtime decoder over shared buffers: each row's prompt K/V start at
    slot 0 (left padding dropped; moved there after a portable prefill), and the graph writes each
    step's K/V into the cache itself at the row's own length (seqlens_k)."""

    def __init__(self, g: Graphs, req: Request, cross: dict, cache: StaticCache):
        b, t = req.attention_mask.shape
        m = self.memory = g.memory
        pads = left_padding(req.attention_mask)
        if not g.shared_prefill:  # the portable decoder wrote the prompt with its left padding
            with m.scope():
                for buffer in cache.past.values():
                    for r, pad in enumerate(pads):
                        if pad:
                            buffer[r, :, :t - pad] = m.copy(buffer[r, :, pad:t])
        self.lengths = (t - pads).astype(np.int64)  # filled slots per row
        self.slots = cache.slots
        with m.scope():
            self.ids = m.zeros((b, 1), np.int64)
            self.seqlens = m.zeros((b,), np.int32)
            self.total = np.zeros((), np.int32)  # host on every device (as shared_prefill's)
            self.logits = m.zeros((b, 1, g.manifest.model.vocab_size), g.logits_dtype)
            inputs = {"input_ids": self.ids, "seqlens_k": self.seqlens, "total_sequence_length": self.total,
                      "image_attention_mask": m.from_host(np.ascontiguousarray(req.image_attention_mask[:, -1:])),
                      "logits_positions": m.zeros((1,), np.int64), **cross, **cache.past}
        outputs = {"logits": self.logits, **{present: cache.past[past] for past, present in cache.pairs}}
        self.call = g.decoder.bind(inputs, outputs)

    def __call__(self, tokens: np.ndarray):
        if (self.lengths >= self.slots).any():
            raise RuntimeError(f"static cache is full ({self.slots} slots)")
        with self.memory.scope():
            assign(self.ids[:, 0], tokens)
            assign(self.seqlens, self.lengths.astype(np.int32))  # the new token's slot = tokens before it
            self.total[...] = self.lengths.max() + 1
            self.call.run()
        self.lengths += 1
        return self.logits[:, 0]


@dataclass
class Step:
    tokens: np.ndarray  # [B] int64, the next token of every row
    logits: object  # [B,V] the raw logits it was chosen from, in the loop's memory (a view: copy it to keep it)
    last: bool  # whether generation stops after this token


class Decoding:
    """One request's choice of tokens: its settings, the sequences so far, which rows are
    unfinished, the sampler's generator. Shared by the single-request loop and the in-flight
    batching engine, so a request gets the same tokens whichever runs it."""

    def __init__(self, info, req: Request, cfg: SamplingConfig):
        eos = np.asarray(cfg.eos_ids() or _as_tuple(info.eos_token_id), np.int64)
        if cfg.eos_token_id is None and eos.size:  # the model's eos, as transformers fills it in
            cfg = dataclasses.replace(cfg, eos_token_id=tuple(int(e) for e in eos))
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else info.pad_token_id
        if pad is None:
            pad = int(eos[0]) if eos.size else 0
        self.cfg, self.eos, self.pad = cfg, eos, pad
        b, self.prompt_len = req.input_ids.shape
        self.sequences = np.zeros((b, self.prompt_len + cfg.max_new_tokens), np.int64)
        self.sequences[:, :self.prompt_len] = req.input_ids
        self.rng = np.random.default_rng(cfg.seed)
        self.pad_lengths = left_padding(req.attention_mask)
        self.unfinished = np.ones(b, bool)
        self.generated = 0

    @property
    def needs_scores(self) -> bool:
        return needs_scores(self.cfg, self.generated)

    def choose(self, rows: np.ndarray, ids: np.ndarray | None, scores) -> tuple[np.ndarray, bool]:
        """The next token of every row [B] and whether generation stops after it. `rows`: the rows
        whose logits were computed (the others are finished and get pad); `ids`: the argmax of their
        raw logits (plain greedy); `scores()`: their logits on the host [len(rows),V] (processors)."""
        b, k = self.sequences.shape[0], self.generated
        length = self.prompt_len + k
        if self.needs_scores:
            host = scores().astype(np.float32, copy=False)
            if len(rows) != b:  # rows that left the batch: their tokens are pad whatever the scores
                full = np.zeros((b, host.shape[-1]), np.float32)
                full[rows] = host
                host = full
            chosen = next_tokens(process(host, self.sequences[:, :length], k, self.cfg, self.pad_lengths),
                                 self.cfg, self.rng)
        else:
            chosen = np.zeros(b, np.int64)
            chosen[rows] = ids
        tokens = np.where(self.unfinished, chosen, self.pad)
        self.sequences[:, length] = tokens
        if self.eos.size:
            self.unfinished &= ~np.isin(tokens, self.eos)
        self.generated += 1
        return tokens, not self.unfinished.any() or self.generated == self.cfg.max_new_tokens


def generate_tokens(g: Graphs, req: Request, cfg: SamplingConfig, t: Timings) -> Iterator[Step]:
    """Yield a Step per generated token until all rows finish or max_new_tokens (one request alone,
    with a cache of its own; `runtime.engine` runs many requests in shared steps)."""
    decoding = Decoding(g.manifest.model, req, cfg)
    b, prompt_len = req.input_ids.shape
    cache = StaticCache(g.manifest, b, prompt_len + cfg.max_new_tokens - 1, g.cache_dtype, g.memory)
    rows = np.arange(b)

    cross = encode_images(g, req, t)
    start = time.perf_counter()
    logits = prefill(g, req, cross, cache)
    t.prefill = time.perf_counter() - start
    step_type = SharedDecodeStep if g.shared_cache else DecodeStep
    step = step_type(g, req, cross, cache) if cfg.max_new_tokens > 1 else None
    while True:
        # no copy for FP32 host logits: the processors never write into their input
        ids = None if decoding.needs_scores else g.memory.argmax(logits)  # plain greedy: only ids leave the device
        tokens, last = decoding.choose(rows, ids, lambda: g.memory.to_host(logits))
        yield Step(tokens, logits, last)
        if last:
            return
        start = time.perf_counter()
        logits = step(tokens)
        t.decode.append(time.perf_counter() - start)


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
