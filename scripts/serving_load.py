"""Serving load: N concurrent clients on one Session, against static batches and one-at-a-time.

    python scripts/serving_load.py                           # random:medium FP32, 8 clients, 32 requests
    python scripts/serving_load.py --export out/ --clients 4 --rate 1.5 --arrivals poisson
    python scripts/serving_load.py --smoke                   # the embedded tiny model, seconds (CI)
    python scripts/serving_load.py --compare-prefill-chunk 32  # mixed traffic, unchunked joins vs chunked

One Session (in-flight batching: concurrent requests share decode steps, runtime/engine.py), one
seeded workload, every scenario in one run on the same machine:

  sequential   the workload's requests one after another from one thread.
  poisson      --clients client threads; requests arrive as a Poisson process at --rate requests/s
               (default: clients / the mean sequential request time, the load N back-to-back
               clients would offer if each request took its solo time); a free client sends the
               next request that has arrived (one that arrives while all clients are busy is sent
               late, and its wait is recorded as `late_s`, not in its TTFT).
  closed       --clients client threads, each sending its next request when its previous one ends.
  static       the same requests as static batches: consecutive groups of the export's max_batch,
               left-padded to a common length, every row generating the group's longest length
               (its rows' extra tokens are dropped; throughput counts the tokens asked for).
  concurrent8, static8, sequential8
               the target case: --target-batch (8) requests of --target-prompt (48) tokens, one
               image each and --target-tokens (32) new tokens: sent by that many threads at once,
               as one batched call, and one after another.
  chat         a --chat-turns multi-turn chat with the same image at every turn: turn k's prompt is
               turn k-1's prompt + its answer + a new question; per turn the vision + perceiver
               seconds, the images served from the image cache and the TTFT.
  join         a target-shaped request sent while --join-background others are decoding (each has
               its first tokens), against the same request sent alone (fresh images each time).

Workload: prompts of --prompt-tokens MIN MAX random text tokens with --images MIN MAX images each
(laid out as IdeficsProcessor does: <fake><image><fake> where the export has those tokens; the
tokens from image k on attend to image k alone), --new-tokens MIN MAX new tokens, greedy, with
min_new_tokens = max_new_tokens so every request gets exactly the tokens asked (random weights may
emit eos). Images are scikit-image's photos when it is installed (each request a different random
crop, so no two requests share an image and the image cache only acts where it should: the chat),
seeded random pixels otherwise. The image cache is emptied before every scenario; every scenario is
preceded by a settle pause (idle thread pools stop spinning) and the run by one warm-up.

Each request records time to first token (TTFT: from its send to its first token), its inter-token
latencies (the gaps between its tokens as its client thread reads them: stalls for other requests'
prefill included; a client that wakes late reads a few tokens at once, which shows as near-zero gaps
when steps take about a millisecond, as in --smoke), its tokens and any error. Per scenario:
throughput (tokens generated / wall seconds from the first send to the last token), TTFT and
inter-token p50/p95, errors, and for the concurrent scenarios how many requests got the sequential
scenario's tokens. The targets: concurrent8 /
static8 throughput >= 0.9, join TTFT / solo TTFT <= 2 (medians), chat turns >= 2: 0 vision +
perceiver seconds. Requests run through the Session's own submission path, at token level
(runtime.session.check_request, then Session.engine.submit: what generate and stream do), so that
tokens and their times are exact and exports without a processor (random:PRESET) work too.

--prefill-chunk N runs every scenario with chunked joins (Session(prefill_chunk=N): a joining
request's vision, perceiver and prompt chunks of N tokens run one per decode step boundary).
--compare-prefill-chunk N runs the mixed workload only: the sequential scenario once (its tokens
and the Poisson rate), then --compare-rounds rounds of the poisson and closed scenarios with
unchunked joins and with chunks of N tokens, alternated (off/on, then on/off) on one Session
(the engine's option toggled while it is idle), so both configurations see the same machine
load. Per configuration, over its rounds pooled: TTFT and inter-token p50/p95/p99, throughput,
and the plain decode step's median (each step's own seconds, no join piece in it); targets:
chunked inter-token p95 <= 2x that decode step, chunked throughput >= 0.9x unchunked. It writes
--json (default docs/serving-chunked-DEVICE.json) and the table, no plot.

Writes a table to stdout, --json (default docs/serving-DEVICE.json) and --png (default
docs/serving-DEVICE.png), both naming the machine and the date. The default export (--model,
default random:medium, FP32) is made once into the toolkit cache ($IDEFICS_TOOLKIT_CACHE or
~/.cache/idefics-toolkit, under serving-load/) and reused; --export DIR uses an existing one. Absolute
times depend on the machine and its load: compare them between runs on one quiet machine, and read
the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("sequential", "poisson", "closed", "static", "concurrent8", "static8", "sequential8", "chat", "join")
TARGETS = {  # ratio name: (comparison, bound)
    "concurrent8_over_static8_throughput": (">=", 0.9),
    "join_over_solo_ttft": ("<=", 2.0),
    "chat_later_turns_vision_perceiver_s": ("<=", 0.0),
}
SMOKE = dict(model="default", clients=3, requests=5, prompt_tokens=[8, 24], images=[0, 2], new_tokens=[3, 8],
             target_batch=4, target_prompt=12, target_tokens=6, chat_turns=3, chat_question=6, chat_tokens=4,
             join_background=2, join_repeats=1)
DEFAULTS = dict(model="random:medium", clients=8, requests=32, prompt_tokens=[16, 96], images=[0, 4],
                new_tokens=[8, 48], target_batch=8, target_prompt=48, target_tokens=32, chat_turns=4,
                chat_question=16, chat_tokens=16, join_background=7, join_repeats=3)


def settle() -> None:
    # As scripts/benchmark.py: let idle thread pools stop spinning before a timed run.
    time.sleep(0.5)


# ---------------------------------------------------------------- the export
def ensure_export(model: str, max_batch: int, max_images: int, validate: bool = True,
                  progress: bool = True) -> Path:
    """An FP32 export of `model` ("default", random:PRESET, a checkpoint) in the toolkit cache,
    made the first time and reused after (a folder that no longer loads is made again)."""
    from exporter.export import ExportConfig, export
    from runtime.manifest import Manifest
    from runtime.paths import cache_root

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-") + f"-b{max_batch}-i{max_images}"
    folder = cache_root() / "serving-load" / name
    if (folder / "manifest.json").is_file():
        try:
            Manifest.load(folder)
            return folder
        except Exception as exc:  # an export from an older toolkit: make it again
            print(f"re-exporting {folder}: {exc}", file=sys.stderr)
            shutil.rmtree(folder)
    # export() writes the folder whole or not at all
    export(ExportConfig(output=folder, model=None if model == "default" else model,
                        max_batch=max_batch, max_images=max_images, validate=validate, progress=progress))
    return folder


# ---------------------------------------------------------------- the workload
class Item:
    """One request of one prompt: input_ids [T], image mask [T, n], pixels [n,3,S,S] or None."""

    def __init__(self, id: int, input_ids: np.ndarray, image_mask: np.ndarray, pixels: np.ndarray | None,
                 new_tokens: int):
        self.id, self.input_ids, self.image_mask, self.pixels = id, input_ids, image_mask, pixels
        self.new_tokens = new_tokens

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def images(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)

    def inputs(self) -> dict[str, Any]:
        return batch_inputs([self], 0)

    def describe(self) -> dict:
        return dict(id=self.id, prompt_tokens=self.prompt_tokens, images=self.images, new_tokens=self.new_tokens)


def batch_inputs(items: list[Item], pad_id: int) -> dict[str, Any]:
    """The items as one batch, left-padded to the longest prompt (as IdeficsProcessor pads)."""
    length = max(i.prompt_tokens for i in items)
    most = max(i.images for i in items)
    b = len(items)
    ids = np.full((b, length), pad_id, np.int64)
    mask = np.zeros((b, length), np.int64)
    image_mask = np.zeros((b, length, max(most, 1)), np.int64)
    pixels = None
    if most:
        size = next(i.pixels for i in items if i.pixels is not None).shape[-1]
        pixels = np.zeros((b, most, 3, size, size), np.float32)
    for r, item in enumerate(items):
        begin = length - item.prompt_tokens
        ids[r, begin:], mask[r, begin:] = item.input_ids, 1
        if item.pixels is not None:
            image_mask[r, begin:, :item.images] = item.image_mask
            pixels[r, :item.images] = item.pixels
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask)


class Workload:
    """Seeded prompts and images for an export (its vocabulary, image tokens, image size)."""

    def __init__(self, manifest, seed: int = 0):
        self.info, self.limits = manifest.model, manifest.limits
        self.rng = np.random.default_rng(seed)
        self.next_id = 0
        self.text_ids = np.setdiff1d(np.arange(3, self.info.vocab_size), np.asarray(self.info.image_token_ids,
                                                                                      np.int64))
        self.photos, self.image_source = _photos()

    def image(self) -> np.ndarray:
        """[3,S,S] a new image: a random crop of a photo, or random pixels without scikit-image."""
        size = self.info.image_size
        if not self.photos:
            return self.rng.standard_normal((3, size, size), dtype=np.float32)
        from calibration.images import to_pixel_values

        photo = self.photos[int(self.rng.integers(len(self.photos)))]
        w, h = photo.size
        cw, ch = int(w * self.rng.uniform(0.6, 1.0)), int(h * self.rng.uniform(0.6, 1.0))
        x, y = int(self.rng.integers(0, w - cw + 1)), int(self.rng.integers(0, h - ch + 1))
        return to_pixel_values([photo.crop((x, y, x + cw, y + ch))], size)[0]

    def text(self, n: int) -> np.ndarray:
        return self.rng.choice(self.text_ids, n)

    def item(self, length: int, images: int, new_tokens: int) -> Item:
        """A prompt of `length` tokens: <bos>, then text with `images` images spread over it."""
        marks = self.info.image_token_ids  # (<image>, <fake_token_around_image>) when the export has them
        width = 3 if len(marks) >= 2 else 1
        images = max(0, min(images, self.limits.max_images, (length - 2) // width))
        ids = self.text(length)
        ids[0] = self.info.bos_token_id if self.info.bos_token_id is not None else ids[0]
        image_mask = np.zeros((length, images), np.int64)
        for k in range(images):
            at = 1 + k * ((length - 1) // images)
            if width == 3:
                ids[at:at + 3] = (marks[1], marks[0], marks[1])
                at += 1  # the <image> token and everything after it attend to image k
            image_mask[at:] = 0
            image_mask[at:, k] = 1
        pixels = np.stack([self.image() for _ in range(images)]) if images else None
        self.next_id += 1
        return Item(self.next_id - 1, ids, image_mask, pixels, new_tokens)

    def mixed(self, count: int, prompt: tuple[int, int], images: tuple[int, int], new: tuple[int, int]) -> list[Item]:
        items = []
        for _ in range(count):
            n = int(self.rng.integers(new[0], new[1] + 1))
            length = min(int(self.rng.integers(prompt[0], prompt[1] + 1)), self.limits.max_seq_len - n)
            items.append(self.item(length, int(self.rng.integers(images[0], images[1] + 1)), n))
        return items


def _photos():
    try:
        from calibration.images import builtin_images

        return builtin_images(), "scikit-image photos, a random crop per image"
    except ImportError:
        return [], "seeded random pixels (scikit-image is not installed)"


# ---------------------------------------------------------------- one request
def run_job(session, inputs: dict, new_tokens: int, stop: threading.Event | None = None,
            progress: list | None = None) -> dict:
    """Send one request (one or more rows) and read its tokens as they come: the token-level face of
    Session.stream. `stop`: leave (cancel) at the next token once set; `progress` gets each stamp."""
    from runtime.sampling import SamplingConfig
    from runtime.session import check_length, check_request

    record = dict(send=time.perf_counter(), stamps=progress if progress is not None else [],
                  tokens=[[] for _ in range(len(inputs["input_ids"]))], timings={}, error=None)
    try:
        request = check_request(session.manifest, **inputs)
        check_length(session.manifest, request.input_ids.shape[1], new_tokens)
        job = session.engine.submit(request, SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        try:
            for step in job.steps():
                record["stamps"].append(time.perf_counter())
                for row, token in zip(record["tokens"], step.tokens):
                    row.append(int(token))
                if stop is not None and stop.is_set():
                    break
        finally:
            if not job.finished:
                job.cancel()
        record["timings"] = {k: v for k, v in job.timings.items() if k != "decode"}
        record["steps_s"] = list(job.timings["decode"])  # each decode step's own seconds
    except Exception as exc:  # recorded, counted, and the scenario goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def request_record(item: Item, rec: dict, t0: float, row: int = 0, asked: int | None = None, **extra) -> dict:
    """What the JSON keeps of one request: its shape, times relative to the scenario's start, tokens."""
    asked = item.new_tokens if asked is None else asked
    stamps = rec["stamps"][:asked]
    out = item.describe()
    out.update(sent_s=rec["send"] - t0, error=rec["error"], tokens=rec["tokens"][row][:asked],
               ttft_s=stamps[0] - rec["send"] if stamps else None,
               latency_s=rec["stamps"][-1] - rec["send"] if rec["stamps"] else None,
               itl_s=np.diff(stamps).tolist(), end_s=rec["stamps"][-1] - t0 if rec["stamps"] else None)
    if rec["error"] is None and len(out["tokens"]) != asked:
        out["error"] = f"got {len(out['tokens'])} tokens of {asked}"
    out["decode_steps_s"] = [round(v, 6) for v in rec.get("steps_s", [])]
    for key in ("queued", "vision", "perceiver", "prefill", "cached_images"):
        if key in rec["timings"]:
            out[key] = rec["timings"][key]
    out.update(extra)
    return out


