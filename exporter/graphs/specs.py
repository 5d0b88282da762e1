"""One IO spec per graph, derived from the model config: the single source of names, dtypes and axes.

Each graph is an optimum `ExporterConfig` (inputs/outputs as name -> {axis: name}) whose tensors
also carry dtypes and fixed sizes. ONNX export arguments, the manifest, dummy and validation inputs
are all derived from these; TensorRT profiles and Triton configs read the same specs from the manifest.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from optimum.exporters.base import ExporterConfig
from optimum.utils import NormalizedConfig
from transformers import IdeficsConfig

from runtime.manifest import CacheNames, GraphSpec, Limits, ModelInfo, TensorSpec
from runtime.reference.modules import image_seq_len, vision_seq_len

# Named dynamic axes, shared by all graphs so the same name means the same size everywhere.
BATCH, IMAGES, NUM_IMAGES = "batch", "images", "num_images"
SEQ, PAST, TOTAL, IMAGE_TOKENS = "seq", "past_seq", "total_seq", "image_tokens"
KEEP = "kept_seq"  # logits are returned at the logits_positions given


# Per-layer tensor names, generated in one place (optimum style) and written to the manifest.
NAMES = CacheNames(
    cross_key="cross_key.{j}", cross_value="cross_value.{j}",
    past_key="past_key.{i}", past_value="past_value.{i}",
    present_key="present_key.{i}", present_value="present_value.{i}",
)
cross_names, past_names, present_names = NAMES.cross, NAMES.past, NAMES.present


def model_info(cfg: IdeficsConfig, image_token_ids: tuple[int, ...] = ()) -> ModelInfo:
    vision = cfg.vision_config
    return ModelInfo(
        num_layers=cfg.num_hidden_layers,
        num_cross_layers=cfg.num_hidden_layers // cfg.cross_layer_interval,
        cross_layer_interval=cfg.cross_layer_interval,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size + cfg.additional_vocab_size,
        vision_seq_len=vision_seq_len(cfg),
        vision_dim=vision.embed_dim,
        image_seq_len=image_seq_len(cfg),
        image_size=vision.image_size,
        use_resampler=bool(cfg.use_resampler),
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        image_token_ids=tuple(image_token_ids),
    )


class _GraphConfig(ExporterConfig):
    """An optimum ExporterConfig whose axes come from typed TensorSpecs."""

    NORMALIZED_CONFIG_CLASS = NormalizedConfig
    GRAPH: ClassVar[str]

    def __init__(self, config: IdeficsConfig, info: ModelInfo):
        super().__init__(config, task="image-to-text")
        self.info = info

    def input_specs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def output_specs(self) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return {s.name: s.dynamic_axes() for s in self.input_specs()}

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {s.name: s.dynamic_axes() for s in self.output_specs()}

    def graph_spec(self) -> GraphSpec:
        return GraphSpec(
            name=self.GRAPH, file=f"{self.GRAPH}.onnx",
            inputs=self.input_specs(), outputs=self.output_specs(),
        )


class VisionSpec(_GraphConfig):
    GRAPH = "vision"

    def input_specs(self):
        size = self.info.image_size
        return (TensorSpec("pixel_values", "float32", (NUM_IMAGES, 3, size, size)),)

    def output_specs(self):
        i = self.info
        return (TensorSpec("image_hidden_states", "float32", (NUM_IMAGES, i.vision_seq_len, i.vision_dim)),)


class PerceiverSpec(_GraphConfig):
    GRAPH = "perceiver"

    def input_specs(self):
        i = self.info
        return (TensorSpec("image_hidden_states", "float32", (BATCH, IMAGES, i.vision_seq_len, i.vision_dim)),)

    def output_specs(self):
        return tuple(_cross_specs(self.info))


class DecoderSpec(_GraphConfig):
    GRAPH = "decoder"

    def input_specs(self):
        i = self.info
        specs = [
            TensorSpec("input_ids", "int64", (BATCH, SEQ)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
            TensorSpec("position_ids", "int64", (BATCH, SEQ)),
            TensorSpec("image_attention_mask", "int64", (BATCH, SEQ, IMAGES)),
            TensorSpec("logits_positions", "int64", (KEEP,)),
            *_cross_specs(i),
        ]
        for layer in range(i.num_layers):
            specs += [TensorSpec(n, "float32", (BATCH, i.num_heads, PAST, i.head_dim)) for n in past_names(layer)]
        return tuple(specs)

    def output_specs(self):
        i = self.info
        specs = [TensorSpec("logits", "float32", (BATCH, KEEP, i.vocab_size))]
        for layer in range(i.num_layers):
            specs += [
                TensorSpec(n, "float32", (BATCH, i.num_heads, SEQ, i.head_dim)) for n in present_names(layer)
            ]
        return tuple(specs)


def _cross_specs(i: ModelInfo) -> list[TensorSpec]:
    specs = []
    for j in range(i.num_cross_layers):
        specs += [TensorSpec(n, "float32", (BATCH, i.num_heads, IMAGE_TOKENS, i.head_dim)) for n in cross_names(j)]
    return specs


GRAPH_SPECS: dict[str, type[_GraphConfig]] = {"vision": VisionSpec, "perceiver": PerceiverSpec, "decoder": DecoderSpec}


def graph_specs(cfg: IdeficsConfig, info: ModelInfo) -> dict[str, _GraphConfig]:
    return {name: cls(cfg, info) for name, cls in GRAPH_SPECS.items()}


def check_limits(info: ModelInfo, limits: Limits, max_position_embeddings: int) -> None:
    """Refuse limits the model cannot honour, naming the flag and the model's own bound."""
    from runtime.errors import ExportError

    if limits.max_seq_len > max_position_embeddings:
        raise ExportError(
            f"--max-seq-len {limits.max_seq_len} exceeds the model's max_position_embeddings "
            f"({max_position_embeddings}); choose at most {max_position_embeddings}"
        )


def zeros_like_spec(spec: TensorSpec, sizes: dict[str, int]) -> torch.Tensor:
    """A zero tensor of a spec's shape with its named axes taken from `sizes`."""
    shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
    dtype = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}[spec.dtype]
    return torch.zeros(shape, dtype=dtype)
