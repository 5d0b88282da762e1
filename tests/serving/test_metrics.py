"""The engine's metrics on the real Triton server's /metrics endpoint (runtime.serving publishes them
as Python-backend custom metrics), scraped before and after requests, failing ones included.

Expected values come from the responses (tokens carried), from transformers' IdeficsProcessor
(prompt lengths), and from which requests were sent (failures by reason, a repeated image): never
from the metrics code. One server for the module (the fixtures of test_idefics_server)."""

from __future__ import annotations

import base64
import re
import time
import urllib.request

import pytest

from runtime.metrics import COUNTERS, GAUGES, HISTOGRAMS, TIME_BUCKETS
from tests.serving.test_idefics_server import (  # noqa: F401 - module-scoped fixtures, one server here
    CHAT, MAX_NEW, _items, client_script, export_dir, grpc_stream, http_generate, photos, pytestmark, raw_stream,
    repo, server, session, triton_env)

WAIT = 30.0
LINE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every idefics_* sample of the metrics endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match and match[1].startswith("idefics_"):
            labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'\w+="[^"]*"', match[2] or ""))
            samples[(match[1], frozenset((k, v.strip('"')) for k, v in labels))] = float(match[3])
    return samples


def value(samples, name: str, **labels) -> float:
    """The sample of the idefics model with these labels (exactly one must match)."""
    found = [v for (n, ls), v in samples.items()
             if n == name and ("model", "idefics") in ls and all((k, str(x)) in ls for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from runtime.reference.sources import ensure_default_checkpoint

    return AutoProcessor.from_pretrained(ensure_default_checkpoint(0))


def prompt_length(processor, prompt, images) -> int:
    return int(processor(text=[_items(prompt, images)], return_tensors="pt")["attention_mask"].sum())


def test_every_metric_is_listed_by_name(server):
    samples = scrape(server)
    names = {n for n, _ in samples}
    for name in [*COUNTERS, *GAUGES]:
        assert name in names, name
    for name in HISTOGRAMS:
        assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= names, name
        les = {dict(ls).get("le") for n, ls in samples if n == f"{name}_bucket" and ("model", "idefics") in ls}
        assert "+Inf" in les and {float(le) for le in les - {"+Inf"}} == set(TIME_BUCKETS), les
    for reason in ("bad_request", "queue_full", "cancelled", "cancelled_queued", "internal"):
        value(samples, "idefics_requests_failed_total", reason=reason)


def test_metrics_count_the_requests_served(server, processor, client_script, photos, repo):
    before = scrape(server)
    astronaut = base64.b64encode(photos["astronaut"]).decode()
    good = [  # sequential, so that the second astronaut finds the first in the image cache
        (CHAT, [photos["astronaut"]], {"prompt": CHAT, "images_base64": [astronaut], "parameters": {"max_new_tokens": 11}}),
        ("User:<image>What now?<end_of_utterance>\nAssistant:", [photos["astronaut"]],
         {"prompt": "User:<image>What now?<end_of_utterance>\nAssistant:", "images_base64": [astronaut],
          "parameters": {"max_new_tokens": 7}}),
        ("User: What is a cat?<end_of_utterance>\nAssistant:", [],
         {"prompt": "User: What is a cat?<end_of_utterance>\nAssistant:", "parameters": {"max_new_tokens": 9}}),
    ]
    tokens = []
    for _, _, body in good:
        status, reply = http_generate(server, body)
        assert status == 200, reply
        tokens.append(reply["tokens"])
    bad = [raw_stream(server, CHAT, [b"\x89PNG\r\n\x1a\n not really"], '{"max_new_tokens": 4}'),
           raw_stream(server, CHAT, [photos["coffee"]], '{"max_new_tokens": 4, "temprature": 0.5}'),
           raw_stream(server, CHAT, [photos["coffee"]], f'{{"max_new_tokens": {MAX_NEW + 1}}}')]
    assert all(message is not None for message in bad), bad
    # a client that goes away mid-stream: its request is cancelled
    log = repo.parent / "server.log"
    gone = log.read_text(errors="replace").count("went away")
    outcome = grpc_stream(server, client_script, CHAT, [photos["chelsea"]],
                          {"max_new_tokens": MAX_NEW, "min_new_tokens": MAX_NEW}, stop_after=1)
    assert outcome[3] == "disconnected"

    want_generated = sum(len(t) for t in tokens)
    want_prompt = sum(prompt_length(processor, p, i) for p, i, _ in good)
    deadline = time.monotonic() + WAIT
    while True:  # the model publishes every 0.25 s, and counts a cancel at the next decode step
        after = scrape(server)
        cancelled = value(after, "idefics_requests_failed_total", reason="cancelled") - \
            value(before, "idefics_requests_failed_total", reason="cancelled")
        rows = value(after, "idefics_rows_in_flight")
        if (cancelled >= 1 and rows == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert log.read_text(errors="replace").count("went away") == gone + 1
    assert delta("idefics_requests_failed_total", reason="cancelled") == 1
    assert delta("idefics_requests_failed_total", reason="bad_request") == len(bad)
    assert delta("idefics_requests_failed_total", reason="queue_full") == 0
    assert delta("idefics_requests_failed_total", reason="cancelled_queued") == 0
    assert delta("idefics_requests_failed_total", reason="internal") == 0
    assert delta("idefics_requests_total") == len(good) + 1  # the bad ones never reached the engine
    assert delta("idefics_requests_completed_total") == len(good)
    # the disconnected stream generated tokens too (up to its cancel): count the good ones' exactly by
    # reading the counter between them would race, so check the cancelled one adds at least its piece
    streamed = delta("idefics_generated_tokens_total") - want_generated
    assert streamed >= 1, (delta("idefics_generated_tokens_total"), want_generated)
    assert delta("idefics_prompt_tokens_total") == want_prompt + prompt_length(processor, CHAT, [photos["chelsea"]])
    assert delta("idefics_image_cache_hits_total") == 1  # the second astronaut
    assert delta("idefics_image_cache_misses_total") == 2  # astronaut, chelsea
    assert delta("idefics_time_to_first_token_seconds_count") == len(good) + 1
    assert delta("idefics_time_to_first_token_seconds_bucket", le="+Inf") == len(good) + 1
    assert delta("idefics_inter_token_seconds_count") == sum(len(t) - 1 for t in tokens) + streamed - 1
    assert value(after, "idefics_queue_size") == 0 and value(after, "idefics_rows_in_flight") == 0
    assert value(after, "idefics_image_cache_entries") >= 2 and value(after, "idefics_image_cache_bytes") > 0


def test_generated_tokens_match_the_responses_exactly(server, photos):
    """Without a cancelled stream in between: the counter grows by exactly the tokens returned."""
    before = scrape(server)
    tokens = []
    for prompt, images, new in [(CHAT, [photos["coffee"]], 13), ("User: Say hi.<end_of_utterance>\nAssistant:", [], 6)]:
        body = {"prompt": prompt, "parameters": {"max_new_tokens": new}}
        if images:
            body["images_base64"] = [base64.b64encode(i).decode() for i in images]
        status, reply = http_generate(server, body)
        assert status == 200, reply
        tokens.append(reply["tokens"])
    want = sum(len(t) for t in tokens)
    deadline = time.monotonic() + WAIT
    while True:
        after = scrape(server)
        got = value(after, "idefics_generated_tokens_total") - value(before, "idefics_generated_tokens_total")
        if got >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(0.6)  # and no more than that after two more publishing rounds
    after = scrape(server)
    assert value(after, "idefics_generated_tokens_total") - value(before, "idefics_generated_tokens_total") == want
    assert value(after, "idefics_requests_completed_total") - value(before, "idefics_requests_completed_total") == 2