def percentile(values, q: float) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else None


def summary(records: list[dict], seconds: float | None = None) -> dict:
    ok = [r for r in records if r["error"] is None]
    if seconds is None:
        ends = [r["end_s"] for r in records if r["end_s"] is not None]
        seconds = max(ends) if ends else 0.0
    tokens = sum(len(r["tokens"]) for r in ok)
    ttft = [r["ttft_s"] for r in ok]
    itl = [gap for r in ok for gap in r["itl_s"]]
    return dict(requests=len(records), errors=len(records) - len(ok), tokens=tokens,
                tokens_asked=sum(r["new_tokens"] for r in records), seconds=seconds,
                throughput_tok_s=tokens / seconds if seconds > 0 else 0.0,
                ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95), ttft_p99_s=percentile(ttft, 99),
                itl_p50_s=percentile(itl, 50), itl_p95_s=percentile(itl, 95), itl_p99_s=percentile(itl, 99),
                decode_step_p50_s=percentile([v for r in ok for v in r.get("decode_steps_s", [])], 50),
                latency_p50_s=percentile([r["latency_s"] for r in ok], 50),
                latency_p95_s=percentile([r["latency_s"] for r in ok], 95))


# ---------------------------------------------------------------- scenarios
class Runner:
    def __init__(self, session, pad_id: int):
        self.session, self.pad_id = session, pad_id

    def fresh(self) -> None:
        """Empty the image cache (between scenarios, while the engine is idle) and settle."""
        from runtime.image_cache import ImageCache

        self.session.engine.image_cache = ImageCache(self.session.engine.image_cache.capacity)
        settle()

    def stats(self) -> dict:
        return dict(getattr(self.session.engine, "stats", {}) or {})

    def scenario(self, name: str, fn, *args, **kwargs) -> dict:
        self.fresh()
        before = self.stats()
        result = fn(*args, **kwargs)
        after = self.stats()
        if after:
            delta = {k: after[k] - before.get(k, 0) for k in after if not k.startswith("max_")}
            if delta.get("steps"):
                delta["mean_rows_per_step"] = delta["rows_stepped"] / delta["steps"]
            result["engine"] = delta
        print(f"  {name}: {line(result)}", flush=True)
        return result

    def sequential(self, items: list[Item]) -> dict:
        t0, records = time.perf_counter(), []
        for item in items:
            records.append(request_record(item, run_job(self.session, item.inputs(), item.new_tokens), t0))
        return dict(summary(records), requests_detail=records)

    def clients(self, items: list[Item], clients: int, arrivals: list[float] | None = None) -> dict:
        """`clients` threads; with `arrivals` (seconds from the start, one per item) a free client
        sends the next item once it has arrived, else (closed loop) as soon as it is free."""
        lock, order, records = threading.Lock(), iter(range(len(items))), [None] * len(items)
        t0 = time.perf_counter() + 0.05  # every client is waiting before the first arrival

        def client():
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                due = t0 + (arrivals[i] if arrivals is not None else 0.0)
                while (wait := due - time.perf_counter()) > 0:
                    time.sleep(wait)
                rec = run_job(self.session, items[i].inputs(), items[i].new_tokens)
                records[i] = request_record(items[i], rec, t0, late_s=max(0.0, rec["send"] - due))

        threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out = dict(summary(records), clients=clients, requests_detail=records)
        if arrivals is not None:
            out["late_p95_s"] = percentile([r["late_s"] for r in records], 95)
        return out

    def static(self, items: list[Item], batch: int) -> dict:
        """Consecutive groups of `batch` as one call each, left-padded, every row generating the
        group's longest length; each row keeps the tokens it asked for."""
        t0, records = time.perf_counter(), []
        for begin in range(0, len(items), batch):
            group = items[begin:begin + batch]
            longest = max(i.new_tokens for i in group)
            rec = run_job(self.session, batch_inputs(group, self.pad_id), longest)
            for row, item in enumerate(group):
                records.append(request_record(item, rec, t0, row, batch_rows=len(group),
                                              batch_new_tokens=longest))
        return dict(summary(records), batch=batch, requests_detail=records)

    def chat(self, workload: Workload, turns: int, question: int, answer: int) -> dict:
        first = workload.item(question + 4, 1, answer)
        ids, image_mask, records, t0 = first.input_ids, first.image_mask, [], time.perf_counter()
        for turn in range(1, turns + 1):
            item = Item(first.id, ids, image_mask, first.pixels, answer)
            rec = run_job(self.session, item.inputs(), answer)
            record = request_record(item, rec, t0, turn=turn)
            t = rec["timings"]
            record["vision_perceiver_s"] = t.get("vision", 0.0) + t.get("perceiver", 0.0)
            records.append(record)
            more = np.concatenate([np.asarray(rec["tokens"][0], np.int64), workload.text(question)])
            ids = np.concatenate([ids, more])
            image_mask = np.concatenate([image_mask, np.ones((len(more), 1), np.int64)])  # all see the image
        return dict(summary(records), turns=records, requests_detail=records)

    def join(self, workload: Workload, shape: tuple[int, int, int], background: int, repeats: int) -> dict:
        """The TTFT of a request sent while `background` others decode, against it sent alone."""
        length, images, tokens = shape
        limit = self.session.manifest.limits.max_seq_len - length
        solo, joined = [], []
        t0 = time.perf_counter()
        for _ in range(repeats):  # alone (a fresh image each time: its vision runs)
            item = workload.item(length, images, tokens)
            settle()
            solo.append(request_record(item, run_job(self.session, item.inputs(), tokens), t0))
        for _ in range(repeats):
            settle()
            stop, stamps = threading.Event(), [[] for _ in range(background)]
            others = [workload.item(length, images, min(limit, 4 * tokens + 16)) for _ in range(background)]
            threads = [threading.Thread(target=run_job, args=(self.session, o.inputs(), o.new_tokens, stop, s))
                       for o, s in zip(others, stamps)]
            for thread in threads:
                thread.start()
            deadline = time.perf_counter() + 600
            while any(len(s) < 2 for s in stamps) and any(t.is_alive() for t in threads) \
                    and time.perf_counter() < deadline:
                time.sleep(0.001)  # until every other request is decoding
            item = workload.item(length, images, tokens)
            decoding = sum(len(s) >= 2 for s in stamps)
            rec = run_job(self.session, item.inputs(), tokens)
            still = sum(t.is_alive() for t in threads)  # still decoding when the join's tokens were done
            stop.set()
            for thread in threads:
                thread.join()
            joined.append(request_record(item, rec, t0, decoding_when_sent=decoding, still_decoding_after=still))
        def spans(records):  # each request ran on its own: its seconds are its own send to last token
            return sum(r["latency_s"] or 0.0 for r in records)

        out = dict(summary(joined, spans(joined)), background=background, repeats=repeats, requests_detail=joined,
                   solo=dict(summary(solo, spans(solo)), requests_detail=solo))
        out["solo_ttft_median_s"] = percentile([r["ttft_s"] for r in solo if r["error"] is None], 50)
        out["joined_ttft_median_s"] = percentile([r["ttft_s"] for r in joined if r["error"] is None], 50)
        return out


