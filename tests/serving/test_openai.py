"""OpenAI-compatible Chat Completions: the messages -> prompt mapping (runtime.chat) against
hand-written prompts, and `idefics-serve REPO --openai-port` queried with the official `openai`
client (sync and async): answers equal to `Session.generate` on the same export, 16 concurrent
clients, bad requests among them with their statuses, a full queue, stop strings, a client that
disconnects mid-stream, and the children stopped with idefics-serve.

References are Session.generate (itself token-identical to transformers) and hand-written prompts,
never the endpoint's own output.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from exporter.triton import serve
from exporter.triton.repository import RepositoryConfig, write_repository
from runtime import Session
from runtime.chat import ChatError, load_image_url, messages_to_prompt, question_to_prompt
from runtime.prompts import build_prompt
from tests.serving import test_server
from tests.serving.test_idefics_server import export_dir, photos, session  # noqa: F401 - module-scoped fixtures
from tests.serving.test_server import ROOT, triton_env  # noqa: F401 - the session-scoped server environment

WAIT = 60.0
MAX_NEW, MAX_IMAGE_BYTES, MAX_QUEUED = 360, 150_000, 12
EOU = "<end_of_utterance>"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


# ---------------------------------------------------------------- the mapping, no server
def test_messages_to_prompt_system_multi_turn_and_images():
    messages = [
        {"role": "system", "content": "You are a helpful visual assistant."},
        {"role": "user", "content": [text_part("What is in this image?"), image_part("data:a")]},
        {"role": "assistant", "content": "A dog running on the ground."},
        {"role": "user", "content": [image_part("data:b"), text_part("And who is that?")]},
        {"role": "assistant", "content": [text_part("Obelix.")]},
        {"role": "user", "content": [text_part("Compare"), image_part("data:c"), text_part("with"),
                                     image_part("data:d"), text_part("please.")]},
    ]
    chat = messages_to_prompt(messages)
    assert chat.text == ("You are a helpful visual assistant.\n"
                         "User: What is in this image?<image><end_of_utterance>\n"
                         "Assistant: A dog running on the ground.<end_of_utterance>\n"
                         "User:<image>And who is that?<end_of_utterance>\n"
                         "Assistant: Obelix.<end_of_utterance>\n"
                         "User: Compare<image>with<image>please.<end_of_utterance>\n"
                         "Assistant:")
    assert chat.images == ["data:a", "data:b", "data:c", "data:d"]
    assert chat.params == ["messages[1].content[1].image_url", "messages[3].content[0].image_url",
                           "messages[5].content[1].image_url", "messages[5].content[3].image_url"]


def test_messages_to_prompt_plain_text_and_card_example():
    assert messages_to_prompt([{"role": "user", "content": "Hi there"}]).text == \
        "User: Hi there<end_of_utterance>\nAssistant:"
    # the idefics-9b-instruct model card's second turn: an image, then the question
    chat = messages_to_prompt([{"role": "user", "content": [image_part("data:x"), text_part("Describe this image.")]}])
    assert chat.text == "User:<image>Describe this image.<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("messages, words", [
    ([], ["non-empty list"]),
    ([{"role": "assistant", "content": "Hi"}], ["last message must be the user's"]),
    ([{"role": "tool", "content": "x"}], ["messages[0].role", "'tool'"]),
    ([{"role": "user", "content": "look: <image>"}], ["<image>", "image_url"]),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], ["messages[0].content[0].type"]),
    ([{"role": "user", "content": "x", "tool_calls": []}], ["'tool_calls'"]),
    ([{"role": "system", "content": [image_part("data:x")]}, {"role": "user", "content": "x"}], ["text only"]),
])
def test_messages_to_prompt_refuses(messages, words):
    with pytest.raises(ChatError) as caught:
        messages_to_prompt(messages)
    for word in words:
        assert word in str(caught.value)


def test_question_to_prompt():
    assert question_to_prompt("What is this?", 1) == "User:<image>What is this?<end_of_utterance>\nAssistant:"
    assert question_to_prompt("Hello", 0) == "User: Hello<end_of_utterance>\nAssistant:"
    assert question_to_prompt("<image>and<image>which?", 2) == \
        "User:<image>and<image>which?<end_of_utterance>\nAssistant:"
    chat = "User:<image>Describe.<end_of_utterance>\nAssistant:"
    assert question_to_prompt(chat, 1) == chat  # already in the chat format: unchanged


def test_load_image_url(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(b"PNGDATA")
    (tmp_path / "secret.png").write_bytes(b"SECRET")
    assert load_image_url(data_url(b"abc"), "p") == b"abc"
    assert load_image_url("a.png", "p", tmp_path / "ok") == b"PNGDATA"
    assert load_image_url(f"file://{tmp_path}/ok/a.png", "p", tmp_path / "ok") == b"PNGDATA"
    for url, allowed, words, status in [
        ("https://example.com/a.png", tmp_path, ["remote", "data: URL"], 400),
        ("../secret.png", tmp_path / "ok", ["outside"], 400),
        (str(tmp_path / "secret.png"), tmp_path / "ok", ["outside"], 400),
        ("a.png", None, ["--allowed-image-dir"], 400),
        ("data:image/png,notbase64", None, ["base64"], 400),
        ("data:image/png;base64,@@@", None, ["base64"], 400),
        (data_url(b"x" * 200), None, ["the limit is 100"], 413),
    ]:
        with pytest.raises(ChatError) as caught:
            load_image_url(url, "p", allowed, max_bytes=100)
        assert caught.value.status == status, url
        for word in words:
            assert word in str(caught.value), (url, str(caught.value))


# ---------------------------------------------------------------- the server
linux_x86 = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                               reason="nvidia-pytriton's tritonserver is for Linux x86_64")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "chelsea.png").write_bytes(photos["chelsea"])
    (folder.parent / "outside.png").write_bytes(photos["chelsea"])
    return folder


class Serving(test_server.Serving):
    """`idefics-serve REPO --openai-port N --allowed-image-dir DIR` in a subprocess."""

    def __init__(self, repo: Path, log_dir: Path, image_dir: Path):
        super().__init__(repo, log_dir, "--allowed-image-dir", str(image_dir), openai=True)
        self.url = f"http://127.0.0.1:{self.ports[3]}/v1"

    def wait_ready(self, timeout: float = 150) -> int:
        return super().wait_ready(timeout)

    def frontend_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"runtime.openai_server .*--port {self.ports[3]}"],
                             capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.server_pid and serve.group_members(self.server_pid):
            os.killpg(self.server_pid, signal.SIGKILL)
        for pid in self.frontend_pids():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def serving(triton_env, export_dir, image_dir, tmp_path_factory):  # noqa: F811
    repo = write_repository(export_dir, tmp_path_factory.mktemp("openai_repo") / "repo",
                            RepositoryConfig(kind="KIND_CPU", max_new_tokens=MAX_NEW, max_image_bytes=MAX_IMAGE_BYTES,
                                             max_queued=MAX_QUEUED))
    running = Serving(repo, repo.parent, image_dir)
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def client(serving):
    from openai import OpenAI

    return OpenAI(base_url=serving.url, api_key="unused", max_retries=0, timeout=WAIT)


def chat(photo: bytes | None, question: str = "Describe this image.") -> list[dict]:
    parts = ([image_part(data_url(photo))] if photo else []) + [text_part(question)]
    return [{"role": "user", "content": parts}]


def reference(session: Session, messages: list[dict], max_new: int) -> tuple[str, int, int, str]:
    """(text, new tokens, prompt tokens, finish_reason) from Session.generate on the same export."""
    r = session.generate(messages=messages, max_new_tokens=max_new)
    tokens = r.new_tokens[0].tolist()
    eos = (2, session.encoder.tokenizer.token_to_id(EOU))
    # a row that ended early is padded: count up to its end-of-sequence token
    end = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
    return r.texts[0], end, r.prompt_length, "stop" if end < len(tokens) or tokens[-1] in eos else "length"


def mix(photos) -> list[tuple[list[dict], int]]:
    two = [{"role": "system", "content": "Answer briefly."},
           {"role": "user", "content": [image_part(data_url(photos["coffee"])), text_part("and"),
                                        image_part(data_url(photos["chelsea"])), text_part("Compare them.")]}]
    history = [{"role": "user", "content": chat(photos["astronaut"])[0]["content"]},
               {"role": "assistant", "content": "An astronaut."},
               {"role": "user", "content": "What is a cat?"}]
    return [(chat(photos["astronaut"]), 20), (chat(None, "What is a cat?"), 12), (two, 24), (history, 16),
            (chat(photos["chelsea"]), 8)]


# the mapping with images, against a hand-written prompt, and Session(messages=) applies the chat settings
def test_session_messages_equal_the_hand_written_prompt(session, photos):
    messages = mix(photos)[2][0]
    hand = ["Answer briefly.\nUser:", Image.open(io.BytesIO(photos["coffee"])), "and",
            Image.open(io.BytesIO(photos["chelsea"])), "Compare them.<end_of_utterance>\nAssistant:"]
    eou = session.encoder.tokenizer.token_to_id(EOU)
    expected = session.generate(prompts=[hand], max_new_tokens=16, eos_token_id=[2, eou],
                                bad_words_ids=session.image_bad_words)
    got = session.generate(messages=messages, max_new_tokens=16)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert got.texts == expected.texts
    assert build_prompt(messages_to_prompt(messages).text, [photos["coffee"], photos["chelsea"]])[0] == \
        "Answer briefly.\nUser:"


@pytest.mark.slow
@linux_x86
def test_models_and_health(serving, client):
    assert [m.id for m in client.models.list().data] == ["idefics"]
    with urllib.request.urlopen(serving.url.removesuffix("/v1") + "/health", timeout=WAIT) as r:
        assert r.status == 200
    text = "".join(serving.output)
    assert serving.url in text


@pytest.mark.slow
@linux_x86
def test_streamed_and_plain_answers_equal_session(client, session, photos):
    messages, new = mix(photos)[0]
    text, tokens, prompt_tokens, reason = reference(session, messages, new)
    stream = client.chat.completions.create(model="idefics", messages=messages, max_tokens=new, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert reasons[-1] == reason and reasons[:-1] == [None] * (len(reasons) - 1)
    assert (usage.completion_tokens, usage.prompt_tokens) == (tokens, prompt_tokens)
    assert usage.total_tokens == tokens + prompt_tokens
    plain = client.chat.completions.create(model="idefics", messages=messages, max_completion_tokens=new,
                                           temperature=0)
    assert plain.choices[0].message.content == text and plain.choices[0].finish_reason == reason
    assert (plain.usage.completion_tokens, plain.usage.prompt_tokens) == (tokens, prompt_tokens)


@pytest.mark.slow
@linux_x86
def test_a_local_file_under_the_allowed_dir_and_a_stop_string(client, session, photos, image_dir):
    messages = [{"role": "user", "content": [image_part("chelsea.png"), text_part("Describe this image.")]}]
    text, *_ = reference(session, chat(photos["chelsea"]), 24)
    plain = client.chat.completions.create(model="idefics", messages=messages, max_tokens=24, temperature=0)
    assert plain.choices[0].message.content == text
    stop = text[5:8]
    cut = text[:text.index(stop)]
    plain = client.chat.completions.create(model="idefics", messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (cut, "stop")
    streamed = client.chat.completions.create(model="idefics", messages=messages, max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


@pytest.mark.slow
@linux_x86
def test_sampling_with_a_seed_is_repeatable(client, session, photos):
    messages, _ = mix(photos)[0]
    r = session.generate(messages=messages, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9,
                         top_k=None, seed=7)
    for _ in range(2):
        got = client.chat.completions.create(model="idefics", messages=messages, max_tokens=12, temperature=0.7,
                                             top_p=0.9, seed=7)
        assert got.choices[0].message.content == r.texts[0]


def bad_requests(photos, image_dir) -> dict[str, tuple[dict, int, list[str]]]:
    ok = chat(photos["coffee"])
    return {  # case -> (request fields, status, words the error must say)
        "unsupported field": ({"messages": ok, "frequency_penalty": 0.5}, 400, ["frequency_penalty"]),
        "n=2": ({"messages": ok, "n": 2}, 400, ["n=1"]),
        "remote URL": ({"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]}, 400,
                       ["remote image URLs are not fetched"]),
        "file outside the allowed dir": ({"messages": [{"role": "user", "content": [
            image_part(str(image_dir.parent / "outside.png"))]}]}, 400, ["outside the directory"]),
        "too many images": ({"messages": [{"role": "user", "content": [image_part(data_url(photos["coffee"]))] * 3}]},
                            400, ["3 images", "at most 2"]),
        "corrupt image": ({"messages": [{"role": "user", "content": [image_part(data_url(b"\x89PNG\r\n\x1a\n no"))]}]},
                          400, ["messages[0].content[0].image_url", "not a readable image"]),
        "oversized image": ({"messages": [{"role": "user", "content": [image_part(data_url(photos["huge"]))]}]}, 413,
                            [f"the limit is {MAX_IMAGE_BYTES}"]),
        "max_tokens over the limit": ({"messages": ok, "max_tokens": MAX_NEW + 1}, 400, [str(MAX_NEW)]),
        "unknown model": ({"messages": ok, "model": "gpt-4o"}, 404, ["gpt-4o"]),
    }


@pytest.mark.slow
@linux_x86
def test_sixteen_concurrent_async_clients_with_bad_requests_among_them(serving, session, photos, image_dir):
    from openai import APIStatusError, AsyncOpenAI

    requests = mix(photos)
    expected = [reference(session, m, n) for m, n in requests]
    bad = bad_requests(photos, image_dir)

    async def good(k, client):
        messages, new = requests[k % len(requests)]
        stream = await client.chat.completions.create(model="idefics", messages=messages, max_tokens=new,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        return "".join(pieces), usage.completion_tokens

    async def failing(case, client):
        fields, *_ = bad[case]
        try:
            await client.chat.completions.create(**{"model": "idefics", "max_tokens": 4, "temperature": 0, **fields})
        except APIStatusError as exc:
            return exc.status_code, exc.body
        return None, None

    async def run():
        async with AsyncOpenAI(base_url=serving.url, api_key="unused", max_retries=0, timeout=2 * WAIT) as client:
            return await asyncio.gather(*[good(k, client) for k in range(16)],
                                        *[failing(case, client) for case in bad])

    outcomes = asyncio.run(run())
    for k, (text, tokens) in enumerate(outcomes[:16]):
        assert (text, tokens) == expected[k % len(requests)][:2], k
    for (case, (_, status, words)), (got, body) in zip(bad.items(), outcomes[16:]):
        assert got == status, (case, got, body)
        for word in words:
            assert word in body["message"], (case, body)


@pytest.mark.slow
@linux_x86
def test_a_full_queue_is_429(serving, photos):
    """4 rows and 12 waiting: of 40 long requests at once, some must be refused with 429 at once.
    Each client holds its stream until every client has its answer, so no row frees early."""
    from openai import OpenAI, RateLimitError

    client = OpenAI(base_url=serving.url, api_key="unused", max_retries=0, timeout=4 * WAIT)
    statuses: dict[int, object] = {}
    clients = 40
    answered = threading.Semaphore(0)
    everyone = threading.Event()

    def one(k):
        try:
            stream = client.chat.completions.create(model="idefics", messages=chat(photos["astronaut"]),
                                                    max_tokens=MAX_NEW, temperature=0, stream=True)
            next(iter(stream))
            statuses[k] = 200
            answered.release()
            everyone.wait(2 * WAIT)
            stream.close()
        except RateLimitError as exc:
            statuses[k] = (429, exc.body)
            answered.release()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    refused = 0
    for _ in range(clients):
        assert answered.acquire(timeout=2 * WAIT)
        refused = sum(s != 200 for s in statuses.values())
        if refused and len(statuses) >= clients - 4:  # the rest may wait for rows the holders keep
            break
    everyone.set()
    for t in threads:
        t.join(4 * WAIT)
    refused = [s for s in statuses.values() if s != 200]
    assert len(statuses) == clients and refused, statuses
    assert all(s[0] == 429 and "try again later" in s[1]["message"] for s in refused), refused


def test_a_closed_connection_is_noticed_without_writing():
    """The frontend's check of the client's socket (Handler._gone), on a real socket pair: an idle
    open connection and one with a next request's bytes waiting are there; a closed one is gone."""
    import socket
    from types import SimpleNamespace

    from runtime.openai_server import Frontend, make_handler

    gone = make_handler(Frontend("127.0.0.1:1"))._gone
    ours, theirs = socket.socketpair()
    with ours:
        handler = SimpleNamespace(connection=ours)
        assert not gone(handler)
        theirs.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert not gone(handler)
        assert ours.recv(64)  # the bytes are still there for the next request: peeked, not read
        theirs.close()
        assert gone(handler)


