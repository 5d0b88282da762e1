"""The three graphs cut into pieces small enough to hold one at a time: each a torch module built on
the meta device and filled from a tensor source with only its own weights.

  vision:    embeddings (+ pre-layernorm), one piece per encoder layer (the last one writes
             image_hidden_states: IDEFICS uses the encoder's last_hidden_state, no post-layernorm)
  perceiver: one piece: the resampler and each cross layer's k_proj / v_proj (/ k_layer_norm); the
             cross layers' q_proj / o_proj (20 x 2 x 8192^2 floats at 80b) are never built
  decoder:   head (embedding, masks, gate, rotary cos/sin), "cross J" before every
             cross_layer_interval-th "layer I self", tail (final norm + lm_head at logits_positions)

The pieces run runtime.reference.modules' functions, the code DecoderGraph and PerceiverGraph run,
so a streamed graph computes what the whole traced one does. Pieces meet at the names in
`Piece.inputs` / `Piece.outputs`: the graph's own IO names (exporter.graphs.specs) and the
intermediate tensors named here (hidden.K, self_mask, ...), whose axes INTERMEDIATE gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.idefics.modeling_idefics import (
    IdeficsDecoderLayer,
    IdeficsGatedCrossAttentionLayer,
    IdeficsRMSNorm,
    IdeficsRotaryEmbedding,
)
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
from transformers.models.idefics.vision import (
    IdeficsVisionEmbeddings,
    IdeficsVisionEncoderLayer,
)

from exporter.graphs.specs import (
    BATCH,
    IMAGE_TOKENS,
    NUM_IMAGES,
    SEQ,
    TOTAL,
    cross_names,
    past_names,
    present_names,
)
from exporter.stream.checkpoint import TensorSource
from runtime.errors import ExportError
from runtime.manifest import ModelInfo
from runtime.reference.modules import (
    cross_block,
    cross_kv,
    decoder_head,
    decoder_logits,
    image_seq_len,
    self_block,
)


class StateDictSource:
    """A TensorSource (exporter.stream.checkpoint) over an in-memory model's state_dict (tests, and
    models already loaded)."""

    def __init__(self, model: nn.Module, where: str = "<in-memory model>"):
        self.config = model.config
        self.where = where
        self._state = model.state_dict()

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self._state:
            raise ExportError(f"{self.where}: no tensor {name!r}")
        return self._state[name].detach().to(dtype)

    def module_state(self, prefix: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self.get(n, dtype) for n in self._state if n.startswith(prefix)}


# Axes of the tensors that pass between pieces (graph IO axes come from the graph's spec).
INTERMEDIATE: dict[str, dict[int, str]] = {
    "vision.hidden": {0: NUM_IMAGES},
    "hidden": {0: BATCH, 1: SEQ},
    "self_mask": {0: BATCH, 2: SEQ, 3: TOTAL},
    "cross_mask": {0: BATCH, 2: SEQ, 3: IMAGE_TOKENS},
    "cross_gate": {0: BATCH, 1: SEQ},
    "rope_cos": {0: BATCH, 2: SEQ},
    "rope_sin": {0: BATCH, 2: SEQ},
}


def intermediate_axes(name: str) -> dict[int, str]:
    return INTERMEDIATE[name.rsplit(".", 1)[0] if name[-1].isdigit() else name]


@dataclass(frozen=True)
class Piece:
    graph: str  # vision | perceiver | decoder
    label: str  # "head", "layer 3 self", "cross 0", "tail", "embeddings", "layer 0", "resampler + cross K/V"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    build: Callable[[], nn.Module]  # the module, holding this piece's weights only

    @property
    def key(self) -> str:
        """The piece's name prefix in its graph: its label without spaces."""
        return f"{self.label.replace(' ', '_').replace('+', '').replace('/', '')}/"


