"""Generation settings and logits processors with transformers' meanings, in numpy.

Order and semantics follow transformers' `GenerationMixin._get_logits_processor`: repetition
penalty, bad words, min new tokens, then (sampling only) temperature, top-k, top-p. Defaults are
transformers' global defaults (top_k 50 when sampling, temperature 1, top_p 1). The tests check
each processor against transformers' own classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None  # None: the model's
    pad_token_id: int | None = None  # None: the model's (else the first eos, as transformers does)
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    seed: int | None = None
    output_logits: bool = False  # keep every step's raw logits in GenerateResult.logits

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        need(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens,
             f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        need(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0),
             f"top_k must be a non-negative integer or None, got {self.top_k!r}")
        need(0.0 <= self.top_p <= 1.0, f"top_p must be within [0, 1], got {self.top_p!r}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id))
        if self.bad_words_ids is not None:
            words = tuple(tuple(int(t) for t in word) for word in self.bad_words_ids)
            need(all(len(w) > 0 for w in words), "bad_words_ids must not contain an empty sequence")
            object.__setattr__(self, "bad_words_ids", words)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unsupported generation setting(s): {', '.join(unknown)}; supported: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)


# ---------------------------------------------------------------- processors: scores [B,V] float32
def repetition_penalty(scores: np.ndarray, sequences: np.ndarray, penalty: float,
                       pad_lengths: np.ndarray | None = None) -> np.ndarray:
    # transformers' RepetitionPenaltyLogitsProcessor: every token present in the sequence so far is
    # divided (> 0) or multiplied (< 0) by the penalty; generate() passes prompt_ignore_length so a
    # row's left padding (pad_lengths[row] tokens) does not count.
    rows = np.broadcast_to(np.arange(scores.shape[0])[:, None], sequences.shape)
    keep = np.ones(sequences.shape, bool) if pad_lengths is None else (
        np.arange(sequences.shape[1])[None, :] >= np.asarray(pad_lengths)[:, None])
    present = np.zeros(scores.shape, bool)
    present[rows[keep], sequences[keep]] = True
    return np.where(present, np.where(scores < 0, scores * penalty, scores / penalty), scores).astype(scores.dtype)


def ban_bad_words(scores: np.ndarray, sequences: np.ndarray, bad_words: Sequence[Sequence[int]]) -> np.ndarray:
    # NoBadWordsLogitsProcessor: a word's last token is banned when the sequence ends with the rest.
    scores = scores.copy()
    for word in bad_words:
        *prefix, last = word
        if not prefix:
            scores[:, last] = -np.inf
            continue
        n = len(prefix)
        if sequences.shape[1] < n:
            continue
        hit = np.all(sequences[:, -n:] == np.asarray(prefix)[None], axis=1)
        scores[hit, last] = -np.inf
    return scores


def min_new_tokens(scores: np.ndarray, generated: int, minimum: int, eos: Sequence[int]) -> np.ndarray:
    if generated < minimum and eos:
        scores = scores.copy()
        scores[:, list(eos)] = -np.inf
    return scores


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(max(k, 1), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores: np.ndarray, p: float) -> np.ndarray:
    # TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability <= 1 - p, keep >= 1.
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def process(scores: np.ndarray, sequences: np.ndarray, generated: int, cfg: SamplingConfig,
            pad_lengths: np.ndarray | None = None) -> np.ndarray:
    """All processors in transformers' order; sequences: [B, prompt + generated] so far."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, sequences, cfg.repetition_penalty, pad_lengths)
    if cfg.bad_words_ids:
        # generate() hands NoBadWordsLogitsProcessor the eos ids, which it never bans on their own
        eos = cfg.eos_ids()
        words = [w for w in cfg.bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        scores = ban_bad_words(scores, sequences, words)
    if cfg.min_new_tokens:
        scores = min_new_tokens(scores, generated, cfg.min_new_tokens, cfg.eos_ids())
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / np.float32(cfg.temperature)
        if cfg.top_k:
            scores = top_k_filter(scores, cfg.top_k)
        if cfg.top_p < 1.0:
            scores = top_p_filter(scores, cfg.top_p)
    return scores


def needs_scores(cfg: SamplingConfig, generated: int) -> bool:
    """Whether step `generated` needs the logits on the host: sampling or a processor that changes
    them; otherwise the next token is the argmax of the raw logits (taken where they are)."""
    return (cfg.do_sample or cfg.repetition_penalty != 1.0 or bool(cfg.bad_words_ids)
            or (generated < cfg.min_new_tokens and bool(cfg.eos_ids())))


def next_tokens(scores: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None) -> np.ndarray:
    """[B] int64: argmax when greedy, else a draw from softmax(scores) with `rng`."""
    if not cfg.do_sample:
        return np.argmax(scores, axis=-1).astype(np.int64)
    probs = softmax(scores)
    draws = rng.random((scores.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), scores.shape[-1] - 1).astype(np.int64)
