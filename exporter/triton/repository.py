"""A Triton Inference Server model repository from an export, every config derived from the manifest.

    repo/
      idefics/    config.pbtxt, 1/model.py + runtime/ + export/ (manifest, tokenizer files and,
                  --graphs inprocess, the graphs or engines themselves)
                  Python backend, decoupled: the toolkit's in-flight batching engine
                  (runtime.serving); responses stream as tokens come
      vision/     config.pbtxt, 1/model.onnx (or model.plan, or model.py)   } only with --graphs bls or
      perceiver/  config.pbtxt, 1/model.onnx (or model.plan, or model.py)   } bls-python: the engine
      decoder/    config.pbtxt, 1/model.onnx (or model.plan, or model.py)   } calls them through BLS
      README.txt  how to serve and query it

`--graphs inprocess` (default) runs the graphs inside the idefics model's process with Session's
runners, the caches in device memory. `bls` keeps the three graph models (onnxruntime_onnx or
tensorrt_plan); `bls-python` writes them as Python models running ONNX Runtime, for servers that
have no onnxruntime backend (nvidia-pytriton's). Configs are built as tritonclient's
`model_config_pb2.ModelConfig` messages and written with protobuf's text format, so they parse
with Triton's own schema by construction.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import runtime
from runtime.errors import ToolkitError
from runtime.manifest import GraphSpec, Manifest, default_precision
from runtime.files import atomic_folder

RUNTIME = Path(runtime.__file__).resolve().parent  # the package copied into the repository

log = logging.getLogger(__name__)

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# Graphs whose first axis is a batch that requests can share (the decoder's batch is the loop's).
BATCHED_AXIS = {"vision": "num_images", "perceiver": "batch"}
GRAPHS = ("inprocess", "bls", "bls-python")


class TritonError(ToolkitError):
    """The repository cannot be written (missing engines, bad options, existing folder)."""


@dataclass(frozen=True)
class RepositoryConfig:
    backend: str = "onnxruntime"
    precision: str | None = None  # None: the export's default precision
    instances: int = 1
    kind: str = "KIND_GPU"  # or KIND_CPU
    max_batch: int | None = None  # None: the export's --max-batch; smaller caps the server
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 256
    graphs: str = "inprocess"  # where the graphs run: in the idefics model's process, or BLS models
    max_queued: int = 64  # requests waiting for rows in the idefics model; past it, an error at once
    image_cache_bytes: int = 256 * 2**20  # the idefics model's image cache (0: off)
    prefill_chunk: int | None = None  # joins in pieces of this many prompt tokens (None: whole)

    def __post_init__(self):
        if self.backend not in PLATFORMS:
            raise TritonError(f"--backend must be one of {list(PLATFORMS)}, got {self.backend!r}")
        if self.graphs not in GRAPHS:
            raise TritonError(f"--graphs must be one of {list(GRAPHS)}, got {self.graphs!r}")
        if self.graphs == "bls-python" and self.backend != "onnxruntime":
            raise TritonError("--graphs bls-python runs ONNX graphs in Python models: use --backend onnxruntime")
        for name in ("max_queued", "image_cache_bytes", "max_new_tokens"):
            if getattr(self, name) < (1 if name != "image_cache_bytes" else 0):
                raise TritonError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.instances < 1:
            raise TritonError(f"--instances must be at least 1, got {self.instances}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise TritonError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_batch is not None and self.max_batch < 1:
            raise TritonError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.kind not in ("KIND_GPU", "KIND_CPU"):
            raise TritonError(f"instance kind must be KIND_GPU or KIND_CPU, got {self.kind!r}")


def graph_config(manifest: Manifest, spec: GraphSpec, config: RepositoryConfig):
    from tritonclient.grpc import model_config_pb2 as mc

    limits = manifest.limits
    if config.graphs == "bls-python":  # requests are not batched by the server for Python models
        model, batched = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=0), None
    else:
        platform, filename = PLATFORMS[config.backend]
        batched = BATCHED_AXIS.get(spec.name)
        model = mc.ModelConfig(name=spec.name, platform=platform, default_model_filename=filename)
    if batched:
        batch = min(config.max_batch or limits.max_batch, limits.max_batch)
        model.max_batch_size = batch * (limits.max_images if batched == "num_images" else 1)
        model.dynamic_batching.SetInParent()

    def dims(shape) -> list[int]:
        shape = shape[1:] if batched else shape  # Triton adds the batch axis itself
        return [d if isinstance(d, int) else -1 for d in shape]

    for tensor in spec.inputs:
        model.input.add(name=tensor.name, data_type=getattr(mc, DTYPES[tensor.dtype]), dims=dims(tensor.shape))
    for tensor in spec.outputs:
        model.output.add(name=tensor.name, data_type=getattr(mc, DTYPES[tensor.dtype]), dims=dims(tensor.shape))
    kind = "KIND_CPU" if config.graphs == "bls-python" else config.kind
    model.instance_group.add(count=config.instances, kind=getattr(mc.ModelInstanceGroup, kind))
    return model


def idefics_config(config: RepositoryConfig):
    from tritonclient.grpc import model_config_pb2 as mc

    model = mc.ModelConfig(name="idefics", backend="python", max_batch_size=0)
    model.model_transaction_policy.decoupled = True  # tokens stream as they are produced
    # either a prompt with images as bytes, or transformers-style arrays (one prompt, batch axis 1)
    model.input.add(name="prompt", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    model.input.add(name="images", data_type=mc.TYPE_STRING, dims=[-1], optional=True)
    model.input.add(name="images_base64", data_type=mc.TYPE_STRING, dims=[-1], optional=True)  # JSON clients
    model.input.add(name="input_ids", data_type=mc.TYPE_INT64, dims=[1, -1], optional=True)
    model.input.add(name="attention_mask", data_type=mc.TYPE_INT64, dims=[1, -1], optional=True)
    model.input.add(name="pixel_values", data_type=mc.TYPE_FP32, dims=[1, -1, 3, -1, -1], optional=True)
    model.input.add(name="image_attention_mask", data_type=mc.TYPE_INT64, dims=[1, -1, -1], optional=True)
    model.input.add(name="settings", data_type=mc.TYPE_STRING, dims=[1], optional=True)  # JSON
    model.output.add(name="text", data_type=mc.TYPE_STRING, dims=[1])
    model.output.add(name="tokens", data_type=mc.TYPE_INT64, dims=[-1])
    model.output.add(name="prompt_tokens", data_type=mc.TYPE_INT64, dims=[1])  # in the last response
    model.output.add(name="finish_reason", data_type=mc.TYPE_STRING, dims=[1])  # in the last response
    inprocess = config.graphs == "inprocess"
    # in-process, the instance runs the graphs (on the instance's GPU with KIND_GPU); with BLS it
    # only runs the loop, on the CPU
    kind = config.kind if inprocess else "KIND_CPU"
    model.instance_group.add(count=config.instances, kind=getattr(mc.ModelInstanceGroup, kind))
    parameters = {
        "graphs": "inprocess" if inprocess else "bls",
        "backend": config.backend, "device": "cuda" if kind == "KIND_GPU" else "cpu",
        "precision": config.precision or "", "max_batch": config.max_batch or "",
        "max_queued": config.max_queued, "image_cache_bytes": config.image_cache_bytes,
        "max_image_bytes": config.max_image_bytes, "max_image_pixels": config.max_image_pixels,
        "max_new_tokens": config.max_new_tokens, "prefill_chunk": config.prefill_chunk or "",
    }
    for key, value in parameters.items():
        if value != "":  # unset: the idefics model's default
            model.parameters[key].string_value = str(value)
    return model


def write_config(model, path: Path) -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(model))


MODEL_PY = '''"""Triton Python backend entry point: the toolkit's generation loop, graphs called through BLS."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the bundled runtime/ package

