"""The idefics-triton repository served by a real Triton Inference Server (exporter.triton.serve), queried
over HTTP and gRPC, with concurrent streaming clients, bad requests among good ones, a client that
disconnects mid-stream, and a restart.

References: `runtime.Session` on the same export (itself token-identical to transformers, see
tests/runtime); the server must give exactly its text and tokens. Every server binds 127.0.0.1 on
free ports, every wait is bounded, and every server is stopped even when a test fails.
"""

from __future__ import annotations

import base64
import io
import json
import platform
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from exporter.export import ExportConfig, export
from exporter.triton.serve import TritonServer
from exporter.triton.repository import RepositoryConfig, write_repository
from runtime import Session
from tests.serving.test_server import triton_env  # noqa: F401 - the session-scoped server environment
from tests.util import load_script

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                       reason="nvidia-pytriton's tritonserver is for Linux x86_64"),
]

WAIT = 60.0  # seconds any one response may take
# long streams, so that a client leaves mid-way: a cancel that reaches the server only after the
# whole stream was sent shows no "went away" (120 tokens were too few on a loaded 2-core machine)
MAX_NEW, MAX_IMAGE_BYTES = 360, 150_000
CHAT = "User:<image>Describe this image.<end_of_utterance>\nAssistant:"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 kB as PNG
    return {"astronaut": png(Image.fromarray(skdata.astronaut()).resize((96, 96))),
            "coffee": png(Image.fromarray(skdata.coffee()).resize((64, 48))),
            "chelsea": png(Image.fromarray(skdata.chelsea()).resize((48, 48))),
            "huge": png(Image.fromarray(noise))}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idefics_server") / "export"
    export(ExportConfig(output=out, progress=False, max_images=2, max_batch=4, max_seq_len=400))
    return out


@pytest.fixture(scope="module")
def session(export_dir):
    with Session(export_dir) as s:
        yield s


@pytest.fixture(scope="module")
def repo(export_dir, tmp_path_factory):
    return write_repository(export_dir, tmp_path_factory.mktemp("idefics_repo") / "repo",
                            RepositoryConfig(kind="KIND_CPU", max_new_tokens=MAX_NEW, max_image_bytes=MAX_IMAGE_BYTES,
                                             max_queued=32))


@pytest.fixture(scope="module")
def server(triton_env, repo):  # noqa: F811
    with TritonServer(repo, log=repo.parent / "server.log", timeout=120) as server:
        yield server


@pytest.fixture(scope="module")
def client_script():
    return load_script("triton_client")


def reference(session: Session, prompt: str, images: list[bytes], **settings) -> tuple[str, list[int]]:
    items = _items(prompt, images)
    r = session.generate(prompts=[items], **settings)
    return r.texts[0], r.new_tokens[0].tolist()


def _items(prompt: str, images: list[bytes]) -> list:
    parts, items = prompt.split("<image>"), []
    for k, text in enumerate(parts):
        if text:
            items.append(text)
        if k < len(images):
            items.append(Image.open(io.BytesIO(images[k])))
    return items


def grpc_stream(server, client_script, prompt, images, settings, stop_after: int | None = None):
    """One streaming request over gRPC: (pieces, final text, final tokens, error message)."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inputs = []
        for name, array, dtype in client_script.build_inputs(prompt, images, {"stream": True, **settings}):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer("idefics", inputs, enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=WAIT)
            if error is not None:
                return pieces, None, None, str(error)
            if client_script.is_final(result):
                return pieces, result.as_numpy("text")[0].decode(), result.as_numpy("tokens").tolist(), None
            pieces.append(result.as_numpy("text")[0].decode())
            if stop_after is not None and len(pieces) >= stop_after:
                client.stop_stream(cancel_requests=True)  # the client goes away mid-stream
                return pieces, None, None, "disconnected"
    finally:
        client.close()


def http_generate(server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.http_url}/v2/models/idefics/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def counters(server) -> dict[str, float]:
    """The idefics model's request counters from the metrics endpoint (failures summed over reasons)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {name: sum(float(v) for v in re.findall(rf'^{name}{{[^}}]*model="idefics"[^}}]*}} (\S+)$', text, re.M))
            for name in ("nv_inference_request_success", "nv_inference_request_failure")}


