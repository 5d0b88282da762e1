"""In-flight batching: many requests share decode steps, between `Session` and the loop.

One engine thread owns the graphs and the cache pool. Callers (any thread, or an asyncio loop)
check their request, `submit` it and read its `Job`: a Step per token, as the single-request loop
yields them. At every step boundary the engine

1. drops the jobs whose caller cancelled (a closed stream) and frees their rows (a job cancelled
   while it waits for rows leaves the queue at once, in `Job.cancel()`, and never runs);
2. admits waiting jobs, FIFO, while the pool has rows for them (all of them when nothing is in
   flight, otherwise one per step, so a join stalls the running rows for about its own prefill):
   their images' cross-attention K/V come from the image cache or from one vision + perceiver run
   over every image missing, then each job's prefill runs alone and its first token is chosen;
   its rows join the pool, each prompt at slot 0. With `prefill_chunk=N` (chunked joins) a join runs
   in pieces instead, one per step boundary while rows decode (back to back when none does): each
   image's vision and perceiver, then the prompt in chunks of N tokens, each chunk with the K/V of
   the ones before as its past; one join at a time while others decode, its rows kept for it;
3. runs one decode step over the rows in flight and hands each job its tokens; a row leaves the
   moment it finishes (eos or max_new_tokens), and its pool row goes to the next request.

Each job keeps its own settings and generator (`loop.Decoding`), so it gets the tokens it would
get alone. An error in one job's work (its images, prefill, processors) ends that job alone; an
error in the shared decode step ends the jobs in that step, and the engine goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import numpy as np

from runtime.errors import ToolkitError
from runtime.image_cache import ImageCache, image_digest
from runtime.loop import Decoding, Graphs, Request, Step, positions, prefill_feed, shared_prefill
from runtime.metrics import Metrics
from runtime.pool import CachePool, Row
from runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)

IDLE_SECONDS = 2.0  # an engine thread with nothing to do for this long ends; the next request starts one


class Cancelled(ToolkitError):
    """The job was cancelled (its stream was closed) or its session closed."""


class Unavailable(ToolkitError):
    """The engine refused a checked request (`reason`: "queue_full", or "cancelled" / "internal"
    when the session is closed / its engine stopped); the engine's metrics have counted it."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Job:
    """One generate/stream call as the engine runs it: read its Steps with `steps()` (blocking) or
    `asteps()` (asyncio); `cancel()` takes it out of the queue at once if it still waits for rows
    (nothing of it runs), else frees its rows at the next step boundary; either way its reader then
    gets `Cancelled`."""

    def __init__(self, req: Request, cfg: SamplingConfig, images: list[list[tuple[int, str]]]):
        self.req, self.cfg = req, cfg
        self.images = images  # per row: (column in pixel_values, digest) of each image it attends to
        self.rows = req.input_ids.shape[0]
        self.submitted = time.perf_counter()
        self.timings: dict = {"queued": None, "first_token": None, "vision": 0.0, "perceiver": 0.0,
                              "prefill": 0.0, "decode": [], "cached_images": 0}
        self.cancelled = self.finished = False
        self.last_token: float | None = None  # when its last Step was chosen (inter-token times)
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._wake = None
        self._on_cancel = None  # set by Engine.submit: takes the job out of the queue if it still waits

    # ---------------------------------------------------------------- engine side
    def send(self, item: Step | BaseException) -> None:
        with self._cond:
            self._events.append(item)
            self.finished = isinstance(item, BaseException) or item.last
            self._cond.notify_all()
            wake, self._wake = self._wake, None
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the caller's event loop is closed: nobody reads this job any more
                self.cancelled = True

    # ---------------------------------------------------------------- caller side
    def cancel(self) -> None:
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    def wait(self, timeout: float) -> bool:
        """Whether the job has something to read (a Step or its end) within `timeout` seconds: a
        caller that must poll its client while the job waits for rows (the Triton model) waits so."""
        with self._cond:
            return bool(self._events) or self._cond.wait_for(lambda: bool(self._events), timeout)

    def steps(self) -> Iterator[Step]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                item = self._events.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.last:
                return

    async def asteps(self) -> AsyncIterator[Step]:
        loop = asyncio.get_running_loop()
        while True:
            ready = asyncio.Event()
            with self._cond:
                item = self._events.popleft() if self._events else None
                if item is None:
                    self._wake = lambda: loop.call_soon_threadsafe(ready.set)
            if item is None:
                await ready.wait()
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.last:
                return


