"""The engine's metrics: counters, gauges and fixed-bucket histograms, thread-safe, no dependencies.

Names are Prometheus-style (`idefics_` prefix, `_total` for counters, `_seconds` for times). The
engine updates them at admission, prefill (first token), every decode step, finish and failure; the
image cache counts its hits and misses. `Session.metrics()` returns `Metrics.snapshot()`, a plain
dict; the Triton `idefics` model publishes the same names through the Python backend's custom
metrics (`runtime.serving`).

    idefics_requests_total                      counter  requests accepted into the engine's queue
    idefics_requests_completed_total            counter  requests that ended with their last token
    idefics_requests_failed_total{reason}       counter  requests that ended otherwise: bad_request
                                                         (refused by the checks), queue_full,
                                                         cancelled (client gone, session closed),
                                                         cancelled_queued (client gone while it
                                                         waited for rows: nothing of it ran),
                                                         internal (an error while running)
    idefics_prompt_tokens_total                 counter  prompt tokens prefilled (padding excluded)
    idefics_generated_tokens_total              counter  new tokens generated (per row, up to and
                                                         including its end-of-sequence token)
    idefics_decode_steps_total                  counter  shared decode steps run
    idefics_image_cache_hits_total              counter  images whose cross-attention K/V came from the cache
    idefics_image_cache_misses_total            counter  images that had to run vision + perceiver
    idefics_queue_size                          gauge    requests waiting for rows
    idefics_rows_in_flight                      gauge    request rows decoding now
    idefics_image_cache_bytes                   gauge    bytes held by the image cache
    idefics_image_cache_entries                 gauge    images held by the image cache
    idefics_time_to_first_token_seconds         histogram  from submission to a request's first token
    idefics_inter_token_seconds                 histogram  between consecutive tokens of a request
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable

# seconds: from a few ms (a decode step of a small model) to minutes (a long queue on a CPU)
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

FAILURE_REASONS = ("bad_request", "queue_full", "cancelled", "cancelled_queued", "internal")

COUNTERS = {
    "idefics_requests_total": "Requests accepted into the engine's queue",
    "idefics_requests_completed_total": "Requests that ended with their last token",
    "idefics_requests_failed_total": "Requests that ended with an error, by reason "
                                     "(bad_request, queue_full, cancelled, cancelled_queued, internal)",
    "idefics_prompt_tokens_total": "Prompt tokens prefilled (left padding excluded)",
    "idefics_generated_tokens_total": "New tokens generated, per row up to and including its end-of-sequence token",
    "idefics_decode_steps_total": "Shared decode steps run",
    "idefics_image_cache_hits_total": "Images whose cross-attention K/V came from the image cache",
    "idefics_image_cache_misses_total": "Images that ran the vision and perceiver graphs",
}
GAUGES = {
    "idefics_queue_size": "Requests waiting for rows",
    "idefics_rows_in_flight": "Request rows decoding now",
    "idefics_image_cache_bytes": "Bytes held by the image cache",
    "idefics_image_cache_entries": "Images held by the image cache",
}
HISTOGRAMS = {
    "idefics_time_to_first_token_seconds": "Seconds from a request's submission to its first token",
    "idefics_inter_token_seconds": "Seconds between consecutive tokens of a request",
}
LABELS = {"idefics_requests_failed_total": "reason"}  # the labelled counters and their label


class Histogram:
    """Fixed upper bounds; counts per bucket (not cumulative), sum and count. Not locked itself."""

    def __init__(self, buckets=TIME_BUCKETS):
        self.buckets = tuple(float(b) for b in buckets)
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"histogram buckets must increase strictly, got {buckets}")
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """{"buckets": {upper bound: cumulative count, ..., inf: count}, "sum": s, "count": n},
        the cumulative `le` layout Prometheus uses."""
        cumulative, total = {}, 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            cumulative[bound] = total
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


class Metrics:
    """The engine's counters, gauges and histograms under one lock.

    Gauges are read from callables at snapshot time (the engine's queue, pool and image cache), so
    they are never stale. With `keep_observations()` on, each histogram observation is also kept
    until `drain()` takes it, for a publisher that forwards them one by one (Triton's histograms
    can only observe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {name: 0 for name in COUNTERS if name not in LABELS}
        self._labelled: dict[str, dict[str, float]] = {name: dict.fromkeys(FAILURE_REASONS, 0) for name in LABELS}
        self._histograms = {name: Histogram() for name in HISTOGRAMS}
        self._gauges: dict[str, Callable[[], float]] = {name: (lambda: 0) for name in GAUGES}
        self._pending: dict[str, list[float]] | None = None

    # ------------------------------------------------------------ updates
    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        if value < 0:
            raise ValueError(f"{name}: a counter only goes up, got {value}")
        with self._lock:
            if name in LABELS:
                key = labels[LABELS[name]]
                table = self._labelled[name]
                table[key] = table.get(key, 0) + value
            else:
                self._counters[name] += value

    def fail(self, reason: str) -> None:
        """One request ended with an error of this reason."""
        self.inc("idefics_requests_failed_total", reason=reason)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._histograms[name].observe(value)
            if self._pending is not None:
                self._pending[name].append(value)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Read gauge NAME from READ() at each snapshot."""
        if name not in GAUGES:
            raise KeyError(name)
        self._gauges[name] = read

    # ------------------------------------------------------------ reading
    def snapshot(self) -> dict:
        """A plain dict: counters and gauges by name (numbers), the labelled counter as
        {label value: number}, histograms as {"buckets": {le: cumulative count}, "sum", "count"}."""
        gauges = {name: read() for name, read in self._gauges.items()}
        with self._lock:
            out: dict = dict(self._counters)
            out.update({name: dict(table) for name, table in self._labelled.items()})
            out.update({name: h.snapshot() for name, h in self._histograms.items()})
        out.update(gauges)
        return out

    def keep_observations(self) -> None:
        with self._lock:
            if self._pending is None:
                self._pending = {name: [] for name in HISTOGRAMS}

    def drain(self) -> tuple[dict, dict[str, list[float]]]:
        """(snapshot, histogram observations since the last drain) in one consistent read."""
        gauges = {name: read() for name, read in self._gauges.items()}
        with self._lock:
            out: dict = dict(self._counters)
            out.update({name: dict(table) for name, table in self._labelled.items()})
            out.update({name: h.snapshot() for name, h in self._histograms.items()})
            pending = self._pending or {name: [] for name in HISTOGRAMS}
            if self._pending is not None:
                self._pending = {name: [] for name in HISTOGRAMS}
        out.update(gauges)
        return out, pending
