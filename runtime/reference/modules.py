"""Exportable torch modules for the three graphs, built over a loaded IdeficsForVisionText2Text:
what exporter.export traces to ONNX, and what Session(backend="torch") runs.

They reuse HF's own submodules (projections, norms, vision tower, resampler) so the weights are the
checkpoint's, and replace only the control flow that does not export: HF's Cache objects, boolean
indexing in the decoupled embedding, and cross-attention K/V recomputed at every step.

  vision:    pixel_values [N,3,H,W]              -> image_hidden_states [N,S,Dv]   (no post-layernorm:
             IDEFICS feeds the encoder's last_hidden_state, the post-layernorm is applied only to the
             pooled CLS token, which IDEFICS does not use)
  perceiver: image_hidden_states [B,I,S,Dv]      -> cross_key.j / cross_value.j [B,H,I*L,hd]
  decoder:   input_ids, attention_mask, position_ids, image_attention_mask, logits_positions [K],
             cross K/V, past K/V -> logits [B,K,V] (at the K positions of this call's tokens), present_key.i / present_value.i [B,H,T,hd]: the K/V of this call's
             T tokens only. The caller owns the cache: it writes them at their positions in a buffer
             allocated once and feeds that buffer back as past (unfilled slots masked by
             attention_mask), so no step copies or concatenates the past.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import IdeficsConfig, IdeficsForVisionText2Text


def vision_seq_len(cfg: IdeficsConfig) -> int:
    """S: tokens the vision tower gives per image (its patches and the CLS token)."""
    vision = cfg.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def image_seq_len(cfg: IdeficsConfig) -> int:
    """L: tokens per image the decoder attends to (the resampler's latents, or S without one)."""
    return cfg.perceiver_config.resampler_n_latents if cfg.use_resampler else vision_seq_len(cfg)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # [B, T, H*hd] -> [B, H, T, hd]
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def _attend(q, k, v, mask, scaling):
    # q: [B,H,T,hd]  k,v: [B,H,S,hd]  mask: [B,1,T,S] additive (0 or finfo.min)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # [B,H,T,hd]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _attend_with_past(q, past_k, past_v, k, v, mask, scaling):
    # q,k,v: [B,H,T,hd]  past_k,past_v: [B,H,P,hd]  mask: [B,1,T,P+T]
    # Scores against the past and the new tokens are computed separately and only the scores are
    # concatenated, so the past is read in place and never copied: the caller's static cache can be
    # fed as it is, unfilled slots masked out.
    p = past_k.shape[2]
    scores = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], dim=-1)
    probs = torch.softmax((scores * scaling + mask).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :p], past_v) + torch.matmul(probs[..., p:], v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionGraph(nn.Module):
    def __init__(self, hf: IdeficsForVisionText2Text):
        super().__init__()
        self.vision = hf.model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixel_values).last_hidden_state