def test_a_client_gone_while_the_model_works_cancels_its_grpc_request(monkeypatch):
    """Streaming or not, a client that leaves while no response comes is noticed within POLL
    seconds (not only at the next write), and its gRPC request is cancelled."""
    from runtime import openai_server
    from runtime.openai_server import ClientGone, Frontend

    class SilentModel:  # a gRPC client whose model never answers
        stopped: list = []

        def start_stream(self, callback):
            pass

        def async_stream_infer(self, *args, **kwargs):
            pass

        def stop_stream(self, cancel_requests):
            self.stopped.append(cancel_requests)

    frontend = Frontend("127.0.0.1:1")
    silent = SilentModel()
    monkeypatch.setattr(frontend, "client", lambda: silent)
    monkeypatch.setattr(openai_server, "WAIT", 30.0)
    request = {"prompt": "User: hi<end_of_utterance>\nAssistant:", "settings": {}, "images": [], "params": [],
               "stops": [], "include_usage": False, "stream": False}
    leaves = time.monotonic() + 0.5
    started = time.monotonic()
    with pytest.raises(ClientGone):
        frontend.completion(request, cancelled=lambda: time.monotonic() > leaves)
    assert time.monotonic() - started < 0.5 + 3 * openai_server.POLL
    assert silent.stopped == [True]  # cancel_requests: the model frees the row


