"""An OpenAI-compatible Chat Completions frontend in front of a Triton server's `idefics` model.

    python -m runtime.openai_server --grpc-url 127.0.0.1:8001 --port 9000 [--allowed-image-dir DIR]
    (idefics-serve REPO --openai-port 9000 starts it beside tritonserver)

Endpoints: POST /v1/chat/completions (streaming as server-sent events ending in `data: [DONE]`, or
not), GET /v1/models, GET /health. Stateless: each request becomes one streaming gRPC request to the
`idefics` model (runtime.serving), whose in-flight batching engine runs it; the frontend only
translates. Messages become IDEFICS's instruct prompt with runtime.chat.messages_to_prompt (the same
mapping `Session.generate(messages=...)` uses), images travel as their bytes, and the request says
"chat": true, so the model also stops at <end_of_utterance> and never emits image tokens.

Settings: max_tokens / max_completion_tokens (default: the server's max_new_tokens limit, within
the export's sequence length), temperature (OpenAI's default 1 samples; 0 is greedy), top_p, seed,
stop (up to 4 strings, matched here: the text ends before the first one, and the request is
cancelled), n=1, stream_options.include_usage. Any other field is a 400 naming it. `usage` counts
are the model's token counts: the prompt's tokens (images' tokens included) and the new tokens.

Errors are OpenAI's error JSON: 400 a bad request (field, message, image, too many images), 404
an unknown model, 413 an image over the server's limit, 429 the model's queue is full, 503 Triton
not ready. A streaming client that disconnects cancels its gRPC request, which frees its row.

Standard library + tritonclient[grpc] (the `triton` extra) + runtime.chat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from runtime.chat import ChatError, load_image_url, messages_to_prompt

log = logging.getLogger("idefics.openai")

SUPPORTED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "seed", "stop", "n", "user"}
WAIT = 600.0  # seconds without a response from Triton before the request is given up


class ClientGone(Exception):
    """The HTTP client closed its connection: its request is cancelled, nothing is sent."""


POLL = 0.2  # seconds between checks that the client is still there while the model works


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_exceeded", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def triton_error(message: str, image_params: list[str]) -> ApiError:
    """The idefics model's error message -> an ApiError with the right status; "image K" becomes the
    request's field name."""
    found = re.match(r"image (\d+):", message)
    param = None
    if found and int(found.group(1)) < len(image_params):
        param = image_params[int(found.group(1))]
        message = param + message[found.end() - 1:]
    if "requests are already waiting for rows" in message:
        return ApiError(429, message, code="queue_full")
    if re.search(r"(bytes|pixels); the limit is", message):
        return ApiError(413, message, param, code="image_too_large")
    if "engine stopped" in message or "session is closed" in message or "unknown model" in message.lower() \
            or "unavailable" in message.lower():
        return ApiError(503, message)
    return ApiError(400, message, param)


