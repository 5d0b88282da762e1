"""`idefics-serve`: a real Triton Inference Server over a model repository, in the foreground.

    idefics-serve REPO [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--host 127.0.0.1]
                       [--env DIR] [--tritonserver PATH] [--timeout 120] [-v] [-- TRITONSERVER-FLAGS...]
                       [--openai-port 9000 [--allowed-image-dir DIR]]

With --openai-port, an OpenAI-compatible Chat Completions frontend (runtime.openai_server) runs
beside the server as a child process, in front of its gRPC port; it is stopped with the server.

Three pieces, each prepared once and reused:

  server binary       --tritonserver, else `tritonserver` on PATH (NVIDIA's container, backends in
                      /opt/tritonserver/backends), else the one the nvidia-pytriton wheel ships
                      (Triton 2.51, Python backend only), installed into the server environment.
  server environment  the Python the Python backend's stub runs the models in: a venv of its own
                      (<cache>/triton/env-py3.X, $IDEFICS_TRITON_ENV or --env) with numpy<2 (the
                      stub is built against NumPy 1.x: with NumPy 2 every BYTES tensor breaks),
                      onnxruntime, tokenizers, pillow: what the runtime/ package bundled in each
                      repository's idefics model imports. Not the toolkit's own venv (NumPy 2).
  backend directory   <cache>/triton/backends-<hash>/python/: the server's libtriton_python.so and
                      triton_python_backend_utils.py and the stub for the environment's Python,
                      beside links to the server's other backends (onnxruntime, tensorrt, ...).

The server runs in a process group of its own (the stubs are in it too) and is stopped as a group.
`TritonServer` is the same thing as a Python API (a context manager) for tests and scripts.

Standard library only (runtime.errors, runtime.files and runtime.paths are too): this module is imported by tests
and by the CLI, which must start without tritonclient.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from runtime.errors import ToolkitError
from runtime.files import atomic_file, atomic_folder
from runtime.paths import cache_root

PYTRITON = "nvidia-pytriton==0.7.0"  # Triton 2.51; pip metadata wants numpy<2, hence --no-deps
# What the runtime/ package bundled in the idefics model imports (runtime.serving and below):
# numpy and pillow at module level, tokenizers and onnxruntime when a session is made.
ENV_PACKAGES = ("numpy<2", "onnxruntime", "tokenizers", "pillow")
MARKER = "idefics-serve-env.json"
ENV_VARIABLE = "IDEFICS_TRITON_ENV"
CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


class ServeError(ToolkitError):
    """The server cannot be set up or started (missing binary, environment, stub, repository)."""


class EnvironmentSetupError(ServeError):
    """pip could not install the server environment (offline?); the message has the command to run."""


class ServerExited(ServeError):
    """tritonserver exited before it was ready (the message ends with the last lines of its log)."""


def _say(message: str) -> None:
    print(f"idefics-serve: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# server binary


def find_tritonserver(explicit: str | os.PathLike | None = None) -> Path | None:
    """The server binary: EXPLICIT (checked), else `tritonserver` on PATH, else None, meaning the one
    nvidia-pytriton ships (see pytriton_tritonserver) is to be used."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ServeError(f"--tritonserver {path}: no such file")
        if not os.access(path, os.X_OK):
            raise ServeError(f"--tritonserver {path}: not executable")
        return path.absolute()
    found = shutil.which("tritonserver")
    return Path(found).absolute() if found else None


def pytriton_root(env: Path) -> Path | None:
    """nvidia-pytriton's bundled server folder (bin/, backends/, python_backend_stubs/) in ENV."""
    for root in sorted(Path(env).glob("lib/python3*/site-packages/pytriton/tritonserver")):
        if (root / "bin" / "tritonserver").is_file():
            return root
    return None


