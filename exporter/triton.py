"""A Triton Inference Server model repository from an export, every config derived from the manifest.

    repo/
      vision/     config.pbtxt, 1/model.onnx (or model.plan)   dynamic batching over images
      perceiver/  config.pbtxt, 1/model.onnx (or model.plan)   dynamic batching over prompts
      decoder/    config.pbtxt, 1/model.onnx (or model.plan)   explicit batch; the loop owns it
      idefics/    config.pbtxt, 1/model.py + runtime/ + export/ (manifest, tokenizer files)
                  Python backend, decoupled: runs runtime's generation loop, calling the three
                  models above through BLS (runtime.serving)

Configs are built as tritonclient's `model_config_pb2.ModelConfig` messages and written with
protobuf's text format, so they parse with Triton's own schema by construction.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ToolkitError
from runtime.manifest import GraphSpec, Manifest

log = logging.getLogger(__name__)

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# Graphs whose first axis is a batch that requests can share (the decoder's batch is the loop's).
BATCHED_AXIS = {"vision": "num_images", "perceiver": "batch"}


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

    def __post_init__(self):
        if self.backend not in PLATFORMS:
            raise TritonError(f"--backend must be one of {list(PLATFORMS)}, got {self.backend!r}")
        if self.instances < 1:
            raise TritonError(f"--instances must be at least 1, got {self.instances}")
        if self.max_batch is not None and self.max_batch < 1:
            raise TritonError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.kind not in ("KIND_GPU", "KIND_CPU"):
            raise TritonError(f"instance kind must be KIND_GPU or KIND_CPU, got {self.kind!r}")


def graph_config(manifest: Manifest, spec: GraphSpec, config: RepositoryConfig):
    from tritonclient.grpc import model_config_pb2 as mc

    platform, filename = PLATFORMS[config.backend]
    batched = BATCHED_AXIS.get(spec.name)
    limits = manifest.limits
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
    model.instance_group.add(count=config.instances, kind=getattr(mc.ModelInstanceGroup, config.kind))
    return model


def idefics_config(config: RepositoryConfig):
    from tritonclient.grpc import model_config_pb2 as mc

    model = mc.ModelConfig(name="idefics", backend="python", max_batch_size=0)
    model.model_transaction_policy.decoupled = True  # tokens stream as they are produced
    # either a prompt with images as bytes, or transformers-style arrays (one prompt, batch axis 1)
    model.input.add(name="prompt", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    model.input.add(name="images", data_type=mc.TYPE_STRING, dims=[-1], optional=True)
    model.input.add(name="input_ids", data_type=mc.TYPE_INT64, dims=[1, -1], optional=True)
    model.input.add(name="attention_mask", data_type=mc.TYPE_INT64, dims=[1, -1], optional=True)
    model.input.add(name="pixel_values", data_type=mc.TYPE_FP32, dims=[1, -1, 3, -1, -1], optional=True)
    model.input.add(name="image_attention_mask", data_type=mc.TYPE_INT64, dims=[1, -1, -1], optional=True)
    model.input.add(name="parameters", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    model.output.add(name="text", data_type=mc.TYPE_STRING, dims=[1])
    model.output.add(name="tokens", data_type=mc.TYPE_INT64, dims=[-1])
    model.instance_group.add(count=config.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in (("max_image_bytes", config.max_image_bytes), ("max_image_pixels", config.max_image_pixels),
                       ("max_new_tokens", config.max_new_tokens), ("precision", config.precision or "")):
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


def write_repository(export: Path, repo: Path, config: RepositoryConfig = RepositoryConfig(), force: bool = False) -> Path:
    export, repo = Path(export), Path(repo)
    manifest = Manifest.load(export)
    precision = config.precision or manifest.precision
    graphs = manifest.graphs_for(precision)
    if config.max_batch and config.max_batch > manifest.limits.max_batch:
        raise TritonError(f"--max-batch {config.max_batch} exceeds the export's max_batch "
                          f"{manifest.limits.max_batch} (idefics-export --max-batch)")
    if config.backend == "tensorrt" and precision == "int8wo":
        raise TritonError("int8wo graphs cannot be TensorRT engines; choose --precision fp16 or int8")
    if repo.exists() and any(repo.iterdir()):
        if not force:
            raise TritonError(f"{repo}: exists and is not empty; pass --force to replace it")
        if not (repo / "idefics" / "config.pbtxt").is_file():
            raise TritonError(f"{repo}: is not a model repository written by idefics-triton; refusing to replace it")
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{repo.name}.partial-", dir=repo.parent))
    try:
        for name, spec in graphs.items():
            write_config(graph_config(manifest, spec, config), tmp / name / "config.pbtxt")
            _copy_model(export, spec, precision, tmp / name / "1", config.backend)
        config = RepositoryConfig(**{**config.__dict__, "precision": precision})
        write_config(idefics_config(config), tmp / "idefics" / "config.pbtxt")
        version = tmp / "idefics" / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(Path(__file__).resolve().parent.parent / "runtime", version / "runtime",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (version / "export").mkdir()
        for name in ["manifest.json", *manifest.processor_files]:
            shutil.copy2(export / name, version / "export" / name)
        (tmp / "README.txt").write_text(json.dumps({"export": str(export), "precision": precision,
                                                    "backend": config.backend}, indent=2) + "\n")
        if repo.exists():
            shutil.rmtree(repo)
        tmp.rename(repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo


def _copy_model(export: Path, spec: GraphSpec, precision: str, version: Path, backend: str) -> None:
    version.mkdir(parents=True)
    if backend == "onnxruntime":
        shutil.copy2(export / spec.file, version / "model.onnx")
        if spec.external_data:  # the graph refers to its weights file by name, beside it
            shutil.copy2(export / spec.external_data, version / spec.external_data)
        return
    from runtime.engines import engine_paths

    engine, _ = engine_paths(export, spec.name, precision)
    if not engine.is_file():
        raise TritonError(f"{engine}: no TensorRT engine; build it first: idefics-build-engines {export} "
                          f"--precision {precision}")
    shutil.copy2(engine, version / "model.plan")
