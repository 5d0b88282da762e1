"""The `idefics` Triton model (runtime.serving) without a server, in both graph modes: in-process
(the graphs in the model's own process) and BLS, over a small stand-in for
`triton_python_backend_utils` whose BLS requests run the repository's REAL graph files
(repo/<model>/1/model.onnx) in ONNX Runtime. (tests/serving runs the real server.) Results are compared with runtime.Session on the export;
limit violations must fail their own request only. Also scripts/triton_client.py's input building."""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format
from PIL import Image
from skimage import data as skdata
from tritonclient.grpc import model_config_pb2 as mc

from exporter.export import ExportConfig, export
from exporter.triton.repository import RepositoryConfig, write_repository
from runtime import Session
from runtime.serving import TritonPythonModel
from tests.util import load_script

PROMPT = "User:<image>Describe this image.<end_of_utterance>\nAssistant:"
FINAL = 1


# ---------------------------------------------------------------- stand-in for triton_python_backend_utils
class FakePb:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL

    def __init__(self, repo: Path):
        self.repo = repo
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.calls: list[str] = []
        pb = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class TritonError:
            def __init__(self, msg):
                self._msg = msg

            def message(self):
                return self._msg

        class InferenceResponse:
            def __init__(self, output_tensors=None, error=None):
                self._tensors, self._error = list(output_tensors or []), error

            def output_tensors(self):
                return self._tensors

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name, self.names, self.inputs = model_name, list(requested_output_names), list(inputs)

            def exec(self):
                pb.calls.append(self.model_name)
                try:
                    sess = pb.session(self.model_name)
                    outs = sess.run(self.names, {t.name(): t.as_numpy() for t in self.inputs})
                except Exception as exc:  # noqa: BLE001 - as Triton does: an error response
                    return InferenceResponse(error=TritonError(f"{type(exc).__name__}: {exc}"))
                return InferenceResponse(output_tensors=[Tensor(n, a) for n, a in zip(self.names, outs)])

        self.Tensor, self.TritonError = Tensor, TritonError
        self.InferenceResponse, self.InferenceRequest = InferenceResponse, InferenceRequest

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self.sessions:
            self.sessions[name] = ort.InferenceSession(str(self.repo / name / "1" / "model.onnx"),
                                                       providers=["CPUExecutionProvider"])
        return self.sessions[name]

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        for t in response.output_tensors():
            if t.name() == name:
                return t
        return None


class Sender:
    """Responses come from the model's responder threads: `done` is set by the final one."""

    def __init__(self):
        self.sent: list[tuple[object, int]] = []
        self.done = threading.Event()
        self.cancelled = False  # the client went away (Triton's is_cancelled())
        self.polled_after_final = False

    def is_cancelled(self):
        self.polled_after_final |= self.done.is_set()  # Triton 2.51 crashes on that
        return self.cancelled

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags == FINAL:
            self.done.set()


class Request:
    def __init__(self, pb: FakePb, prompt: str, images: list[bytes] = (), parameters=None):
        self.tensors = {"prompt": pb.Tensor("prompt", np.array([prompt.encode()], dtype=np.object_))}
        if images:
            self.tensors["images"] = pb.Tensor("images", np.array(list(images), dtype=np.object_))
        if parameters is not None:
            raw = parameters if isinstance(parameters, str) else json.dumps(parameters)
            self.tensors["settings"] = pb.Tensor("settings", np.array([raw.encode()], dtype=np.object_))
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


def text_of(pb: FakePb, response) -> str:
    return pb.get_output_tensor_by_name(response, "text").as_numpy()[0].decode()


def tokens_of(pb: FakePb, response) -> list[int]:
    return pb.get_output_tensor_by_name(response, "tokens").as_numpy().tolist()


def final(pb: FakePb, request: Request):
    """The request's last response: FINAL, and the only FINAL one."""
    assert request.sender.done.wait(60), "no final response within 60 s"
    flags = [f for _, f in request.sender.sent]
    assert flags and flags[-1] == FINAL and flags.count(FINAL) == 1, flags
    return request.sender.sent[-1][0]


def ok(pb: FakePb, request: Request) -> tuple[str, list[int]]:
    response = final(pb, request)
    assert not response.has_error(), response.error().message()
    return text_of(pb, response), tokens_of(pb, response)


