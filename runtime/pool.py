"""The cache pool of the in-flight batching engine: one row per request row in flight.

Every buffer is one flat allocation made once per Session, sized for `capacity` rows, the
export's max_seq_len self-attention slots and max_images images of cross-attention K/V. The rows
in flight are kept contiguous at the start of each buffer and laid out as [rows, H, slots, hd]
for the current bound `slots` (the longest active request's need) and `images` (the most images
an active row holds). So the decoder is bound to the active rows and slots only: a step reads
rows x slots of cache, never the pool's capacity (the portable decoder reads every slot bound).

- A joining row whose need passes the bound re-lays the pool (the active rows are copied into the
  wider layout): once per join, never per step. Bound slots grow in steps of ROUND.
- A leaving row is replaced by the last row (one row copied), keeping the rows contiguous; when
  the longest need left falls to half the bound, the pool is re-laid narrower.
- Each row fills its own slots from 0 at its own pace (`lengths`); its attention mask says which
  slots are filled, and its last column stands for the token being decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.memory import assign

ROUND = 16  # bound slots grow in steps of this many, so short joins seldom re-lay the pool


@dataclass(eq=False)
class Row:
    """A pool row held by one row of a request; `index` moves when rows are compacted."""

    index: int
    need: int  # slots this row can fill: its prompt plus max_new_tokens - 1


def _round_up(value: int, step: int, limit: int) -> int:
    return min(limit, -(-value // step) * step)


class CachePool:
    def __init__(self, g, capacity: int):
        """`g`: the loop's Graphs (manifest, decoder runner, memory, cache dtypes)."""
        info, names, limits = g.manifest.model, g.manifest.names, g.manifest.limits
        self.g, self.memory, self.capacity = g, g.memory, capacity
        self.max_slots, self.max_images = limits.max_seq_len, limits.max_images
        self.heads, self.head_dim, self.image_len = info.num_heads, info.head_dim, info.image_seq_len
        self.pairs = names.cache_pairs(info.num_layers)
        self.cross_names = [name for j in range(info.num_cross_layers) for name in names.cross(j)]
        m, h, hd = self.memory, self.heads, self.head_dim
        with m.scope():
            self._flat_past = {past: m.zeros((capacity * h * self.max_slots * hd,), g.cache_dtype)
                               for past, _ in self.pairs}
            self._flat_cross = {name: m.zeros((capacity * h * self.max_images * self.image_len * hd,), g.cross_dtype)
                                for name in self.cross_names}
            self._flat_mask = m.zeros((capacity * (self.max_slots + 1),), np.int64)
            self._flat_image_mask = m.zeros((capacity * self.max_images,), np.int64)
            # decode-step buffers: row r of each is the row in flight at index r
            self.ids = m.zeros((capacity, 1), np.int64)
            self.pos = m.zeros((capacity, 1), np.int64)
            self.logits = m.zeros((capacity, 1, info.vocab_size), g.logits_dtype)
            self.step = {present: m.zeros((capacity, h, 1, hd), g.cache_dtype) for _, present in self.pairs}
            self.logits_positions = m.zeros((1,), np.int64)  # the one token's logits
            # the ONNX Runtime decoder over shared buffers (g.shared_cache): per-row lengths instead
            # of a mask and positions, and it writes each step's K/V into the pool itself
            self.seqlens = m.zeros((capacity,), np.int32)
            self.total = np.zeros((), np.int32)  # host on every device: CUDA's GroupQueryAttention reads it there
        self.shared = bool(getattr(g, "shared_cache", False))
        self.lengths = np.zeros(capacity, np.int64)  # filled slots per row
        self.rows: list[Row] = []
        self.relayouts = 0
        self._call, self._call_key = None, None
        self._set_layout(ROUND, 1)

    # ------------------------------------------------------------ layout
    def _set_layout(self, slots: int, images: int) -> None:
        def view(flat, shape):
            return flat[: int(np.prod(shape))].reshape(shape)

        c, h, hd = self.capacity, self.heads, self.head_dim
        self.slots, self.images = slots, images
        self.past = {name: view(flat, (c, h, slots, hd)) for name, flat in self._flat_past.items()}
        self.cross = {name: view(flat, (c, h, images * self.image_len, hd)) for name, flat in self._flat_cross.items()}
        self.mask = view(self._flat_mask, (c, slots + 1))
        self.image_mask = view(self._flat_image_mask, (c, 1, images))

    def _relayout(self, slots: int, images: int) -> None:
        """Copy the active rows into the layout for `slots` and `images`."""
        n, m = len(self.rows), self.memory
        keep_slots, keep_tokens = min(slots, self.slots), min(images, self.images) * self.image_len
        keep_images = min(images, self.images)
        with m.scope():
            kept_past = {name: m.copy(v[:n, :, :keep_slots]) for name, v in self.past.items()}
            kept_cross = {name: m.copy(v[:n, :, :keep_tokens]) for name, v in self.cross.items()}
            kept_image_mask = m.copy(self.image_mask[:n, :, :keep_images])
            self._set_layout(slots, images)
            for name, kept in kept_past.items():
                self.past[name][:n, :, :keep_slots] = kept
            for name, kept in kept_cross.items():
                self.cross[name][:n, :, :keep_tokens] = kept
            self.image_mask[:n] = 0
            self.image_mask[:n, :, :keep_images] = kept_image_mask
            mask = np.zeros((n, slots + 1), np.int64)
            mask[:, :slots][np.arange(slots)[None, :] < self.lengths[:n, None]] = 1
            mask[:, slots] = 1
            assign(self.mask[:n], mask)
        self.relayouts += 1

    # ------------------------------------------------------------ rows
    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def add(self, need: int, kv: dict, cross: dict, image_mask: np.ndarray, position: int) -> Row:
        """Append a row: `kv` {past name: [H,T,hd]} the prompt's K/V (slots 0..T-1), `cross` {cross
        name: [H,I*L,hd]} its images' K/V, `image_mask` [I] the images its new tokens attend to,
        `position` the position id of its last prompt token."""
        if not self.rows:  # nothing to keep: the layout is free to change
            self._set_layout(_round_up(need, ROUND, self.max_slots), max(1, len(image_mask)))
        elif need > self.slots or len(image_mask) > self.images:
            self._relayout(max(self.slots, _round_up(need, ROUND, self.max_slots)),
                           max(self.images, len(image_mask)))
        if not self.free or need > self.slots:
            raise RuntimeError(f"cache pool: no room for a row of {need} slots ({len(self.rows)} of "
                               f"{self.capacity} rows, {self.slots} slots bound)")
        r, t, m = len(self.rows), next(iter(kv.values())).shape[1], self.memory
        with m.scope():
            for name, value in kv.items():
                self.past[name][r, :, :t] = value
            for name, value in cross.items():
                self.cross[name][r, :, :value.shape[1]] = value
            row_mask = np.zeros((self.slots + 1,), np.int64)
            row_mask[:t] = 1
            row_mask[self.slots] = 1
            assign(self.mask[r], row_mask)
            images = np.zeros((1, self.images), np.int64)
            images[0, :len(image_mask)] = image_mask
            assign(self.image_mask[r], images)
            assign(self.pos[r], np.array([position], np.int64))
        self.lengths[r] = t
        row = Row(r, need)
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        """Free `row`; the last row moves into its place."""
        i, last, m = row.index, len(self.rows) - 1, self.memory
        if self.rows[i] is not row:
            raise RuntimeError("cache pool: removing a row it does not hold")
        if i != last:
            with m.scope():
                for buffers in (self.past, self.cross):
                    for value in buffers.values():
                        value[i] = value[last]
                for value in (self.mask, self.image_mask, self.pos):
                    value[i] = value[last]
            self.lengths[i] = self.lengths[last]
            self.rows[i] = self.rows[last]
            self.rows[i].index = i
        self.rows.pop()
        longest = max((r.need for r in self.rows), default=0)
        if self.rows and _round_up(longest, ROUND, self.max_slots) <= self.slots // 2:
            images = max(1, int(max(self._row_images(r) for r in range(len(self.rows)))))
            self._relayout(_round_up(longest, ROUND, self.max_slots), min(images, self.images))

    def _row_images(self, r: int) -> int:
        attended = np.nonzero(self.memory.to_host(self.image_mask[r, 0]))[0]
        return int(attended[-1]) + 1 if attended.size else 0

    # ------------------------------------------------------------ the step
    def decode(self, tokens: np.ndarray):
        """tokens [n] (host) of the rows in flight -> logits [n,V] in the pool's memory; each row's new
        K/V go into its next slot."""
        n, m = len(self.rows), self.memory
        if (self.lengths[:n] >= self.slots).any():
            raise RuntimeError(f"cache pool: a row has filled all {self.slots} slots bound")
        key = (n, self.slots, self.images)
        if self.shared:
            return self._decode_shared(tokens, key)
        if key != self._call_key:  # rows joined or left, or the pool was re-laid
            inputs = {"input_ids": self.ids[:n], "attention_mask": self.mask[:n], "position_ids": self.pos[:n],
                      "image_attention_mask": self.image_mask[:n], "logits_positions": self.logits_positions,
                      **{name: v[:n] for name, v in self.cross.items()},
                      **{name: v[:n] for name, v in self.past.items()}}
            outputs = {"logits": self.logits[:n], **{name: v[:n] for name, v in self.step.items()}}
            self._call, self._call_key = self.g.decoder.bind(inputs, outputs), key
        with m.scope():
            assign(self.ids[:n, 0], tokens)
            self.pos[:n] += 1
            self._call.run()
            rows, slots = m.index(np.arange(n)), m.index(self.lengths[:n])
            for past, present in self.pairs:
                self.past[past][rows, :, slots] = self.step[present][:n, :, 0]
            self.mask[rows, slots] = 1
        self.lengths[:n] += 1
        return self.logits[:n, 0]

    def _decode_shared(self, tokens: np.ndarray, key):
        n, m = len(self.rows), self.memory
        if key != self._call_key:
            inputs = {"input_ids": self.ids[:n], "seqlens_k": self.seqlens[:n], "total_sequence_length": self.total,
                      "image_attention_mask": self.image_mask[:n], "logits_positions": self.logits_positions,
                      **{name: v[:n] for name, v in self.cross.items()},
                      **{name: v[:n] for name, v in self.past.items()}}
            outputs = {"logits": self.logits[:n], **{present: self.past[past][:n] for past, present in self.pairs}}
            self._call, self._call_key = self.g.decoder.bind(inputs, outputs), key
        with m.scope():
            assign(self.ids[:n, 0], tokens)
            assign(self.seqlens[:n], self.lengths[:n].astype(np.int32))  # each row's new token goes at its length
            assign(self.total, np.array(self.lengths[:n].max() + 1, np.int32))
            self._call.run()
            self.mask[m.index(np.arange(n)), m.index(self.lengths[:n])] = 1
        self.lengths[:n] += 1
        return self.logits[:n, 0]