def cross_kv(resampler: nn.Module | None, cross_attns, n_heads: int, qk_layer_norms: bool,
             image_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The perceiver graph's computation: resampler (when given), then each cross-attention layer's K
    and V. `cross_attns`: modules with k_proj, v_proj (and k_layer_norm with qk_layer_norms); their
    q_proj / o_proj are not read (the streamed export never builds them)."""
    b, i, s, d = image_hidden_states.shape
    x = image_hidden_states.reshape(b * i, s, d)
    if resampler is not None:
        x = resampler(x)  # [B*I, L, Dv]
    x = x.reshape(b, -1, d)  # [B, I*L, Dv], images in order, as IdeficsModel.forward views them
    outputs = []
    for attn in cross_attns:
        k = _heads(attn.k_proj(x), n_heads)
        if qk_layer_norms:
            k = attn.k_layer_norm(k)
        outputs += [k, _heads(attn.v_proj(x), n_heads)]
    return tuple(outputs)


class PerceiverGraph(nn.Module):
    """Resampler (when the config has one) plus every gated cross-attention layer's K and V."""

    def __init__(self, hf: IdeficsForVisionText2Text):
        super().__init__()
        cfg = hf.config
        self.resampler = hf.model.perceiver_resampler if cfg.use_resampler else None
        self.cross = nn.ModuleList(layer.cross_attn for layer in hf.model.gated_cross_attn_layers)
        self.n_heads = cfg.num_attention_heads
        self.qk_layer_norms = cfg.qk_layer_norms

    def forward(self, image_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cross_kv(self.resampler, self.cross, self.n_heads, self.qk_layer_norms, image_hidden_states)


def decoder_head(input_ids, attention_mask, position_ids, image_attention_mask, past_len, embed_weight, inv_freq,
                 rope_scaling: float, image_seq_len: int) -> tuple[torch.Tensor, ...]:
    """Everything the decoder computes before its layers: (hidden [B,T,D], self mask [B,1,T,P+T],
    cross mask [B,1,T,I*L], gate [B,T,1], rotary cos, sin [B,1,T,hd]). `past_len`: P."""
    dtype = embed_weight.dtype
    hidden = nn.functional.embedding(input_ids, embed_weight)  # [B,T,D]
    t = input_ids.shape[1]
    p = past_len
    min_value = torch.finfo(dtype).min

    # Self-attention mask [B,1,T,P+T]: causal within the window, padding from attention_mask.
    q_pos = torch.arange(t, device=input_ids.device) + p
    k_pos = torch.arange(p + t, device=input_ids.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] != 0)
    self_mask = torch.where(allowed, 0.0, min_value).to(dtype)

    # Cross-attention mask [B,1,T,I*L]: each image's mask entry repeated over its L tokens.
    b, _, n_images = image_attention_mask.shape
    image_allowed = image_attention_mask[..., None].expand(b, t, n_images, image_seq_len)
    image_allowed = image_allowed.reshape(b, t, n_images * image_seq_len)[:, None] != 0
    cross_mask = torch.where(image_allowed, 0.0, min_value).to(dtype)
    # Tokens attending to no image get a zero cross-attention output (HF's cross_attention_gate).
    gate = (image_attention_mask != 0).any(dim=-1)[..., None].to(dtype)  # [B,T,1]

    freqs = position_ids[..., None].float() * inv_freq  # [B,T,hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * rope_scaling).to(dtype)[:, None]  # [B,1,T,hd]
    sin = (emb.sin() * rope_scaling).to(dtype)[:, None]
    return hidden, self_mask, cross_mask, gate, cos, sin


def self_block(layer, n_heads: int, hidden, mask, cos, sin, past_k, past_v) -> tuple[torch.Tensor, ...]:
    """One IdeficsDecoderLayer over explicit past K/V: (hidden, this call's K, V)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = _heads(attn.q_proj(x), n_heads)
    k = _heads(attn.k_proj(x), n_heads)
    v = _heads(attn.v_proj(x), n_heads)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = _attend_with_past(q, past_k, past_v, k, v, mask, attn.scaling)
    hidden = hidden + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def cross_block(block, n_heads: int, qk_layer_norms: bool, hidden, key, value, mask, gate) -> torch.Tensor:
    """One IdeficsGatedCrossAttentionLayer on the perceiver graph's K/V."""
    attn = block.cross_attn
    x = block.input_layernorm(hidden)
    q = _heads(attn.q_proj(x), n_heads)
    if qk_layer_norms:
        q = attn.q_layer_norm(q)  # the K side is normalised in the perceiver graph
    x = attn.o_proj(_attend(q, key, value, mask, attn.scaling)) * gate
    hidden = hidden + torch.tanh(block.alpha_cross_attn) * x
    x = block.mlp(block.post_attention_layernorm(hidden))
    return hidden + torch.tanh(block.alpha_dense) * x


def decoder_logits(norm, lm_head_weight, hidden, logits_positions) -> torch.Tensor:
    """Final norm, then lm_head at `logits_positions` only: [B,K,V]."""
    hidden = norm(hidden)
    # Only the positions in `logits_positions` go through lm_head (generation needs the last one;
    # the vocabulary projection of a whole prompt would cost as much as several decoder layers).
    # Positions are a data input whose *shape* sets the logits' length, so every output shape
    # follows from input shapes: no shape-tensor inputs or data-dependent shapes for TensorRT.
    return nn.functional.linear(hidden.index_select(1, logits_positions), lm_head_weight)


class DecoderGraph(nn.Module):
    """LLaMA decoder with gated cross-attention, explicit past tensors, one graph for prefill and decode."""

    def __init__(self, hf: IdeficsForVisionText2Text):
        super().__init__()
        cfg = hf.config
        model = hf.model
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.interval = cfg.cross_layer_interval
        self.image_seq_len = image_seq_len(cfg)
        self.layers = model.layers
        self.cross_layers = model.gated_cross_attn_layers
        self.norm = model.norm
        # IdeficsDecoupledEmbedding / IdeficsDecoupledLinear select rows with boolean masks, which does
        # not export; one concatenated table computes the same values.
        embed = model.embed_tokens
        table = [embed.weight]
        if cfg.additional_vocab_size > 0:
            table.append(embed.additional_embedding.weight)
        self.embed_weight = nn.Parameter(torch.cat(table).detach(), requires_grad=False)
        head = [hf.lm_head.weight]
        if cfg.additional_vocab_size > 0:
            head.append(hf.lm_head.additional_fc.weight)
        self.lm_head_weight = nn.Parameter(torch.cat(head).detach(), requires_grad=False)
        rotary = model.layers[0].self_attn.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)

    def forward(self, input_ids, attention_mask, position_ids, image_attention_mask, logits_positions, *caches):
        n_cross = len(self.cross_layers)
        cross = caches[: 2 * n_cross]
        past = caches[2 * n_cross:]
        hidden, self_mask, cross_mask, gate, cos, sin = decoder_head(
            input_ids, attention_mask, position_ids, image_attention_mask, past[0].shape[2], self.embed_weight,
            self.inv_freq, self.rope_scaling, self.image_seq_len)
        presents = []
        for idx, layer in enumerate(self.layers):
            if idx % self.interval == 0:
                j = idx // self.interval
                hidden = cross_block(self.cross_layers[j], self.n_heads, self.cfg.qk_layer_norms, hidden,
                                     cross[2 * j], cross[2 * j + 1], cross_mask, gate)
            hidden, k, v = self_block(layer, self.n_heads, hidden, self_mask, cos, sin,
                                      past[2 * idx], past[2 * idx + 1])
            presents += [k, v]
        return (decoder_logits(self.norm, self.lm_head_weight, hidden, logits_positions), *presents)


def graph_modules(hf: IdeficsForVisionText2Text) -> dict[str, nn.Module]:
    """{graph name: module} for the three graphs, in export order."""
    return {"vision": VisionGraph(hf), "perceiver": PerceiverGraph(hf), "decoder": DecoderGraph(hf)}