def failed(pb: FakePb, request: Request) -> str:
    response = final(pb, request)
    assert len(request.sender.sent) == 1
    assert response.has_error()
    return response.error().message()


# ---------------------------------------------------------------- fixtures
def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo(fn, size) -> bytes:
    return png(Image.fromarray(fn()).convert("RGB").resize(size))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "export"
    export(ExportConfig(output=out, progress=False, max_images=2))
    return out


@pytest.fixture(scope="module", params=["inprocess", "bls"])
def repo(export_dir, tmp_path_factory, request):
    return write_repository(export_dir, tmp_path_factory.mktemp("serving_repo") / "repo",
                            RepositoryConfig(graphs=request.param, kind="KIND_CPU"))


def is_bls(repo: Path) -> bool:
    return (repo / "decoder").is_dir()


@pytest.fixture(scope="module")
def session(export_dir):
    with Session(export_dir) as s:
        yield s


@pytest.fixture(scope="module")
def images():
    return {"astronaut": photo(skdata.astronaut, (64, 64)), "coffee": photo(skdata.coffee, (48, 40)),
            "chelsea": photo(skdata.chelsea, (40, 40)), "tiny": photo(skdata.astronaut, (8, 8))}


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture
def make_model(repo, monkeypatch):
    def make(**parameters) -> tuple[TritonPythonModel, FakePb]:
        pb = FakePb(repo)
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
        cfg = text_format.Parse((repo / "idefics" / "config.pbtxt").read_text(), mc.ModelConfig())
        for key, value in parameters.items():
            cfg.parameters[key].string_value = str(value)
        config = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
        assert config["parameters"]["max_new_tokens"] == {"string_value": str(parameters.get("max_new_tokens", 256))}
        model = TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "export_dir": str(repo / "idefics" / "1" / "export")})
        made.append(model)
        return model, pb

    made: list[TritonPythonModel] = []
    yield make
    for model in made:
        model.finalize()


@pytest.fixture
def model(make_model):
    return make_model()


@pytest.fixture(scope="module")
def expected(session, images):
    """Session's results for the prompts the tests send, keyed by name."""
    def run(prompt):
        r = session.generate(prompts=[prompt], max_new_tokens=12)
        return r.texts[0], r.new_tokens[0].tolist()

    text_only = "User:What is a cat?<end_of_utterance>\nAssistant:"
    return {
        "astronaut": run(["User:", decoded(images["astronaut"]), "Describe this image.<end_of_utterance>\nAssistant:"]),
        "two": run(["User:", decoded(images["coffee"]), "and", decoded(images["chelsea"]),
                    "Compare them.<end_of_utterance>\nAssistant:"]),
        "text": run([text_only]),
        "tiny": run(["User:", decoded(images["tiny"]), "Describe this image.<end_of_utterance>\nAssistant:"]),
    }


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the serving model must never open a connection")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---------------------------------------------------------------- (a)-(c) results equal Session's
def test_single_request(model, session, images, expected):
    m, pb = model
    req = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
    assert m.execute([req]) is None
    text, tokens = ok(pb, req)
    assert len(req.sender.sent) == 1  # not streaming: one final response
    assert (text, tokens) == expected["astronaut"]
    assert 1 <= len(tokens) <= 12
    if is_bls(m_repo := pb.repo):
        assert {"vision", "perceiver", "decoder"} <= set(pb.calls)  # graphs ran through BLS
    else:
        assert pb.calls == [] and not (m_repo / "decoder").exists()  # graphs ran in the model's process


def test_batch_of_requests(model, images, expected):
    m, pb = model
    reqs = [
        Request(pb, "User:<image>and<image>Compare them.<end_of_utterance>\nAssistant:",
                [images["coffee"], images["chelsea"]], {"max_new_tokens": 12}),
        Request(pb, "User:What is a cat?<end_of_utterance>\nAssistant:", [], {"max_new_tokens": 12}),
        Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12}),
    ]
    m.execute(reqs)
    assert [ok(pb, r) for r in reqs] == [expected["two"], expected["text"], expected["astronaut"]]


def test_text_only_runs_no_image_graphs(model, expected):
    m, pb = model
    req = Request(pb, "User:What is a cat?<end_of_utterance>\nAssistant:", [], {"max_new_tokens": 12})
    m.execute([req])
    assert ok(pb, req) == expected["text"]


