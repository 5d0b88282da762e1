"""In-flight batching (runtime.engine): concurrent requests share decode steps and each gets exactly
what it would get alone.

References, never this code's own output: transformers' IdeficsForVisionText2Text.generate for each
request alone (greedy), and the single-request loop (`loop.generate_tokens`, its own static cache,
no engine) for sampled requests with the same seed. The embedded default has non-zero gates, and
`test_images_matter` checks that the images change the tokens of these prompts."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from calibration.images import builtin_images
from exporter.export import ExportConfig, export
from runtime import Session
from runtime.engine import Cancelled, Engine
from runtime.loop import Graphs, Timings, generate_tokens
from runtime.memory import TorchMemory
from runtime.pool import ROUND, CachePool
from tests.util import default_hf, hf_generate, run_threads

MAX_BATCH, MAX_IMAGES, MAX_SEQ_LEN = 4, 2, 128


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "export"
    export(ExportConfig(output=out, progress=False, max_images=MAX_IMAGES, max_seq_len=MAX_SEQ_LEN,
                        max_batch=MAX_BATCH))
    return out


@pytest.fixture(scope="module")
def hf():
    return default_hf()


@pytest.fixture(scope="module")
def photos():
    return builtin_images(4)


def prompt_sets(photos):
    """Requests that differ in prompt length, image count (0, 1, 2), batch and max_new_tokens."""
    return [
        ([["User:", photos[0], "Describe this image in a few words, then say more.<end_of_utterance>\nAssistant:"]], 40),
        ([["User: a cat on a table. Assistant:"]], 12),
        ([["User: compare", photos[1], "and", photos[2], "please.<end_of_utterance>\nAssistant:"]], 24),
        ([["What is the rocket doing?"], ["User:", photos[3], "Which one is it?"]], 18),  # one call, two rows
        ([["Hi", photos[2]]], 30),
    ]


def inputs_of(processor, prompts) -> dict:
    batch = {k: v.numpy() for k, v in processor(text=prompts, return_tensors="pt").items()}
    if not batch["image_attention_mask"].any():  # text only: no pixels at all
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return batch


@pytest.fixture(scope="module")
def expected(hf, photos):
    model, processor = hf
    return [hf_generate(model, processor(text=prompts, return_tensors="pt"), max_new_tokens=new)
            for prompts, new in prompt_sets(photos)]


def test_images_matter(hf, photos):
    model, processor = hf
    prompts, new = prompt_sets(photos)[0]
    with_image = hf_generate(model, processor(text=prompts, return_tensors="pt"), max_new_tokens=new)
    other = hf_generate(model, processor(text=[[prompts[0][0], photos[3], prompts[0][2]]], return_tensors="pt"),
                        max_new_tokens=new)
    assert (with_image != other).any(), "precondition: the image must change the tokens"


@pytest.mark.parametrize("prefill_chunk", [None, 3])  # 3: chunked joins (tests/runtime/test_chunked_join.py)
@pytest.mark.parametrize("memory", ["host", "torch"])
def test_concurrent_requests_equal_transformers_alone(export_dir, hf, photos, expected, memory, prefill_chunk):
    model, processor = hf
    with Session(export_dir, prefill_chunk=prefill_chunk) as session:
        if memory == "torch":  # the device-memory path (torch tensors), on the CPU
            session.graphs = Graphs(session.manifest, {"vision": session.graphs.vision,
                                                       "perceiver": session.graphs.perceiver,
                                                       "decoder": session.graphs.decoder}, memory=TorchMemory("cpu"))
            session.engine = Engine(session.graphs, MAX_BATCH, prefill_chunk=prefill_chunk)
        sets = prompt_sets(photos)
        results = {}

        def work(i):
            prompts, new = sets[i]
            results[i] = session.generate(**inputs_of(processor, prompts), max_new_tokens=new)

        assert not run_threads(work, len(sets))
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i].sequences, want, err_msg=f"request {i}")
        stats = session.engine.stats
        assert stats["max_rows"] >= 3, f"the requests did not share steps: {stats}"
        assert stats["joined"] == len(sets)
        assert not session.engine.pool.rows, "every row is freed at the end"


def test_sampled_requests_equal_their_solo_runs(export_dir, hf, photos):
    model, processor = hf
    sets = prompt_sets(photos)
    settings = [dict(do_sample=True, seed=7, top_k=20, temperature=0.8), dict(),  # greedy in between
                dict(do_sample=True, seed=11, top_p=0.9), dict(do_sample=True, seed=3, repetition_penalty=1.3),
                dict(do_sample=True, seed=5, min_new_tokens=6, bad_words_ids=[[5], [7, 8]])]
    with Session(export_dir) as session:
        solo = []
        for (prompts, new), extra in zip(sets, settings):
            request, cfg = session._prepare(None, None, None, None, prompts, dict(max_new_tokens=new, **extra))
            steps = list(generate_tokens(session.graphs, request, cfg, Timings()))
            solo.append(np.concatenate([request.input_ids, np.stack([s.tokens for s in steps], 1)], 1))
        results = {}

        def work(i):
            results[i] = session.generate(prompts=sets[i][0], max_new_tokens=sets[i][1], **settings[i])

        assert not run_threads(work, len(sets))
        for i, want in enumerate(solo):
            np.testing.assert_array_equal(results[i].sequences, want, err_msg=f"request {i}: {settings[i]}")
        assert session.engine.stats["max_rows"] >= 3
    greedy = results[1].sequences
    np.testing.assert_array_equal(greedy, expected_greedy := hf_generate(
        model, processor(text=sets[1][0], return_tensors="pt"), max_new_tokens=sets[1][1]))
    assert expected_greedy.shape == greedy.shape


def test_image_cache_hit_equals_cold_cache(export_dir, hf, photos, expected, monkeypatch):
    model, processor = hf
    prompts, new = prompt_sets(photos)[2]  # two images
    with Session(export_dir) as session:
        calls = {"vision": 0}
        infer = session.graphs.vision.bind

        def counted(*args, **kwargs):
            calls["vision"] += 1
            return infer(*args, **kwargs)

        monkeypatch.setattr(session.graphs.vision, "bind", counted)
        cold = session.generate(prompts=prompts, max_new_tokens=new)
        assert cold.timings["cached_images"] == 0 and calls["vision"] == 1
        hot = session.generate(prompts=prompts, max_new_tokens=new)
        assert hot.timings["cached_images"] == 2 and calls["vision"] == 1, "a hit skips the vision graph"
        assert hot.timings["vision"] == hot.timings["perceiver"] == 0
        np.testing.assert_array_equal(cold.sequences, expected[2])
        np.testing.assert_array_equal(hot.sequences, expected[2])
        # another prompt around one of the same photos hits for that photo only
        other = [["User:", photos[1], "and", photos[0], "?"]]
        mixed = session.generate(prompts=other, max_new_tokens=10)
        assert mixed.timings["cached_images"] == 1
        np.testing.assert_array_equal(
            mixed.sequences, hf_generate(model, processor(text=other, return_tensors="pt"), max_new_tokens=10))


def test_image_cache_is_bounded_in_bytes(export_dir, photos):
    with Session(export_dir) as probe:
        probe.generate(prompts=[["Hi", photos[0]]], max_new_tokens=1)
        entry = probe.engine.image_cache.size
    assert entry > 0
    with Session(export_dir, image_cache_bytes=entry) as session:  # room for one image
        for photo in photos[:3]:
            session.generate(prompts=[["Hi", photo]], max_new_tokens=1)
        assert len(session.engine.image_cache.entries) == 1 and session.engine.image_cache.size <= entry
        assert session.generate(prompts=[["Hi", photos[2]]], max_new_tokens=1).timings["cached_images"] == 1
        assert session.generate(prompts=[["Hi", photos[0]]], max_new_tokens=1).timings["cached_images"] == 0
    with Session(export_dir, image_cache_bytes=0) as off:
        off.generate(prompts=[["Hi", photos[0]]], max_new_tokens=1)
        assert off.generate(prompts=[["Hi", photos[0]]], max_new_tokens=1).timings["cached_images"] == 0
    with pytest.raises(ValueError, match="image_cache_bytes"):
        Session(export_dir, image_cache_bytes=-1)


def test_bad_input_and_cancellation_leave_the_rest_exact(export_dir, hf, photos, expected):
    _, processor = hf
    sets = prompt_sets(photos)
    with Session(export_dir) as session:
        results, outcome = {}, {}

        def work(i):
            if i == 1:  # bad: more images than the export allows
                try:
                    session.generate(prompts=[["a", photos[0], photos[1], photos[2]]], max_new_tokens=4)
                except ValueError as exc:
                    outcome["bad"] = str(exc)
            elif i == 3:  # a stream closed after two pieces
                stream = session.stream(prompts=sets[0][0], max_new_tokens=60)
                outcome["pieces"] = [next(stream), next(stream)]
                stream.close()
            else:
                results[i] = session.generate(**inputs_of(processor, sets[i][0]), max_new_tokens=sets[i][1])

        assert not run_threads(work, len(sets))
        assert "images" in outcome["bad"] and len(outcome["pieces"]) == 2
        for i in (0, 2, 4):
            np.testing.assert_array_equal(results[i].sequences, expected[i], err_msg=f"request {i}")
        assert session.engine.stats["joined"] == 4  # the bad request never reached the engine
        deadline = time.monotonic() + 10
        while session.engine.pool.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not session.engine.pool.rows, "the closed stream's row is freed"


def test_an_error_in_flight_ends_that_request_alone(export_dir, hf, photos, expected, monkeypatch):
    import runtime.loop

    _, processor = hf
    sets = prompt_sets(photos)
    real = runtime.loop.process

    def process(scores, sequences, generated, cfg, pad_lengths=None):
        if cfg.repetition_penalty == 1.25 and generated == 3:
            raise FloatingPointError("injected failure in one request's processors")
        return real(scores, sequences, generated, cfg, pad_lengths)

    monkeypatch.setattr(runtime.loop, "process", process)
    with Session(export_dir) as session:
        results, failures = {}, []

        def work(i):
            if i == 1:
                try:
                    session.generate(prompts=sets[i][0], max_new_tokens=20, repetition_penalty=1.25)
                except FloatingPointError as exc:
                    failures.append(exc)
            else:
                results[i] = session.generate(**inputs_of(processor, sets[i][0]), max_new_tokens=sets[i][1])

        assert not run_threads(work, len(sets))
        assert len(failures) == 1
        for i in (0, 2, 3, 4):
            np.testing.assert_array_equal(results[i].sequences, expected[i], err_msg=f"request {i}")
        assert session.engine.stats["failed"] == 1 and not session.engine.pool.rows
        # and the engine goes on serving
        np.testing.assert_array_equal(session.generate(**inputs_of(processor, sets[1][0]), max_new_tokens=12).sequences,
                                      expected[1])


def test_bound_cache_follows_the_active_rows_and_the_longest_request(export_dir, hf, photos, monkeypatch):
    _, processor = hf
    with Session(export_dir) as session:
        shapes = []
        bind = session.graphs.decoder.bind

        def spy(inputs, outputs):
            shapes.append((tuple(inputs["past_key.0"].shape), tuple(inputs["cross_key.0"].shape)))
            return bind(inputs, outputs)

        monkeypatch.setattr(session.graphs.decoder, "bind", spy)
        short = inputs_of(processor, [["Hi"]])
        session.generate(**short, max_new_tokens=5)
        t = short["input_ids"].shape[1]
        need = t + 5 - 1
        decode_shapes = [s for s in shapes if s[0][2] > 0]  # the prefill binds an empty past
        assert decode_shapes and all(p[0] == 1 and p[2] == -(-need // ROUND) * ROUND for p, _ in decode_shapes)
        assert all(p[2] < MAX_SEQ_LEN for p, _ in decode_shapes), "the pool's capacity is never bound whole"
        assert all(c[2] == session.manifest.model.image_seq_len for _, c in decode_shapes)  # one image slot
    pool = session.engine.pool
    assert pool.capacity == MAX_BATCH and pool.max_slots == MAX_SEQ_LEN


def test_pool_relayout_keeps_every_row(export_dir):
    """Rows written, the pool re-laid wider and narrower, a row removed: every row's cache, masks and
    positions are where an independent record says."""
    with Session(export_dir) as session:
        pool = CachePool(session.graphs, MAX_BATCH)
        info = session.manifest.model
        rng = np.random.default_rng(0)
        h, hd, length = info.num_heads, info.head_dim, info.image_seq_len
        record = []
        for need, t, images in ((10, 4, 1), (70, 9, 2), (20, 3, 0)):
            kv = {past: rng.standard_normal((h, t, hd)).astype(np.float32) for past, _ in pool.pairs}
            cross = {name: rng.standard_normal((h, images * length, hd)).astype(np.float32) for name in pool.cross_names}
            mask = np.ones(images, np.int64)
            record.append((pool.add(need, kv, cross, mask, t - 1), kv, cross, t, images))
        assert pool.slots == 80 and pool.images == 2 and pool.relayouts == 1

        def check():
            for row, kv, cross, t, images in record:
                r = row.index
                for name, value in kv.items():
                    np.testing.assert_array_equal(pool.past[name][r, :, :t], value)
                for name, value in cross.items():
                    np.testing.assert_array_equal(pool.cross[name][r, :, :images * length], value)
                want = np.zeros(pool.slots + 1, np.int64)
                want[:t] = 1
                want[-1] = 1
                np.testing.assert_array_equal(pool.mask[r], want)
                np.testing.assert_array_equal(pool.image_mask[r, 0, :images], np.ones(images))
                assert pool.pos[r, 0] == t - 1 and pool.lengths[r] == t

        check()
        pool.remove(record[1][0])  # the longest: the last row moves into its place, the pool narrows
        del record[1]
        assert [row.index for row, *_ in record] == [0, 1] and pool.slots == 32 and pool.images == 1
        assert pool.relayouts == 2
        check()


def test_max_batch_bounds_the_rows_in_flight(export_dir, hf, photos, expected):
    _, processor = hf
    sets = prompt_sets(photos)
    with Session(export_dir, max_batch=2) as session:
        results = {}

        def work(i):
            results[i] = session.generate(**inputs_of(processor, sets[i][0]), max_new_tokens=sets[i][1])

        assert not run_threads(work, len(sets))
        for i, want in enumerate(expected):
            np.testing.assert_array_equal(results[i].sequences, want)
        assert session.engine.stats["max_rows"] == 2
        # more rows than max_batch: queued in parts, never more than 2 rows in flight
        # (tests/runtime/test_metrics.py compares such a call's tokens with each prompt alone)
        r = session.generate(prompts=[["a"], ["b"], ["c"]], max_new_tokens=2)
        assert r.sequences.shape[0] == 3 and r.timings["parts"] == 2
        assert session.engine.stats["max_rows"] == 2
    with pytest.raises(ValueError, match="max_batch"):
        Session(export_dir, max_batch=MAX_BATCH + 1)


def test_asyncio_faces(export_dir, hf, photos, expected):
    _, processor = hf
    sets = prompt_sets(photos)

    async def main(session):
        results = await asyncio.gather(*(session.agenerate(**inputs_of(processor, prompts), max_new_tokens=new)
                                         for prompts, new in sets))
        pieces = [piece async for piece in session.astream(prompts=sets[2][0], max_new_tokens=sets[2][1])]

        async def abandon():  # a task cancelled mid-stream frees its row
            async for _ in session.astream(prompts=sets[0][0], max_new_tokens=60):
                await asyncio.sleep(3600)

        task = asyncio.create_task(abandon())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return results, pieces

    with Session(export_dir) as session:
        results, pieces = asyncio.run(main(session))
        for result, want in zip(results, expected):
            np.testing.assert_array_equal(result.sequences, want)
        assert "".join(pieces) == processor.tokenizer.decode(expected[2][0, -sets[2][1]:], skip_special_tokens=True)
        deadline = time.monotonic() + 10
        while session.engine.pool.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not session.engine.pool.rows


def gate_first_full_step(engine: Engine):
    """Hold the engine thread at its first decode step with every row in flight (nothing of the
    queue can be taken meanwhile): (entered, release) events."""
    entered, release, real = threading.Event(), threading.Event(), engine._step

    def step():
        if not release.is_set() and len(engine.pool.rows) == engine.capacity:
            entered.set()
            assert release.wait(120), "the test never released the engine"
        real()

    engine._step = step
    return entered, release


def test_a_request_cancelled_while_queued_leaves_at_once_and_never_runs(export_dir, hf, photos, expected):
    """Every row busy, two more requests wait (one a Job, one an asyncio task). Each cancelled leaves
    the queue at once, while the engine is still held in its step: no vision for its image, no
    prefill, no row; its reader gets Cancelled; counted as cancelled_queued. The running requests
    then end exactly as transformers' alone."""
    _, processor = hf
    sets = prompt_sets(photos)
    running = [0, 1, 2, 4]  # one row each: every one of the MAX_BATCH rows
    waiting = sets[3][0]  # two rows, with the only use of photos[3]
    with Session(export_dir) as session:
        engine = session.engine
        entered, release = gate_first_full_step(engine)
        batches = [inputs_of(processor, sets[i][0]) for i in running]
        with engine._cond:  # all queued before the engine takes any: admitted together, nothing in flight
            jobs = [session._submit(b["input_ids"], b["attention_mask"], b.get("pixel_values"),
                                    b.get("image_attention_mask"), None, {"max_new_tokens": sets[i][1]})
                    for i, b in zip(running, batches)]
        assert entered.wait(120), "the engine never stepped with every row in flight"
        assert len(engine.pool.rows) == MAX_BATCH and engine.stats["joined"] == len(running)
        metrics = session.metrics

        async def main():
            job = session._submit(None, None, None, None, waiting, {"max_new_tokens": 18})
            task = asyncio.create_task(session.agenerate(prompts=waiting, max_new_tokens=18))
            for _ in range(1000):  # agenerate queues its job before its first await
                if metrics()["idefics_queue_size"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert metrics()["idefics_queue_size"] == 2
            job.cancel()
            assert metrics()["idefics_queue_size"] == 1  # at once: the engine is still held
            assert job.wait(10)
            with pytest.raises(Cancelled):
                next(job.steps())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            m = metrics()
            assert m["idefics_queue_size"] == 0
            assert m["idefics_requests_failed_total"]["cancelled_queued"] == 2
            assert m["idefics_requests_failed_total"]["cancelled"] == 0
            return job

        try:
            cancelled = asyncio.run(main())
        finally:
            release.set()
        for i, job in zip(running, jobs):
            np.testing.assert_array_equal(session._results([job], [list(job.steps())]).sequences, expected[i],
                                          err_msg=f"request {i}")
        m = metrics()
        assert engine.stats["joined"] == len(running) and engine.stats["max_rows"] == MAX_BATCH
        # no prefill and no vision for the cancelled ones: only the running prompts' tokens, and
        # photos[3] never reached the image cache
        assert m["idefics_prompt_tokens_total"] == sum(int(b["attention_mask"].sum()) for b in batches)
        digests = {digest for row in cancelled.images for _, digest in row}
        assert digests and not digests & set(engine.image_cache.entries)
        assert m["idefics_requests_completed_total"] == len(running)
        assert m["idefics_requests_failed_total"] == {"bad_request": 0, "queue_full": 0, "cancelled": 0,
                                                      "cancelled_queued": 2, "internal": 0}
        assert not engine.pool.rows and m["idefics_queue_size"] == 0


def test_an_error_in_the_shared_step_ends_its_requests_and_the_engine_goes_on(export_dir, hf, photos, expected,
                                                                               monkeypatch):
    _, processor = hf
    sets = prompt_sets(photos)
    with Session(export_dir) as session:
        session.generate(prompts=[["warm"]], max_new_tokens=2)  # the pool exists now
        pool = session.engine.pool
        real = pool.decode
        calls = {"n": 0}

        def decode(tokens):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure of the decoder")
            return real(tokens)

        monkeypatch.setattr(pool, "decode", decode)
        with pytest.raises(RuntimeError, match="injected"):
            session.generate(**inputs_of(processor, sets[0][0]), max_new_tokens=10)
        assert not pool.rows
        np.testing.assert_array_equal(
            session.generate(**inputs_of(processor, sets[2][0]), max_new_tokens=sets[2][1]).sequences, expected[2])


def test_closing_the_session_ends_waiting_requests(export_dir):
    session = Session(export_dir)
    session.generate(prompts=[["warm"]], max_new_tokens=2)
    session.close()
    with pytest.raises(Exception, match="closed"):
        session.generate(prompts=[["Hi"]], max_new_tokens=2)


def test_a_full_queue_refuses_at_once(export_dir, hf, photos, expected):
    """max_queued: past that many requests waiting for rows, a call fails at once with the limit named;
    the requests already in flight or waiting are unharmed."""
    _, processor = hf
    sets = prompt_sets(photos)
    with Session(export_dir, max_batch=1, max_queued=1) as session:
        gate, release = threading.Event(), threading.Event()
        real = session.engine._admit

        def admit(jobs):  # hold the engine once the first job is admitted, so the next one must wait
            real(jobs)
            gate.set()
            release.wait(30)

        session.engine._admit = admit
        results, errors = {}, []
        first = threading.Thread(target=lambda: results.setdefault(0, session.generate(
            **inputs_of(processor, sets[0][0]), max_new_tokens=sets[0][1])))
        first.start()
        assert gate.wait(30)
        second = threading.Thread(target=lambda: results.setdefault(2, session.generate(
            **inputs_of(processor, sets[2][0]), max_new_tokens=sets[2][1])))
        second.start()
        deadline = time.monotonic() + 10
        while len(session.engine._waiting) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(Exception, match="the limit is 1") as refused:
            session.generate(prompts=sets[1][0], max_new_tokens=4)
        errors.append(refused.value)
        session.engine._admit = real
        release.set()
        first.join(60)
        second.join(60)
        np.testing.assert_array_equal(results[0].sequences, expected[0])
        np.testing.assert_array_equal(results[2].sequences, expected[2])