def pytriton_tritonserver(env: Path) -> Path:
    root = pytriton_root(env)
    if root is None:
        raise ServeError(f"{env}: nvidia-pytriton is not installed there; run: "
                         f"{env}/bin/python -m pip install --no-deps {PYTRITON}")
    server = root / "bin" / "tritonserver"
    if not os.access(server, os.X_OK):  # wheels do not always keep the mode bits
        server.chmod(server.stat().st_mode | 0o111)
    return server


# ---------------------------------------------------------------------------------------------
# server environment


def default_environment() -> Path:
    """$IDEFICS_TRITON_ENV, else <cache>/triton/env-py3.X for the current interpreter's version."""
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE]).expanduser()
    return cache_root() / "triton" / f"env-py{sys.version_info.major}.{sys.version_info.minor}"


def wanted_packages(pytriton: bool) -> list[str]:
    return [*ENV_PACKAGES, *([PYTRITON] if pytriton else [])]


def manual_commands(env: Path, pytriton: bool) -> str:
    pip = f"{env}/bin/python -m pip install"
    lines = [f"{sys.executable} -m venv {env}", f"{pip} " + " ".join(f"'{p}'" for p in ENV_PACKAGES)]
    if pytriton:
        lines.append(f"{pip} --no-deps {PYTRITON}")
    return "\n".join(f"  {line}" for line in lines)


