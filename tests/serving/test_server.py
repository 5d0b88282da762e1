"""exporter.triton.serve and idefics-serve against a real Triton Inference Server (nvidia-pytriton's 2.51
unless tritonserver is on PATH), with tiny Python-backend models written here: a decoupled BYTES
echo (the Python backend stub needs NumPy 1.x for BYTES), an int64 model, and a decoupled streamer
that records whether its response sender saw the request cancelled.

The server environment (a venv with numpy<2, onnxruntime, tokenizers, pillow, nvidia-pytriton) is
made once with pip, about half a minute, in ~/.cache/idefics-toolkit-tests/triton-env (outside the
per-run cache) so later runs reuse it. Every wait is bounded; every server is stopped, even on
failure; everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from exporter.triton import serve
from exporter.triton.serve import ServeError, ServerExited, TritonServer, group_members
from tests.util import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                       reason="nvidia-pytriton's tritonserver is for Linux x86_64"),
]

TEST_ENV = Path.home() / ".cache" / "idefics-toolkit-tests" / "triton-env"
WAIT = 20.0  # seconds any single response may take

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "text" data_type: TYPE_STRING dims: [-1] }]
output [{ name: "text" data_type: TYPE_STRING dims: [-1] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""
ECHO_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            request.get_response_sender().send(pb_utils.InferenceResponse([pb_utils.Tensor("text", text)]),
                                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''
INTS_CONFIG = """
name: "ints"
backend: "python"
max_batch_size: 0
input [{ name: "n" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "values" data_type: TYPE_INT64 dims: [-1] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""
INTS_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy()[0])
            values = np.arange(n, dtype=np.int64) * 3 + 2**40
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("values", values)]))
        return out
'''
STREAM_CONFIG = """
name: "stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "n" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "i" data_type: TYPE_INT64 dims: [1] }]
instance_group [{ count: 1 kind: KIND_CPU }]
parameters { key: "record" value { string_value: "RECORD" } }
"""
# Never touch the request or its sender after COMPLETE_FINAL: in 2.51 request.is_cancelled() /
# sender.is_cancelled() then crash the whole server (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled).
# A cancelled request still needs its COMPLETE_FINAL, or the server cannot unload the model at exit.
STREAM_MODEL = '''
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.record = json.loads(args["model_config"])["parameters"]["record"]["string_value"]

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.respond, args=(request,), daemon=True).start()
        return None

    def respond(self, request):
        n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy()[0])
        sender = request.get_response_sender()
        sent, cancelled = 0, False
        for i in range(n):
            if sender.is_cancelled():
                cancelled = True
                break
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("i", np.array([i], np.int64))]))
            sent += 1
            time.sleep(0.1)
        request_cancelled = request.is_cancelled()
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        with open(self.record, "a") as f:
            f.write(json.dumps({"id": request.request_id(), "sent": sent, "cancelled": cancelled,
                                "request_cancelled": request_cancelled}) + "\\n")
'''
BROKEN_CONFIG = """
name: "broken"
backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_INT64 dims: [1] }]
output [{ name: "y" data_type: TYPE_INT64 dims: [1] }]
"""
BROKEN_MODEL = '''
class TritonPythonModel:
    def initialize(self, args):
        raise ValueError("broken-model-7361: cannot load")