# ---------------------------------------------------------------- one request each way
def test_one_request_over_http(server, session, photos):
    status, body = http_generate(server, {"prompt": CHAT, "images_base64": [base64.b64encode(photos["astronaut"]).decode()],
                                          "parameters": {"max_new_tokens": 12}})
    assert status == 200, body
    assert (body["text"], body["tokens"]) == reference(session, CHAT, [photos["astronaut"]], max_new_tokens=12)


def test_one_streaming_request_over_grpc(server, session, client_script, photos):
    pieces, text, tokens, error = grpc_stream(server, client_script, CHAT, [photos["coffee"]], {"max_new_tokens": 16})
    assert error is None, error
    assert (text, tokens) == reference(session, CHAT, [photos["coffee"]], max_new_tokens=16)
    items = _items(CHAT, [photos["coffee"]])
    assert "".join(pieces) == "".join(session.stream(prompts=[items], max_new_tokens=16)) == text
    assert all(pieces)


def requests_mix(photos):
    two = "User:<image>and<image>Compare them.<end_of_utterance>\nAssistant:"
    return [(CHAT, [photos["astronaut"]], 20), ("User: What is a cat?<end_of_utterance>\nAssistant:", [], 12),
            (two, [photos["coffee"], photos["chelsea"]], 24), (CHAT, [photos["chelsea"]], 8)]


def test_sixteen_concurrent_streaming_clients(server, session, client_script, photos):
    mix = requests_mix(photos)
    expected = [reference(session, p, i, max_new_tokens=n) for p, i, n in mix]
    outcomes: dict[int, tuple] = {}

    def client(k):
        prompt, images, new = mix[k % len(mix)]
        outcomes[k] = grpc_stream(server, client_script, prompt, images, {"max_new_tokens": new})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT)
    assert len(outcomes) == 16
    for k, (pieces, text, tokens, error) in sorted(outcomes.items()):
        assert error is None, (k, error)
        assert (text, tokens) == expected[k % len(mix)], k
        assert "".join(pieces) == text


BAD = {  # case -> (prompt, images, parameters JSON text, words the error must say)
    "corrupt image": (CHAT, ["CORRUPT"], '{"max_new_tokens": 4}', ["image 0", "not a readable image"]),
    "oversized image": (CHAT, ["huge"], '{"max_new_tokens": 4}', ["image 0", f"the limit is {MAX_IMAGE_BYTES}"]),
    "too many images": ("User:<image><image><image>Hi", ["coffee", "coffee", "coffee"], '{"max_new_tokens": 4}',
                        ["3 images", "at most 2"]),
    "unknown setting": (CHAT, ["coffee"], '{"max_new_tokens": 4, "temprature": 0.5}', ["temprature"]),
    "max_new_tokens over the limit": (CHAT, ["coffee"], f'{{"max_new_tokens": {MAX_NEW + 1}}}',
                                      [f"max_new_tokens {MAX_NEW + 1}", f"limit {MAX_NEW}"]),
    "malformed JSON": (CHAT, ["coffee"], '{"max_new_tokens": 4', ["not JSON"]),
    "empty prompt": ("", [], '{"max_new_tokens": 4}', ["prompt", "empty"]),
    "placeholders": (CHAT, ["coffee", "chelsea"], '{"max_new_tokens": 4}', ["1 <image>", "2 images"]),
}


