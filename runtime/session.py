"""`Session`: load an export and generate text from interleaved text-and-image prompts.

    s = Session("out/")                       # backend="onnxruntime", device="cpu"
    r = s.generate(prompts=[["User:", image, "What is this?<end_of_utterance>\\nAssistant:"]],
                   max_new_tokens=32)
    r.sequences, r.texts, r.timings
    for piece in s.stream(prompts=[...]): print(piece, end="")
    r = await s.agenerate(prompts=[...]);  async for piece in s.astream(prompts=[...]): ...

Requests are checked against the manifest's limits before anything runs, in the caller's thread.
Then the Session's engine (`runtime.engine`) runs them: concurrent calls from several threads or
tasks share decode steps (in-flight batching), and each gets the tokens it would get alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import numpy as np

from runtime import cpu
from runtime.cache import int8_cache_scales
from runtime.engine import Engine, Job
from runtime.loop import Graphs, Request, Step
from runtime.errors import ToolkitError
from runtime.manifest import Manifest
from runtime.memory import memory_for
from runtime.plan import GraphPlan, check_backend, plan_graphs
from runtime.chat import chat_generation_settings, load_image_url, messages_to_prompt
from runtime.prompts import PromptEncoder, build_prompt
from runtime.runners import create_runner
from runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """What `Session.generate` and `Session.agenerate` return for one call.

    Attributes:
        sequences: [batch, prompt + new] int64: the prompt's ids followed by the new tokens, the
            layout and values of transformers' `IdeficsForVisionText2Text.generate`. A row that
            finished early (an end-of-sequence token) is padded with `pad_token_id`.
        prompt_length: Columns of `sequences` that are the prompt (left padding included).
        texts: The decoded new text of each row (special tokens skipped), or None when the export
            has no processor files.
        timings: Seconds spent on the request: "vision", "perceiver", "prefill", "decode" (a list,
            one per decode step), "queued" (from the call to its first decode step in the shared
            batch), "first_token" (from the call to its first token), and "cached_images" (how many
            of its images came from the image cache).
        logits: [batch, new, vocab] raw logits of every step with `output_logits=True`, else None.
    """

    sequences: np.ndarray
    prompt_length: int
    texts: list[str] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    logits: np.ndarray | None = None

    @property
    def new_tokens(self) -> np.ndarray:
        """[batch, new] int64: the generated tokens, `sequences` without the prompt."""
        return self.sequences[:, self.prompt_length:]


class Session:
    """An export loaded for generation: text from prompts of interleaved text and images.

    A Session loads the graphs an `idefics-export` folder holds (which ones: `runtime.plan`) on
    ONNX Runtime (CPU or CUDA), TensorRT, or the FP32 PyTorch modules as a reference, and generates
    as transformers' `generate` does, its settings with the same meanings and defaults. Calls from
    several threads or asyncio tasks at once share decode steps (in-flight batching in
    `runtime.engine`), and each gets the tokens it would get alone. Requests are checked against
    the export's limits in the caller's thread before anything runs. Close it (or use it as a
    context manager) to end its engine thread and free its graphs.

    Example:
        ```python
        from PIL import Image
        from runtime import Session

        with Session("out/") as s:  # ONNX Runtime on the CPU, the export's fastest precision there
            prompt = ["User:", Image.open("cat.png"), "What is this?<end_of_utterance>\\nAssistant:"]
            r = s.generate(prompts=[prompt], max_new_tokens=32, bad_words_ids=s.image_bad_words)
            print(r.texts[0])
            for piece in s.stream(prompts=[prompt], max_new_tokens=32):
                print(piece, end="", flush=True)
        ```

    Attributes:
        folder: The export folder.
        backend: "onnxruntime", "tensorrt" or "torch".
        device: "cpu", "cuda" or "cuda:N".
        manifest: The export's manifest.
        plan: The graphs loaded, their precisions and flavour (`runtime.plan.GraphPlan`).
        precision: The precision the decoder runs in ("fp32", "fp16", "int8", "int8wo" or "int4wo").
        flavour: "ort" when an ONNX Runtime-optimized graph runs, else "portable".
        graphs: The loaded graphs as the generation loop runs them (`runtime.loop.Graphs`).
        encoder: Turns prompts into ids and ids into text; None when the export has no processor
            files (then pass `input_ids` and read `sequences`).
        engine: The in-flight batching engine the requests run in.
    """

    def __init__(self, path: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int | None = None, verify: bool = True, precision: str | None = None,
                 prefill_precision: str | None = None, max_batch: int | None = None,
                 image_cache_bytes: int = 256 * 2**20, max_queued: int | None = None, portable: bool = False,
                 prefill_chunk: int | None = None):
        """Load the export in `path`.

        Which graphs load is `runtime.plan.plan_graphs`'s choice (`self.plan`):

        - The decoder runs in `precision`; by default (`runtime.manifest.default_precision`) the
          fastest the export has for the backend and device: int8wo, else int4wo, else fp32 on ONNX Runtime's
          CPU; fp16, else int8, else fp32 on a GPU. backend="torch" runs the FP32 PyTorch modules
          the FP32 graphs were traced from. `self.precision` says which was loaded.
        - `prefill_precision` runs the images and the prompt (vision, perceiver, prefill) in that
          precision instead, decoding in `precision`: e.g. "fp32" with "int8wo", whose INT8
          weight-only decoder decodes faster on the CPU but is slower on long inputs.
        - On backend="onnxruntime", an export with ONNX Runtime-optimized graphs
          (idefics-export --ort-optimized) runs those the manifest lists for the device: the
          vision / perceiver (fused Attention, LayerNorm, Gelu) of the precision the images run in,
          and the decoder of the decode precision (GroupQueryAttention over a shared cache; on CUDA
          the FP16 one only, as CUDA's GroupQueryAttention takes FP16 only). With that decoder,
          prompts run in the ORT prompt or decoder graph of their precision when exported, else in
          the portable decoder; the portable decoder of whole sequences loads on first use.
          `portable=True` loads the standard graphs only. `self.flavour` says which ran: "ort" or
          "portable".

        Args:
            path: The idefics-export output folder.
            backend: "onnxruntime", "tensorrt" (device="cuda" only) or "torch" (the reference).
            device: "cpu", "cuda" or "cuda:N".
            threads: ONNX Runtime's intra-op threads per graph (None: ONNX Runtime's default;
                ignored by the other backends).
            verify: Check the sha256 of every file this session reads against the manifest.
            precision: "fp32", "fp16", "int8", "int8wo" or "int4wo"; None: the default above.
            prefill_precision: Run images and prompts in this precision; None: in `precision`.
            max_batch: Request rows in flight at once, sharing decode steps (default: the export's
                max_batch).
            image_cache_bytes: Bound of the cache of images' cross-attention K/V across requests
                (0 turns it off).
            max_queued: Requests waiting for rows at most; past it a call fails at once (None: no
                bound).
            portable: Load the standard graphs only, never the ONNX Runtime-optimized ones.
            prefill_chunk: A request joining others in flight runs in pieces, one between two of
                their decode steps (each image's vision and perceiver, then its prompt in chunks
                of this many tokens), so that the running streams are not stalled for a whole
                join; the tokens are those of the unchunked engine. None or 0 (the default): each
                join runs whole between two steps. Over the ONNX Runtime decoder the chunks run
                in the portable decoder of whole sequences (loaded on first use).

        Raises:
            ManifestError: The folder holds no readable manifest, lacks the precision's graphs
                (the message names the idefics-export flag that writes them), comes from an older
                idefics-export, or a file is missing or differs from its sha256 (with `verify`).
            ValueError: An unknown backend or device, options the backend cannot run
                (backend="torch" with a reduced precision or `prefill_precision`), precisions
                whose caches do not match, or a `max_batch` / `image_cache_bytes` out of range.
            ToolkitError: The backend's GPU packages are missing, or INT8 graphs would run on this
                CPU's saturating INT8 kernels.
        """
        check_backend(backend, device)
        self.folder = Path(path)
        self.backend, self.device = backend, device
        self.manifest = Manifest.load(self.folder)
        self.plan: GraphPlan = plan_graphs(self.manifest, backend, device, precision, prefill_precision, portable,
                                           folder=self.folder)
        plan = self.plan
        if plan.defaulted:
            log.info("%s: loading %s, the default on %s %s among %s", self.folder, plan.precision, backend, device,
                     ", ".join(["fp32", *self.manifest.variants]))
        self.precision = plan.precision
        if backend == "onnxruntime" and device == "cpu":
            refuse_saturating_int8([plan.precision, plan.prefill_precision])
        self.flavour = plan.flavour
        if verify:
            self.manifest.verify_files(self.folder, plan.files + self.manifest.processor_files)
        require_backend(backend, device)
        memory = memory_for(device)
        if backend == "torch":  # the reference: the modules the graphs were traced from, FP32 only
            from runtime.runners.torch import TorchRunner, load_modules

            modules = load_modules(self.manifest)
            runners = {name: TorchRunner(spec, modules[name], device) for name, spec in plan.graphs.items()}
        else:
            runners = {name: create_runner(backend, spec, self.folder, device, threads, hot=name == "decoder",
                                           stream=memory.stream_handle, manifest=self.manifest)
                       for name, spec in plan.graphs.items()}
        try:
            for runner in runners.values():
                runner.activate()
        except BaseException:
            for runner in runners.values():
                runner.deactivate()
            raise
        prefill = prompt = None
        if plan.prefill is not None:
            prefill = create_runner(backend, plan.prefill.spec, self.folder, device, threads, hot=False,
                                    stream=memory.stream_handle, manifest=self.manifest)
            if plan.prompt is None:
                prefill.activate()
        if plan.prompt is not None:
            prompt = runners["decoder"] if plan.prompt_is_decoder else create_runner(
                backend, plan.prompt.spec, self.folder, device, threads, hot=False, stream=memory.stream_handle,
                manifest=self.manifest)
            prompt.activate()
        # an FP32 prompt before int8wo steps: its K/V are quantized into the INT8 cache (Graphs
        # refuses any other pair of cache dtypes)
        kv_scales = int8_cache_scales(self.folder / plan.decoder.file) if plan.quantize_prompt_kv else None
        self.graphs = Graphs(self.manifest, runners, prefill, memory, prompt, kv_scales)
        self.encoder = PromptEncoder(self.folder) if self.manifest.processor_files else None
        self.engine = Engine(self.graphs, self.manifest.limits.max_batch if max_batch is None else max_batch,
                             image_cache_bytes, max_queued, prefill_chunk)

    # ------------------------------------------------------------ public API
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_attention_mask=None,
                 *, prompts: Sequence[Sequence[Any]] | None = None, messages: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> GenerateResult:
        """Generate new tokens for a batch of prompts, blocking until every row has finished.

        Pass either `prompts` (needs the export's processor files) or transformers-style tensors
        (numpy arrays or torch tensors, e.g. IdeficsProcessor's output).

        Args:
            input_ids (numpy.ndarray | torch.Tensor | None): [batch, seq] token ids, left-padded.
            attention_mask (numpy.ndarray | torch.Tensor | None): [batch, seq] 1 for tokens, 0 for left
                padding (default: all ones).
            pixel_values (numpy.ndarray | torch.Tensor | None): [batch, images, 3, H, W] float images at the
                export's image size, or None for text only.
            image_attention_mask (numpy.ndarray | torch.Tensor | None): [batch, seq, images] which image each
                token attends to; required with `pixel_values`.
            prompts: Prompts, each a list of str and PIL images in the order they are read (one
                such list alone is one prompt).
            messages: Instead of prompts, one conversation as OpenAI chat messages (system, user and
                assistant; content parts text and image_url with a data: URL or a local file path),
                turned into IDEFICS's instruct format by `runtime.chat.messages_to_prompt`; generation
                then also stops at <end_of_utterance> and never emits image tokens
                (`runtime.chat.chat_generation_settings`) unless the settings say otherwise.
            **settings: Generation settings with transformers' meanings and defaults:
                max_new_tokens (20), min_new_tokens, do_sample, temperature, top_k, top_p,
                repetition_penalty, eos_token_id, pad_token_id, bad_words_ids, seed (numpy's
                generator), output_logits.

        Returns:
            The sequences, decoded texts, timings and (with output_logits=True) logits.

        Raises:
            ValueError: A malformed request or one the export cannot take (length, images, image
                size, mask layout: the message names the argument and the limit), checked before
                any graph runs. More prompts than the session's max_batch are not refused: they
                are queued in parts of max_batch rows (each part decodes as its own request, so a
                seeded sampler draws per part; with output_logits, the steps after a part ended
                hold NaN), and the result is the rows in order, as one call gives.
            TypeError: An unknown setting or an input of the wrong type.
            ToolkitError: `max_queued` requests already wait, or the session is closed or its
                engine stopped.

        Example:
            ```python
            r = session.generate(prompts=[["User:", image, "Describe it.<end_of_utterance>\\nAssistant:"]],
                                 max_new_tokens=32)
            r.texts[0], r.new_tokens.shape
            ```
        """
        prompts, settings = self._chat(messages, prompts, settings)
        jobs = self._submit_parts(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        with _cancel_unless_finished(*jobs):
            return self._results(jobs, [list(job.steps()) for job in jobs])

    def stream(self, input_ids=None, attention_mask=None, pixel_values=None, image_attention_mask=None,
               *, prompts: Sequence[Sequence[Any]] | None = None, messages: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> Iterator[str | list[str]]:
        """Yield new text as it is produced.

        Takes the arguments of `generate`, and needs the export's processor files (to decode). An
        incomplete UTF-8 character is held back until it completes. Closing the generator (or
        leaving the loop early) frees the request's rows.

        Yields:
            A str for one prompt, or a list of str (one per prompt, "" where a row has nothing new)
            for several; only when some row has new text.

        Raises:
            ValueError: The export has no processor files, or a request `generate` would refuse.

        Example:
            ```python
            for piece in session.stream(prompts=[prompt], max_new_tokens=64):
                print(piece, end="", flush=True)
            ```
        """
        prompts, settings = self._chat(messages, prompts, settings)
        texts, job = self._stream_start(input_ids, attention_mask, pixel_values, image_attention_mask, prompts,
                                        settings)
        with _cancel_unless_finished(job):
            for step in job.steps():
                piece = self._pieces(texts, step)
                if piece is not None:
                    yield piece

    async def agenerate(self, input_ids=None, attention_mask=None, pixel_values=None, image_attention_mask=None,
                        *, prompts: Sequence[Sequence[Any]] | None = None, messages: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> GenerateResult:
        """`generate` for asyncio: awaits the engine without holding a thread.

        Takes the arguments of `generate` and returns its result; cancelling the awaiting task frees
        the request's rows.

        Example:
            ```python
            r = await session.agenerate(prompts=[prompt], max_new_tokens=32)
            ```
        """
        prompts, settings = self._chat(messages, prompts, settings)
        jobs = self._submit_parts(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        with _cancel_unless_finished(*jobs):
            steps = []
            for job in jobs:  # (an async comprehension inside a list comprehension needs Python 3.11)
                steps.append([step async for step in job.asteps()])
            return self._results(jobs, steps)

    async def astream(self, input_ids=None, attention_mask=None, pixel_values=None, image_attention_mask=None,
                      *, prompts: Sequence[Sequence[Any]] | None = None, messages: Sequence[Mapping[str, Any]] | None = None, **settings: Any) -> AsyncIterator[str | list[str]]:
        """`stream` for asyncio: yields new text as it is produced, without holding a thread.

        Takes the arguments of `generate` and yields what `stream` yields; cancelling the task or
        closing the iterator frees the request's rows.

        Example:
            ```python
            async for piece in session.astream(prompts=[prompt], max_new_tokens=64):
                await websocket.send(piece)
            ```
        """
        prompts, settings = self._chat(messages, prompts, settings)
        texts, job = self._stream_start(input_ids, attention_mask, pixel_values, image_attention_mask, prompts,
                                        settings)
        with _cancel_unless_finished(job):
            async for step in job.asteps():
                piece = self._pieces(texts, step)
                if piece is not None:
                    yield piece

    def metrics(self) -> dict:
        """The engine's metrics now, as a plain dict (names and meanings: `runtime.metrics`):
        counters and gauges as numbers, "idefics_requests_failed_total" as {reason: count}, and the
        histograms as {"buckets": {upper bound: cumulative count}, "sum": seconds, "count": n}.

        Example:
            ```python
            m = session.metrics()
            m["idefics_generated_tokens_total"], m["idefics_queue_size"]
            ```
        """
        return self.engine.metrics.snapshot()

    @property
    def image_bad_words(self) -> list[list[int]]:
        """`bad_words_ids` that ban the image tokens (`<image>`, `<fake_token_around_image>`), as
        IDEFICS's examples do; empty when the export has no processor files."""
        return [[i] for i in self.manifest.model.image_token_ids]

    def close(self) -> None:
        """End the engine thread and free the graphs; requests still waiting or running end with
        an error (`runtime.engine.Cancelled`). Leaving a `with Session(...)` block calls it."""
        self.engine.close()
        g = self.graphs
        for runner in (g.vision, g.perceiver, g.decoder, g.prefill_decoder, g.prompt_decoder):
            runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ requests
    def _chat(self, messages, prompts, settings) -> tuple[Any, dict]:
        """messages= -> (prompts, settings): the chat template and the chat generation settings."""
        if messages is None:
            return prompts, settings
        if prompts is not None:
            raise ValueError("pass either messages= or prompts=, not both")
        if self.encoder is None:
            raise ValueError(f"{self.folder}: this export has no processor files; messages need a tokenizer")
        chat = messages_to_prompt(messages)
        images = [load_image_url(url, param, allowed_dir="/") for url, param in zip(chat.images, chat.params)]
        items = build_prompt(chat.text, images, max_images=self.manifest.limits.max_images, labels=chat.params)
        return [items], {**chat_generation_settings(self.encoder.tokenizer, self.manifest), **settings}

    def _submit(self, input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings) -> Job:
        request, cfg = self._checked(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        if request.input_ids.shape[0] > self.engine.capacity:
            self.engine.metrics.fail("bad_request")
            raise ValueError(f"input_ids: batch {request.input_ids.shape[0]} exceeds this session's max_batch "
                             f"{self.engine.capacity}; generate() and agenerate() queue larger batches in parts")
        return self.engine.submit(request, cfg)

    def _submit_parts(self, input_ids, attention_mask, pixel_values, image_attention_mask, prompts,
                      settings) -> list[Job]:
        """The request as jobs of at most max_batch rows each (one job when it fits), all queued now."""
        request, cfg = self._checked(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        size, jobs = self.engine.capacity, []
        try:
            for begin in range(0, request.input_ids.shape[0], size):
                jobs.append(self.engine.submit(_rows(request, slice(begin, begin + size)), cfg))
        except BaseException:
            for job in jobs:  # a later part refused (the queue is full): the earlier ones go too
                job.cancel()
            raise
        return jobs

    def _checked(self, input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings):
        try:
            return self._prepare(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        except (ValueError, TypeError):
            self.engine.metrics.fail("bad_request")
            raise

    def _stream_start(self, input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings):
        if self.encoder is None:
            raise ValueError(f"{self.folder}: this export has no processor files, so there is no text to stream")
        job = self._submit(input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings)
        return [TextStream(self.encoder) for _ in range(job.rows)], job

    @staticmethod
    def _pieces(texts: list[TextStream], step: Step) -> str | list[str] | None:
        pieces = [text.add(int(token), step.last) for text, token in zip(texts, step.tokens)]
        if not any(pieces):
            return None
        return pieces[0] if len(pieces) == 1 else pieces

    def _results(self, jobs: list[Job], steps: list[list[Step]]) -> GenerateResult:
        """One result from the parts of a call, rows in order; a part that ended before the longest
        one is padded as a finished row is in one call (its pad token; NaN logits)."""
        new = max(len(part) for part in steps)
        pad = _pad_id(self.manifest, jobs[0].cfg)
        tokens, logits = [], []
        for job, part in zip(jobs, steps):
            rows = np.stack([s.tokens for s in part], axis=1)
            tokens.append(np.pad(rows, ((0, 0), (0, new - rows.shape[1])), constant_values=pad))
            if job.cfg.output_logits:
                values = np.stack([s.logits for s in part], axis=1)
                logits.append(np.pad(values, ((0, 0), (0, new - values.shape[1]), (0, 0)), constant_values=np.nan))
        ids = np.concatenate([job.req.input_ids for job in jobs])
        sequences = np.concatenate([ids, np.concatenate(tokens)], axis=1)
        prompt_length = ids.shape[1]
        texts = [self.encoder.decode(row) for row in sequences[:, prompt_length:]] if self.encoder else None
        return GenerateResult(sequences, prompt_length, texts, _timings(jobs), np.concatenate(logits) if logits else None)

    def _prepare(self, input_ids, attention_mask, pixel_values, image_attention_mask, prompts, settings):
        cfg = SamplingConfig.from_kwargs(**settings)
        if prompts is not None:
            if input_ids is not None or pixel_values is not None:
                raise ValueError("pass either prompts= or input_ids/pixel_values, not both")
            if self.encoder is None:
                raise ValueError(f"{self.folder}: this export has no processor files; pass input_ids instead of prompts")
            enc = self.encoder.encode(prompts)
            has_images = bool(enc.image_attention_mask.any()) or bool(enc.pixel_values.any())
            input_ids, attention_mask = enc.input_ids, enc.attention_mask
            image_attention_mask = enc.image_attention_mask
            pixel_values = enc.pixel_values if has_images else None
        elif input_ids is None:
            raise ValueError("generate() needs input_ids or prompts")
        request = check_request(self.manifest, input_ids, attention_mask, pixel_values, image_attention_mask,
                                batch_limit=False)
        check_length(self.manifest, request.input_ids.shape[1], cfg.max_new_tokens)
        return request, cfg


def _rows(request: Request, rows: slice) -> Request:
    """Some rows of a checked request (its columns, padding included, unchanged)."""
    return Request(request.input_ids[rows], request.attention_mask[rows],
                   None if request.pixel_values is None else request.pixel_values[rows],
                   request.image_attention_mask[rows])


def _pad_id(manifest: Manifest, cfg: SamplingConfig) -> int:
    """The token a finished row is padded with (as `runtime.loop.Decoding` chooses it)."""
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    if manifest.model.pad_token_id is not None:
        return int(manifest.model.pad_token_id)
    eos = cfg.eos_ids() or manifest.model.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or ())
    return int(eos[0]) if eos else 0


def _timings(jobs: list[Job]) -> dict[str, Any]:
    """A call's timings; for a call run in parts: the graphs' seconds and cached images summed,
    "queued" / "first_token" of the last part to start, "decode" the parts' steps one after another."""
    if len(jobs) == 1:
        return dict(jobs[0].timings)
    parts = [job.timings for job in jobs]
    out = {key: sum(t[key] for t in parts) for key in ("vision", "perceiver", "prefill", "cached_images")}
    for key in ("queued", "first_token"):
        values = [t[key] for t in parts if t[key] is not None]
        out[key] = max(values) if values else None
    out["decode"] = [s for t in parts for s in t["decode"]]
    out["parts"] = len(jobs)
    return out


class _cancel_unless_finished:
    """Cancel the jobs when their caller leaves early (an exception, a closed stream, a cancelled task)."""

    def __init__(self, *jobs: Job):
        self.jobs = jobs

    def __enter__(self):
        return self.jobs[0]

    def __exit__(self, *exc):
        for job in self.jobs:
            if not job.finished:
                job.cancel()


class TextStream:
    """New text of one row as tokens arrive, holding back an incomplete UTF-8 sequence (byte-fallback
    tokens) until it completes or generation ends."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder, self.tokens, self.shown = encoder, [], ""

    def add(self, token: int, last: bool) -> str:
        self.tokens.append(token)
        text = self.encoder.decode(self.tokens)
        piece = text[len(self.shown):] if last or not text.endswith("\ufffd") else ""
        self.shown += piece
        return piece


def refuse_saturating_int8(precisions) -> None:
    """Refuse INT8 graphs where this process would run them on saturating INT8 kernels: a CPU
    without AVX-512 VNNI with runtime.cpu's native mode asked for (they would give wrong results)."""
    int8 = [p for p in precisions if p in ("int8", "int8wo", "int4wo")]  # int4wo: INT8 products (accuracy 4)
    if int8 and cpu.int8_kernels() == "u8s8-saturating":
        raise ToolkitError(
            f"precision {int8[0]!r} needs exact INT8 products, and this CPU has no AVX-512 VNNI: with "
            f"{cpu.ENV}=native ONNX Runtime's u8 x s8 kernel adds pairs of products in saturating 16-bit "
            f"lanes here; unset {cpu.ENV} (its default, auto, uses the exact u8 x u8 kernel on this CPU)")


def require_backend(backend: str, device: str) -> None:
    """Name the package to install when the backend's GPU pieces are missing (before loading anything)."""
    if backend == "tensorrt":
        from runtime.engines import require_tensorrt

        require_tensorrt()
    elif backend == "onnxruntime" and device != "cpu":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ToolkitError(f"device={device!r} needs onnxruntime-gpu (this onnxruntime {onnxruntime.__version__} "
                               "has no CUDAExecutionProvider): pip uninstall onnxruntime && pip install onnxruntime-gpu")


def check_length(manifest: Manifest, length: int, max_new_tokens: int) -> None:
    limit = manifest.limits.max_seq_len
    if length + max_new_tokens > limit:
        raise ValueError(
            f"prompt has {length} tokens and max_new_tokens is {max_new_tokens}: {length + max_new_tokens} "
            f"in all; this export allows at most {limit} (idefics-export --max-seq-len)"
        )


def _array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}") from exc


def _integers(name: str, value: Any, rank: int, layout: str, allow_bool: bool = False) -> np.ndarray:
    array = _array(name, value)
    if allow_bool and array.dtype == bool:  # IdeficsProcessor returns a bool image mask for text-only prompts
        array = array.astype(np.int64)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array {layout}, got dtype {array.dtype}")
    if array.ndim != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def check_request(manifest: Manifest, input_ids, attention_mask, pixel_values, image_attention_mask,
                  *, batch_limit: bool = True) -> Request:
    """Validate and normalise a request against the export; errors name the argument and the limit.
    `batch_limit=False`: any batch (Session.generate queues one over max_batch in parts)."""
    info, limits = manifest.model, manifest.limits
    ids = _integers("input_ids", input_ids, 2, "[batch, seq]")
    b, t = ids.shape
    if b < 1 or t < 1:
        raise ValueError(f"input_ids: expected a non-empty [batch, seq] array, got shape {ids.shape}")
    if batch_limit and b > limits.max_batch:
        raise ValueError(f"input_ids: batch {b} exceeds this export's max_batch {limits.max_batch} (--max-batch)")
    if ids.min() < 0 or ids.max() >= info.vocab_size:
        raise ValueError(f"input_ids: token ids must lie in [0, {info.vocab_size}); got {ids.min()}..{ids.max()}")
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = _integers("attention_mask", attention_mask, 2, "[batch, seq]", allow_bool=True)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape} differs from input_ids {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask: values must be 0 or 1")
        if (mask[:, -1] == 0).any() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError("attention_mask: padding must be on the left (generation appends on the right)")

    if pixel_values is None:
        if image_attention_mask is not None and _array("image_attention_mask", image_attention_mask).any():
            raise ValueError("image_attention_mask attends to images but pixel_values is None")
        return Request(ids, mask, None, np.zeros((b, t, 1), np.int64))

    pixels = _array("pixel_values", pixel_values)
    if not np.issubdtype(pixels.dtype, np.floating):
        raise TypeError(f"pixel_values: expected a float array [batch, images, 3, H, W], got dtype {pixels.dtype}")
    if pixels.ndim != 5 or pixels.shape[0] != b or pixels.shape[2] != 3:
        raise ValueError(
            f"pixel_values: expected shape [batch={b}, images, 3, {info.image_size}, {info.image_size}], "
            f"got {tuple(pixels.shape)}"
        )
    n = pixels.shape[1]
    if pixels.shape[3:] != (info.image_size, info.image_size):
        raise ValueError(
            f"pixel_values: images are {pixels.shape[3]}x{pixels.shape[4]}; this export takes "
            f"{info.image_size}x{info.image_size} (fixed at export)"
        )
    if not 1 <= n <= limits.max_images:
        raise ValueError(f"pixel_values: {n} images per prompt; this export allows 1 to {limits.max_images} (--max-images)")
    if image_attention_mask is None:
        raise ValueError("image_attention_mask [batch, seq, images] is required with pixel_values")
    image_mask = _integers("image_attention_mask", image_attention_mask, 3, "[batch, seq, images]", allow_bool=True)
    if image_mask.shape != (b, t, n):
        raise ValueError(f"image_attention_mask: expected shape {(b, t, n)} (batch, seq, images), got {image_mask.shape}")
    return Request(ids, mask, np.ascontiguousarray(pixels, dtype=np.float32), image_mask)
