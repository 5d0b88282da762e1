"""The FP32 PyTorch reference at sizes that do not fit in memory whole: transformers' own modules run
piece by piece (exporter.stream.pieces), each built from the tensor source, run on the whole batch,
and freed before the next, so memory is one layer plus the activations.

`teacher_forced_logits` gives what runtime.compare.teacher_forced_logits gives for a Session (the
logits that predict each of the last `new` tokens of `sequences`, in one prefill), so a reduced
precision's Session is measured against FP32 at idefics-9b / 80b sizes, where no FP32 Session or
whole PyTorch model fits (scripts/real_size.py).
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.stream.checkpoint import TensorSource
from exporter.stream.pieces import graph_pieces
from exporter.stream.writer import run_piece
from runtime.compare import teacher_forced_inputs
from runtime.loop import positions
from runtime.manifest import Manifest


def teacher_forced_logits(source: TensorSource, manifest: Manifest, request, sequences: np.ndarray,
                          new: int) -> np.ndarray:
    """[B, new, V] FP32 logits predicting each of the last `new` tokens of `sequences` [B, T] (the
    request's prompt followed by the tokens to read), as a prefill of sequences[:, :-1]."""
    info = manifest.model
    plan = graph_pieces(source, info)
    ids, mask, image_mask = teacher_forced_inputs(request, sequences)
    b, read = ids.shape
    cross = _cross(plan, info, manifest, request, b, image_mask.shape[-1])
    empty = torch.zeros(b, info.num_heads, 0, info.head_dim)
    feed = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(positions(mask)),
        "image_attention_mask": torch.from_numpy(image_mask),
        "logits_positions": torch.arange(read - new, read),
        **cross,
        **{name: empty for i in range(info.num_layers) for name in manifest.names.past(i)},
    }
    for piece in plan["decoder"]:
        out = run_piece(piece.build(), piece, feed)  # the module (one layer's weights) is freed here
        feed.update({k: v for k, v in out.items() if not k.startswith("present_")})  # no cache is kept
    return feed["logits"].numpy()


def _cross(plan, info, manifest: Manifest, request, b: int, n: int) -> dict[str, torch.Tensor]:
    names = [name for j in range(info.num_cross_layers) for name in manifest.names.cross(j)]
    if request.pixel_values is None:  # the gate zeroes cross-attention for rows without images
        zeros = torch.zeros(b, info.num_heads, n * info.image_seq_len, info.head_dim)
        return dict.fromkeys(names, zeros)
    feed = {"pixel_values": torch.from_numpy(request.pixel_values.reshape(-1, *request.pixel_values.shape[2:]))}
    for piece in plan["vision"]:
        feed.update(run_piece(piece.build(), piece, feed))
    hidden = feed["image_hidden_states"]
    feed = {"image_hidden_states": hidden.reshape(b, n, *hidden.shape[1:])}
    for piece in plan["perceiver"]:
        feed.update(run_piece(piece.build(), piece, feed))
    return {name: feed[name] for name in names}
