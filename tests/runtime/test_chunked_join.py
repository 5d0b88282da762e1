"""Chunked joins (Engine(prefill_chunk=N)): a request joining others in flight runs in pieces, one
per step boundary (each image's vision and perceiver, then its prompt in chunks of N tokens with
the past of the chunks before), and every request still gets exactly what it gets alone.

References, never this code's own output: transformers' generate for each request alone (greedy,
the `expected` fixture of test_engine), and the unchunked engine's graph runs for the boundary
count (which must exceed one piece there, or the instrument proves nothing)."""

from __future__ import annotations


import numpy as np
import pytest

from runtime import Session
from runtime.engine import Engine
from runtime.loop import Graphs
from runtime.memory import TorchMemory
from runtime.pool import CachePool
from tests.runtime.test_engine import MAX_BATCH, export_dir, expected, hf, inputs_of, photos, prompt_sets  # noqa: F401
from tests.util import run_threads


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_concurrent_chunked_joins_equal_transformers_alone(export_dir, hf, photos, expected, chunk):
    # 0 / 1 / 2 images, a left-padded call of two rows, different lengths; 1000 > every prompt
    model, processor = hf
    with Session(export_dir, prefill_chunk=chunk) as session:
        sets = prompt_sets(photos)
        results = {}

        def work(i):
            prompts, new = sets[i]
            results[i] = session.generate(**inputs_of(processor, prompts), max_new_tokens=new)

        assert not run_threads(work, len(sets))
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i].sequences, want, err_msg=f"request {i}, chunk {chunk}")
        stats = session.engine.stats
        assert stats["max_rows"] >= 3, f"the requests did not share steps: {stats}"
        assert stats["joined"] == len(sets)
        assert stats["max_pieces_between_steps"] <= 1, stats
        assert not session.engine.pool.rows and not session.engine._joining


@pytest.mark.parametrize("chunk", [1, 5])
def test_chunked_joins_alone_equal_transformers(export_dir, hf, photos, expected, chunk):
    # one request at a time: its pieces run back to back, nothing decoding
    model, processor = hf
    with Session(export_dir, prefill_chunk=chunk, image_cache_bytes=0) as session:
        for i, (prompts, new) in enumerate(prompt_sets(photos)):
            result = session.generate(**inputs_of(processor, prompts), max_new_tokens=new)
            np.testing.assert_array_equal(result.sequences, expected[i], err_msg=f"request {i}, chunk {chunk}")


def test_chunked_joins_on_torch_memory_equal_transformers(export_dir, hf, photos, expected):
    model, processor = hf
    with Session(export_dir) as session:
        g = session.graphs
        session.graphs = Graphs(session.manifest, {"vision": g.vision, "perceiver": g.perceiver, "decoder": g.decoder},
                                memory=TorchMemory("cpu"))
        session.engine = Engine(session.graphs, MAX_BATCH, prefill_chunk=4)
        sets = prompt_sets(photos)
        results = {}

        def work(i):
            results[i] = session.generate(**inputs_of(processor, sets[i][0]), max_new_tokens=sets[i][1])

        assert not run_threads(work, len(sets))
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i].sequences, want, err_msg=f"request {i}")


def _pieces_between_steps(session, processor, photos):
    """Start a long request; once it decodes, a 2-image request joins. Returns, for every gap
    between two decode steps, the graphs run (vision, perceiver, decoder: a prompt) while rows
    were decoding, and both requests' sequences."""
    engine, g = session.engine, session.graphs
    engine.pool = CachePool(g, engine.capacity)  # made here so its decode can be watched
    events, pool = [], engine.pool
    run, decode = g.run, pool.decode

    def watched_run(runner, inputs):
        kind = runner.spec.file.split(".")[0]  # vision, perceiver or decoder
        events.append(kind if pool.rows else "idle")
        return run(runner, inputs)

    def watched_decode(tokens):
        events.append("decode")
        return decode(tokens)

    g.run, pool.decode = watched_run, watched_decode
    sets = prompt_sets(photos)
    long_prompts, long_new = sets[0]
    join_prompts, join_new = sets[2]  # two images
    batch = inputs_of(processor, long_prompts)
    request, cfg = session._prepare(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                    batch.get("image_attention_mask"), None, dict(max_new_tokens=long_new))
    steps = session.engine.submit(request, cfg).steps()
    got = [next(steps)]
    got.append(next(steps))  # decoding now
    joined = session.generate(**inputs_of(processor, join_prompts), max_new_tokens=join_new)
    got.extend(steps)
    gaps, gap = [], []
    for event in events:
        if event == "decode":
            gaps.append(tuple(gap))
            gap = []
        elif event != "idle":
            gap.append(event)
    return gaps, np.concatenate([request.input_ids, np.stack([s.tokens for s in got], 1)], 1), joined.sequences


def test_no_step_boundary_carries_more_than_one_piece(export_dir, hf, photos, expected):
    model, processor = hf
    sets = prompt_sets(photos)
    with Session(export_dir) as session:  # the unchunked engine: the whole join in one gap
        gaps, _, joined = _pieces_between_steps(session, processor, photos)
        assert max(map(len, gaps)) >= 3, f"the instrument sees no join in one gap: {gaps}"
        np.testing.assert_array_equal(joined, expected[2])
    with Session(export_dir, prefill_chunk=4) as session:
        gaps, tokens, joined = _pieces_between_steps(session, processor, photos)
        prompt_len = inputs_of(processor, sets[2][0])["input_ids"].shape[1]
        pieces = [gap for gap in gaps if gap]
        # one piece a gap: an image's vision and perceiver, or one chunk of the prompt
        assert set(pieces) <= {("vision", "perceiver"), ("decoder",)}, gaps
        assert pieces.count(("vision", "perceiver")) == 2, gaps
        assert pieces.count(("decoder",)) == -(-prompt_len // 4), (gaps, prompt_len)
        np.testing.assert_array_equal(joined, expected[2])
        np.testing.assert_array_equal(tokens, expected[0])


def test_prefill_chunk_is_checked(export_dir):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Session(export_dir, prefill_chunk=-2)
    with Session(export_dir, prefill_chunk=0) as session:
        assert session.engine.prefill_chunk is None