def line(s: dict) -> str:
    def f(v, scale=1.0, digits=3):
        return "-" if v is None else f"{v * scale:.{digits}f}"

    return (f"{s['requests']} requests, {s['errors']} errors, {s['tokens']} tokens in {s['seconds']:.2f} s: "
            f"{s['throughput_tok_s']:.1f} tok/s, TTFT p50 {f(s['ttft_p50_s'])} p95 {f(s['ttft_p95_s'])} s, "
            f"ITL p50 {f(s['itl_p50_s'], 1e3, 1)} p95 {f(s['itl_p95_s'], 1e3, 1)} ms")


def matches(reference: dict, other: dict) -> dict:
    """Requests of `other` whose tokens equal `reference`'s request of the same id."""
    ref = {r["id"]: r["tokens"] for r in reference["requests_detail"] if r["error"] is None}
    same = [r["id"] for r in other["requests_detail"] if r["id"] in ref and r["tokens"] == ref[r["id"]]]
    return dict(same=len(same), of=len(other["requests_detail"]))


# ---------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for CI: the embedded default model, 3 clients, 5 short requests, a 4-row "
                        "target case, a 3-turn chat, 2 background requests for the join (every option left out "
                        "takes its smoke value)")
    p.add_argument("--model", default=None,
                   help="what to export when --export is not given: random:PRESET, 'default' (the embedded tiny "
                        "model) or a checkpoint; exported once, FP32, into the toolkit cache "
                        "(default: random:medium; --smoke: default)")
    p.add_argument("--export", type=Path, default=None, help="use this existing export folder instead")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "torch"],
                   help="Session backend (default: onnxruntime)")
    p.add_argument("--device", default="cpu", help="Session device: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", default=None, help="graphs to run (default: the export's, FP32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: its own, the cores)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="Session(max_batch=): rows in flight at once (default: the export's, 8)")
    p.add_argument("--clients", type=int, default=None, help="concurrent client threads (default: 8; smoke: 3)")
    p.add_argument("--requests", type=int, default=None, help="requests in the mixed workload (default: 32; smoke: 5)")
    p.add_argument("--arrivals", nargs="+", choices=["poisson", "closed"], default=["poisson", "closed"],
                   help="concurrent scenarios to run: poisson (open loop at --rate) and/or closed (each client "
                        "sends its next request when its previous one ends); default: both")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals, requests/s (default: clients / the mean sequential request seconds)")
    p.add_argument("--prompt-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="prompt length range, tokens, images included (default: 16 96; smoke: 8 24)")
    p.add_argument("--images", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="images per request range (default: 0 4; smoke: 0 2; at most the export's max_images)")
    p.add_argument("--new-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="new tokens per request range (default: 8 48; smoke: 3 8)")
    p.add_argument("--target-batch", type=int, default=None,
                   help="requests of the target case: concurrent8 / static8 / sequential8 (default: 8; smoke: 4)")
    p.add_argument("--target-prompt", type=int, default=None,
                   help="prompt tokens of the target case and the join (default: 48; smoke: 12)")
    p.add_argument("--target-tokens", type=int, default=None,
                   help="new tokens of the target case and the join (default: 32; smoke: 6)")
    p.add_argument("--chat-turns", type=int, default=None, help="turns of the chat (default: 4; smoke: 3)")
    p.add_argument("--chat-question", type=int, default=None,
                   help="tokens of each chat question (default: 16; smoke: 6)")
    p.add_argument("--chat-tokens", type=int, default=None,
                   help="new tokens of each chat answer (default: 16; smoke: 4)")
    p.add_argument("--join-background", type=int, default=None,
                   help="requests decoding when the join request arrives (default: 7; smoke: 2)")
    p.add_argument("--join-repeats", type=int, default=None,
                   help="times the join (and its solo run) are measured; medians are compared (default: 3; smoke: 1)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="Session(prefill_chunk=N): chunked joins, N prompt tokens a piece (default: off)")
    p.add_argument("--compare-prefill-chunk", type=int, nargs="+", default=None, metavar="N",
                   help="run the mixed workload only, unchunked joins against chunks of N tokens (one or more N), "
                        "alternated")
    p.add_argument("--compare-rounds", type=int, default=2,
                   help="with --compare-prefill-chunk: rounds of each configuration (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="workload seed: prompts, images, lengths, arrivals (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: docs/serving-DEVICE.json)")
    p.add_argument("--png", type=Path, default=None, help="plot file (default: docs/serving-DEVICE.png)")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    kind = args.device.split(":")[0]
    chunked = "chunked-" if args.compare_prefill_chunk else ""
    args.json = args.json or ROOT / "docs" / f"serving-{chunked}{kind}.json"
    args.png = args.png or ROOT / "docs" / f"serving-{kind}.png"
    for key in ("clients", "requests", "target_batch", "target_prompt", "target_tokens", "chat_turns",
                "chat_question", "chat_tokens", "join_repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.join_background < 0 or (args.max_batch is not None and args.max_batch < 1):
        p.error("--join-background must be at least 0 and --max-batch at least 1")
    for key in ("prompt_tokens", "images", "new_tokens"):
        low, high = getattr(args, key)
        if low > high or low < (1 if key != "images" else 0):
            p.error(f"--{key.replace('_', '-')} {low} {high}: need 0/1 <= MIN <= MAX")
    if args.prompt_tokens[0] < 2:
        p.error("--prompt-tokens MIN must be at least 2")
    for key in ("prefill_chunk", "compare_prefill_chunk"):
        values = getattr(args, key)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.compare_rounds < 1:
        p.error("--compare-rounds must be at least 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    return args


def machine(args, session) -> dict:
    import onnxruntime

    out = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
               cpus=os.cpu_count(), os=f"{platform.system()} {platform.release()}",
               python=platform.python_version(), onnxruntime=onnxruntime.__version__, backend=args.backend,
               device=args.device, precision=session.precision, threads=args.threads,
               date=time.strftime("%Y-%m-%d"), time=time.strftime("%H:%M:%S %Z"))
    if args.device != "cpu":
        try:
            import torch

            out["gpu"] = torch.cuda.get_device_name()
        except Exception:
            pass
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from runtime import Session

    export_dir = args.export
    if export_dir is None:
        export_dir = ensure_export(args.model, max(8, args.target_batch, args.max_batch or 0), 4,
                                   validate=not args.smoke, progress=not args.smoke)
    session = Session(export_dir, backend=args.backend, device=args.device, threads=args.threads,
                      precision=args.precision, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk)
    try:
        if args.compare_prefill_chunk:
            return compare_chunks(args, session, export_dir)
        return run(args, session, export_dir)
    finally:
        session.close()


def run(args, session, export_dir: Path) -> dict:
    manifest = session.manifest
    workload = Workload(manifest, args.seed)
    pad = manifest.model.pad_token_id or 0
    rows = session.engine.capacity
    target_batch = min(args.target_batch, rows)
    items = workload.mixed(args.requests, tuple(args.prompt_tokens), tuple(args.images), tuple(args.new_tokens))
    shape = (args.target_prompt, 1, args.target_tokens)
    target = [workload.item(*shape) for _ in range(target_batch)]
    runner = Runner(session, pad)
    print(f"export {export_dir}: {len(items)} requests, {args.clients} clients, {rows} rows in flight; "
          f"images: {workload.image_source}", flush=True)

    settle()  # warm-up: first-run allocations, the engine thread, the cache pool
    runner.clients(items[:2], 2)
    run_job(session, batch_inputs(target[:2], pad), 2)

    results: dict[str, dict] = {}
    results["sequential"] = runner.scenario("sequential", runner.sequential, items)
    mean_latency = float(np.mean([r["latency_s"] for r in results["sequential"]["requests_detail"]
                                  if r["latency_s"] is not None] or [1.0]))
    rate = args.rate or args.clients / mean_latency
    gaps = np.random.default_rng(args.seed + 1).exponential(1.0 / rate, len(items))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
    if "poisson" in args.arrivals:
        results["poisson"] = runner.scenario("poisson", runner.clients, items, args.clients, arrivals)
        results["poisson"]["rate_per_s"] = rate
    if "closed" in args.arrivals:
        results["closed"] = runner.scenario("closed", runner.clients, items, args.clients)
    results["static"] = runner.scenario("static", runner.static, items, rows)
    results["concurrent8"] = runner.scenario("concurrent8", runner.clients, target, len(target))
    results["static8"] = runner.scenario("static8", runner.static, target, len(target))
    results["sequential8"] = runner.scenario("sequential8", runner.sequential, target)
    results["chat"] = runner.scenario("chat", runner.chat, workload, args.chat_turns, args.chat_question,
                                      args.chat_tokens)
    results["join"] = runner.scenario("join", runner.join, workload, shape, min(args.join_background, rows - 1),
                                      args.join_repeats)
    for name in ("poisson", "closed", "static"):
        if name in results:
            results[name]["tokens_match_sequential"] = matches(results["sequential"], results[name])
    for name in ("concurrent8", "static8"):
        results[name]["tokens_match_sequential"] = matches(results["sequential8"], results[name])

    later = results["chat"]["turns"][1:]
    ratios = {
        "concurrent8_over_static8_throughput": _ratio(results["concurrent8"]["throughput_tok_s"],
                                                      results["static8"]["throughput_tok_s"]),
        "concurrent8_over_sequential8_throughput": _ratio(results["concurrent8"]["throughput_tok_s"],
                                                          results["sequential8"]["throughput_tok_s"]),
        "join_over_solo_ttft": _ratio(results["join"]["joined_ttft_median_s"], results["join"]["solo_ttft_median_s"]),
        "chat_later_turns_vision_perceiver_s": sum(t["vision_perceiver_s"] for t in later) if later else None,
        "chat_later_turns_cached_images": [t.get("cached_images") for t in later],
    }
    for name in ("poisson", "closed"):
        if name in results:
            ratios[f"{name}_over_sequential_throughput"] = _ratio(results[name]["throughput_tok_s"],
                                                                  results["sequential"]["throughput_tok_s"])
    targets = {name: dict(value=ratios[name], target=f"{op} {bound}",
                          met=None if ratios[name] is None else
                          (ratios[name] >= bound if op == ">=" else ratios[name] <= bound))
               for name, (op, bound) in TARGETS.items()}
    for s in results.values():
        for r in s.get("requests_detail", []):
            r.pop("decode_steps_s", None)  # summarized (decode_step_p50_s); the JSON stays readable
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = dict(model=args.model if args.export is None else None, export=str(export_dir),
                  machine=machine(args, session), settings=settings, rows_in_flight=rows,
                  image_source=workload.image_source,
                  scenarios=results, ratios=ratios, targets=targets)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.png)
    print(table(result))
    print(f"wrote {args.json} and {args.png}")
    return result


def compare_chunks(args, session, export_dir: Path) -> dict:
    """The mixed workload with unchunked joins and with chunked ones (--compare-prefill-chunk N),
    alternated on one Session: see the module's docstring."""
    from runtime.engine import _chunk_runner

    _chunk_runner(session.graphs)  # refuses graphs whose prompts cannot run in chunks
    manifest, engine = session.manifest, session.engine
    workload = Workload(manifest, args.seed)
    pad = manifest.model.pad_token_id or 0
    items = workload.mixed(args.requests, tuple(args.prompt_tokens), tuple(args.images), tuple(args.new_tokens))
    runner = Runner(session, pad)
    chunks = list(dict.fromkeys(args.compare_prefill_chunk))
    settings_ = [None, *chunks]
    print(f"export {export_dir}: {len(items)} requests, {args.clients} clients, {engine.capacity} rows in flight; "
          f"unchunked joins against chunks of {chunks} tokens, {args.compare_rounds} rounds; "
          f"images: {workload.image_source}", flush=True)

    settle()  # warm-up, both ways (the chunks' shapes)
    for setting in settings_:
        engine.prefill_chunk = setting
        runner.clients(items[:2], 2)
    engine.prefill_chunk = None
    sequential = runner.scenario("sequential", runner.sequential, items)
    mean_latency = float(np.mean([r["latency_s"] for r in sequential["requests_detail"]
                                  if r["latency_s"] is not None] or [1.0]))
    rate = args.rate or args.clients / mean_latency
    gaps = np.random.default_rng(args.seed + 1).exponential(1.0 / rate, len(items))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
    runs: list[dict] = []
    for round_ in range(args.compare_rounds):
        order = settings_ if round_ % 2 == 0 else settings_[::-1]
        for arrival in args.arrivals:
            for setting in order:
                engine.prefill_chunk = setting  # the engine is idle between scenarios
                name = f"{arrival} round {round_ + 1}, {'chunk ' + str(setting) if setting else 'unchunked'}"
                s = runner.scenario(name, runner.clients, items, args.clients,
                                    arrivals if arrival == "poisson" else None)
                s.update(arrival=arrival, prefill_chunk=setting, round=round_ + 1,
                         tokens_match_sequential=matches(sequential, s))
                runs.append(s)
    engine.prefill_chunk = args.prefill_chunk

    def pooled(setting, arrival=None) -> dict:
        chosen = [s for s in runs if s["prefill_chunk"] == setting and arrival in (None, s["arrival"])]
        records = [r for s in chosen for r in s["requests_detail"]]
        out = summary(records, sum(s["seconds"] for s in chosen))
        out.update(scenarios=len(chosen), tokens_match_sequential=dict(
            same=sum(s["tokens_match_sequential"]["same"] for s in chosen),
            of=sum(s["tokens_match_sequential"]["of"] for s in chosen)))
        return out

    configs = {}
    for setting in settings_:
        key = f"chunk {setting}" if setting else "unchunked"
        configs[key] = dict(all=pooled(setting), **{arrival: pooled(setting, arrival) for arrival in args.arrivals})
    off = configs["unchunked"]["all"]
    ratios = {"unchunked_itl_p95_over_decode_step": _ratio(off["itl_p95_s"], off["decode_step_p50_s"])}
    bounds = {}
    for chunk in chunks:
        on = configs[f"chunk {chunk}"]["all"]
        ratios.update({
            f"chunk{chunk}_itl_p95_over_decode_step": _ratio(on["itl_p95_s"], on["decode_step_p50_s"]),
            # the unchunked engine's plain step: the streams' step without chunking's fewer rows per step
            f"chunk{chunk}_itl_p95_over_unchunked_decode_step": _ratio(on["itl_p95_s"], off["decode_step_p50_s"]),
            f"chunk{chunk}_over_unchunked_throughput": _ratio(on["throughput_tok_s"], off["throughput_tok_s"]),
            f"chunk{chunk}_over_unchunked_itl_p95": _ratio(on["itl_p95_s"], off["itl_p95_s"]),
            f"chunk{chunk}_over_unchunked_ttft_p50": _ratio(on["ttft_p50_s"], off["ttft_p50_s"]),
        })
        bounds.update({f"chunk{chunk}_itl_p95_over_decode_step": ("<=", 2.0),
                       f"chunk{chunk}_over_unchunked_throughput": (">=", 0.9)})
    targets = {name: dict(value=ratios[name], target=f"{op} {bound}",
                          met=None if ratios[name] is None else
                          (ratios[name] >= bound if op == ">=" else ratios[name] <= bound))
               for name, (op, bound) in bounds.items()}
    for s in [sequential, *runs]:
        for r in s["requests_detail"]:
            r.pop("decode_steps_s", None)  # summarized; the JSON stays readable
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = dict(model=args.model if args.export is None else None, export=str(export_dir),
                  machine=machine(args, session), settings=settings, rows_in_flight=engine.capacity,
                  image_source=workload.image_source, rate_per_s=rate, sequential=sequential,
                  configs=configs, runs=runs, ratios=ratios, targets=targets)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(chunk_table(result))
    print(f"wrote {args.json}")
    return result


def chunk_table(result: dict) -> str:
    def f(v, scale=1.0, digits=3):
        return "-" if v is None else f"{v * scale:.{digits}f}"

    lines = ["| joins | arrivals | requests | tok/s | TTFT p50 / p95 / p99 s | inter-token p50 / p95 / p99 ms | "
             "decode step p50 ms | same tokens as sequential |", "|---|---|---|---|---|---|---|---|"]
    for name, config in result["configs"].items():
        for arrival, s in config.items():
            same = s["tokens_match_sequential"]
            lines.append(f"| {name} | {arrival} | {s['requests']} | {s['throughput_tok_s']:.1f} | "
                         f"{f(s['ttft_p50_s'])} / {f(s['ttft_p95_s'])} / {f(s['ttft_p99_s'])} | "
                         f"{f(s['itl_p50_s'], 1e3, 1)} / {f(s['itl_p95_s'], 1e3, 1)} / {f(s['itl_p99_s'], 1e3, 1)} | "
                         f"{f(s['decode_step_p50_s'], 1e3, 1)} | {same['same']}/{same['of']} |")
    lines.append("")
    for name, value in result["ratios"].items():
        lines.append(f"{name}: {f(value)}")
    for name, t in result["targets"].items():
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {name}: {f(t['value'])} (target {t['target']}): {verdict}")
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or not b else a / b


def table(result: dict) -> str:
    def f(v, scale=1.0, digits=3):
        return "-" if v is None else f"{v * scale:.{digits}f}"

    lines = ["| scenario | requests | errors | tokens | seconds | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | "
             "ITL p95 ms | same tokens as sequential |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["scenarios"].items():
        same = s.get("tokens_match_sequential")
        same = "-" if same is None else f"{same['same']}/{same['of']}"
        lines.append(f"| {name} | {s['requests']} | {s['errors']} | {s['tokens']} | {s['seconds']:.2f} | "
                     f"{s['throughput_tok_s']:.1f} | {f(s['ttft_p50_s'])} | {f(s['ttft_p95_s'])} | "
                     f"{f(s['itl_p50_s'], 1e3, 1)} | {f(s['itl_p95_s'], 1e3, 1)} | "
                     f"{same} |")
    lines += ["", "| chat turn | prompt tokens | vision+perceiver s | cached images | TTFT s |",
              "|---|---|---|---|---|"]
    for t in result["scenarios"]["chat"]["turns"]:
        lines.append(f"| {t['turn']} | {t['prompt_tokens']} | {t['vision_perceiver_s']:.4f} | "
                     f"{t.get('cached_images', '-')} | {f(t['ttft_s'])} |")
    join = result["scenarios"]["join"]
    lines += ["", f"join: TTFT {f(join['joined_ttft_median_s'])} s with {join['background']} others decoding, "
                  f"{f(join['solo_ttft_median_s'])} s alone (medians of {join['repeats']})", ""]
    for name, t in result["targets"].items():
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {name}: {f(t['value'])} (target {t['target']}): {verdict}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = result["scenarios"]
    names = list(scen)
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    ax = axes[0, 0]
    ax.bar(x, [scen[n]["throughput_tok_s"] for n in names], color="tab:blue")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("generated tokens/s")
    r = result["ratios"]
    ax.set_title("throughput; concurrent8/static8 = "
                 + ("-" if r["concurrent8_over_static8_throughput"] is None
                    else f"{r['concurrent8_over_static8_throughput']:.2f}") + " (target >= 0.9)")
    for ax, (key, scale, label) in zip([axes[0, 1], axes[1, 0]], [("ttft", 1.0, "time to first token (s)"),
                                                                  ("itl", 1e3, "inter-token latency (ms)")]):
        for offset, q in ((-0.2, "p50"), (0.2, "p95")):
            ax.bar(x + offset, [(scen[n][f"{key}_{q}_s"] or 0.0) * scale for n in names], 0.4, label=q)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(label)
        ax.legend()
    ax = axes[1, 1]
    turns = scen["chat"]["turns"]
    t = np.arange(1, len(turns) + 1)
    ax.bar(t - 0.2, [u["vision_perceiver_s"] for u in turns], 0.4, label="vision + perceiver s")
    ax.bar(t + 0.2, [u["ttft_s"] or 0.0 for u in turns], 0.4, label="TTFT s")
    ax.set_xticks(t, [f"turn {k}\n{u.get('cached_images', 0)} cached" for k, u in zip(t, turns)])
    ax.set_title("chat, same image each turn; join TTFT / solo = "
                 + ("-" if r["join_over_solo_ttft"] is None else f"{r['join_over_solo_ttft']:.2f}") + " (target <= 2)")
    ax.legend()
    m = result["machine"]
    source = result["model"] or result["export"]
    fig.suptitle(f"Serving load, {source} {m['precision']} on {m['backend']}:{m['device']}; {m['processor']}, "
                 f"{m['cpus']} CPUs, {m['os']}; {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