def read_marker(env: Path) -> dict | None:
    try:
        return json.loads((Path(env) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def environment_info(env: Path) -> dict:
    """The environment's Python: version "3.X", its library folder and whether libpython is shared
    (the stub links libpython3.X.so), and NumPy's version (None when missing)."""
    python = Path(env) / "bin" / "python"
    if not python.exists():
        raise ServeError(f"{env}: not a virtual environment (no bin/python)")
    code = ("import json, sys, sysconfig, importlib.util as u\n"
            "np = None\n"
            "try:\n    import numpy; np = numpy.__version__\nexcept Exception: pass\n"
            "missing = [m for m in ('numpy', 'onnxruntime', 'tokenizers', 'PIL') if u.find_spec(m) is None]\n"
            "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'),"
            " 'shared': bool(sysconfig.get_config_var('Py_ENABLE_SHARED')), 'numpy': np, 'missing': missing}))\n")
    env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env_vars)
    if out.returncode != 0:
        raise ServeError(f"{python} does not run: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def _check_environment(env: Path, pytriton: bool) -> dict:
    """An environment made by hand (no marker): check it rather than install into it."""
    info = environment_info(env)
    problems = []
    if info["missing"]:
        problems.append(f"missing {', '.join(info['missing'])}")
    if info["numpy"] and int(info["numpy"].split(".")[0]) >= 2:
        problems.append(f"NumPy {info['numpy']} (the Python backend stub needs numpy<2: BYTES tensors break)")
    if pytriton and pytriton_root(env) is None:
        problems.append("no nvidia-pytriton (needed for its tritonserver)")
    if problems:
        raise ServeError(f"server environment {env}: " + "; ".join(problems) + ". Fix it with:\n"
                         + "\n".join(manual_commands(env, pytriton).splitlines()[1:]))
    return info


def _pip(python: Path, args: list[str], env: Path, pytriton: bool) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_USER")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        what = "the Triton server environment" + (" (and nvidia-pytriton, for its tritonserver: none is on "
                                                   "PATH)" if pytriton else "")
        raise EnvironmentSetupError(
            f"pip could not install {what} into {env} (offline? no wheel for this platform?):\n{tail}\n"
            f"Run by hand, then rerun:\n{manual_commands(env, pytriton)}"
            + ("\nor install Triton Inference Server (NVIDIA's container nvcr.io/nvidia/tritonserver) and "
               "put tritonserver on PATH / pass --tritonserver" if pytriton else ""))


def _relocate_scripts(bin_dir: Path, old: Path, new: Path) -> None:
    """venv writes its own path into bin/ (activate, pip's shebangs): point them at the final name."""
    old_b, new_b = str(old).encode(), str(new).encode()
    for path in bin_dir.iterdir():
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        data = path.read_bytes()
        if old_b in data and b"\0" not in data[:4096]:
            path.write_bytes(data.replace(old_b, new_b))


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def server_environment(env: str | os.PathLike | None = None, *, pytriton: bool = False) -> Path:
    """The server environment (created once, then reused): a venv with numpy<2, onnxruntime,
    tokenizers, pillow, and nvidia-pytriton (--no-deps) when PYTRITON. ENV defaults to
    default_environment(). A venv made elsewhere (no marker file) is checked, never installed into.
    Creation happens in a `.partial` folder renamed at the end, under a lock, so an interrupted or
    concurrent setup leaves nothing half-made. Raises EnvironmentSetupError when pip fails."""
    env = Path(env).expanduser().absolute() if env is not None else default_environment().absolute()
    wanted = wanted_packages(pytriton)

    def complete() -> bool:
        marker = read_marker(env)
        return bool(marker) and set(wanted) <= set(marker.get("packages", ())) and (env / "bin" / "python").exists()

    if complete():
        return env
    if env.exists() and read_marker(env) is None:
        if not (env / "bin" / "python").exists() and any(env.iterdir()):
            raise ServeError(f"--env {env}: exists and is not a virtual environment")
        if (env / "bin" / "python").exists():
            _check_environment(env, pytriton)
            return env
    with _locked(env.parent / f".{env.name}.lock"):
        if complete():
            return env
        marker = read_marker(env)
        if marker is not None:  # ours, made without nvidia-pytriton: add what is missing in place
            missing = [p for p in wanted if p not in marker.get("packages", ())]
            _say(f"adding {' '.join(missing)} to the Triton server environment {env} (once)")
            plain = [p for p in missing if p != PYTRITON]
            if plain:
                _pip(env / "bin" / "python", plain, env, pytriton)
            if PYTRITON in missing:
                _pip(env / "bin" / "python", ["--no-deps", PYTRITON], env, pytriton)
            _write_marker(env, {**marker, "packages": sorted(set(marker["packages"]) | set(missing))})
            return env
        if env.exists() and not any(env.iterdir()):
            env.rmdir()
        _say(f"creating the Triton server environment {env} (once; about a minute): "
             f"{' '.join(wanted)}" + (" (--no-deps)" if pytriton else ""))
        started = time.monotonic()
        with atomic_folder(env, mode=0o755) as partial:
            made = subprocess.run([sys.executable, "-m", "venv", "--prompt", env.name, str(partial)], capture_output=True, text=True)
            if made.returncode != 0:
                raise ServeError(f"{sys.executable} -m venv {partial} failed: {made.stderr.strip()[-500:]}")
            _pip(partial / "bin" / "python", list(ENV_PACKAGES), env, pytriton)
            if pytriton:
                _pip(partial / "bin" / "python", ["--no-deps", PYTRITON], env, pytriton)
            info = environment_info(partial)
            _relocate_scripts(partial / "bin", partial, env)
            _write_marker(partial, {"packages": sorted(wanted), "python": info["version"],
                                    "interpreter": sys.executable, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _say(f"server environment ready in {time.monotonic() - started:.0f} s")
    return env


def _write_marker(env: Path, data: dict) -> None:
    with atomic_file(env / MARKER, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# backend directory


def _server_backends(server: Path) -> Path:
    for candidate in (server.parent.parent / "backends", CONTAINER_BACKENDS):
        if all((candidate / "python" / name).is_file() for name in PYTHON_BACKEND_FILES):
            return candidate
    raise ServeError(f"{server}: no Python backend beside it ({server.parent.parent / 'backends'}/python/"
                     f"libtriton_python.so) nor in {CONTAINER_BACKENDS}/python; the idefics model needs "
                     "Triton's Python backend")


def _stub_python(stub: Path) -> str | None:
    """The Python version a stub binary links (libpython3.X.so), read off the file."""
    found = re.search(rb"libpython(3\.\d+)", stub.read_bytes())
    return found.group(1).decode() if found else None


def find_stub(server: Path, version: str) -> Path:
    """The Python backend stub for Python VERSION ("3.11"): nvidia-pytriton ships one per version in
    python_backend_stubs/3.X/; a container's backends/python/ holds one for its own Python."""
    server = Path(server).resolve()
    stubs = server.parent.parent / "python_backend_stubs"
    if stubs.is_dir():
        stub = stubs / version / STUB
        if stub.is_file():
            return stub
        have = sorted((p.name for p in stubs.iterdir() if (p / STUB).is_file()),
                      key=lambda v: tuple(map(int, v.split("."))))
        raise ServeError(f"{server}: no Python backend stub for Python {version} (it has {', '.join(have)}); "
                         f"make a server environment with one of those: python3.X -m venv DIR, install "
                         f"{' '.join(ENV_PACKAGES)} into it, and pass --env DIR")
    stub = _server_backends(server) / "python" / STUB
    if not stub.is_file():
        raise ServeError(f"{server}: no {STUB} in {stub.parent}")
    built = _stub_python(stub)
    if built and built != version:
        raise ServeError(f"{stub} is built for Python {built}, the server environment has Python {version}: "
                         f"make one with python{built} -m venv DIR, install {' '.join(ENV_PACKAGES)} "
                         "into it, and pass --env DIR")
    return stub


def backend_directory(server: str | os.PathLike, version: str | None = None, root: Path | None = None) -> Path:
    """A --backend-directory for SERVER whose python/ holds the server's libtriton_python.so and
    triton_python_backend_utils.py and the stub for Python VERSION (default: this interpreter's),
    all symbolic links (the binaries find their libraries relative to where they really are),
    beside links to the server's other backends. Made once in <cache>/triton/backends-<hash>/."""
    server = Path(server).resolve()
    version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
    source = _server_backends(server)
    stub = find_stub(server, version)
    links = {f"python/{name}": source / "python" / name for name in PYTHON_BACKEND_FILES}
    links[f"python/{STUB}"] = stub
    for entry in sorted(source.iterdir()):
        if entry.name != "python" and entry.is_dir():
            links[entry.name] = entry
    digest = hashlib.sha256(f"{server}\n{version}".encode()).hexdigest()[:12]
    target = (root or cache_root() / "triton") / f"backends-{digest}"

    def valid(folder: Path) -> bool:
        return all((folder / rel).is_symlink() and Path(os.readlink(folder / rel)) == dest
                   for rel, dest in links.items())

    if valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # kept, not replaced, where another process made a valid one meanwhile
    with _locked(target.parent / f".{target.name}.lock"), atomic_folder(target, mode=0o755, keep=valid) as tmp:
        (tmp / "python").mkdir()
        for rel, dest in links.items():
            (tmp / rel).symlink_to(dest)
        (tmp / "SERVER.txt").write_text(f"{server}\nPython {version}\n")
    return target


# ---------------------------------------------------------------------------------------------
# the server


def check_repository(repo: Path, gpus: int | None = None) -> list[str]:
    """The model names of REPO (folders with a config.pbtxt); raises ServeError when there are none,
    or when a model asks for GPU instances (KIND_GPU, idefics-triton's default) and this machine has
    no GPU (`gpus`: how many it has; default gpu_count()), which Triton would only report after
    starting ("has kind KIND_GPU but no GPUs are available")."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ServeError(f"{repo}: no such model repository folder")
    configs = sorted(repo.glob("*/config.pbtxt"))
    if not configs:
        raise ServeError(f"{repo}: no models in it (no */config.pbtxt); write one with "
                         "idefics-triton EXPORT REPO")
    on_gpu = [c for c in configs if re.search(r"\bkind\s*:\s*KIND_GPU\b", c.read_text())]
    if on_gpu and (gpu_count() if gpus is None else gpus) == 0:
        names = ", ".join(c.parent.name for c in on_gpu)
        raise ServeError(f"{repo}: model {names} asks for GPU instances (instance_group kind KIND_GPU, "
                         "idefics-triton's default) and this machine has no NVIDIA GPU; write the repository "
                         "for the CPU: idefics-triton EXPORT REPO --kind KIND_CPU --force")
    return [c.parent.name for c in configs]


def gpu_count() -> int:
    """NVIDIA GPUs the driver shows (/proc/driver/nvidia/gpus), as far as CUDA_VISIBLE_DEVICES lets
    a process see them; 0 without the driver."""
    folder = Path("/proc/driver/nvidia/gpus")
    count = len(list(folder.iterdir())) if folder.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and count:
        count = min(count, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return count


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """COUNT distinct ports free on HOST now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on HOST:PORT now (SO_REUSEADDR, as servers bind: connections
    of a stopped server lingering in TIME_WAIT do not count, a listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def group_members(pgid: int) -> list[int]:
    """Processes still in process group PGID (from /proc; zombies included until reaped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _log_tail(path: Path | None, lines: int = 12) -> str:
    """The errors in the server's log (model load failures, bind errors), then its last LINES lines."""
    if path is None:
        return "(no log)"
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(cannot read {path})"
    errors = [line for line in text if re.match(r"E\d{4} ", line) or line.startswith(("error:", "Signal ("))
              or "UNAVAILABLE" in line or re.search(r"tritonserver: .*option", line)]
    errors = [line for line in errors if "CudaDriverHelper" not in line]  # every CPU-only start says so
    if any(line.startswith("Usage: tritonserver") for line in text):  # a flag it does not take
        return "\n".join(errors + ["(tritonserver printed its usage: see tritonserver --help)"])
    tail = text[-lines:]
    shown = [line for line in errors[-15:] if line not in tail]
    return "\n".join(shown + (["..."] if shown else []) + tail) or "(the log is empty)"


class TritonServer:
    """A tritonserver process over REPO, bound to HOST (127.0.0.1 by default), in its own process
    group. Ports left None are chosen free on HOST. Usable as a context manager (start/stop).

    env: the server environment (default: default_environment(); created on first use).
    tritonserver: the binary (default: find_tritonserver(), else nvidia-pytriton's).
    log: file the server's output goes to (default: a temporary file, kept); passthrough also
    copies it to this process's stdout. extra_args: more tritonserver flags."""

    def __init__(self, repo: str | os.PathLike, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, *, host: str = "127.0.0.1", env: str | os.PathLike | None = None,
                 tritonserver: str | os.PathLike | None = None, log: str | os.PathLike | None = None,
                 passthrough: bool = False, timeout: float = 120.0, exit_timeout: int = 5,
                 extra_args: Sequence[str] = ()):
        self.repo = Path(repo).absolute()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.env = Path(env) if env is not None else None
        self.tritonserver = tritonserver
        self.log = Path(log) if log is not None else None
        self.passthrough = passthrough
        self.timeout = timeout
        self.exit_timeout = exit_timeout
        self.extra_args = list(extra_args)
        self.server: Path | None = None
        self.backends: Path | None = None
        self.process: subprocess.Popen | None = None
        self.models: list[str] = []
        self._tee: threading.Thread | None = None

    # -- addresses
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def urls(self) -> dict[str, str]:
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # -- preparing
    def prepare(self) -> list[str]:
        """Everything but the launch: the repository check, binary, environment, backend folder and
        the command line (returned)."""
        self.models = check_repository(self.repo)
        server = find_tritonserver(self.tritonserver)
        self.env = server_environment(self.env, pytriton=server is None)
        info = read_marker(self.env) or {}
        version = info.get("python") or environment_info(self.env)["version"]
        self.server = server or pytriton_tritonserver(self.env)
        self.backends = backend_directory(self.server, version)
        if self.http_port is None or self.grpc_port is None or self.metrics_port is None:
            ports = iter(free_ports(3, self.host or "0.0.0.0"))
            self.http_port = self.http_port or next(ports)
            self.grpc_port = self.grpc_port or next(ports)
            self.metrics_port = self.metrics_port or next(ports)
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            if not port_free(port, self.host or "0.0.0.0"):
                raise ServeError(f"{name} port {port} on {self.host} is in use (--{name.lower()}-port)")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ServeError(f"the HTTP, gRPC and metrics ports must differ, got {self.http_port}, "
                             f"{self.grpc_port}, {self.metrics_port}")
        cmd = [str(self.server), "--model-repository", str(self.repo), "--backend-directory", str(self.backends),
               "--http-address", self.host, "--http-port", str(self.http_port),
               "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
               "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
               "--allow-metrics", "true", "--exit-timeout-secs", str(self.exit_timeout)]
        caches = Path(self.server).resolve().parent.parent / "caches"
        if caches.is_dir() and caches != Path("/opt/tritonserver/caches"):
            cmd += ["--cache-directory", str(caches)]
        return cmd + self.extra_args

    def process_environment(self) -> dict[str, str]:
        """The server's environment: the stub finds its Python through VIRTUAL_ENV and PATH; the
        env's libpython and nvidia-pytriton's bundled libraries on LD_LIBRARY_PATH; no PYTHONPATH
        or PYTHONHOME from this process (they would bring its NumPy 2)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env["VIRTUAL_ENV"] = str(self.env)
        env["PATH"] = f"{self.env}/bin" + (f":{env['PATH']}" if env.get("PATH") else "")
        libs = []
        info = environment_info(self.env)
        if info.get("shared") and info.get("libdir"):
            libs.append(info["libdir"])
        bundled = Path(self.server).resolve().parent.parent.parent.parent / "nvidia_pytriton.libs"
        if bundled.is_dir():
            libs.append(str(bundled))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        if libs:
            env["LD_LIBRARY_PATH"] = ":".join(libs)
        return env

    # -- running
    def start(self) -> "TritonServer":
        """Launch and wait until /v2/health/ready (every model loaded) or `timeout` seconds; raises
        ServerExited (with the log's last lines) when the server exits first, ServeError on a
        timeout (the server is stopped then)."""
        if self.alive():
            return self
        cmd = self.prepare()
        if self.log is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log = Path(name)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE if self.passthrough else log,
                                            stderr=subprocess.STDOUT, env=self.process_environment(),
                                            start_new_session=True)
        if self.passthrough:
            self._tee = threading.Thread(target=self._copy_output, daemon=True, name="tritonserver-log")
            self._tee.start()
        try:
            self.wait_ready(self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _copy_output(self) -> None:
        with open(self.log, "ab") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with contextlib.suppress(Exception):
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                if self._tee:
                    self._tee.join(2)
                raise ServerExited(f"tritonserver exited with code {code} before it was ready; the last lines of "
                                   f"its log {self.log}:\n{_log_tail(self.log)}")
            # the metrics endpoint is its own listener, which Triton may open after the models are ready
            # (seen under load: /metrics refused a scrape right after readiness)
            if self.ready() and self.metrics_up():
                return
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver was not ready after {timeout:g} s (--timeout); the last lines of "
                                 f"its log {self.log}:\n{_log_tail(self.log)}")
            time.sleep(0.2)

    def _request(self, path: str, data: bytes | None = None, timeout: float = 2.0):
        request = urllib.request.Request(self.http_url + path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"} if data else {})
        return urllib.request.urlopen(request, timeout=timeout)

    def ready(self) -> bool:
        """Whether /v2/health/ready says so (every model loaded: Triton's strict readiness)."""
        try:
            with self._request("/v2/health/ready") as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def metrics_up(self) -> bool:
        """Whether the metrics endpoint answers."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def model_states(self) -> dict[str, str]:
        """{model: state} from POST /v2/repository/index (READY, UNAVAILABLE with a reason, ...)."""
        with self._request("/v2/repository/index", data=b"{}") as response:
            index = json.loads(response.read())
        return {m["name"]: m.get("state", "") + (f" ({m['reason']})" if m.get("reason") else "") for m in index}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (or TIMEOUT seconds); its exit code, None if still running."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL to what is left after TIMEOUT seconds; returns
        once the server and its stubs are gone. The server's exit code (None if never started)."""
        process = self.process
        if process is None:
            return None
        pgid = process.pid  # start_new_session: the server leads its own group
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + 2.0
        while group_members(pgid) and time.monotonic() < deadline:  # stubs finishing on their own
            time.sleep(0.05)
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        if self._tee:
            self._tee.join(2)
        if process.stdout:
            process.stdout.close()
        return process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible frontend


class OpenAIFrontend:
    """runtime.openai_server in a child process of its own (a session of its own: idefics-serve
    stops it), in front of a running server's gRPC port; ready when GET /v1/models answers."""

    def __init__(self, grpc_url: str, port: int, host: str = "127.0.0.1",
                 allowed_image_dir: str | os.PathLike | None = None, log: Path | None = None):
        self.grpc_url, self.port, self.host = grpc_url, port, host
        self.allowed_image_dir = Path(allowed_image_dir).expanduser().absolute() if allowed_image_dir else None
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> "OpenAIFrontend":
        import importlib.util

        if self.allowed_image_dir is not None and not self.allowed_image_dir.is_dir():
            raise ServeError(f"--allowed-image-dir {self.allowed_image_dir}: not a directory")
        if not port_free(self.port, self.host or "0.0.0.0"):
            raise ServeError(f"OpenAI port {self.port} on {self.host} is in use (--openai-port)")
        root = str(Path(importlib.util.find_spec("runtime").origin).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "runtime.openai_server", "--grpc-url", self.grpc_url, "--host", self.host,
               "--port", str(self.port)]
        if self.allowed_image_dir is not None:
            cmd += ["--allowed-image-dir", str(self.allowed_image_dir)]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        finally:
            if self.log:
                out.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ServerExited(f"the OpenAI frontend exited with code {self.process.returncode}"
                                   + (f"; the last lines of {self.log}:\n{_log_tail(self.log)}" if self.log else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"the OpenAI frontend was not ready after {timeout:g} s")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/models", timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if group_members(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# the CLI

DESCRIPTION = """\
Start a Triton Inference Server over the model repository REPO (written by idefics-triton) and stay
in the foreground until Ctrl-C or SIGTERM, which stop it and every process it started.

The server binary is --tritonserver, else tritonserver on PATH (NVIDIA's container), else the one
the nvidia-pytriton wheel ships (Triton 2.51, Python backend only: repositories with
onnxruntime/tensorrt graph models need the container's server). Models run in a server environment
of their own (a venv with numpy<2, onnxruntime, tokenizers, pillow; created once with pip in
<cache>/triton/env-py3.X, or $IDEFICS_TRITON_ENV, or --env). Flags after `--` go to tritonserver.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics-serve", description=DESCRIPTION,
                                usage="%(prog)s [options] REPO [-- TRITONSERVER-FLAGS...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repository", type=Path, help="a Triton model repository (idefics-triton EXPORT REPO)")
    p.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"], metavar="N", help="default: 8000")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"], metavar="N", help="default: 8001")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"], metavar="N", help="default: 8002")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--env", type=Path, default=None, metavar="DIR",
                   help=f"server environment (default: ${ENV_VARIABLE} or <cache>/triton/env-py3.X)")
    p.add_argument("--tritonserver", type=Path, default=None, metavar="PATH",
                   help="server binary (default: tritonserver on PATH, else nvidia-pytriton's)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for every model to load (default: 120)")
    p.add_argument("--log", type=Path, default=None, metavar="FILE",
                   help="server log file (default: <cache>/triton/logs/tritonserver-HTTPPORT.log)")
    p.add_argument("--openai-port", type=int, default=None, metavar="N",
                   help="also serve OpenAI-compatible Chat Completions (/v1/chat/completions, /v1/models, /health) "
                        "on this port, a frontend in front of the server's gRPC port (runtime.openai_server)")
    p.add_argument("--allowed-image-dir", type=Path, default=None, metavar="DIR",
                   help="with --openai-port: image_url parts may name local files under DIR (default: data: URLs "
                        "only; http(s) URLs are always refused)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the server's log here")
    return p


class _Stop(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # the rest goes to tritonserver
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - 1] if "--" in argv else argv)
    stopping = []

    def on_signal(signum, frame):
        if not stopping:  # the first one stops; later ones wait for that
            stopping.append(signum)
            raise _Stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = args.log or cache_root() / "triton" / "logs" / f"tritonserver-{args.http_port}.log"
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port, host=args.host,
                          env=args.env, tritonserver=args.tritonserver, log=log, passthrough=args.verbose,
                          timeout=args.timeout, extra_args=extra)
    frontend = None
    try:
        started = time.monotonic()
        if args.openai_port is not None:
            if args.openai_port in (args.http_port, args.grpc_port, args.metrics_port):
                raise ServeError(f"--openai-port {args.openai_port} is one of the Triton ports")
            if not port_free(args.openai_port, args.host or "0.0.0.0"):
                raise ServeError(f"OpenAI port {args.openai_port} on {args.host} is in use (--openai-port)")
        server.start()
        states = server.model_states()
        if args.openai_port is not None:
            frontend = OpenAIFrontend(server.grpc_url, args.openai_port, args.host, args.allowed_image_dir,
                                      log=Path(server.log).with_name(f"openai-{args.openai_port}.log")).start()
        print(f"idefics-serve: tritonserver {server.server} (pid {server.pid}) ready in "
              f"{time.monotonic() - started:.1f} s over {server.repo}\n"
              f"  HTTP     {server.http_url}\n  gRPC     {server.grpc_url}\n  metrics  {server.metrics_url}\n"
              f"  models   " + ", ".join(f"{name} {state}" for name, state in states.items()) + "\n"
              f"  log      {server.log}\n"
              + (f"  OpenAI   {frontend.url} (chat completions; images: data: URLs"
                 + (f", files under {frontend.allowed_image_dir}" if frontend.allowed_image_dir else "")
                 + f"; log {frontend.log})\n" if frontend else "")
              + "Ctrl-C or SIGTERM stops it.", flush=True)
        while True:
            code = server.wait(1.0)
            if frontend is not None and not frontend.alive():
                print(f"idefics-serve: error: the OpenAI frontend exited with code {frontend.process.returncode}; "
                      f"the last lines of {frontend.log}:\n{_log_tail(frontend.log)}", file=sys.stderr)
                return 1
            if code is not None:
                print(f"idefics-serve: error: tritonserver exited with code {code}; the last lines of "
                      f"{server.log}:\n{_log_tail(server.log)}", file=sys.stderr)
                return code if code > 0 else 1  # a signal (-11: a crash) or 0 unasked
    except _Stop:
        print(f"idefics-serve: {signal.Signals(stopping[0]).name}: stopping the server", file=sys.stderr, flush=True)
        return 0
    except ServerExited as exc:
        print(f"idefics-serve: error: {exc}", file=sys.stderr)
        return 1
    except ToolkitError as exc:
        print(f"idefics-serve: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not stopping:
            stopping.append(None)  # a signal from now on no longer interrupts the stop
        if frontend is not None:
            frontend.stop()
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