@pytest.mark.slow
@linux_x86
def test_a_client_that_disconnects_frees_its_row(serving, client, session, photos):
    # the clients leave by closing their sockets, as a process that dies does (a client library's
    # close() may instead keep reading, or keep the connection for reuse)
    import json
    import socket
    from urllib.parse import urlsplit

    _, full, _, _ = reference(session, chat(photos["astronaut"]), MAX_NEW)
    assert full > 20, "the answer must be long enough to leave in the middle of it"
    log = serving.log
    before = log.read_text(errors="replace").count("went away")
    frontend_log = log.with_name(f"openai-{serving.ports[3]}.log")
    noticed = frontend_log.read_text(errors="replace").count("went away")
    where = urlsplit(serving.url)
    body = json.dumps({"model": "idefics", "messages": chat(photos["astronaut"]), "max_tokens": MAX_NEW,
                       "temperature": 0, "stream": True}).encode()
    finished = 0
    for _ in range(4):  # max_batch is 4: clients that go away must not hold the rows
        sock = socket.create_connection((where.hostname, where.port), timeout=WAIT)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 2:  # the role chunk and the first text
            data = sock.recv(65536)
            assert data, received
            received += data
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        sock.setblocking(False)  # what has come already: on a loaded machine, maybe the whole answer
        try:
            while data := sock.recv(1 << 20):
                received += data
        except BlockingIOError:
            pass
        finished += b"data: [DONE]" in received  # the frontend sent it all: nothing left to notice
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    # the frontend notices each client that leaves before its answer's end and cancels its gRPC request
    # (one that had the whole answer already leaves nothing to notice: seen in CI beside other jobs)
    deadline = time.monotonic() + WAIT
    while (time.monotonic() < deadline
           and frontend_log.read_text(errors="replace").count("went away") < noticed + 4 - finished):
        time.sleep(0.2)
    assert finished < 4, "every answer ended before its client left: nothing was tested"
    assert frontend_log.read_text(errors="replace").count("went away") - noticed == 4 - finished
    # Not all four can be required to reach the model (issue 28, measured): every cancel the frontend
    # sent while the model still worked was seen within ~15 ms, but this test model writes its whole
    # 360-token answer in ~0.35 s, and on a loaded machine a client can get its first chunks (or the
    # frontend its cancel out) only after the model has finished: nothing is left to cancel. So the
    # cancels the model does see are checked (each before the answer's end), and that the rows serve again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.read_text(errors="replace").count("went away") < before + 4:
        time.sleep(0.2)
    left = [int(n) for n in re.findall(r"went away after (\d+) tokens", log.read_text(errors="replace"))]
    assert all(n < full for n in left[before:]), (left, full)
    # then all four rows serve a full batch, exactly
    requests = mix(photos)[:4]
    outcomes = {}

    def one(k):
        messages, new = requests[k]
        r = client.chat.completions.create(model="idefics", messages=messages, max_tokens=new, temperature=0)
        outcomes[k] = (r.choices[0].message.content, r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    for k, (messages, new) in enumerate(requests):
        assert outcomes[k] == reference(session, messages, new)[:2], k


# ---------------------------------------------------------------- idefics-generate uses the same template
def test_idefics_generate_templates_a_plain_question(export_dir, session, photos, tmp_path, capsys):
    import json

    from runtime.cli import main

    (tmp_path / "a.png").write_bytes(photos["astronaut"])
    hand = ["User:", Image.open(io.BytesIO(photos["astronaut"])), "What is in the picture?<end_of_utterance>\nAssistant:"]
    eou = session.encoder.tokenizer.token_to_id(EOU)
    expected = session.generate(prompts=[hand], max_new_tokens=12, eos_token_id=[2, eou],
                                bad_words_ids=session.image_bad_words)
    argv = [str(export_dir), "What is in the picture?", "--image", str(tmp_path / "a.png"), "--max-new-tokens", "12",
            "--json", "--precision", session.precision]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == expected.sequences.tolist()
    # a prompt in the chat format passes through unchanged, with the plain settings
    plain = session.generate(prompts=[hand], max_new_tokens=12)
    assert main([str(export_dir), r"User:<image>What is in the picture?<end_of_utterance>\nAssistant:",
                 *argv[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == plain.sequences.tolist()
    # --raw: the prompt as it is
    raw = session.generate(prompts=[[Image.open(io.BytesIO(photos["astronaut"])), "A photo of"]], max_new_tokens=12)
    assert main([str(export_dir), "<image>A photo of", "--raw", *argv[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == raw.sequences.tolist()


def test_not_ready_is_503_in_openai_error_json():
    """The frontend before (or without) its Triton server: /health, /v1/models and completions are 503."""
    import json
    import urllib.error

    from runtime.openai_server import Frontend, OpenAIServer, make_handler

    port = serve.free_ports(2)
    server = OpenAIServer(("127.0.0.1", port[0]), make_handler(Frontend(f"127.0.0.1:{port[1]}")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port[0]}"
        for path, data in [("/health", None), ("/v1/models", None),
                           ("/v1/chat/completions", json.dumps({"model": "idefics", "messages": chat(None)}).encode())]:
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(urllib.request.Request(base + path, data=data), timeout=WAIT)
            assert caught.value.code == 503, path
            body = json.loads(caught.value.read())
            assert body["error"]["type"] == "service_unavailable" and "not ready" in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@linux_x86
def test_the_raw_event_stream(serving, session, photos):
    """Server-sent events as OpenAI sends them: `data: {chunk}` lines, then `data: [DONE]`."""
    import json

    messages, new = mix(photos)[1]
    text, *_ = reference(session, messages, new)
    body = json.dumps({"model": "idefics", "messages": messages, "max_tokens": new, "temperature": 0, "stream": True})
    request = urllib.request.Request(serving.url + "/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "idefics" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


# ---------------------------------------------------------------- last: it stops the module's server
def readme_openai_snippet() -> str:
    """The README's Python block that talks to the OpenAI endpoint, as written."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    found = [b for b in blocks if "from openai import OpenAI" in b]
    assert len(found) == 1, "the README shows one OpenAI client snippet"
    return found[0]


@pytest.mark.slow
@linux_x86
def test_the_readme_snippet_streams_the_answer_session_gives(serving, session, tmp_path):
    """The README's snippet, run as written (only the port is this server's), from a checkout's
    root: its printed answer about docs/astronaut.jpg is Session.generate's, greedy, 32 tokens."""
    snippet = readme_openai_snippet()
    assert "http://127.0.0.1:9000/v1" in snippet
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("http://127.0.0.1:9000/v1", serving.url))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    photo = data_url((ROOT / "docs" / "astronaut.jpg").read_bytes(), "image/jpeg")
    messages = [{"role": "user", "content": [image_part(photo), text_part("What is in this picture?")]}]
    text, *_ = reference(session, messages, 32)
    assert text.strip() and done.stdout == text + "\n"



@pytest.mark.slow
@linux_x86
def test_sigterm_stops_the_frontend_too(serving):  # stops the module's server: keep it the file's last test
    pids = serving.frontend_pids()
    assert pids, "no frontend process"
    serving.process.send_signal(signal.SIGTERM)
    assert serving.process.wait(20) == 0, "".join(serving.output)
    assert serving.frontend_pids() == []
    assert all(serve.port_free(port) for port in serving.ports)
