"""The `idefics` Triton model (Python backend, decoupled): requests go to the toolkit's in-flight
batching engine, and responses are sent as tokens come.

Where the graphs run (the model config's "graphs" parameter, written by idefics-triton --graphs):
- "inprocess" (default): inside this model's own process, with the runners `Session` uses
  (ONNX Runtime CPU/CUDA, TensorRT) and the caches in device memory, as TensorRT-LLM's backend
  keeps its KV cache in the model instance. `execute` checks each request, hands it to the engine
  and returns; a thread per request sends its responses.
- "bls": the repository's vision / perceiver / decoder models, called through BLS by the same
  engine; every decode step sends the bound caches to the decoder model as request tensors
  (kept as an option and measured against in-process).

Request: "prompt" (text with one `<image>` placeholder per image) and "images" (encoded image
bytes, in placeholder order; never URLs or paths) or "images_base64" (the same, base64 text, for
JSON clients such as the HTTP generate endpoint), or transformers-style arrays for one prompt
("input_ids" [1,T], optional "attention_mask", "pixel_values" [1,I,3,H,W], "image_attention_mask").
Settings: the "settings" input (JSON: generation settings as Session.generate takes them, plus
"stream": true for a response per piece of text), or the request's own parameters (the HTTP
generate endpoint's "parameters" object).
Settings may say "chat": true (a chat turn, as the OpenAI frontend sends: generation also stops
at <end_of_utterance> and never emits image tokens, runtime.chat.chat_generation_settings).
Response: "text" (a piece per response when streaming, then the whole text) and "tokens" (the
new token ids: those since the previous response when streaming, all of them in the last),
"prompt_tokens" (the prompt's length in tokens), and in the last response "finish_reason" ("stop":
an end-of-sequence token; "length": max_new_tokens). A request that breaks a
limit gets an error response at once and never reaches the engine; a client that goes away
mid-stream frees its row at the next step, and one that goes away while its request waits for rows
(all busy) is seen within QUEUED_POLL_SECONDS: the request leaves the queue and never runs.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import importlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.engine import Engine, Job, Unavailable
from runtime.errors import ToolkitError
from runtime.chat import chat_generation_settings
from runtime.loop import Graphs, Request, _as_tuple
from runtime.manifest import GRAPH_NAMES, GraphSpec, Manifest
from runtime.metrics import COUNTERS, FAILURE_REASONS, GAUGES, HISTOGRAMS, LABELS, TIME_BUCKETS, Metrics
from runtime.prompts import PromptEncoder, build_prompt
from runtime.runners.base import BoundCall, CopyingBoundCall, Runner
from runtime.sampling import SamplingConfig
from runtime.session import Session, TextStream, check_length, check_request

log = logging.getLogger(__name__)

# how often a request waiting for rows checks whether its client went away (Triton's is_cancelled();
# a running request checks at every step): by its own responder thread, so the engine never waits on it
QUEUED_POLL_SECONDS = 0.05


class BlsRunner(Runner):
    """A graph served by another Triton model, called with Business Logic Scripting."""

    backend = "triton-bls"

    def __init__(self, spec: GraphSpec, pb):
        super().__init__(spec)
        self.pb = pb

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.spec.outputs]
        request = self.pb.InferenceRequest(
            model_name=self.spec.name, requested_output_names=names,
            inputs=[self.pb.Tensor(name, np.ascontiguousarray(array)) for name, array in feed.items()],
        )
        response = request.exec()
        if response.has_error():
            raise ToolkitError(f"model {self.spec.name!r}: {response.error().message()}")
        return {name: self.pb.get_output_tensor_by_name(response, name).as_numpy() for name in names}

    def bind_impl(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> BoundCall:
        return CopyingBoundCall(self, inputs, outputs)


@dataclass(frozen=True)
class ServerConfig:
    """The idefics model's parameters (config.pbtxt), as idefics-triton writes them."""

    graphs: str = "inprocess"  # or "bls"
    backend: str = "onnxruntime"  # in-process runners: onnxruntime | tensorrt
    device: str = "cpu"  # in-process: cpu | cuda (the instance's GPU)
    precision: str | None = None
    max_batch: int | None = None  # rows in flight (None: the export's)
    max_queued: int = 64  # requests waiting for rows; past it, an error at once
    image_cache_bytes: int = 256 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 256
    prefill_chunk: int | None = None  # joins in pieces of this many prompt tokens (None: whole)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ServerConfig:
        known = {f: t for f, t in cls.__annotations__.items()}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            raise ToolkitError(f"idefics model config: unknown parameters {unknown}")
        values: dict[str, Any] = {}
        for key, raw in parameters.items():
            if raw == "":
                continue
            values[key] = int(raw) if "int" in known[key] else raw
        config = cls(**values)
        if config.graphs not in ("inprocess", "bls"):
            raise ToolkitError(f"idefics model config: graphs must be 'inprocess' or 'bls', got {config.graphs!r}")
        return config


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.pb = importlib.import_module("triton_python_backend_utils")
        model_config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        self.config = config = ServerConfig.from_parameters(parameters)
        folder = Path(args.get("export_dir") or Path(__file__).resolve().parent.parent / "export")
        if config.graphs == "bls":
            self.manifest = Manifest.load(folder)
            specs = self.manifest.graphs_for(config.precision)
            runners = {name: BlsRunner(specs[name], self.pb) for name in GRAPH_NAMES}
            for runner in runners.values():
                runner.activate()
            rows = config.max_batch or self.manifest.limits.max_batch
            self.engine = Engine(Graphs(self.manifest, runners), rows, config.image_cache_bytes, config.max_queued,
                                 config.prefill_chunk)
            self.encoder = PromptEncoder(folder) if self.manifest.processor_files else None
            self.session = None
        else:
            device = config.device
            if device == "cuda" and args.get("model_instance_kind") == "GPU":
                device = f"cuda:{args.get('model_instance_device_id', 0)}"
            self.session = Session(folder, backend=config.backend, device=device, precision=config.precision,
                                   max_batch=config.max_batch, image_cache_bytes=config.image_cache_bytes,
                                   max_queued=config.max_queued, prefill_chunk=config.prefill_chunk)
            self.manifest, self.engine, self.encoder = self.session.manifest, self.session.engine, self.session.encoder
        if self.encoder is None:
            log.warning("%s: the export has no processor files: requests must send input_ids, not prompts", folder)
        self.metrics = None  # the engine's metrics on the server's endpoint (a Python backend with custom metrics)
        if hasattr(self.pb, "MetricFamily"):
            self.metrics = TritonMetrics(self.pb, self.engine.metrics, {"model": args.get("model_name", "idefics"),
                                                                        "version": str(args.get("model_version", ""))})

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job, stream = self._submit(request)
            except (ValueError, TypeError, ToolkitError) as exc:  # this request only, at once
                if not isinstance(exc, Unavailable):  # the engine counted its own refusals
                    self.engine.metrics.fail("bad_request")
                self._error(sender, exc)
                continue
            threading.Thread(target=self._respond, args=(job, sender, stream), name="idefics-respond",
                             daemon=True).start()
        return None

    def _submit(self, request) -> tuple[Job, bool]:
        pb = self.pb
        settings = _settings(pb.get_input_tensor_by_name(request, "settings"), request)
        stream = settings.pop("stream", False)
        if not isinstance(stream, bool):
            raise ValueError(f"settings: stream must be true or false, got {stream!r}")
        chat = settings.pop("chat", False)
        if not isinstance(chat, bool):
            raise ValueError(f"settings: chat must be true or false, got {chat!r}")
        if chat:  # a chat turn: stop at <end_of_utterance> too, no image tokens (what Session(messages=) does)
            settings = {**chat_generation_settings(self.encoder.tokenizer if self.encoder else None, self.manifest),
                        **settings}
        cfg = SamplingConfig.from_kwargs(**settings)
        if cfg.max_new_tokens > self.config.max_new_tokens:
            raise ValueError(f"max_new_tokens {cfg.max_new_tokens} exceeds this server's limit "
                             f"{self.config.max_new_tokens}")
        req = self._arrays(request) if pb.get_input_tensor_by_name(request, "input_ids") is not None \
            else self._prompt(request)
        if chat and "max_new_tokens" not in settings:  # a chat turn without a length: as long as fits
            room = self.manifest.limits.max_seq_len - req.input_ids.shape[1]
            cfg = dataclasses.replace(cfg, max_new_tokens=max(1, min(self.config.max_new_tokens, room)))
        check_length(self.manifest, req.input_ids.shape[1], cfg.max_new_tokens)
        return self.engine.submit(req, cfg), stream

    def _respond(self, job: Job, sender, stream: bool) -> None:
        """Send the job's tokens as they come (the engine's thread is never held by a slow client)."""
        text, tokens, sent = TextStream(self.encoder) if self.encoder else None, [], 0
        cancelled = getattr(sender, "is_cancelled", lambda: False)
        try:
            while not job.wait(QUEUED_POLL_SECONDS):  # still waiting for rows: is the client still there?
                if cancelled():  # it went away: the job leaves the queue now, and nothing of it runs
                    job.cancel()
                    log.warning("a client went away before its first token; its request is dropped")
                    sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # (see below)
                    return
            for step in job.steps():
                if cancelled():  # the client went away: its row is freed at the next step
                    job.cancel()
                    log.warning("a client went away after %d tokens; its row is freed", len(tokens))
                    # a request must always end with the final flag, or Triton counts it in flight for
                    # ever (and cannot unload the model); after it, neither request nor sender is touched
                    sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                tokens.append(int(step.tokens[0]))
                piece = text.add(tokens[-1], step.last) if text else ""
                if stream and (piece or text is None):
                    sender.send(self._response(piece, tokens[sent:], job.req.input_ids.shape[1]))
                    sent = len(tokens)
            final = self.encoder.decode(tokens) if self.encoder else ""
            eos = job.cfg.eos_ids() or _as_tuple(self.manifest.model.eos_token_id)
            reason = "stop" if tokens and tokens[-1] in eos else "length"
            sender.send(self._response(final, tokens, job.req.input_ids.shape[1], reason),
                        flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - the request's own error goes back to its client
            job.cancel()
            self._error(sender, exc)

    def _error(self, sender, exc: BaseException) -> None:
        try:
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(str(exc))),
                        flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - the client is gone; nothing to tell
            log.debug("could not send an error response", exc_info=True)

    def _prompt(self, request) -> Request:
        pb = self.pb
        if self.encoder is None:
            raise ValueError("this export has no processor files, so prompts cannot be tokenized; send input_ids")
        prompt = _strings(pb.get_input_tensor_by_name(request, "prompt"), "prompt")
        if len(prompt) != 1:
            raise ValueError(f"prompt: expected one string, got {len(prompt)}")
        if not prompt[0].strip():
            raise ValueError("prompt: empty")
        images = _images(pb.get_input_tensor_by_name(request, "images"),
                         pb.get_input_tensor_by_name(request, "images_base64"))
        items = build_prompt(prompt[0], images, max_images=self.manifest.limits.max_images,
                             max_image_bytes=self.config.max_image_bytes,
                             max_image_pixels=self.config.max_image_pixels)
        enc = self.encoder.encode([items])
        return check_request(self.manifest, enc.input_ids, enc.attention_mask, enc.pixel_values if images else None,
                             enc.image_attention_mask if images else None)

    def _arrays(self, request) -> Request:
        """transformers-style input_ids [1,T] (+ attention_mask, pixel_values, image_attention_mask)."""
        def array(name):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        ids = array("input_ids")
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"input_ids: expected one prompt [1, seq], got shape {tuple(ids.shape)}; "
                             "send several prompts as several requests")
        return check_request(self.manifest, ids, array("attention_mask"), array("pixel_values"),
                             array("image_attention_mask"))

    def _response(self, text: str, tokens: list[int], prompt_tokens: int | None = None, reason: str | None = None):
        pb = self.pb
        tensors = [pb.Tensor("text", np.array([text.encode()], dtype=np.object_)),
                   pb.Tensor("tokens", np.asarray(tokens, dtype=np.int64))]
        if prompt_tokens is not None:  # the prompt's length
            tensors.append(pb.Tensor("prompt_tokens", np.asarray([prompt_tokens], dtype=np.int64)))
        if reason is not None:  # the last response: why generation ended
            tensors.append(pb.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_)))
        return pb.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.session is not None:
            self.session.close()
        else:
            self.engine.close()


