"""Agreement between two precisions (or backends) of the same export, for reports and checks.

- token agreement of free-running greedy generation: the share of equal tokens and, per row, the
  first position where the two differ;
- next-token top-1 agreement under teacher forcing: both graphs read the same reference sequence
  (prompt + the reference's generated tokens) and their argmax at every generated position is
  compared, so one early difference does not spoil every later position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.loop import Request, Timings, encode_images, prefill_feed


@dataclass
class Agreement:
    token_share: float  # free-running greedy: equal tokens / all tokens
    first_divergence: list[int]  # per row: index of the first differing token (= length when none)
    top1_share: float  # teacher-forced next-token argmax agreement
    near_tie_share: float  # share of reference positions whose top-2 logit gap is under `tie_gap`

    def as_dict(self) -> dict:
        return dict(token_share=self.token_share, first_divergence=self.first_divergence,
                    top1_share=self.top1_share, near_tie_share=self.near_tie_share)


def token_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, list[int]]:
    # reference, other: [B, new] generated tokens
    equal = reference == other
    first = [int(np.argmin(row)) if not row.all() else row.size for row in equal]
    return float(equal.mean()), first


def teacher_forced_inputs(request: Request, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, image_attention_mask) of the prefill that reads `sequences` [B, T]
    (the request's prompt followed by the tokens to read) teacher-forced: all but the last token,
    the new tokens unpadded and seeing the prompt's last images, as generation extends them."""
    b, total = sequences.shape
    prompt = request.input_ids.shape[1]
    mask = np.concatenate([request.attention_mask, np.ones((b, total - prompt), np.int64)], axis=1)
    image_mask = np.concatenate(
        [request.image_attention_mask, np.repeat(request.image_attention_mask[:, -1:], total - prompt, axis=1)], axis=1)
    return np.ascontiguousarray(sequences[:, :-1]), mask[:, :-1], image_mask[:, :-1]


def teacher_forced_logits(session, request: Request, sequences: np.ndarray, new: int) -> np.ndarray:
    """[B, new, V] logits that predict each of the last `new` tokens of `sequences`, in one prefill."""
    g = session.graphs
    cross = encode_images(g, request, Timings())
    feed = prefill_feed(g, *teacher_forced_inputs(request, sequences), cross, keep=new)
    # a prefill: the portable decoder (the ORT flavour's decoder takes per-row lengths, not this feed)
    return g.memory.to_host(g.run(g.prefill_decoder, feed)["logits"]).astype(np.float32)


def compare_sessions(reference, other, request: Request, max_new_tokens: int, tie_gap: float = 1e-2) -> Agreement:
    """Greedy generation of both sessions on one request, and teacher-forced top-1 on the reference's."""
    from runtime.sampling import SamplingConfig
    from runtime.loop import generate_tokens

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)

    def greedy(session):
        return np.stack([s.tokens for s in generate_tokens(session.graphs, request, cfg, Timings())], axis=1)

    ref_tokens, other_tokens = greedy(reference), greedy(other)
    share, first = token_agreement(ref_tokens, other_tokens)
    sequences = np.concatenate([request.input_ids, ref_tokens], axis=1)
    ref_logits = teacher_forced_logits(reference, request, sequences, max_new_tokens)
    other_logits = teacher_forced_logits(other, request, sequences, max_new_tokens)
    top1 = float((ref_logits.argmax(-1) == other_logits.argmax(-1)).mean())
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    ties = float(((top2[..., 1] - top2[..., 0]) < tie_gap).mean())
    return Agreement(share, first, top1, ties)
