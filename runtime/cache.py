"""Self-attention KV cache allocated once per request and written in place (gpt-fast's static cache).

Slot s of every buffer holds the K/V of the s-th token fed to the decoder (prompt tokens first,
left padding included). The decoder graph reads the whole buffer as its past; `mask` tells it
which slots are filled (and not padding). Its last column stands for the token being decoded,
so a decode step's attention_mask is `mask` itself: [B, slots + 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.manifest import Manifest
from runtime.memory import HostMemory, assign


def int8_cache_scales(path: str | Path) -> dict[str, np.ndarray] | None:
    """{past name: [1,H,1,hd] float32}, in layer order, of the INT8 KV cache an ONNX Runtime decoder
    keeps (the int8wo one of idefics-export --ort-optimized: GroupQueryAttention quantizes each new
    K/V with static per-channel scales, its k_scale / v_scale inputs, for its past_key / past_value
    inputs), or None for a float cache."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    scales = {}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 13 and node.input[12]:
            for past, scale in ((node.input[3], node.input[12]), (node.input[4], node.input[13])):
                scales[past] = numpy_helper.to_array(initializers[scale])
    return scales or None


class StaticCache:
    def __init__(self, manifest: Manifest, batch: int, slots: int, dtype=np.float32, memory=None):
        """Buffers come from `memory` (host numpy by default; torch tensors on a GPU)."""
        memory = memory or HostMemory()
        info, names = manifest.model, manifest.names
        shape = (batch, info.num_heads, slots, info.head_dim)
        step_shape = (batch, info.num_heads, 1, info.head_dim)
        self.pairs = names.cache_pairs(info.num_layers)
        self.past = {past: memory.zeros(shape, dtype) for past, _ in self.pairs}
        self.step = {present: memory.zeros(step_shape, dtype) for _, present in self.pairs}  # decode outputs
        self.mask = memory.zeros((batch, slots + 1), np.int64)
        self.mask[:, slots] = 1
        self.slots = slots
        self.filled = 0

    def empty_past(self) -> dict:
        """Zero-length views of the buffers: the past of a prefill ([B,H,0,hd], no allocation)."""
        return {past: buffer[:, :, :0] for past, buffer in self.past.items()}

    def write_prompt(self, presents: dict, prompt_mask: np.ndarray) -> None:
        # presents: [B,H,T,hd] per layer from the prefill, in the cache's memory
        t = prompt_mask.shape[1]
        for past, present in self.pairs:
            self.past[past][:, :, :t] = presents[present]
        assign(self.mask[:, :t], prompt_mask)
        self.filled = t

    def commit_step(self) -> None:
        """Move the last decode step's K/V (bound outputs in `step`) into the next slot."""
        if self.filled >= self.slots:
            raise RuntimeError(f"static cache is full ({self.slots} slots)")
        s = self.filled
        for past, present in self.pairs:
            self.past[past][:, :, s] = self.step[present][:, :, 0]
        self.mask[:, s] = 1
        self.filled += 1
