"""The engine's metrics (runtime.metrics) and `Session.metrics()`, and `Session.generate` with more
prompts than max_batch (queued in parts).

Expected values come from the results and from transformers' IdeficsProcessor (prompt lengths),
never from the metrics code itself; the tokens of a call run in parts are compared with each prompt
run alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from calibration.images import builtin_images
from exporter.export import ExportConfig, export
from runtime import Session
from runtime.metrics import COUNTERS, GAUGES, HISTOGRAMS, TIME_BUCKETS, Histogram, Metrics

MAX_BATCH = 2


# ---------------------------------------------------------------- the metrics object alone
def test_histogram_counts_cumulative_buckets():
    values = [0.001, 0.005, 0.0051, 0.3, 0.3, 7.0, 500.0]
    h = Histogram()
    for v in values:
        h.observe(v)
    snap = h.snapshot()
    bounds = [*TIME_BUCKETS, float("inf")]
    assert list(snap["buckets"]) == bounds
    for bound in bounds:  # Prometheus' le: values <= bound
        assert snap["buckets"][bound] == sum(1 for v in values if v <= bound), bound
    assert snap["count"] == len(values) and snap["sum"] == pytest.approx(sum(values))
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_metrics_names_snapshot_and_threads():
    m = Metrics()
    snap = m.snapshot()
    assert set(snap) == set(COUNTERS) | set(GAUGES) | set(HISTOGRAMS)
    assert all(name.startswith("idefics_") for name in snap)
    assert all(name.endswith("_total") for name in COUNTERS)
    assert snap["idefics_requests_failed_total"] == {"bad_request": 0, "queue_full": 0, "cancelled": 0,
                                                     "cancelled_queued": 0, "internal": 0}

    def work():
        for _ in range(2000):
            m.inc("idefics_generated_tokens_total", 2)
            m.fail("cancelled")
            m.observe("idefics_inter_token_seconds", 0.02)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["idefics_generated_tokens_total"] == 4 * 2000 * 2
    assert snap["idefics_requests_failed_total"]["cancelled"] == 4 * 2000
    assert snap["idefics_inter_token_seconds"]["count"] == 4 * 2000
    with pytest.raises(ValueError):
        m.inc("idefics_prompt_tokens_total", -1)
    m.gauge("idefics_queue_size", lambda: 7)
    assert m.snapshot()["idefics_queue_size"] == 7


def test_drain_hands_each_observation_once():
    m = Metrics()
    m.observe("idefics_time_to_first_token_seconds", 0.5)  # before keep_observations: not kept
    m.keep_observations()
    m.observe("idefics_time_to_first_token_seconds", 1.5)
    m.observe("idefics_inter_token_seconds", 0.1)
    snap, observed = m.drain()
    assert observed == {"idefics_time_to_first_token_seconds": [1.5], "idefics_inter_token_seconds": [0.1]}
    assert snap["idefics_time_to_first_token_seconds"]["count"] == 2
    assert m.drain()[1] == {"idefics_time_to_first_token_seconds": [], "idefics_inter_token_seconds": []}


# ---------------------------------------------------------------- a Session
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics") / "export"
    export(ExportConfig(output=out, progress=False, max_images=2, max_seq_len=128, max_batch=MAX_BATCH))
    return out


@pytest.fixture(scope="module")
def photos():
    return builtin_images(3)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from runtime.reference.sources import ensure_default_checkpoint

    return AutoProcessor.from_pretrained(ensure_default_checkpoint(0))


def real_lengths(processor, prompts) -> list[int]:
    """Prompt tokens per prompt, from transformers' processor (each alone: no padding)."""
    return [int(processor(text=[p], return_tensors="pt")["attention_mask"].sum()) for p in prompts]


def generated(result, eos) -> int:
    """New tokens each row really generated: up to and including its first eos, else all."""
    total = 0
    for row in result.new_tokens:
        hits = np.nonzero(np.isin(row, eos))[0]
        total += int(hits[0]) + 1 if hits.size else len(row)
    return total