def test_default_parameters(model, session, images):
    m, pb = model
    req = Request(pb, PROMPT, [images["astronaut"]])  # no parameters tensor: Session's defaults
    m.execute([req])
    r = session.generate(prompts=[["User:", decoded(images["astronaut"]),
                                   "Describe this image.<end_of_utterance>\nAssistant:"]])
    assert ok(pb, req) == (r.texts[0], r.new_tokens[0].tolist())


def test_stream(model, session, images, expected):
    m, pb = model
    req = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12, "stream": True})
    m.execute([req])
    final(pb, req)
    sent = req.sender.sent
    pieces = [text_of(pb, r) for r, flags in sent[:-1]]
    assert all(flags == 0 for _, flags in sent[:-1])
    assert all(not r.has_error() for r, _ in sent)
    assert len(pieces) >= 1 and all(pieces)
    streamed_tokens = [t for r, _ in sent[:-1] for t in tokens_of(pb, r)]
    text, tokens = ok(pb, req)
    assert "".join(pieces) == text
    assert (text, tokens) == expected["astronaut"]
    assert set(streamed_tokens) <= set(tokens)
    prompt = ["User:", decoded(images["astronaut"]), "Describe this image.<end_of_utterance>\nAssistant:"]
    assert "".join(session.stream(prompts=[prompt], max_new_tokens=12)) == text


def test_a_request_cancelled_while_queued_is_dropped_unrun(make_model, images, expected):
    """The only row busy (the engine held at its first step), a second request waits; its client
    goes away (is_cancelled). The model polls waiting requests itself, so the request gets its final
    flag and leaves the queue while the engine is still held: never run (no vision for its image,
    no prefill), counted as cancelled_queued; the running request's answer is unchanged."""
    m, pb = make_model(max_batch=1)
    engine = m.engine
    entered, release, real = threading.Event(), threading.Event(), engine._step

    def step():  # hold the engine at its first step, the row in flight
        if not release.is_set():
            entered.set()
            assert release.wait(120), "the test never released the engine"
        real()

    engine._step = step
    try:
        running = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
        m.execute([running])
        assert entered.wait(60), "the engine never stepped"
        queued = Request(pb, PROMPT, [images["coffee"]], {"max_new_tokens": 12, "stream": True})
        m.execute([queued])
        assert engine.metrics.snapshot()["idefics_queue_size"] == 1
        queued.sender.cancelled = True
        assert queued.sender.done.wait(30), "the cancelled request was not ended while it waited"
        assert queued.sender.sent == [(None, FINAL)]  # only the final flag, as for a cancel mid-stream
        m_now = engine.metrics.snapshot()
        assert m_now["idefics_queue_size"] == 0 and m_now["idefics_requests_failed_total"]["cancelled_queued"] == 1
        assert entered.is_set() and not release.is_set()  # all that while the engine was held
    finally:
        release.set()
    assert ok(pb, running) == expected["astronaut"]
    after = engine.metrics.snapshot()
    assert engine.stats["joined"] == 1
    assert after["idefics_image_cache_misses_total"] == 1  # the astronaut only: no vision for the coffee
    assert after["idefics_requests_failed_total"] == {"bad_request": 0, "queue_full": 0, "cancelled": 0,
                                                      "cancelled_queued": 1, "internal": 0}
    assert after["idefics_requests_completed_total"] == 1
    assert not queued.sender.polled_after_final and not running.sender.polled_after_final


# ---------------------------------------------------------------- (d) limits: one request fails, the others don't
def check_isolated(m, pb, bad: Request, good: Request, want, *words) -> str:
    m.execute([bad, good])
    message = failed(pb, bad)
    for word in words:
        assert word in message, message
    assert ok(pb, good) == want
    return message


@pytest.mark.parametrize("case", ["too_many_images", "placeholders", "max_new_tokens", "seq_len", "not_json",
                                  "not_object", "unknown_setting", "garbage_image", "url_as_image"])