from runtime.serving import TritonPythonModel  # noqa: E402,F401
'''

GRAPH_MODEL_PY = '''"""Triton Python backend: one graph of an idefics export run in ONNX Runtime (idefics-triton
--graphs bls-python, for servers without the onnxruntime backend). Inputs and outputs as the graph's."""
import sys
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from idefics_cpu import exact_int8  # noqa: E402 (runtime/cpu.py, copied beside this file)


class TritonPythonModel:
    def initialize(self, args):
        options = exact_int8(onnxruntime.SessionOptions())  # INT8 products exact on CPUs without VNNI too
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(Path(__file__).parent / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                values = self.session.run(self.outputs, feed)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, values)]))
            except Exception as exc:  # this request's error, to its caller
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses
'''

README_TXT = """An idefics-triton model repository ({graphs} graphs, {backend}, precision {precision}).

Serve it (a real Triton Inference Server; idefics-serve finds tritonserver on PATH or uses the one
nvidia-pytriton ships, and prepares a Python environment for the Python backend's stub):
    idefics-serve {repo} --http-port 8000 --grpc-port 8001 --metrics-port 8002
or, in NVIDIA's Triton container (its own tritonserver and Python):
    tritonserver --model-repository {repo}

Query it over gRPC, streaming (decoupled model):
    python scripts/triton_client.py --url localhost:8001 --image photo.jpg --prompt "What is in the picture?"
or over HTTP with Triton's generate endpoint:
    curl -X POST localhost:8000/v2/models/idefics/generate \\
         -d '{{"prompt": "User: hello<end_of_utterance>\\nAssistant:", "parameters": {{"max_new_tokens": 16}}}}'
Inputs: prompt (one <image> placeholder per image), images (encoded bytes) or images_base64,
or input_ids [1,T] (+ attention_mask, pixel_values, image_attention_mask); settings (JSON
generation settings, "stream": true for a response per piece; over the HTTP generate endpoint,
its "parameters" object). Outputs: text, tokens.

The idefics model's Python environment needs NumPy 1.x (the backend stub is built against it),
onnxruntime (onnxruntime-gpu for --kind KIND_GPU), tokenizers and Pillow{tensorrt}; the toolkit's
runtime/ package is bundled in idefics/1/runtime.
{processor}"""


def write_repository(export: Path, repo: Path, config: RepositoryConfig = RepositoryConfig(), force: bool = False) -> Path:
    export, repo = Path(export), Path(repo)
    manifest = Manifest.load(export)
    # what a Session on the served backend and device would load (int8wo or fp32 on a CPU instance)
    device = "cuda" if config.kind == "KIND_GPU" and config.graphs != "bls-python" else "cpu"
    precision = config.precision or default_precision(manifest, config.backend, device)
    graphs = manifest.graphs_for(precision)
    if config.max_batch and config.max_batch > manifest.limits.max_batch:
        raise TritonError(f"--max-batch {config.max_batch} exceeds the export's max_batch "
                          f"{manifest.limits.max_batch} (idefics-export --max-batch)")
    if config.backend == "tensorrt" and precision in ("int8wo", "int4wo"):
        raise TritonError(f"{precision} graphs cannot be TensorRT engines; choose --precision fp16 or int8")
    if repo.exists() and any(repo.iterdir()):
        if not force:
            raise TritonError(f"{repo}: exists and is not empty; pass --force to replace it")
        if not (repo / "idefics" / "config.pbtxt").is_file():
            raise TritonError(f"{repo}: is not a model repository written by idefics-triton; refusing to replace it")
    with atomic_folder(repo) as tmp:
        if config.graphs != "inprocess":
            for name, spec in graphs.items():
                write_config(graph_config(manifest, spec, config), tmp / name / "config.pbtxt")
                _copy_model(export, spec, precision, tmp / name / "1", config.backend)
                if config.graphs == "bls-python":
                    (tmp / name / "1" / "model.py").write_text(GRAPH_MODEL_PY)
                    shutil.copy2(RUNTIME / "cpu.py",
                                 tmp / name / "1" / "idefics_cpu.py")
        config = RepositoryConfig(**{**config.__dict__, "precision": precision})
        write_config(idefics_config(config), tmp / "idefics" / "config.pbtxt")
        version = tmp / "idefics" / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(RUNTIME, version / "runtime",
                        ignore=shutil.ignore_patterns("__pycache__", "reference"))
        bundled = version / "export"
        bundled.mkdir()
        for name in ["manifest.json", *manifest.processor_files]:
            shutil.copy2(export / name, bundled / name)
        if config.graphs == "inprocess":  # the graphs (or engines) run in the idefics model itself
            for spec in graphs.values():
                for name in filter(None, (spec.file, spec.external_data)):
                    shutil.copy2(export / name, bundled / name)
                if config.backend == "tensorrt":  # the engine and the metadata its runner checks
                    for path in _engine_files(export, spec, precision):
                        if not path.is_file():
                            raise TritonError(f"{path}: missing; build the engines again: idefics-build-engines "
                                              f"{export} --precision {precision}")
                        (bundled / path.parent.name).mkdir(exist_ok=True)
                        shutil.copy2(path, bundled / path.parent.name / path.name)
            if config.backend == "onnxruntime":  # the --ort-optimized graphs, which its Session prefers
                for variant in manifest.ort_optimized.values():
                    for spec in variant.graphs.values():
                        for name in filter(None, (spec.file, spec.external_data)):
                            shutil.copy2(export / name, bundled / name)
        if not manifest.processor_files:
            log.warning("%s has no processor files: the idefics model will take input_ids only, not prompts", export)
        (tmp / "README.txt").write_text(README_TXT.format(
            graphs=config.graphs, backend=config.backend, precision=precision, repo=repo,
            tensorrt=" (and TensorRT for --backend tensorrt)" if config.backend == "tensorrt" else "",
            processor="" if manifest.processor_files else
            "\nThis export has no processor files (tokenizer): send input_ids, not prompts.\n"))
    return repo


def _engine_files(export: Path, spec: GraphSpec, precision: str) -> tuple[Path, Path]:
    from runtime.engines import engine_paths

    engine, meta = engine_paths(export, spec.name, precision)
    if not engine.is_file():
        raise TritonError(f"{engine}: no TensorRT engine; build it first: idefics-build-engines {export} "
                          f"--precision {precision}")
    return engine, meta


def _copy_model(export: Path, spec: GraphSpec, precision: str, version: Path, backend: str) -> None:
    version.mkdir(parents=True)
    if backend == "onnxruntime":
        shutil.copy2(export / spec.file, version / "model.onnx")
        if spec.external_data:  # the graph refers to its weights file by name, beside it
            shutil.copy2(export / spec.external_data, version / spec.external_data)
        return
    engine, _ = _engine_files(export, spec, precision)
    shutil.copy2(engine, version / "model.plan")