def wait_for(read, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while read() != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return read()


def test_generate_queues_more_prompts_than_max_batch_in_parts(export_dir, photos):
    prompts = [["User:", photos[0], "Describe this image in a few words.<end_of_utterance>\nAssistant:"],
               ["User: a cat on a table. Assistant:"],
               ["User: compare", photos[1], "and", photos[2], "please.<end_of_utterance>\nAssistant:"],
               ["What is the rocket doing?"],
               ["Hi", photos[2]]]
    with Session(export_dir) as s:
        assert s.engine.capacity == MAX_BATCH
        alone = [s.generate(prompts=[p], max_new_tokens=14).new_tokens[0] for p in prompts]
        r = s.generate(prompts=prompts, max_new_tokens=14)  # 5 rows on 2: three parts, rows in order
        pad = s.manifest.model.pad_token_id
        assert r.sequences.shape[0] == len(prompts) and r.timings["parts"] == 3
        assert r.new_tokens.shape[1] == max(len(a) for a in alone)
        for row, want in zip(r.new_tokens, alone):
            np.testing.assert_array_equal(row[:len(want)], want)
            assert (row[len(want):] == pad).all()
        assert r.texts == [s.encoder.decode(a) for a in alone]
        assert s.engine.stats["max_rows"] <= MAX_BATCH
        # async too
        import asyncio

        ra = asyncio.run(s.agenerate(prompts=prompts, max_new_tokens=14))
        np.testing.assert_array_equal(ra.sequences, r.sequences)
        # streaming cannot be cut in parts: refused before anything runs, saying what does
        with pytest.raises(ValueError, match=r"batch 5 exceeds this session's max_batch 2.*generate"):
            next(iter(s.stream(prompts=prompts, max_new_tokens=4)))


def test_session_metrics_count_what_the_results_show(export_dir, photos, processor):
    with Session(export_dir) as s:
        eos = np.atleast_1d(s.manifest.model.eos_token_id)
        m0 = s.metrics()
        assert m0["idefics_generated_tokens_total"] == 0 and m0["idefics_queue_size"] == 0
        first = [["User:", photos[0], "Describe it.<end_of_utterance>\nAssistant:"], ["User: hello. Assistant:"]]
        again = [["User:", photos[0], "And now?<end_of_utterance>\nAssistant:"]]  # the same image: a cache hit
        r1 = s.generate(prompts=first, max_new_tokens=9)
        r2 = s.generate(prompts=again, max_new_tokens=7)
        m = s.metrics()
        assert m["idefics_prompt_tokens_total"] == sum(real_lengths(processor, first + again))
        assert m["idefics_generated_tokens_total"] == generated(r1, eos) + generated(r2, eos)
        assert m["idefics_requests_total"] == m["idefics_requests_completed_total"] == 2
        assert m["idefics_image_cache_misses_total"] == 1 and m["idefics_image_cache_hits_total"] == 1
        assert r2.timings["cached_images"] == 1
        assert m["idefics_image_cache_entries"] == 1 and m["idefics_image_cache_bytes"] > 0
        assert m["idefics_time_to_first_token_seconds"]["count"] == 2
        assert m["idefics_time_to_first_token_seconds"]["sum"] == pytest.approx(
            r1.timings["first_token"] + r2.timings["first_token"], rel=1e-6)
        # one observation per token after a job's first
        assert m["idefics_inter_token_seconds"]["count"] == r1.new_tokens.shape[1] - 1 + r2.new_tokens.shape[1] - 1
        assert m["idefics_decode_steps_total"] == s.engine.stats["steps"]
        assert m["idefics_queue_size"] == 0 and m["idefics_rows_in_flight"] == 0
        assert m["idefics_requests_failed_total"] == {"bad_request": 0, "queue_full": 0, "cancelled": 0,
                                                      "cancelled_queued": 0, "internal": 0}

        # failures, by reason
        with pytest.raises(ValueError):
            s.generate(prompts=first, max_new_tokens=500)  # past max_seq_len
        with pytest.raises(TypeError):
            s.generate(prompts=first, num_beams=2)
        s.engine.max_queued = 0
        with pytest.raises(Exception, match="waiting for rows"):
            s.generate(prompts=again, max_new_tokens=2)
        s.engine.max_queued = None
        stream = s.stream(prompts=again, max_new_tokens=60, min_new_tokens=60)
        next(stream)
        stream.close()  # the caller goes away: cancelled at the next step boundary
        failed = lambda: s.metrics()["idefics_requests_failed_total"]  # noqa: E731
        want = {"bad_request": 2, "queue_full": 1, "cancelled": 1, "cancelled_queued": 0, "internal": 0}
        assert wait_for(failed, want) == want
        real = s.engine.pool.decode
        s.engine.pool.decode = lambda tokens: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            with pytest.raises(RuntimeError, match="boom"):
                s.generate(prompts=again, max_new_tokens=5)
        finally:
            s.engine.pool.decode = real
        m = s.metrics()
        assert m["idefics_requests_failed_total"] == {**want, "internal": 1}
        assert m["idefics_requests_total"] == 4  # the two that reached the engine after the first two
        assert m["idefics_requests_completed_total"] == 2
        assert m["idefics_rows_in_flight"] == 0


# ---------------------------------------------------------------- publication to Triton, without a server
class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    made: list = []

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
        FakeFamily.made.append(self)

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
        family = self

        class Metric:
            def __init__(self):
                self.family, self.labels, self.buckets = family, labels, buckets
                self.value, self.observed = 0, []

            def increment(self, v):
                assert v > 0
                self.value += v

            def set(self, v):
                self.value = v

            def observe(self, v):
                self.observed.append(v)

        return Metric()


def test_triton_metrics_publish_increases_values_and_each_observation():
    from types import SimpleNamespace

    from runtime.serving import TritonMetrics

    m = Metrics()
    m.inc("idefics_generated_tokens_total", 5)
    m.fail("bad_request")
    m.gauge("idefics_queue_size", lambda: 3)
    published = TritonMetrics(SimpleNamespace(MetricFamily=FakeFamily), m, {"model": "idefics"}, interval=3600)
    try:
        m.observe("idefics_inter_token_seconds", 0.2)
        published.publish()
        m.inc("idefics_generated_tokens_total", 2)
        m.observe("idefics_inter_token_seconds", 0.3)
        published.publish()
        published.publish()  # nothing new: nothing added twice
        assert published.counters[("idefics_generated_tokens_total", None)].value == 7
        failed = published.counters[("idefics_requests_failed_total", "bad_request")]
        assert failed.value == 1 and failed.labels == {"model": "idefics", "reason": "bad_request"}
        assert published.counters[("idefics_requests_failed_total", "cancelled")].value == 0
        assert published.gauges["idefics_queue_size"].value == 3
        assert published.histograms["idefics_inter_token_seconds"].observed == [0.2, 0.3]
        assert published.histograms["idefics_inter_token_seconds"].buckets == list(TIME_BUCKETS)
        assert {f.name: f.kind for f in FakeFamily.made} == {**dict.fromkeys(COUNTERS, "counter"),
                                                             **dict.fromkeys(GAUGES, "gauge"),
                                                             **dict.fromkeys(HISTOGRAMS, "histogram")}
    finally:
        published.close()
