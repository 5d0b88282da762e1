"""Model shapes by name: the embedded default and random-weight presets.

A preset is plain data (keyword arguments of `transformers.IdeficsConfig`), gpt-fast style. The large
presets copy the shapes of the published checkpoints (HuggingFaceM4/idefics-9b, idefics-80b) so that
`--model random:9b` exercises export at real sizes without downloading weights.
"""

from __future__ import annotations

import copy
from typing import Any

# Token layout of the embedded tokenizer (runtime.reference.tokenizer): the last three ids are IDEFICS's extra
# tokens, which the model keeps in its decoupled "additional" embedding as the real checkpoints do.
TINY_TOKENIZER_SIZE = 1024
TINY_ADDITIONAL_VOCAB = 3

_LLAMA_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# The CLIP ViT-H/14 tower and resampler both published checkpoints share.
_IDEFICS_VISION = dict(
    embed_dim=1280, image_size=224, patch_size=14, num_hidden_layers=32,
    num_attention_heads=16, intermediate_size=5120, hidden_act="gelu",
)
_IDEFICS_PERCEIVER = dict(
    use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: small enough to export and validate in seconds on 2 cores, but every
    # IDEFICS feature that changes the graphs is on (resampler, interval > 1, additional vocab).
    "tiny": dict(
        vocab_size=TINY_TOKENIZER_SIZE - TINY_ADDITIONAL_VOCAB,
        additional_vocab_size=TINY_ADDITIONAL_VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,
        max_position_embeddings=512,
        use_resampler=True,
        vision_config=dict(
            embed_dim=48, image_size=32, patch_size=8, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=96,
        ),
        perceiver_config=dict(
            use_resampler=True, resampler_n_latents=8, resampler_depth=2,
            resampler_n_heads=2, resampler_head_dim=16,
        ),
        **_LLAMA_SPECIAL,
    ),
    # The benchmark shape of the design notes: hidden 768, 8 layers, 257 image tokens (224 / 14).
    "medium": dict(
        vocab_size=32000,
        additional_vocab_size=2,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        cross_layer_interval=2,
        use_resampler=False,
        vision_config=dict(
            embed_dim=768, image_size=224, patch_size=14, num_hidden_layers=4,
            num_attention_heads=12, intermediate_size=3072,
        ),
        **_LLAMA_SPECIAL,
    ),
    # Shapes of the published checkpoints' config.json.
    "9b": dict(
        vocab_size=32000,
        additional_vocab_size=2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        cross_layer_interval=4,
        qk_layer_norms=False,
        use_resampler=True,
        vision_config=_IDEFICS_VISION,
        perceiver_config=_IDEFICS_PERCEIVER,
        **_LLAMA_SPECIAL,
    ),
    "80b": dict(
        vocab_size=32000,
        additional_vocab_size=2,
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        cross_layer_interval=4,
        qk_layer_norms=True,
        use_resampler=True,
        vision_config=_IDEFICS_VISION,
        perceiver_config=_IDEFICS_PERCEIVER,
        **_LLAMA_SPECIAL,
    ),
}

# The published 9B widths with only as many layers as a 24 GB machine exports: four decoder
# layers, the fewest with cross-attention every 4 (transformers builds layers // interval gated
# blocks, so fewer layers would have none), two vision layers, the full resampler. Its decoder
# graph passes 2 GB (about 4.7 GB in FP32), so it is the real run of the external-data path
# (scripts/real_width.py).
PRESETS["9b-slice"] = dict(PRESETS["9b"], num_hidden_layers=4,
                           vision_config=dict(_IDEFICS_VISION, num_hidden_layers=2))
# The same cut of the 80B widths (text 8192 wide, 64 heads, MLP 22016; Q/K layer norms): what one
# layer of idefics-80b costs a streamed export (scripts/real_size.py), in minutes, not hours.
PRESETS["80b-slice"] = dict(PRESETS["80b"], num_hidden_layers=4,
                            vision_config=dict(_IDEFICS_VISION, num_hidden_layers=2))


# IdeficsConfig variants (overrides of "tiny") that the tests export and compare with transformers:
# every option that changes the graphs. scripts/variants_report.py prints their export report.
CONFIG_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "no-resampler": dict(use_resampler=False, perceiver_config=dict(use_resampler=False)),
    "cross-interval-1": dict(cross_layer_interval=1),
    "cross-interval-4": dict(cross_layer_interval=4),
    "qk-layer-norms": dict(qk_layer_norms=True),
    "qk-layer-norms-perceiver": dict(perceiver_config=dict(qk_layer_norms_perceiver=True)),
    "alpha-vector": dict(alpha_type="vector"),
    "gelu": dict(hidden_act="gelu"),
    "vision-quick-gelu": dict(vision_config=dict(hidden_act="quick_gelu")),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "no-additional-vocab": dict(vocab_size=1024, additional_vocab_size=0),
    "unfrozen-text": dict(freeze_text_layers=False, freeze_lm_head=True),
    "odd-sizes": dict(
        vocab_size=997, additional_vocab_size=3, hidden_size=36, intermediate_size=50,
        num_hidden_layers=3, num_attention_heads=3, cross_layer_interval=3,
        vision_config=dict(embed_dim=30, image_size=30, patch_size=6, num_attention_heads=3, intermediate_size=45),
        perceiver_config=dict(resampler_n_latents=5, resampler_n_heads=3, resampler_head_dim=7),
    ),
}


def preset_kwargs(name: str) -> dict[str, Any]:
    """A deep copy of a preset's IdeficsConfig arguments; KeyError names the known presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, nested dicts (vision_config, perceiver_config) key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out