def test_request_errors(model, images, expected, case):
    m, pb = model
    good = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
    img = images["astronaut"]
    bad, words = {
        "too_many_images": (Request(pb, "User:<image><image><image>Hi<end_of_utterance>\nAssistant:",
                                    [img, img, img], {"max_new_tokens": 4}), ["3 images", "at most 2"]),
        "placeholders": (Request(pb, PROMPT, [img, img], {"max_new_tokens": 4}), ["1 <image>", "2 images"]),
        "max_new_tokens": (Request(pb, PROMPT, [img], {"max_new_tokens": 257}), ["max_new_tokens 257", "256"]),
        "seq_len": (Request(pb, "User:" + "cat dog bird " * 200 + "<end_of_utterance>\nAssistant:", [],
                            {"max_new_tokens": 200}), ["max_new_tokens is 200", "at most 512"]),
        "not_json": (Request(pb, PROMPT, [img], "{max_new_tokens: 4"), ["not JSON"]),
        "not_object": (Request(pb, PROMPT, [img], "[4]"), ["JSON object"]),
        "unknown_setting": (Request(pb, PROMPT, [img], {"max_new_tokens": 4, "temprature": 0.5}), ["temprature"]),
        "garbage_image": (Request(pb, PROMPT, [b"\x89PNG not really an image"], {"max_new_tokens": 4}),
                          ["image 0", "not a readable image"]),
        "url_as_image": (Request(pb, PROMPT, [b"https://example.com/cat.png"], {"max_new_tokens": 4}),
                         ["image 0", "not a readable image"]),
    }[case]
    check_isolated(m, pb, bad, good, expected["astronaut"], *words)


def test_error_comes_before_any_graph(model, images):
    m, pb = model
    img = images["astronaut"]
    m.execute([Request(pb, "User:<image><image><image>Hi", [img, img, img]),
               Request(pb, PROMPT, [img], {"max_new_tokens": 9999})])
    assert pb.calls == []


def test_image_bytes_limit(make_model, images, expected):
    limit = len(images["tiny"]) + 1
    assert len(images["astronaut"]) > limit
    m, pb = make_model(max_image_bytes=limit)
    bad = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 4})
    good = Request(pb, PROMPT, [images["tiny"]], {"max_new_tokens": 12})
    check_isolated(m, pb, bad, good, expected["tiny"], "image 0", f"the limit is {limit}")


def test_image_pixels_limit(make_model, images, expected):
    m, pb = make_model(max_image_pixels=100)  # tiny is 8x8 = 64 pixels, astronaut 64x64
    bad = Request(pb, "User:<image>and<image>Hi<end_of_utterance>\nAssistant:", [images["tiny"], images["astronaut"]],
                  {"max_new_tokens": 4})
    good = Request(pb, PROMPT, [images["tiny"]], {"max_new_tokens": 12})
    check_isolated(m, pb, bad, good, expected["tiny"], "image 1", "64x64", "100 pixels")


def test_max_new_tokens_limit_from_config(make_model, images, expected):
    m, pb = make_model(max_new_tokens=12)
    bad = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 13})
    good = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
    check_isolated(m, pb, bad, good, expected["astronaut"], "max_new_tokens 13", "limit 12")


def test_url_in_prompt_stays_text(model, session):
    m, pb = model
    prompt = "User:Describe https://example.com/cat.png please<end_of_utterance>\nAssistant:"
    req = Request(pb, prompt, [], {"max_new_tokens": 12})
    m.execute([req])
    r = session.generate(prompts=[[prompt]], max_new_tokens=12)
    assert ok(pb, req) == (r.texts[0], r.new_tokens[0].tolist())
    assert "vision" not in pb.calls


def test_bare_url_prompt_is_refused(model, expected, images):
    """A prompt that is nothing but a URL is neither fetched nor taken as an image."""
    m, pb = model
    bad = Request(pb, "https://example.com/cat.png", [], {"max_new_tokens": 4})
    good = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
    check_isolated(m, pb, bad, good, expected["astronaut"], "URL")


def test_missing_prompt(model, images, expected):
    m, pb = model
    bad = Request(pb, "x")
    del bad.tensors["prompt"]
    good = Request(pb, PROMPT, [images["astronaut"]], {"max_new_tokens": 12})
    check_isolated(m, pb, bad, good, expected["astronaut"], "prompt")


# ---------------------------------------------------------------- (e) scripts/triton_client.py
@pytest.fixture(scope="module")
def client():
    return load_script("triton_client")