'''


def write_model(repo: Path, name: str, config: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(source)


@pytest.fixture(scope="session")
def triton_env():
    """The server environment, made once per machine (pip); skipped when pip cannot reach PyPI."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(serve.ENV_VARIABLE, str(os.environ.get(serve.ENV_VARIABLE) or TEST_ENV))
        try:
            env = serve.server_environment(pytriton=serve.find_tritonserver() is None)
        except serve.EnvironmentSetupError as exc:
            pytest.skip(f"cannot make the Triton server environment: {exc}")
        yield env


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    write_model(repo, "echo", ECHO_CONFIG, ECHO_MODEL)
    write_model(repo, "ints", INTS_CONFIG, INTS_MODEL)
    write_model(repo, "stream", STREAM_CONFIG.replace("RECORD", str(root / "record.jsonl")), STREAM_MODEL)
    return repo


@pytest.fixture(scope="module")
def server(triton_env, repo):
    with TritonServer(repo, log=repo.parent / "server.log", timeout=90) as server:
        yield server


def records(repo: Path, request_id: str, timeout: float = WAIT) -> dict:
    """The stream model's record of REQUEST_ID, once it has finished."""
    deadline = time.monotonic() + timeout
    path = repo.parent / "record.jsonl"
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry["id"] == request_id:
                    return entry
        time.sleep(0.1)
    raise AssertionError(f"the stream model never finished request {request_id}")


# --------------------------------------------------------------------------------------------
# the pieces


def test_environment_has_what_the_bundled_runtime_imports(triton_env, tmp_path):
    shutil.copytree(ROOT / "runtime", tmp_path / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import runtime.serving, numpy, onnxruntime, tokenizers, PIL\n"
            "print(numpy.__version__, runtime.serving.__file__)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([str(triton_env / "bin" / "python"), "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    version, where = out.stdout.split()
    assert version.startswith("1."), f"the stub needs NumPy 1.x, the env has {version}"
    assert where.startswith(str(tmp_path))


def test_environment_is_reused(triton_env):
    started = time.monotonic()
    assert serve.server_environment(triton_env, pytriton=serve.find_tritonserver() is None) == triton_env
    assert time.monotonic() - started < 5
    marker = serve.read_marker(triton_env)
    assert set(serve.ENV_PACKAGES) <= set(marker["packages"])
    assert not (triton_env.parent / f".{triton_env.name}.partial").exists()


def test_backend_directory(triton_env):
    binary = serve.find_tritonserver() or serve.pytriton_tritonserver(triton_env)
    version = serve.read_marker(triton_env)["python"]
    folder = serve.backend_directory(binary, version)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        assert (folder / "python" / name).resolve().is_file(), name
    assert serve.backend_directory(binary, version) == folder
    assert folder.is_relative_to(serve.cache_root())


def test_a_failed_setup_names_the_command_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "ENV_PACKAGES", ("idefics-serve-no-such-package-4711",))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    env = tmp_path / "env"
    with pytest.raises(serve.EnvironmentSetupError, match="Run by hand") as failed:
        serve.server_environment(env)
    assert f"-m venv {env}" in str(failed.value) and f"{env}/bin/python -m pip install" in str(failed.value)
    assert not env.exists() and not (tmp_path / ".env.partial").exists()

    def interrupted(cmd, **kwargs):  # `python -m venv PARTIAL` interrupted half-way
        Path(cmd[-1], "bin").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(serve.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve.server_environment(env)
    assert not env.exists() and not (tmp_path / ".env.partial").exists()


def test_find_tritonserver_rejects_a_bad_path(tmp_path):
    with pytest.raises(ServeError, match="no such file"):
        serve.find_tritonserver(tmp_path / "nope")
    (tmp_path / "plain").write_text("")
    with pytest.raises(ServeError, match="not executable"):
        serve.find_tritonserver(tmp_path / "plain")


def test_repository_without_models(tmp_path):
    with pytest.raises(ServeError, match="no models"):
        serve.check_repository(tmp_path)
    with pytest.raises(ServeError, match="no such model repository"):
        serve.check_repository(tmp_path / "missing")


def test_gpu_instances_without_a_gpu_say_what_to_do(tmp_path, capsys):
    """A repository written with idefics-triton's default (KIND_GPU) on a machine without a GPU:
    idefics-serve says at once to write it with --kind KIND_CPU, before any server starts."""
    for name, kind in (("idefics", "KIND_GPU"), ("vision", "KIND_CPU")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\ninstance_group {{\n  count: 1\n  kind: {kind}\n}}\n')
    with pytest.raises(ServeError, match="model idefics asks for GPU instances") as info:
        serve.check_repository(tmp_path, gpus=0)
    assert "--kind KIND_CPU" in str(info.value) and "vision" not in str(info.value)
    assert serve.check_repository(tmp_path, gpus=1) == ["idefics", "vision"]
    (tmp_path / "idefics" / "config.pbtxt").write_text('name: "idefics"\ninstance_group { kind: KIND_CPU }\n')
    assert serve.check_repository(tmp_path, gpus=0) == ["idefics", "vision"]
    if serve.gpu_count() == 0:  # this machine: the command line says it in one line, exit 2
        (tmp_path / "idefics" / "config.pbtxt").write_text('name: "idefics"\ninstance_group { kind: KIND_GPU }\n')
        assert serve.main([str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("idefics-serve: error:") and "--kind KIND_CPU" in err and len(err.splitlines()) == 1


def test_gpu_count_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert serve.gpu_count() == 0


# --------------------------------------------------------------------------------------------
# a served repository


def test_server_is_ready_on_localhost(server):
    assert server.alive() and server.ready()
    assert server.model_states() == {"echo": "READY", "ints": "READY", "stream": "READY"}
    assert set(server.urls) == {"http", "grpc", "metrics"}
    assert all("127.0.0.1" in url for url in server.urls.values())
    with urllib.request.urlopen(server.metrics_url, timeout=WAIT) as response:
        assert b"nv_inference_request_success" in response.read()
    assert len(group_members(server.pid)) >= 4  # the server and one stub per model, in its group


def test_bytes_echo_over_grpc(server):
    import tritonclient.grpc as grpcclient

    texts = [["hello"], ["héllo wörld ✓", ""], ["x" * 10000, "\0binary\xff".encode("latin-1").decode("latin-1")]]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, batch in enumerate(texts):
            data = np.array([t.encode() for t in batch], dtype=object)
            tensor = grpcclient.InferInput("text", [len(batch)], "BYTES")
            tensor.set_data_from_numpy(data)
            client.async_stream_infer("echo", [tensor], request_id=str(i))
            result, error = answers.get(timeout=WAIT)
            assert error is None, error
            assert result.as_numpy("text").tolist() == data.tolist()
    finally:
        client.stop_stream()
        client.close()


def test_bytes_echo_over_http(server):
    # a decoupled model answers HTTP on the generate endpoints (plain /infer refuses decoupled models)
    request = urllib.request.Request(f"{server.http_url}/v2/models/echo/generate",
                                     data=json.dumps({"text": "héllo ✓"}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert json.loads(response.read())["text"] == "héllo ✓"


def test_int64_over_grpc_and_http(server):
    import tritonclient.grpc as grpcclient

    expected = (np.arange(7, dtype=np.int64) * 3 + 2**40).tolist()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("n", [1], "INT64")
        tensor.set_data_from_numpy(np.array([7], np.int64))
        result = client.infer("ints", [tensor], client_timeout=WAIT)
        assert result.as_numpy("values").dtype == np.int64
        assert result.as_numpy("values").tolist() == expected
    finally:
        client.close()
    body = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [7]}]}
    request = urllib.request.Request(f"{server.http_url}/v2/models/ints/infer", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        output = json.loads(response.read())["outputs"][0]
    assert output["datatype"] == "INT64" and output["data"] == expected


def _stream(server, request_id: str, n: int = 50):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = grpcclient.InferInput("n", [1], "INT64")
    tensor.set_data_from_numpy(np.array([n], np.int64))
    client.async_stream_infer("stream", [tensor], request_id=request_id)
    for i in range(3):
        result, error = answers.get(timeout=WAIT)
        assert error is None and result.as_numpy("i").tolist() == [i]
    return client


def test_grpc_stop_stream_with_cancel_cancels_the_request(server, repo):
    client = _stream(server, "cancel-requests")
    client.stop_stream(cancel_requests=True)
    client.close()
    entry = records(repo, "cancel-requests")
    assert entry["cancelled"] and entry["request_cancelled"] and entry["sent"] < 10, entry


def test_a_grpc_client_that_goes_away_cancels_its_request(server, repo):
    script = ("import os, sys, queue, numpy as np\nimport tritonclient.grpc as g\n"
              "c = g.InferenceServerClient(sys.argv[1]); q = queue.Queue()\n"
              "c.start_stream(callback=lambda result, error: q.put(error))\n"
              "t = g.InferInput('n', [1], 'INT64'); t.set_data_from_numpy(np.array([50], np.int64))\n"
              "c.async_stream_infer('stream', [t], request_id='client-exits')\n"
              "assert [q.get(timeout=20) for _ in range(3)] == [None] * 3\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, server.grpc_url], check=True, timeout=60)
    entry = records(repo, "client-exits")
    assert entry["cancelled"] and entry["sent"] < 10, entry


def test_an_http_stream_dropped_cancels_its_request(server, repo):
    request = urllib.request.Request(f"{server.http_url}/v2/models/stream/generate_stream",
                                     data=json.dumps({"n": 50, "id": "http-drop"}).encode(), method="POST")
    response = urllib.request.urlopen(request, timeout=WAIT)
    try:
        for i in range(3):
            assert json.loads(response.readline().removeprefix(b"data: "))["i"] == i
            response.readline()
    finally:
        response.close()
    entry = records(repo, "http-drop")
    assert entry["cancelled"] and entry["sent"] < 10, entry
    assert server.alive()


# --------------------------------------------------------------------------------------------
# failures


def test_a_model_that_fails_to_load_shows_the_log(triton_env, tmp_path):
    write_model(tmp_path / "repo", "broken", BROKEN_CONFIG, BROKEN_MODEL)
    server = TritonServer(tmp_path / "repo", log=tmp_path / "server.log", timeout=60)
    try:
        with pytest.raises(ServerExited, match="broken-model-7361"):
            server.start()
    finally:
        server.stop()
    assert not server.alive() and group_members(server.pid) == []


def test_a_port_in_use_is_refused(triton_env, repo, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = TritonServer(repo, http_port=taken.getsockname()[1], log=tmp_path / "server.log")
        try:
            with pytest.raises(ServeError, match="in use"):
                server.start()
        finally:
            server.stop()
    assert server.process is None


# --------------------------------------------------------------------------------------------
# the CLI


def cli(*args: str) -> list[str]:
    found = shutil.which("idefics-serve")
    return [found, *args] if found else [sys.executable, "-m", "exporter.triton.serve", *args]


class Serving:
    """`idefics-serve` in a subprocess, its output read by a thread; `extra`: more of its flags, and
    with `openai` a fourth free port for --openai-port (self.ports[3])."""

    def __init__(self, repo: Path, tmp_path: Path, *extra: str, openai: bool = False):
        self.ports = serve.free_ports(4 if openai else 3)
        http, grpc, metrics = map(str, self.ports[:3])
        self.log = tmp_path / "server.log"
        self.process = subprocess.Popen(
            cli(str(repo), "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics,
                "--log", str(self.log), "--timeout", "90", *extra,
                *(["--openai-port", str(self.ports[3])] if openai else [])),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.server_pid = None

    def _read(self):
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if found := re.search(r"\(pid (\d+)\) ready", line):
                self.server_pid = int(found.group(1))
            if "stops it" in line:
                return self.server_pid
        raise AssertionError("idefics-serve was not ready:\n" + "".join(self.output))

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.server_pid and group_members(self.server_pid):
            os.killpg(self.server_pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_a_signal_stops_it_and_its_children(triton_env, repo, tmp_path, signum):
    serving = Serving(repo, tmp_path)
    try:
        pid = serving.wait_ready()
        assert len(group_members(pid)) >= 4
        with urllib.request.urlopen(f"http://127.0.0.1:{serving.ports[0]}/v2/health/ready", timeout=WAIT) as r:
            assert r.status == 200
        text = "".join(serving.output)
        assert f"127.0.0.1:{serving.ports[1]}" in text and "echo READY" in text
        started = time.monotonic()
        serving.process.send_signal(signum)
        assert serving.process.wait(15) == 0, "".join(serving.output)
        assert time.monotonic() - started < 12
        assert group_members(pid) == []
        assert all(serve.port_free(port) for port in serving.ports)
    finally:
        serving.close()


def test_cli_fails_when_the_server_dies(triton_env, repo, tmp_path):
    serving = Serving(repo, tmp_path)
    try:
        pid = serving.wait_ready()
        os.killpg(pid, signal.SIGKILL)
        code = serving.process.wait(15)
        assert code != 0
        assert "tritonserver exited" in "".join(serving.output)
    finally:
        serving.close()


def test_cli_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run(cli(str(tmp_path / "empty")), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "no models" in out.stderr and "idefics-triton" in out.stderr
    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_MODEL)
    out = subprocess.run(cli(str(tmp_path / "repo"), "--tritonserver", str(tmp_path / "nope")),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--tritonserver" in out.stderr and "no such file" in out.stderr