def raw_stream(server, prompt, images, parameters: str):
    """A streaming gRPC request with the parameters input as given (possibly malformed JSON)."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        arrays = [("prompt", np.array([prompt.encode()], dtype=np.object_)),
                  ("settings", np.array([parameters.encode()], dtype=np.object_))]
        if images:
            arrays.append(("images", np.array(images, dtype=np.object_)))
        inputs = []
        for name, array in arrays:
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer("idefics", inputs, enable_empty_final_response=True)
        result, error = results.get(timeout=WAIT)
        return str(error) if error is not None else None
    finally:
        client.close()


def test_bad_requests_among_good_ones_then_still_live_and_counted(server, session, client_script, photos):
    before = counters(server)
    mix = requests_mix(photos)
    expected = [reference(session, p, i, max_new_tokens=n) for p, i, n in mix]
    good, bad = {}, {}

    def send_good(k):
        prompt, images, new = mix[k]
        good[k] = grpc_stream(server, client_script, prompt, images, {"max_new_tokens": new})

    def send_bad(case):
        prompt, names, parameters, _ = BAD[case]
        images = [b"\x89PNG\r\n\x1a\n not really" if n == "CORRUPT" else photos[n] for n in names]
        bad[case] = raw_stream(server, prompt, images, parameters)

    threads = [threading.Thread(target=send_good, args=(k,)) for k in range(len(mix))]
    threads += [threading.Thread(target=send_bad, args=(case,)) for case in BAD]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT)
    for case, (*_, words) in BAD.items():
        message = bad[case]
        assert message is not None, f"{case}: no error"
        for word in words:
            assert word in message, (case, message)
    for k, (pieces, text, tokens, error) in good.items():
        assert error is None and (text, tokens) == expected[k], k
    # the server is still live and ready, and its metrics count what it served
    with urllib.request.urlopen(server.http_url + "/v2/health/live", timeout=10) as r:
        assert r.status == 200
    assert server.ready()
    # Triton counts a decoupled request when the model releases it, which can come just after its
    # client saw the final response (one CI run read 11 of 12): read until all are counted, or 10 s
    deadline = time.monotonic() + 10
    while True:
        after = counters(server)
        handled = sum(after.values()) - sum(before.values())
        if handled >= len(mix) + len(BAD) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert handled >= len(mix) + len(BAD), (before, after)
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] >= len(mix)


def test_a_client_that_disconnects_frees_its_row(server, session, client_script, photos, repo):
    # max_batch is 4: four clients that go away mid-stream must not hold the rows
    outcomes = {}

    def leave(k):
        outcomes[k] = grpc_stream(server, client_script, CHAT, [photos["astronaut"]], {"max_new_tokens": MAX_NEW,
                                                                                      "min_new_tokens": MAX_NEW},
                                  stop_after=1)

    threads = [threading.Thread(target=leave, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT)
    assert all(o[3] == "disconnected" for o in outcomes.values()), outcomes
    deadline = time.monotonic() + WAIT
    log = repo.parent / "server.log"
    # A client cancels after its first piece; on a loaded 2-core machine its cancel can reach the
    # server after the whole stream was sent (with 120-token streams: 3 of 4 seen once in CI, 2 of
    # 4 under a concurrent benchmark), so one such race is allowed; a server that never sees a
    # client leave still fails, and one that saw it must have freed the row before the stream's end.
    while time.monotonic() < deadline and log.read_text(errors="replace").count("went away") < 4:
        time.sleep(0.2)
    left = [int(n) for n in re.findall(r"went away after (\d+) tokens", log.read_text(errors="replace"))]
    assert len(left) >= 3, f"the model saw {len(left)} of 4 clients leave"
    assert all(n < MAX_NEW for n in left), left
    mix = requests_mix(photos)
    for prompt, images, new in mix:
        pieces, text, tokens, error = grpc_stream(server, client_script, prompt, images, {"max_new_tokens": new})
        assert error is None and (text, tokens) == reference(session, prompt, images, max_new_tokens=new)


def test_restart_over_the_same_repository(triton_env, repo, session, client_script, photos, server):  # noqa: F811
    # a clean exit: no request left in flight (the disconnected ones above got their final flag)
    assert server.stop() == 0, (repo.parent / "server.log").read_text(errors="replace")[-2000:]
    assert not server.alive()
    with TritonServer(repo, log=repo.parent / "server-again.log", timeout=120) as again:
        pieces, text, tokens, error = grpc_stream(again, client_script, CHAT, [photos["coffee"]], {"max_new_tokens": 10})
        assert error is None
        assert (text, tokens) == reference(session, CHAT, [photos["coffee"]], max_new_tokens=10)


def test_bls_graph_models_give_the_same_tokens(triton_env, export_dir, session, client_script, photos,  # noqa: F811
                                               tmp_path):
    """--graphs bls-python: the engine calls vision / perceiver / decoder models through BLS."""
    repo = write_repository(export_dir, tmp_path / "repo", RepositoryConfig(graphs="bls-python", kind="KIND_CPU"))
    with TritonServer(repo, log=tmp_path / "server.log", timeout=120) as server:
        assert set(server.model_states()) == {"idefics", "vision", "perceiver", "decoder"}
        mix = requests_mix(photos)
        outcomes = {}

        def client(k):
            prompt, images, new = mix[k]
            outcomes[k] = grpc_stream(server, client_script, prompt, images, {"max_new_tokens": new})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(mix))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * WAIT)
        for k, (prompt, images, new) in enumerate(mix):
            pieces, text, tokens, error = outcomes[k]
            assert error is None, error
            assert (text, tokens) == reference(session, prompt, images, max_new_tokens=new)