def _filled(module: nn.Module, source: TensorSource, prefix: str, skip: tuple[str, ...] = ()) -> nn.Module:
    """`module` (built on meta) holding `prefix`'s tensors from `source` (but those whose names
    start with one of `skip`: another piece's), every key required."""
    state = source.module_state(prefix)
    state = {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ExportError(f"{source.where}: the tensors under {prefix!r} do not fill a "
                          f"{type(module).__name__}: {exc}") from exc
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_meta:
            raise ExportError(f"{source.where}: {prefix}{name} has no value (not in the checkpoint)")
    return module.eval()


def _eager(cfg):
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = "eager"  # the exported attention: plain MatMul/Softmax
    return cfg


# ---------------------------------------------------------------- vision
class VisionEmbeddings(nn.Module):
    def __init__(self, source: TensorSource):
        super().__init__()
        vision = _eager(source.config.vision_config)
        with torch.device("meta"):
            embeddings = IdeficsVisionEmbeddings(vision)
            norm = nn.LayerNorm(vision.embed_dim, eps=vision.layer_norm_eps)
        # position_ids is a non-persistent buffer (not in checkpoints): computed, as HF's __init__ does
        del embeddings.position_ids
        self.embeddings = _filled(embeddings, source, "model.vision_model.embeddings.")
        self.embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
        self.pre_layrnorm = _filled(norm, source, "model.vision_model.pre_layrnorm.")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))


class VisionLayer(nn.Module):
    def __init__(self, source: TensorSource, index: int):
        super().__init__()
        with torch.device("meta"):
            layer = IdeficsVisionEncoderLayer(_eager(source.config.vision_config))
        self.layer = _filled(layer, source, f"model.vision_model.encoder.layers.{index}.")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden, None)