class StopMatcher:
    """Text out as it comes, ending before the first stop string; text that could still become a
    stop string is held back."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

    def add(self, piece: str, last: bool = False) -> str:
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                out, self.shown = self.text[self.shown:end], max(self.shown, end)
                return out
        end = len(self.text)
        if self.stops and not last:
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown:end], end
        return out


class Frontend:
    """The translation, independent of HTTP: settings checks, the gRPC stream, the responses."""

    def __init__(self, grpc_url: str, model: str = "idefics", served_name: str | None = None,
                 allowed_image_dir: str | None = None):
        self.grpc_url, self.model, self.served_name = grpc_url, model, served_name or model
        self.allowed_image_dir = str(Path(allowed_image_dir).resolve()) if allowed_image_dir else None
        self.limits: dict[str, int] | None = None
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self.created = int(time.time())

    # -- Triton
    # gRPC clients are pooled, never closed while the frontend runs: one serves one request at a
    # time (a tritonclient client holds one stream), then goes back to the pool. Closing channels
    # while other requests run reset unrelated HTTP connections (seen with 16 concurrent clients).
    def client(self):
        import tritonclient.grpc as grpcclient

        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return grpcclient.InferenceServerClient(self.grpc_url)

    def release(self, client) -> None:
        self._pool.put(client)

    def ready(self) -> bool:
        try:
            client = self.client()
            try:
                ok = client.is_server_ready() and client.is_model_ready(self.model)
                if ok and self.limits is None:
                    config = client.get_model_config(self.model, as_json=True)["config"]
                    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
                    self.limits = {k: int(parameters[k]) for k in ("max_image_bytes", "max_new_tokens", "max_queued")
                                   if parameters.get(k)}
                return bool(ok)
            finally:
                self.release(client)
        except Exception:  # noqa: BLE001 - not reachable yet
            return False

    # -- the request
    def parse(self, body: Any) -> dict:
        """Check a chat completion request; the prompt, images and settings for the model."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unsupported = sorted(set(body) - SUPPORTED)
        if unsupported:
            raise ApiError(400, f"unsupported field {unsupported[0]!r} (this server supports: "
                           f"{', '.join(sorted(SUPPORTED))})", unsupported[0], code="unsupported_parameter")
        if body.get("model") != self.served_name:
            raise ApiError(404, f"model {body.get('model')!r} does not exist; this server has {self.served_name!r}",
                           "model", code="model_not_found")
        n = body.get("n")
        if n not in (None, 1):
            raise ApiError(400, f"n: only n=1 is supported, got {n!r}", "n", code="unsupported_value")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: expected true or false", "stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not isinstance(options, dict):
                raise ApiError(400, "stream_options: expected an object", "stream_options")
            extra = sorted(set(options) - {"include_usage"})
            if extra:
                raise ApiError(400, f"unsupported field 'stream_options.{extra[0]}'", f"stream_options.{extra[0]}",
                               code="unsupported_parameter")
            if not stream:
                raise ApiError(400, "stream_options: only with stream=true", "stream_options")
            include_usage = bool(options.get("include_usage"))
        settings: dict[str, Any] = {"chat": True, "stream": True}
        limit = (self.limits or {}).get("max_new_tokens")
        given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
        if len(set(map(str, given.values()))) > 1:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
        for key, value in given.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ApiError(400, f"{key}: expected a positive integer, got {value!r}", key)
            if limit is not None and value > limit:
                raise ApiError(400, f"{key} {value} exceeds this server's limit {limit}", key)
            settings["max_new_tokens"] = value
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
                raise ApiError(400, f"temperature: expected a number from 0 to 2, got {temperature!r}", "temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        if temperature > 0:  # OpenAI's sampling: temperature and top_p only (no top-k)
            settings.update(do_sample=True, temperature=temperature, top_k=None)
        top_p = body.get("top_p")
        if top_p is not None:
            if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
                raise ApiError(400, f"top_p: expected a number in (0, 1], got {top_p!r}", "top_p")
            if temperature > 0:
                settings["top_p"] = float(top_p)
        seed = body.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ApiError(400, f"seed: expected a non-negative integer, got {seed!r}", "seed")
            settings["seed"] = seed
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "stop: expected a string or a list of up to 4 non-empty strings", "stop")
        try:
            chat = messages_to_prompt(body.get("messages"))
            images = [load_image_url(url, param, self.allowed_image_dir, (self.limits or {}).get("max_image_bytes"))
                      for url, param in zip(chat.images, chat.params)]
        except ChatError as exc:
            raise ApiError(exc.status, str(exc), exc.param,
                           code="image_too_large" if exc.status == 413 else None) from exc
        return {"prompt": chat.text, "images": images, "params": chat.params, "settings": settings, "stops": stops,
                "stream": stream, "include_usage": include_usage}

    def generate(self, request: dict, cancelled=lambda: False):
        """Yield ("piece", text) as the model streams, then ("final", text, tokens, prompt_tokens,
        finish_reason); raises ApiError. Closing the generator cancels the gRPC request."""
        import tritonclient.grpc as grpcclient

        arrays = [("prompt", np.array([request["prompt"].encode()], dtype=np.object_)),
                  ("settings", np.array([json.dumps(request["settings"]).encode()], dtype=np.object_))]
        if request["images"]:
            arrays.append(("images", np.array(request["images"], dtype=np.object_)))
        inputs = []
        for name, array in arrays:
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        results: queue.Queue = queue.Queue()
        try:
            client = self.client()
        except Exception as exc:  # noqa: BLE001
            raise ApiError(503, f"the Triton server is not reachable: {exc}") from exc
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            tokens: list[int] = []
            checked = time.monotonic()
            while True:
                # the client is checked while the model works, not only when a write fails: a client
                # that closed its connection is noticed within POLL seconds, streaming or not (a
                # write into a closed socket can succeed for many tokens), and its row is freed
                result = error = None
                started = time.monotonic()
                while result is None and error is None:
                    try:
                        result, error = results.get(timeout=POLL)
                    except queue.Empty:
                        if time.monotonic() - started > WAIT:
                            raise ApiError(503, f"no response from the model in {WAIT:g} s") from None
                    if time.monotonic() - checked >= POLL:
                        checked = time.monotonic()
                        if cancelled():
                            raise ClientGone()
                if error is not None:
                    message = error.message() if callable(getattr(error, "message", None)) else str(error)
                    raise triton_error(message, request["params"])
                parameter = result.get_response().parameters.get("triton_final_response")
                if parameter is not None and parameter.bool_param:
                    finished = True
                    text = result.as_numpy("text")
                    all_tokens = result.as_numpy("tokens")
                    prompt_tokens = result.as_numpy("prompt_tokens")
                    reason = result.as_numpy("finish_reason")
                    yield ("final", text[0].decode() if text is not None else "",
                           all_tokens.tolist() if all_tokens is not None else tokens,
                           int(prompt_tokens[0]) if prompt_tokens is not None else None,
                           reason[0].decode() if reason is not None else "stop")
                    return
                new, prompt = result.as_numpy("tokens"), result.as_numpy("prompt_tokens")
                if new is not None:
                    tokens.extend(new.tolist())
                yield ("piece", result.as_numpy("text")[0].decode(), len(tokens),
                       int(prompt[0]) if prompt is not None else None)
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            except Exception:  # noqa: BLE001 - a broken client is dropped, not pooled
                return
            self.release(client)

    # -- responses
    def completion(self, request: dict, emit=None, cancelled=lambda: False) -> dict | None:
        """Run one request. With EMIT (streaming), chunks go to EMIT(dict) and None is returned;
        otherwise the chat.completion object. CANCELLED() says whether the client went away (then
        ClientGone is raised and the gRPC request cancelled)."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stopper = StopMatcher(request["stops"])

        def chunk(delta: dict, reason: str | None = None) -> dict:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.served_name,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            if request["include_usage"]:
                out["usage"] = None
            return out

        started, generated, prompt_tokens, reason, final_text = False, 0, None, None, None
        events = self.generate(request, cancelled)
        try:
            for event in events:
                if emit is not None and not started:
                    emit(chunk({"role": "assistant", "content": ""}))
                    started = True
                if event[0] == "piece":
                    _, text, generated, prompt_tokens = event
                    piece = stopper.add(text)
                    if emit is not None and piece:
                        emit(chunk({"content": piece}))
                    if stopper.stopped:
                        break
                    continue
                _, text, tokens, prompt_tokens, reason = event
                generated = len(tokens)
                piece = stopper.add("", last=True)  # what was held back for a stop string that never came
                if emit is not None and piece:
                    emit(chunk({"content": piece}))
                final_text = text
                break
            else:
                raise ApiError(500, "the model ended the stream without a final response")
        finally:
            events.close()  # a stop string or a client gone: cancels the gRPC request
        if stopper.stopped:
            reason, final_text = "stop", stopper.text[:stopper.shown]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": (prompt_tokens or 0) + generated}
        if emit is not None:
            emit(chunk({}, reason))
            if request["include_usage"]:
                emit({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.served_name,
                      "system_fingerprint": None, "choices": [], "usage": usage})
            return None
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.served_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final_text, "refusal": None},
                             "logprobs": None, "finish_reason": reason}],
                "usage": usage}



def make_handler(frontend: Frontend):
    class Handler(BaseHTTPRequestHandler):
        server_version = "idefics-openai/1"
        protocol_version = "HTTP/1.1"  # keep-alive; event streams are chunked

        def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's name
            log.info("%s %s", self.address_string(), format % args)

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: ApiError) -> None:
            self._json(exc.status, exc.body())

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                if frontend.ready():
                    self._json(200, {"status": "ok"})
                else:
                    self._error(ApiError(503, "the Triton server or its idefics model is not ready"))
            elif path == "/v1/models":
                if not frontend.ready():
                    return self._error(ApiError(503, "the Triton server or its idefics model is not ready"))
                self._json(200, {"object": "list", "data": [{"id": frontend.served_name, "object": "model",
                                                             "created": frontend.created, "owned_by": "idefics-toolkit"}]})
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                if name != frontend.served_name:
                    return self._error(ApiError(404, f"model {name!r} does not exist", "model", code="model_not_found"))
                self._json(200, {"id": name, "object": "model", "created": frontend.created, "owned_by": "idefics-toolkit"})
            else:
                self._error(ApiError(404, f"no route GET {path}"))

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path != "/v1/chat/completions":
                return self._error(ApiError(404, f"no route POST {path}"))
            try:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    self.close_connection = True
                    raise ApiError(411, "send the request body with a Content-Length")
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ApiError(400, f"the request body is not JSON ({exc})") from exc
                if frontend.limits is None and not frontend.ready():
                    raise ApiError(503, "the Triton server or its idefics model is not ready")
                request = frontend.parse(body)
                if not request["stream"]:
                    return self._json(200, frontend.completion(request, cancelled=self._gone))
                self._stream(request)
            except ApiError as exc:
                self._error(exc)
            except ClientGone:
                self.close_connection = True
                log.warning("a client went away; its request was cancelled")

        def _gone(self) -> bool:
            """Whether the client closed its connection: readable, with nothing left to read (the
            bytes of a next request on a kept-alive connection count as the client still there)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):  # reset, or already closed
                return True

        def _stream(self, request: dict) -> None:
            # the first event (or an error) decides the status: errors before any text are plain JSON
            sent = []

            def write(data: bytes) -> None:  # one HTTP/1.1 chunk
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                except OSError as exc:  # BrokenPipeError, ConnectionResetError, ...
                    self.close_connection = True
                    raise ClientGone() from exc

            def emit(obj: dict) -> None:
                if not sent:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    sent.append(True)
                write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            try:
                frontend.completion(request, emit, self._gone)
            except ApiError as exc:
                if not sent:
                    raise
                emit(exc.body())
            write(b"data: [DONE]\n\n")
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError as exc:
                self.close_connection = True
                raise ClientGone() from exc

    return Handler


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    # the listen backlog: socketserver's default 5 makes the kernel drop connections beyond it, which
    # clients see a second later as resets (16 concurrent openai clients did)
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """A client that resets a kept-alive connection is not an error worth a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("%s: the connection was closed by the client", client_address)
            return
        super().handle_error(request, client_address)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.openai_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-url", default="127.0.0.1:8001", help="the Triton server's gRPC address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model", default="idefics", help="the Triton model (default: idefics)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--allowed-image-dir", default=None, metavar="DIR",
                   help="local image files (paths, file:// URLs) are read only under DIR (default: none are)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("IDEFICS_OPENAI_DEBUG") else logging.WARNING, format="idefics-openai: %(message)s")
    frontend = Frontend(args.grpc_url, args.model, args.served_model_name, args.allowed_image_dir)
    server = OpenAIServer((args.host, args.port), make_handler(frontend))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"idefics-openai: listening on http://{args.host}:{args.port}/v1 (Triton gRPC {args.grpc_url})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