@dataclass(eq=False)
class _Running:
    """A job whose rows are in the pool."""

    job: Job
    decoding: Decoding
    rows: list[Row | None]  # per request row: its pool row while in flight
    tokens: np.ndarray  # [B] the tokens chosen last, fed at the next step
    keep_finished: bool  # output_logits: finished rows are fed pad to the end, as the loop does


class Engine:
    def __init__(self, g: Graphs, rows: int, image_cache_bytes: int = 256 * 2**20, max_queued: int | None = None,
                 prefill_chunk: int | None = None):
        """`rows`: requests rows in flight at once (the pool's capacity); `image_cache_bytes`: bound of
        the image cache (0: off); `max_queued`: jobs waiting for rows at most (None: unbounded);
        `prefill_chunk`: joins in pieces of at most this many prompt tokens, one piece per step
        boundary while rows decode (None or 0: each join whole, between two steps)."""
        limit = g.manifest.limits.max_batch
        if not isinstance(rows, int) or not 1 <= rows <= limit:
            raise ValueError(f"max_batch must be an integer from 1 to this export's max_batch {limit} "
                             f"(idefics-export --max-batch); got {rows!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool)
                                          or prefill_chunk < 0):
            raise ValueError(f"prefill_chunk must be a number of tokens >= 1 (None or 0: off); got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk or None
        if self.prefill_chunk:
            _chunk_runner(g)  # refuses graphs whose prompts cannot run in chunks
        self.g, self.capacity, self.max_queued = g, rows, max_queued
        self.metrics = Metrics()  # what Session.metrics() returns and the Triton model publishes
        self.image_cache = ImageCache(image_cache_bytes, self.metrics)
        self.pool: CachePool | None = None  # allocated by the engine thread, at the first request
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[_Running] = []
        self._joining: collections.deque[_Joining] = collections.deque()  # chunked joins, FIFO
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopped: BaseException | None = None  # why the engine stopped serving, if it did
        # what the engine did, for tests and benchmarks: decode steps, rows stepped in all and at
        # most in one step, jobs joined, jobs ended by an error
        # (chunked joins: pieces run, and the most run between two steps while rows decoded)
        self.stats = {"steps": 0, "rows_stepped": 0, "max_rows": 0, "joined": 0, "failed": 0,
                      "pieces": 0, "max_pieces_between_steps": 0}
        self._pieces_since_step = 0
        metrics, cache = self.metrics, self.image_cache
        metrics.gauge("idefics_queue_size", lambda: len(self._waiting))
        metrics.gauge("idefics_rows_in_flight", lambda: 0 if self.pool is None else len(self.pool.rows))
        metrics.gauge("idefics_image_cache_bytes", lambda: cache.size)
        metrics.gauge("idefics_image_cache_entries", lambda: len(cache.entries))

    # ---------------------------------------------------------------- callers
    def submit(self, req: Request, cfg: SamplingConfig) -> Job:
        """Queue a checked request; its rows must fit the pool."""
        b = req.input_ids.shape[0]
        if b > self.capacity:
            raise ValueError(f"input_ids: batch {b} exceeds this session's max_batch {self.capacity} "
                             "(Session(max_batch=...))")
        job = Job(req, cfg, _image_keys(req))
        job._on_cancel = self._cancel_waiting
        with self._cond:
            if self._closed:
                reason = "internal" if self._stopped else "cancelled"
                self.metrics.fail(reason)
                raise Unavailable(f"the session's engine stopped: {self._stopped}" if self._stopped
                                  else "the session is closed", reason)
            if self.max_queued is not None and len(self._waiting) >= self.max_queued:
                self.metrics.fail("queue_full")
                raise Unavailable(f"{len(self._waiting)} requests are already waiting for rows; the limit is "
                                  f"{self.max_queued}: try again later", "queue_full")
            self._waiting.append(job)
            self.metrics.inc("idefics_requests_total")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="idefics-engine", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def _cancel_waiting(self, job: Job) -> None:
        """`job.cancel()`: a job still waiting for rows leaves the queue now, before any of its work
        (vision, prefill, a row), and is counted "cancelled_queued"; its reader gets Cancelled. A job
        the engine took already is dropped at the next step boundary ("cancelled")."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
            self.metrics.fail("cancelled_queued")
        job.send(Cancelled("the request was cancelled while it waited for rows"))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._shutdown(Cancelled("the session is closed"))  # jobs submitted but never started

    # ---------------------------------------------------------------- the engine thread
    def _serve(self) -> None:
        try:
            if self.pool is None:
                self.pool = CachePool(self.g, self.capacity)
            self._loop()
        except BaseException as exc:  # out of memory for the pool, or a bug: no job may wait forever
            log.exception("the engine stopped")
            self._stopped = exc
            self._shutdown(ToolkitError(f"the session's engine stopped: {type(exc).__name__}: {exc}"), "internal")

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._closed and not self._waiting and not self._active and not self._joining:
                    # an idle engine ends its thread (the next submit starts another), so a Session
                    # dropped without close() is not kept alive by it; the pool stays allocated
                    self._cond.wait(IDLE_SECONDS)
                    if not self._closed and not self._waiting and not self._active and not self._joining:
                        self._thread = None
                        return
                if self._closed:
                    break
                admitted = self._take()
            for job in [j for j in admitted if j.cancelled]:  # cancelled since: still nothing of it ran
                admitted.remove(job)
                self._dropped(job, "cancelled_queued")
            self._drop_cancelled()
            if admitted and self.prefill_chunk:
                self._joining.extend(_Joining(job, self._pieces(job)) for job in admitted)
            elif admitted:
                self._admit(admitted)
            if self._joining:
                self._advance()
            if self._active:
                self._step()
        self._shutdown(Cancelled("the session was closed while this request was running"))

    def _shutdown(self, exc: BaseException, reason: str = "cancelled") -> None:
        with self._cond:
            self._closed = True
            jobs = [*self._waiting, *(join.job for join in self._joining), *(run.job for run in self._active)]
            self._waiting.clear()
        for join in self._joining:
            join.pieces.close()
        self._joining.clear()
        self._active.clear()
        for job in jobs:
            if not job.finished:
                self.metrics.fail(reason)
            job.send(exc)

    def _take(self) -> list[Job]:
        """Waiting jobs to admit now (under the lock): FIFO while rows are free; one per step while
        others decode, so that joins do not pile up in front of the running rows (chunked: one
        join in progress at a time while others decode; its rows are kept for it)."""
        while self._waiting and self._waiting[0].cancelled:  # (cancel() takes them out itself)
            self._dropped(self._waiting.popleft(), "cancelled_queued")
        busy = bool(self._active)
        if busy and self._joining:
            return []
        free, taken = self.pool.free - sum(join.job.rows for join in self._joining), []
        while self._waiting and self._waiting[0].rows <= free and (not busy or not taken):
            job = self._waiting.popleft()
            if not job.cancelled:
                taken.append(job)
                free -= job.rows
            else:
                self._dropped(job, "cancelled_queued")
        return taken

    def _dropped(self, job: Job, reason: str) -> None:
        self.metrics.fail(reason)
        if not job.finished:
            job.send(Cancelled("the request was cancelled"))

    def _drop_cancelled(self) -> None:
        for join in [j for j in self._joining if j.job.cancelled]:
            join.pieces.close()
            self._joining.remove(join)
            self._dropped(join.job, "cancelled")
        for run in [r for r in self._active if r.job.cancelled]:
            self._finish(run)
            self._dropped(run.job, "cancelled")

    def _finish(self, run: _Running) -> None:
        for row in run.rows:
            if row is not None:
                self.pool.remove(row)
        run.rows = [None] * len(run.rows)
        self._active.remove(run)

    def _fail(self, job: Job, exc: BaseException, run: _Running | None = None) -> None:
        log.warning("request failed in flight: %s: %s", type(exc).__name__, exc)
        self.stats["failed"] += 1
        self.metrics.fail("internal")
        if run is not None and run in self._active:
            self._finish(run)
        job.send(exc)

    # ---------------------------------------------------------------- joining
    def _admit(self, jobs: list[Job]) -> None:
        try:
            entries = self._encode_images(jobs)
        except Exception as exc:  # the images' graphs failed: every job that needed them fails
            for job in jobs:
                self._fail(job, exc)
            return
        for job in jobs:
            try:
                self._join(job, entries)
            except Exception as exc:
                self._fail(job, exc, next((r for r in self._active if r.job is job), None))

    def _encode_images(self, jobs: list[Job]) -> dict[str, dict]:
        """Cross-attention K/V {cross name: [H,L,hd]} of every image the jobs attend to, by digest:
        from the cache, or from one vision and perceiver run over all images missing."""
        g, entries, missing = self.g, {}, {}
        for job in jobs:
            for r, images in enumerate(job.images):
                for column, digest in images:
                    if digest in entries or digest in missing:
                        continue
                    entry = self.image_cache.get(digest)
                    if entry is not None:
                        entries[digest] = entry
                        job.timings["cached_images"] += 1
                    else:
                        missing[digest] = job.req.pixel_values[r, column]
        if not missing:
            return entries
        digests, chunk = list(missing), self.g.manifest.limits.max_batch
        vision = perceiver = 0.0
        for begin in range(0, len(digests), chunk):
            part = digests[begin:begin + chunk]
            start = time.perf_counter()
            (hidden,) = g.run(g.vision, {"pixel_values": np.stack([missing[d] for d in part])}).values()
            g.memory.synchronize()
            vision += time.perf_counter() - start
            start = time.perf_counter()
            cross = g.run(g.perceiver, {"image_hidden_states": hidden.reshape(len(part), 1, *hidden.shape[1:])})
            g.memory.synchronize()
            perceiver += time.perf_counter() - start
            for n, digest in enumerate(part):
                entries[digest] = {name: g.memory.copy(value[n]) for name, value in cross.items()}
                self.image_cache.put(digest, entries[digest])
        for job in jobs:  # what the jobs that needed a graph run waited for it
            if any(d in missing for images in job.images for _, d in images):
                job.timings["vision"], job.timings["perceiver"] = vision, perceiver
        return entries

    def _cross(self, job: Job, entries: dict[str, dict]) -> tuple[np.ndarray, dict]:
        """The job's image mask [B,T,W] (column k: the k-th image its row attends to) and cross K/V
        {cross name: [B,H,W*L,hd]}, its images' entries laid out in that order."""
        g, req, m = self.g, job.req, self.g.memory
        info = g.manifest.model
        b, t = req.input_ids.shape
        width = max(1, max(len(images) for images in job.images))
        length = info.image_seq_len
        image_mask = np.zeros((b, t, width), np.int64)  # the columns of the images each row attends to
        with m.scope():
            cross = {name: m.zeros((b, info.num_heads, width * length, info.head_dim), g.cross_dtype)
                     for j in range(info.num_cross_layers) for name in g.manifest.names.cross(j)}
            for r, images in enumerate(job.images):
                for k, (column, digest) in enumerate(images):
                    image_mask[r, :, k] = req.image_attention_mask[r, :, column]
                    for name, value in entries[digest].items():
                        cross[name][r, :, k * length:(k + 1) * length] = value
        return image_mask, cross

    def _join(self, job: Job, entries: dict[str, dict]) -> None:
        """Prefill the job alone, choose its first token, and put its unfinished rows in the pool."""
        g, req, cfg, m = self.g, job.req, job.cfg, self.g.memory
        info = g.manifest.model
        b, t = req.input_ids.shape
        image_mask, cross = self._cross(job, entries)
        start = time.perf_counter()
        decoding = Decoding(info, req, cfg)
        if g.shared_prefill:  # the ONNX Runtime decoder: each row's K/V from slot 0 of buffers of its own
            shape = (b, info.num_heads, t - int(decoding.pad_lengths.min()), info.head_dim)
            with m.scope():
                out = {present: m.zeros(shape, g.cache_dtype) for _, present in self.pool.pairs}
            logits = shared_prefill(g, req.input_ids, req.attention_mask, image_mask, cross,
                                    {past: out[present] for past, present in self.pool.pairs})
        else:
            out = g.run(g.prompt_decoder, prefill_feed(g, req.input_ids, req.attention_mask, image_mask, cross))
            logits = out["logits"][:, -1]

        def filled(r):  # row r's prompt K/V {past name: [H,n,hd]}
            pad = int(decoding.pad_lengths[r])
            span = slice(0, t - pad) if g.shared_prefill else slice(pad, t)
            return {past: out[present][r, :, span] for past, present in self.pool.pairs}

        self._start(job, decoding, logits, filled, image_mask, cross, start)

    def _start(self, job: Job, decoding: Decoding, logits, filled, image_mask: np.ndarray, cross: dict,
               start: float) -> None:
        """After the job's prefill (begun at `start`; `logits` [B,V] of its last position): choose
        its first token, put its unfinished rows in the pool (`filled(r)`: row r's prompt K/V)."""
        g, req, cfg, m = self.g, job.req, job.cfg, self.g.memory
        b, t = req.input_ids.shape
        length = g.manifest.model.image_seq_len
        ids = None if decoding.needs_scores else m.argmax(logits)
        if start is not None:  # (a chunked join has counted its chunks' seconds)
            job.timings["prefill"] = time.perf_counter() - start
        self.metrics.inc("idefics_prompt_tokens_total", int(req.attention_mask.sum()))
        rows_generating = int(decoding.unfinished.sum())
        tokens, last = decoding.choose(np.arange(b), ids, lambda: m.to_host(logits))
        job.last_token = time.perf_counter()
        job.timings["first_token"] = job.last_token - job.submitted
        self.metrics.inc("idefics_generated_tokens_total", rows_generating)
        self.metrics.observe("idefics_time_to_first_token_seconds", job.timings["first_token"])
        run = _Running(job, decoding, [None] * b, tokens, keep_finished=cfg.output_logits)
        self.stats["joined"] += 1
        if not last:
            self._active.append(run)
            last_positions = positions(req.attention_mask)[:, -1]
            for r in range(b):
                if decoding.unfinished[r] or run.keep_finished:
                    pad = int(decoding.pad_lengths[r])
                    n_images = len(job.images[r])
                    row_cross = {name: value[r, :, :n_images * length] for name, value in cross.items()}
                    run.rows[r] = self.pool.add(t - pad + cfg.max_new_tokens - 1, filled(r), row_cross,
                                                image_mask[r, -1, :n_images], int(last_positions[r]))
        else:
            job.timings["queued"] = job.timings["first_token"]
            self.metrics.inc("idefics_requests_completed_total")
        job.send(Step(tokens, self._host_logits(run, logits, np.arange(b)), last))

    # ---------------------------------------------------------------- chunked joins
    def _advance(self) -> None:
        """Run the joins' pieces, FIFO: one piece when rows are decoding (the next step follows at
        once), else back to back until a row is decoding or no join is left."""
        while self._joining:
            join = self._joining[0]
            busy = bool(self.pool.rows)
            try:
                next(join.pieces)
            except StopIteration:  # its last piece ran: it joined (or finished at its first token)
                self._joining.popleft()
            except Exception as exc:  # its images, its prefill or its processors: that job alone fails
                self._joining.popleft()
                self._fail(join.job, exc, next((r for r in self._active if r.job is join.job), None))
            self.stats["pieces"] += 1
            if busy:
                self._pieces_since_step += 1
                self.stats["max_pieces_between_steps"] = max(self.stats["max_pieces_between_steps"],
                                                             self._pieces_since_step)
                return

    def _pieces(self, job: Job) -> Iterator[None]:
        """The job's join in pieces: per image not in the cache its vision and perceiver (the
        perceiver is a small part of it), then its prompt in chunks of prefill_chunk tokens, each
        with the K/V of the chunks before it as its past. Each next() runs one piece; the last one
        also chooses the first token and puts the rows in the pool. Tokens are those of the whole
        prefill."""
        g, req, m = self.g, job.req, self.g.memory
        ran = False
        entries: dict[str, dict] = {}
        for r, images in enumerate(job.images):
            for column, digest in images:
                if digest in entries:
                    continue
                entry = self.image_cache.get(digest)  # another join may have put it there meanwhile
                if entry is not None:
                    entries[digest] = entry
                    job.timings["cached_images"] += 1
                    continue
                if ran:
                    yield
                start = time.perf_counter()
                (hidden,) = g.run(g.vision, {"pixel_values": req.pixel_values[r, column][None]}).values()
                m.synchronize()
                job.timings["vision"] += time.perf_counter() - start
                start = time.perf_counter()
                cross = g.run(g.perceiver, {"image_hidden_states": hidden.reshape(1, 1, *hidden.shape[1:])})
                m.synchronize()
                job.timings["perceiver"] += time.perf_counter() - start
                ran = True
                entries[digest] = {name: m.copy(value[0]) for name, value in cross.items()}
                self.image_cache.put(digest, entries[digest])
        image_mask, cross = self._cross(job, entries)
        info = g.manifest.model
        runner = _chunk_runner(g)
        decoding = Decoding(info, req, job.cfg)
        b, t = req.input_ids.shape
        first = int(decoding.pad_lengths.min())  # columns every row pads are left out, as shared prefill does
        pairs = self.pool.pairs
        with m.scope():
            kv = {past: m.zeros((b, info.num_heads, t - first, info.head_dim), g.prefill_cache_dtype)
                  for past, _ in pairs}
        position_ids = positions(req.attention_mask)
        prefill = 0.0
        for a in range(first, t, self.prefill_chunk):
            e = min(t, a + self.prefill_chunk)
            if ran:
                yield
            ran = True
            start = time.perf_counter()
            with m.scope():
                past = {name: m.copy(value[:, :, :a - first]) for name, value in kv.items()}
            out = g.run(runner, {
                "input_ids": np.ascontiguousarray(req.input_ids[:, a:e]),
                # the past's columns and the chunk's: what the whole prefill's tokens [a, e) see
                "attention_mask": np.ascontiguousarray(req.attention_mask[:, first:e]),
                "position_ids": np.ascontiguousarray(position_ids[:, a:e]),
                "image_attention_mask": np.ascontiguousarray(image_mask[:, a:e]),
                "logits_positions": np.array([e - a - 1], np.int64),
                **cross, **past})
            with m.scope():
                for name, present in pairs:
                    kv[name][:, :, a - first:e - first] = out[present]
            m.synchronize()
            prefill += time.perf_counter() - start
        job.timings["prefill"] = prefill

        def filled(r):
            return {name: value[r, :, int(decoding.pad_lengths[r]) - first:] for name, value in kv.items()}

        self._start(job, decoding, out["logits"][:, -1], filled, image_mask, cross, None)

    # ---------------------------------------------------------------- the shared step
    def _step(self) -> None:
        pool, m = self.pool, self.g.memory
        tokens = np.zeros(len(pool.rows), np.int64)
        for run in self._active:
            for r, row in enumerate(run.rows):
                if row is not None:
                    tokens[row.index] = run.tokens[r]
        start = time.perf_counter()
        self._pieces_since_step = 0
        try:
            logits = pool.decode(tokens)
            greedy = [run for run in self._active if not run.decoding.needs_scores]
            ids = m.argmax(logits) if greedy else None  # plain greedy: only token ids leave the device
        except Exception as exc:  # the shared step failed: it ends every request in it
            for run in list(self._active):
                self._fail(run.job, exc, run)
            return
        elapsed = time.perf_counter() - start
        n = len(pool.rows)
        self.stats.update(steps=self.stats["steps"] + 1, rows_stepped=self.stats["rows_stepped"] + n,
                          max_rows=max(self.stats["max_rows"], n))
        self.metrics.inc("idefics_decode_steps_total")
        done = []
        for run in list(self._active):  # choose every job's tokens before any row moves
            job = run.job
            try:
                if job.timings["queued"] is None:
                    job.timings["queued"] = start - job.submitted
                rows = np.array([r for r, row in enumerate(run.rows) if row is not None], np.int64)
                index = np.array([run.rows[r].index for r in rows], np.int64)
                generating = int(run.decoding.unfinished.sum())
                run.tokens, last = run.decoding.choose(
                    rows, None if ids is None else ids[index], lambda: m.to_host(logits[m.index(index)]))
                job.timings["decode"].append(elapsed)
                done.append((run, Step(run.tokens, self._host_logits(run, logits, index), last)))
                self.metrics.inc("idefics_generated_tokens_total", generating)
            except Exception as exc:
                done.append((run, exc))
        now = time.perf_counter()
        for run, outcome in done:
            if isinstance(outcome, BaseException):
                self._fail(run.job, outcome, run)
                continue
            self.metrics.observe("idefics_inter_token_seconds", now - run.job.last_token)
            run.job.last_token = now
            if outcome.last:
                self.metrics.inc("idefics_requests_completed_total")
                self._finish(run)
            elif not run.keep_finished:  # a finished row leaves now; its siblings go on
                for r, row in enumerate(run.rows):
                    if row is not None and not run.decoding.unfinished[r]:
                        pool.remove(row)
                        run.rows[r] = None
            run.job.send(outcome)

    def _host_logits(self, run: _Running, logits, index: np.ndarray):
        """A host copy of the job's rows' raw logits [B,V] when it asked for them (output_logits)."""
        if not run.job.cfg.output_logits:
            return None
        m = self.g.memory
        return m.to_host(logits[m.index(index)]).astype(np.float32)


@dataclass(eq=False)
class _Joining:
    """A job joining in pieces (Engine(prefill_chunk=...)): `pieces` runs one at each next()."""

    job: Job
    pieces: Iterator[None]


def _chunk_runner(g: Graphs):
    """The decoder a prompt runs in chunks in, with the K/V of the chunks before as its past: the
    portable decoder (past K/V and an attention mask over them) the prompts run in already, or,
    over a shared cache (the ONNX Runtime decoder, whose GroupQueryAttention prompt takes no past),
    the portable decoder of whole sequences of the same precision, which writes the decode cache's
    dtype. Refused where that cache is INT8 (int8wo's ORT decoder): its prompts run in a prompt
    graph of INT8 products (or the decode graph) with no past, and a portable FP32 prompt quantized
    into the cache would give other numbers than the unchunked engine."""
    runner = g.prefill_decoder if g.shared_prefill else g.prompt_decoder
    if g.prefill_cache_dtype != g.cache_dtype:
        raise ValueError(f"prefill_chunk: prompts run in {g.prompt_decoder.spec.file} with no past, and the "
                         f"decoder that takes one ({runner.spec.file}) writes its cache in {g.prefill_cache_dtype} "
                         f"where the decode graph reads {g.cache_dtype}: prompts cannot run in chunks with these "
                         "graphs (prefill_chunk=None, or portable=True)")
    return runner


def _image_keys(req: Request) -> list[list[tuple[int, str]]]:
    """Per row: (column, digest) of each image the row attends to anywhere; images no token attends
    to (the processor's zero padding of rows with fewer images) are never computed."""
    if req.pixel_values is None:
        return [[] for _ in range(req.input_ids.shape[0])]
    attended = req.image_attention_mask.any(axis=1)  # [B,I]
    return [[(int(i), image_digest(req.pixel_values[r, i])) for i in np.nonzero(attended[r])[0]]
            for r in range(attended.shape[0])]