def test_build_inputs(client, images):
    settings = {"max_new_tokens": 7, "stream": True, "temperature": 0.5}
    inputs = client.build_inputs(PROMPT, [images["tiny"]], settings)
    assert [(name, dtype) for name, _, dtype in inputs] == [("prompt", "BYTES"), ("settings", "BYTES"),
                                                            ("images", "BYTES")]
    arrays = {name: array for name, array, _ in inputs}
    assert all(a.dtype == np.object_ for a in arrays.values())
    assert arrays["prompt"].tolist() == [PROMPT.encode()]
    assert json.loads(arrays["settings"][0]) == settings
    assert arrays["images"].shape == (1,) and arrays["images"][0] == images["tiny"]
    text_only = client.build_inputs("hello", [], {})
    assert [name for name, _, _ in text_only] == ["prompt", "settings"]
    with pytest.raises(ValueError, match="placeholder"):
        client.build_inputs(PROMPT, [], {})
    with pytest.raises(ValueError, match="placeholder"):
        client.build_inputs("no placeholder", [images["tiny"]], {})


def test_chat_prompt(client):
    assert client.chat_prompt("What?", 2) == "User:<image><image>What?<end_of_utterance>\nAssistant:"
    assert client.chat_prompt("What?", 0) == "User:What?<end_of_utterance>\nAssistant:"
    mine = "User:<image> then <image>?"
    assert client.chat_prompt(mine, 2) == mine


def test_client_inputs_served(client, model, images, expected):
    """What the client sends, as the server model receives it."""
    m, pb = model
    prompt = client.chat_prompt("Describe this image.", 1)
    assert prompt == PROMPT
    req = Request(pb, "")
    req.tensors = {name: pb.Tensor(name, array)
                   for name, array, _ in client.build_inputs(prompt, [images["astronaut"]], {"max_new_tokens": 12})}
    m.execute([req])
    assert ok(pb, req) == expected["astronaut"]


# ---------------------------------------------------------------- transformers-style arrays
class ArrayRequest(Request):
    """A request carrying input_ids / masks / pixel_values instead of a prompt."""

    def __init__(self, pb: FakePb, arrays: dict, parameters=None):
        super().__init__(pb, "", (), parameters)
        del self.tensors["prompt"]
        for name, value in arrays.items():
            self.tensors[name] = pb.Tensor(name, np.ascontiguousarray(value))


def test_token_ids_and_pixel_arrays(model, session, images):
    m, pb = model
    enc = session.encoder.encode([["User:", decoded(images["coffee"]), "What is this?<end_of_utterance>\nAssistant:"]])
    arrays = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=enc.pixel_values,
                  image_attention_mask=enc.image_attention_mask)
    want = session.generate(**arrays, max_new_tokens=10)
    req = ArrayRequest(pb, arrays, {"max_new_tokens": 10})
    m.execute([req])
    assert ok(pb, req) == (want.texts[0], want.new_tokens[0].tolist())
    # several prompts in one array request are refused (send several requests), naming the shape
    two = {k: np.concatenate([v, v]) for k, v in arrays.items()}
    bad = ArrayRequest(pb, two, {"max_new_tokens": 4})
    m.execute([bad])
    assert "one prompt" in failed(pb, bad)


def test_export_without_processor_files_serves_token_arrays(tmp_path, monkeypatch):
    """random: presets have no tokenizer: the model loads, takes input_ids, and refuses prompts by name."""
    out = tmp_path / "bare"
    export(ExportConfig(output=out, model="random:tiny", progress=False, validate=False))
    repo = write_repository(out, tmp_path / "repo", RepositoryConfig(kind="KIND_CPU"))
    pb = FakePb(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    config = json_format.MessageToDict(text_format.Parse((repo / "idefics" / "config.pbtxt").read_text(),
                                                         mc.ModelConfig()), preserving_proto_field_name=True)
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "export_dir": str(repo / "idefics" / "1" / "export")})
    try:
        ids = np.array([[1, 40, 41, 42, 43]], np.int64)
        with Session(out) as session:
            want = session.generate(input_ids=ids, max_new_tokens=6).new_tokens[0].tolist()
        req = ArrayRequest(pb, {"input_ids": ids}, {"max_new_tokens": 6, "stream": True})
        model.execute([req])
        text, tokens = ok(pb, req)
        assert tokens == want and text == ""
        assert [t for r, _ in req.sender.sent[:-1] for t in tokens_of(pb, r)] == want  # one response per token
        bad = Request(pb, "User: hi", [], {"max_new_tokens": 4})
        model.execute([bad])
        assert "no processor files" in failed(pb, bad)
    finally:
        model.finalize()