# ---------------------------------------------------------------- perceiver
class PerceiverKV(nn.Module):
    """PerceiverGraph without the cross layers' q_proj / o_proj: same outputs, a fraction of the weights."""

    def __init__(self, source: TensorSource):
        super().__init__()
        cfg = source.config
        self.resampler = None
        if cfg.use_resampler:
            p = cfg.perceiver_config
            with torch.device("meta"):
                resampler = IdeficsPerceiverResampler(cfg, cfg.vision_config.embed_dim, p.resampler_depth,
                                                      p.resampler_n_heads, p.resampler_head_dim, p.resampler_n_latents)
            self.resampler = _filled(resampler, source, "model.perceiver_resampler.")
        self.cross = nn.ModuleList()
        for j in range(cfg.num_hidden_layers // cfg.cross_layer_interval):
            with torch.device("meta"):  # on meta the whole layer costs nothing; only K/V's parts are kept
                attn = IdeficsGatedCrossAttentionLayer(cfg, j).cross_attn
            kept = nn.Module()
            names = ("k_proj", "v_proj", "k_layer_norm") if cfg.qk_layer_norms else ("k_proj", "v_proj")
            for name in names:
                setattr(kept, name, getattr(attn, name))
            for name in names:  # each part filled alone: the layer's other tensors are never read
                _filled(getattr(kept, name), source, f"model.gated_cross_attn_layers.{j}.cross_attn.{name}.")
            self.cross.append(kept)
        self.n_heads = cfg.num_attention_heads
        self.qk_layer_norms = cfg.qk_layer_norms

    def forward(self, image_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cross_kv(self.resampler, self.cross, self.n_heads, self.qk_layer_norms, image_hidden_states)


# ---------------------------------------------------------------- decoder
def _table(source: TensorSource, base: str, additional: str, tied: tuple[str, str] | None = None) -> torch.Tensor:
    """The base table and the additional vocabulary's rows, concatenated (as DecoderGraph does);
    `tied`: the names to read where a tied checkpoint leaves `base` / `additional` out."""
    cfg, names = source.config, set(source.names())
    wanted = [base, additional] if cfg.additional_vocab_size > 0 else [base]
    fallback = list(tied or ())[: len(wanted)]
    parts = []
    for k, name in enumerate(wanted):
        if name not in names and tied is not None and cfg.tie_word_embeddings:
            name = fallback[k]
        parts.append(source.get(name))
    return torch.cat(parts)


class DecoderHead(nn.Module):
    def __init__(self, source: TensorSource):
        super().__init__()
        cfg = source.config
        self.embed_weight = nn.Parameter(_table(source, "model.embed_tokens.weight",
                                                "model.embed_tokens.additional_embedding.weight"), requires_grad=False)
        rotary = IdeficsRotaryEmbedding(cfg)  # hd/2 frequencies computed from the config, as HF's layers do
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        self.image_seq_len = image_seq_len(cfg)

    def forward(self, input_ids, attention_mask, position_ids, image_attention_mask):
        past_len = attention_mask.shape[1] - input_ids.shape[1]
        return decoder_head(input_ids, attention_mask, position_ids, image_attention_mask, past_len,
                            self.embed_weight, self.inv_freq, self.rope_scaling, self.image_seq_len)


class SelfLayer(nn.Module):
    def __init__(self, source: TensorSource, index: int):
        super().__init__()
        cfg = source.config
        with torch.device("meta"):
            layer = IdeficsDecoderLayer(cfg, index)
        layer.self_attn.rotary_emb = nn.Identity()  # cos/sin come from the head; its buffers are not weights
        self.layer = _filled(layer, source, f"model.layers.{index}.")
        self.n_heads = cfg.num_attention_heads

    def forward(self, hidden, mask, cos, sin, past_k, past_v):
        return self_block(self.layer, self.n_heads, hidden, mask, cos, sin, past_k, past_v)


class CrossLayer(nn.Module):
    def __init__(self, source: TensorSource, index: int):
        super().__init__()
        cfg = source.config
        with torch.device("meta"):
            block = IdeficsGatedCrossAttentionLayer(cfg, index)
        # K/V come from the perceiver graph: k_proj / v_proj (and k_layer_norm) are not this piece's
        attn = block.cross_attn
        for name in ("k_proj", "v_proj", "k_layer_norm"):
            if hasattr(attn, name):
                setattr(attn, name, nn.Identity())
        if hasattr(attn, "rotary_emb"):
            attn.rotary_emb = nn.Identity()
        self.block = _filled(block, source, f"model.gated_cross_attn_layers.{index}.",
                             skip=("cross_attn.k_proj.", "cross_attn.v_proj.", "cross_attn.k_layer_norm."))
        self.n_heads = cfg.num_attention_heads
        self.qk_layer_norms = cfg.qk_layer_norms

    def forward(self, hidden, key, value, mask, gate):
        return cross_block(self.block, self.n_heads, self.qk_layer_norms, hidden, key, value, mask, gate)


class DecoderTail(nn.Module):
    def __init__(self, source: TensorSource):
        super().__init__()
        cfg = source.config
        with torch.device("meta"):
            norm = IdeficsRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.norm = _filled(norm, source, "model.norm.")
        self.lm_head_weight = nn.Parameter(
            _table(source, "lm_head.weight", "lm_head.additional_fc.weight",
                   tied=("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight")),
            requires_grad=False)

    def forward(self, hidden, logits_positions):
        return decoder_logits(self.norm, self.lm_head_weight, hidden, logits_positions)


# ---------------------------------------------------------------- the plan
def graph_pieces(source: TensorSource, info: ModelInfo) -> dict[str, list[Piece]]:
    """{graph: its pieces in order}; building a piece (Piece.build) reads its weights."""
    cfg = source.config
    vision_layers = cfg.vision_config.num_hidden_layers
    vision = [Piece("vision", "embeddings", ("pixel_values",), ("vision.hidden.0",), lambda: VisionEmbeddings(source))]
    for k in range(vision_layers):
        out = "image_hidden_states" if k == vision_layers - 1 else f"vision.hidden.{k + 1}"
        vision.append(Piece("vision", f"layer {k}", (f"vision.hidden.{k}",), (out,),
                            lambda k=k: VisionLayer(source, k)))
    cross = tuple(n for j in range(info.num_cross_layers) for n in cross_names(j))
    perceiver = [Piece("perceiver", "resampler + cross K/V", ("image_hidden_states",), cross,
                       lambda: PerceiverKV(source))]
    head = ("hidden.0", "self_mask", "cross_mask", "cross_gate", "rope_cos", "rope_sin")
    decoder = [Piece("decoder", "head", ("input_ids", "attention_mask", "position_ids", "image_attention_mask"),
                     head, lambda: DecoderHead(source))]
    n = 0
    for i in range(info.num_layers):
        if i % info.cross_layer_interval == 0:
            j = i // info.cross_layer_interval
            decoder.append(Piece("decoder", f"cross {j}", (f"hidden.{n}", *cross_names(j), "cross_mask", "cross_gate"),
                                 (f"hidden.{n + 1}",), lambda j=j: CrossLayer(source, j)))
            n += 1
        decoder.append(Piece("decoder", f"layer {i} self",
                             (f"hidden.{n}", "self_mask", "rope_cos", "rope_sin", *past_names(i)),
                             (f"hidden.{n + 1}", *present_names(i)), lambda i=i: SelfLayer(source, i)))
        n += 1
    decoder.append(Piece("decoder", "tail", (f"hidden.{n}", "logits_positions"), ("logits",),
                         lambda: DecoderTail(source)))
    return {"vision": vision, "perceiver": perceiver, "decoder": decoder}