class TritonMetrics:
    """The engine's metrics (`runtime.metrics`) published as Triton custom metrics on the server's
    metrics endpoint, under the same names, labelled with the model (and reason for failures), by a
    thread that copies what changed every `interval` seconds: counters by their increase, gauges
    by value, and each histogram observation forwarded as it was observed."""

    def __init__(self, pb, metrics: Metrics, labels: dict[str, str], interval: float = 0.25):
        family = pb.MetricFamily
        self.source, self.interval = metrics, interval
        self._families = []  # kept alive: a family whose object is collected leaves the endpoint

        def make(name, description, kind):
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        self.counters = {}
        for name, description in COUNTERS.items():
            fam = make(name, description, family.COUNTER)
            if name in LABELS:
                for value in FAILURE_REASONS:
                    self.counters[(name, value)] = fam.Metric(labels={**labels, LABELS[name]: value})
            else:
                self.counters[(name, None)] = fam.Metric(labels=labels)
        self.gauges = {name: make(name, description, family.GAUGE).Metric(labels=labels)
                       for name, description in GAUGES.items()}
        self.histograms = {name: make(name, description, family.HISTOGRAM).Metric(labels=labels,
                                                                                   buckets=list(TIME_BUCKETS))
                           for name, description in HISTOGRAMS.items()}
        self._published: dict = dict.fromkeys(self.counters, 0)
        metrics.keep_observations()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idefics-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        snapshot, observed = self.source.drain()
        for (name, label), metric in self.counters.items():
            value = snapshot[name] if label is None else snapshot[name].get(label, 0)
            if value > self._published[(name, label)]:
                metric.increment(value - self._published[(name, label)])
                self._published[(name, label)] = value
        for name, metric in self.gauges.items():
            metric.set(snapshot[name])
        for name, values in observed.items():
            for value in values:
                self.histograms[name].observe(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - metrics never take the model down
                log.warning("could not publish the engine's metrics", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _strings(tensor, name: str) -> list[str]:
    if tensor is None:
        raise ValueError(f"{name}: missing (a string with one <image> placeholder per image)")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


def _images(raw, encoded) -> list[bytes]:
    if raw is not None and encoded is not None:
        raise ValueError("send images either as bytes (images) or as base64 text (images_base64), not both")
    if raw is not None:
        return [bytes(b) for b in raw.as_numpy().reshape(-1)]
    if encoded is None:
        return []
    images = []
    for index, text in enumerate(_strings(encoded, "images_base64")):
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"images_base64 {index}: not base64 ({exc})") from exc
    return images


def _settings(tensor, request) -> dict[str, Any]:
    """Settings from the "settings" input (JSON), or the request's own parameters (the HTTP generate
    endpoint's "parameters" object; Triton's generate endpoint reserves that name, hence "settings")."""
    if tensor is None:
        raw = request.parameters() if hasattr(request, "parameters") else "{}"
        return dict(json.loads(raw or "{}"))
    raw = _strings(tensor, "settings")
    try:
        value = json.loads(raw[0]) if raw else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"settings: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError("settings: expected a JSON object of generation settings")
    return value
