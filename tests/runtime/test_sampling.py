"""runtime.sampling against transformers' own logits processors (the reference).

Scores are random float32 [B=3, V=50]; sequences random int64. Ours get numpy, transformers gets
torch tensors of the same data. Every processor must leave -inf at exactly the positions
transformers does, and the other values within rtol 1e-6.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime import sampling
from runtime.sampling import SamplingConfig, next_tokens, process

B, V, PROMPT = 3, 50, 8


# ---------------------------------------------------------------- helpers
def make_scores(seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def make_sequences(seed: int = 0, length: int = PROMPT) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, V, (B, length), dtype=np.int64)


def hf(processor, sequences: np.ndarray, scores: np.ndarray) -> np.ndarray:
    out = processor(torch.from_numpy(sequences.copy()), torch.from_numpy(scores.copy()))
    return out.numpy()


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert isinstance(ours, np.ndarray)
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32, ours.dtype
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg="-inf positions differ")
    assert not np.isnan(ours).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=0)


def hf_chain(cfg: SamplingConfig, prompt_len: int) -> LogitsProcessorList:
    """The processors GenerationMixin._get_logits_processor builds for these settings, in its order
    (greedy/sampling with num_beams=1, so min_tokens_to_keep=1)."""
    eos = list(cfg.eos_ids()) or None
    chain = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.bad_words_ids is not None:
        chain.append(NoBadWordsLogitsProcessor([list(w) for w in cfg.bad_words_ids], eos))
    if cfg.min_new_tokens > 0 and eos is not None:
        chain.append(MinNewTokensLengthLogitsProcessor(prompt_len, cfg.min_new_tokens, eos))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(cfg.temperature)))
        if cfg.top_k is not None and cfg.top_k != 0:
            chain.append(TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
        if cfg.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
    return chain


# ---------------------------------------------------------------- single processors
@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_matches_transformers(penalty, seed):
    scores, seqs = make_scores(seed), make_sequences(seed, length=20)
    assert (scores < 0).any() and (scores > 0).any()
    assert any(len(set(row)) < len(row) for row in seqs.tolist())  # repeated ids: penalised once
    ours = sampling.repetition_penalty(scores, seqs, penalty)
    ref = hf(RepetitionPenaltyLogitsProcessor(penalty), seqs, scores)
    assert_same(ours, ref)
    assert not np.allclose(ref, scores)  # the case is not trivial


BAD_WORDS = [
    [[5]],  # single token
    [[5], [17], [49]],
    [[7, 9]],  # two tokens: banned only where a row ends with 7
    [[3, 4, 11], [4, 11], [6, 11]],  # several words with the same last token
    [[12], [7, 9], [3, 4, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]],  # one longer than the sequence
]


@pytest.mark.parametrize("words", BAD_WORDS)
def test_bad_words_match_transformers(words):
    scores = make_scores(2)
    for length in (1, 6):
        seqs = make_sequences(2, length=length)
        seqs[0, -1] = 7  # row 0 ends with the prefix of [7, 9]
        if length > 1:
            seqs[1, -2:] = [3, 4]  # row 1 ends with the prefix of [3, 4, 11]
        seqs[2, -1] = 6  # row 2 ends with the prefix of [6, 11]
        ours = sampling.ban_bad_words(scores, seqs, [tuple(w) for w in words])
        ref = hf(NoBadWordsLogitsProcessor(words), seqs, scores)
        assert_same(ours, ref)
        assert np.isneginf(ref).any()


def test_bad_words_with_eos_param_match_transformers():
    # transformers drops a bad word that is exactly an eos token; multi-token words ending in eos stay.
    words, eos = [[4, 2], [9]], [2, 3]
    scores, seqs = make_scores(3), make_sequences(3)
    seqs[1, -1] = 4
    ref = hf(NoBadWordsLogitsProcessor(words, eos_token_id=eos), seqs, scores)
    assert_same(sampling.ban_bad_words(scores, seqs, [tuple(w) for w in words]), ref)
    assert np.isneginf(ref[1, 2]) and np.isfinite(ref[0, 2])


@pytest.mark.parametrize("eos", [2, (2, 7), (0, 49, 13)])
@pytest.mark.parametrize("generated,minimum", [(0, 1), (2, 3), (3, 3), (5, 3), (0, 0)])
def test_min_new_tokens_matches_transformers(eos, generated, minimum):
    scores, seqs = make_scores(4), make_sequences(4, length=PROMPT + generated)
    eos_list = [eos] if isinstance(eos, int) else list(eos)
    ours = sampling.min_new_tokens(scores, generated, minimum, eos_list)
    reference = MinNewTokensLengthLogitsProcessor(PROMPT, minimum, eos if isinstance(eos, int) else eos_list)
    ref = hf(reference, seqs, scores)
    assert_same(ours, ref)
    assert np.isneginf(ref).any() == (generated < minimum)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.3, 2.0])
def test_temperature_matches_transformers(temperature):
    scores, seqs = make_scores(5), make_sequences(5)
    cfg = SamplingConfig(do_sample=True, temperature=temperature, top_k=None)
    ours = process(scores, seqs, 0, cfg)
    assert_same(ours, hf(TemperatureLogitsWarper(temperature), seqs, scores))


@pytest.mark.parametrize("k", [1, 5, 20, 49, 50, 80])
@pytest.mark.parametrize("seed", [0, 6])
def test_top_k_matches_transformers(k, seed):
    scores, seqs = make_scores(seed), make_sequences(seed)
    ref = hf(TopKLogitsWarper(k), seqs, scores)
    assert_same(sampling.top_k_filter(scores, k), ref)
    assert (np.isfinite(ref).sum(axis=1) == min(k, V)).all()


def test_top_k_keeps_ties_like_transformers():
    scores = np.random.default_rng(7).integers(0, 5, (B, V)).astype(np.float32)
    seqs = make_sequences(7)
    for k in (1, 3, 10, 30):
        ref = hf(TopKLogitsWarper(k), seqs, scores)
        assert_same(sampling.top_k_filter(scores, k), ref)
        assert (np.isfinite(ref).sum(axis=1) > k).any()  # ties at the k-th value are kept


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_top_p_matches_transformers(p, scale):
    scores, seqs = make_scores(8, scale), make_sequences(8)
    ref = hf(TopPLogitsWarper(p), seqs, scores)
    assert_same(sampling.top_p_filter(scores, p), ref)


def test_top_p_with_ties_keeps_the_same_values_as_transformers():
    # Among tied scores transformers' (unstable) torch.sort decides which tie survives, so only the
    # kept values, not their positions, are comparable.
    scores = np.random.default_rng(9).integers(0, 5, (B, V)).astype(np.float32)
    seqs = make_sequences(9)
    for p in (0.3, 0.5, 0.9):
        ours = sampling.top_p_filter(scores, p)
        ref = hf(TopPLogitsWarper(p), seqs, scores)
        for o, r in zip(ours, ref):
            np.testing.assert_array_equal(np.sort(o[np.isfinite(o)]), np.sort(r[np.isfinite(r)]))


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 1 / 16])
def test_top_p_boundary_matches_transformers(p):
    # 16 equal finite scores, the rest -inf: cumulative probabilities are exact multiples of 1/16, so
    # `cumulative <= 1 - p` (transformers) removes a token whose cumulative equals 1 - p exactly.
    scores = np.full((B, V), -np.inf, np.float32)
    for b in range(B):
        scores[b, np.random.default_rng(b).choice(V, 16, replace=False)] = float(b)
    ours = sampling.top_p_filter(scores, p)
    ref = hf(TopPLogitsWarper(p), make_sequences(0), scores)
    np.testing.assert_array_equal(np.isfinite(ours).sum(1), np.isfinite(ref).sum(1))
    assert (np.isfinite(ref).sum(1) == round(16 * p)).all()
    assert (np.isfinite(ours) <= np.isfinite(scores)).all()


def test_top_p_after_top_k_matches_transformers():
    scores, seqs = make_scores(10, 1.0), make_sequences(10)
    for k, p in [(10, 0.5), (3, 0.99), (25, 0.9)]:
        ref = hf(LogitsProcessorList([TopKLogitsWarper(k), TopPLogitsWarper(p)]), seqs, scores)
        assert_same(sampling.top_p_filter(sampling.top_k_filter(scores, k), p), ref)


# ---------------------------------------------------------------- the whole chain
CONFIGS = {
    "greedy-default": SamplingConfig(),
    "greedy-processors": SamplingConfig(
        repetition_penalty=1.3, bad_words_ids=((5,), (7, 9), (3, 4, 11)), min_new_tokens=3, eos_token_id=2
    ),
    "greedy-ignores-warpers": SamplingConfig(temperature=0.5, top_k=3, top_p=0.5),
    "sample-default": SamplingConfig(do_sample=True),
    "sample-all": SamplingConfig(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.2,
        bad_words_ids=((1,), (4, 6), (7, 9)), min_new_tokens=2, eos_token_id=(2, 3),
    ),
    "sample-top-p-only": SamplingConfig(do_sample=True, top_k=None, top_p=0.5, temperature=1.5),
    "sample-top-k-0": SamplingConfig(do_sample=True, top_k=0, top_p=0.8, repetition_penalty=0.8),
    "sample-top-k-1": SamplingConfig(do_sample=True, top_k=1),
    "sample-no-eos": SamplingConfig(do_sample=True, temperature=2.0, top_k=5, min_new_tokens=4),
}


@pytest.mark.parametrize("generated", [0, 1, 5])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_process_matches_transformers_chain(name, generated):
    cfg = CONFIGS[name]
    scores, seqs = make_scores(11), make_sequences(11, length=PROMPT + generated)
    seqs[0, -1] = 7
    seqs[1, -1] = 4
    if generated:
        seqs[2, -2:] = [3, 4]
    before = scores.copy()
    ours = process(scores, seqs, generated, cfg)
    ref = hf(hf_chain(cfg, PROMPT), seqs, scores)
    assert_same(ours, ref)
    np.testing.assert_array_equal(scores, before)  # the caller's scores are not modified
    if not cfg.do_sample:  # greedy picks transformers' argmax
        np.testing.assert_array_equal(next_tokens(ours, cfg, None), torch.from_numpy(ref).argmax(-1).numpy())
        assert next_tokens(ours, cfg, None).dtype == np.int64


def test_process_bad_words_spare_eos_like_generate():
    cfg = SamplingConfig(bad_words_ids=((2,), (5,)), eos_token_id=2)
    scores, seqs = make_scores(12), make_sequences(12)
    ref = hf(hf_chain(cfg, PROMPT), seqs, scores)
    assert np.isfinite(ref[:, 2]).all() and np.isneginf(ref[:, 5]).all()
    assert_same(process(scores, seqs, 0, cfg), ref)


def test_process_repetition_penalty_skips_left_padding_like_generate():
    cfg = SamplingConfig(repetition_penalty=1.5)
    pad = 0
    scores = make_scores(13)
    seqs = np.random.default_rng(13).integers(1, V, (B, PROMPT + 2), dtype=np.int64)  # no pad id in the text
    attention_mask = np.ones((B, PROMPT), np.int64)
    attention_mask[1, :3] = 0
    attention_mask[2, :5] = 0
    seqs[:, :PROMPT][attention_mask == 0] = pad
    seqs[0, -1] = pad  # a generated pad/unk token is penalised like any other
    # what GenerationMixin._get_logits_processor builds from the prompt's attention mask
    padding_lengths = (attention_mask != 0).argmax(axis=1)
    reference = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.from_numpy(padding_lengths))
    ref = hf(reference, seqs, scores)
    assert ref[1, pad] == scores[1, pad] and ref[0, pad] != scores[0, pad]
    assert_same(process(scores, seqs, 2, cfg, pad_lengths=padding_lengths), ref)
    # without padding information every position counts, as before
    assert_same(process(scores, seqs, 2, cfg), hf(RepetitionPenaltyLogitsProcessor(1.5), seqs, scores))


# ---------------------------------------------------------------- settings
def test_defaults_are_transformers_global_defaults():
    defaults = GenerationConfig._get_default_generation_params()
    cfg = SamplingConfig()
    for name in ("top_k", "top_p", "temperature", "repetition_penalty", "do_sample"):
        assert getattr(cfg, name) == defaults[name], name
    assert cfg.min_new_tokens == defaults["min_length"] == 0
    assert cfg.bad_words_ids is defaults["bad_words_ids"] is None


def test_unknown_settings_raise_type_error_naming_them():
    with pytest.raises(TypeError) as info:
        SamplingConfig.from_kwargs(top_k=5, num_beams=4, typical_p=0.5)
    message = str(info.value)
    assert "num_beams" in message and "typical_p" in message
    assert "top_k, " not in message.split(";")[0]  # a known name is not reported as unknown
    cfg = SamplingConfig.from_kwargs(top_k=5, temperature=0.5, do_sample=True)
    assert (cfg.top_k, cfg.temperature, cfg.do_sample) == (5, 0.5, True)


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": -3}, {"max_new_tokens": 2.5},
    {"min_new_tokens": -1}, {"min_new_tokens": 1.5},
    {"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")},
    {"top_k": -1}, {"top_k": 2.5},
    {"top_p": -0.1}, {"top_p": 1.5}, {"top_p": float("nan")},
    {"repetition_penalty": 0.0}, {"repetition_penalty": -1.2},
    {"bad_words_ids": ((1,), ())},
])
def test_invalid_values_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
    with pytest.raises(ValueError):
        SamplingConfig.from_kwargs(**kwargs)


def test_valid_edge_values_are_accepted():
    SamplingConfig(max_new_tokens=1, min_new_tokens=0, top_k=0, top_p=0.0, temperature=1e-3)
    SamplingConfig(top_k=None, top_p=1.0, repetition_penalty=0.5)
    assert SamplingConfig(eos_token_id=[2, 3]).eos_ids() == (2, 3)
    assert SamplingConfig(eos_token_id=2).eos_ids() == (2,)
    assert SamplingConfig(bad_words_ids=[[1, 2], [3]]).bad_words_ids == ((1, 2), (3,))


# ---------------------------------------------------------------- drawing tokens
SAMPLE_CFG = SamplingConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.9)


def hf_warped(cfg: SamplingConfig, scores: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    return hf(hf_chain(cfg, seqs.shape[1]), seqs, scores)


def test_sampling_is_reproducible_with_a_seeded_generator():
    scores, seqs = make_scores(14, 1.0), make_sequences(14)
    warped = process(scores, seqs, 0, SAMPLE_CFG)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return np.stack([next_tokens(warped, SAMPLE_CFG, rng) for _ in range(200)])

    first = draws(123)
    assert first.dtype == np.int64 and first.shape == (200, B)
    np.testing.assert_array_equal(first, draws(123))
    assert (first != draws(124)).mean() > 0.2
    assert all(len(set(first[:, b])) > 1 for b in range(B))  # it samples, not argmax


@pytest.mark.parametrize("cfg", [
    SAMPLE_CFG,
    SamplingConfig(do_sample=True, top_k=None, top_p=0.6),
    SamplingConfig(do_sample=True, top_k=3, temperature=1.5),
    SamplingConfig(do_sample=True, repetition_penalty=1.4, bad_words_ids=((0,), (1,)), top_k=8),
], ids=["tk10-tp0.9", "tp0.6", "tk3", "rep-bad-tk8"])
def test_drawn_tokens_lie_in_transformers_support(cfg):
    scores, seqs = make_scores(15, 1.0), make_sequences(15)
    support = np.isfinite(hf_warped(cfg, scores, seqs))
    assert (support.sum(axis=1) < V).all()
    warped = process(scores, seqs, 0, cfg)
    rng = np.random.default_rng(0)
    n = 5000
    for b in range(B):
        drawn = next_tokens(np.repeat(warped[b:b + 1], n, axis=0), cfg, rng)
        assert support[b, drawn].all(), sorted(set(drawn[~support[b, drawn]].tolist()))
        if support[b].sum() > 1:
            assert len(set(drawn.tolist())) > 1  # it samples, not argmax


@pytest.mark.parametrize("cfg", [
    SAMPLE_CFG,
    SamplingConfig(do_sample=True, top_k=None, top_p=0.8, temperature=1.3),
    SamplingConfig(do_sample=True, top_k=6, repetition_penalty=1.3),
], ids=["tk10-tp0.9-t0.7", "tp0.8-t1.3", "tk6-rep"])
def test_empirical_distribution_matches_transformers(cfg):
    scores, seqs = make_scores(16, 1.0), make_sequences(16)
    reference = torch.softmax(torch.from_numpy(hf_warped(cfg, scores, seqs)[0]), dim=-1).double().numpy()
    n = 20000
    row = process(scores, seqs, 0, cfg)[:1]
    drawn = next_tokens(np.repeat(row, n, axis=0), cfg, np.random.default_rng(1))
    empirical = np.bincount(drawn, minlength=V) / n
    tv = 0.5 * np.abs(empirical - reference).sum()
    assert tv < 0.03, tv
    # the reference is far from the un-warped softmax, so the bound is meaningful
    raw = torch.softmax(torch.from_numpy(scores[0]), dim=-1).double().numpy()
    assert 0.5 * np.abs(raw - reference).sum() > 0.1


def test_greedy_ignores_the_generator():
    scores = make_scores(17)
    cfg = dataclasses.replace(SamplingConfig(), top_k=1)
    expected = torch.from_numpy(scores).argmax(-1).numpy()
    np.testing.assert_array_equal(next_tokens(scores, cfg, None), expected)
    np.testing.assert_array_equal(next_tokens(scores, cfg, np.random.default_rng(0)), expected)
