"""TensorRT engines from the strongly typed FP16/INT8 ONNX graphs, through Polygraphy.

TensorRT 11 builds strongly typed networks only: precision comes from the graphs themselves (FP16
tensors, explicit Q/DQ), so the build sets no precision flags. What is derived here from the
manifest, and unit-tested without a GPU: the optimisation profiles (from the export's limits;
the decoder gets a prefill-shaped and a decode-shaped profile), the engine's metadata (TensorRT
version, GPU compute capability, the ONNX file's sha256) and the check that refuses an engine
built for another TensorRT, GPU or graph. The build itself needs TensorRT and a GPU.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from runtime.engines import ENGINE_DIR, EngineError, EngineInfo, engine_paths, gpu_identity, require_tensorrt
from runtime.files import atomic_file
from runtime.manifest import GraphSpec, Manifest, sha256_file

log = logging.getLogger(__name__)

OPT_PROMPT = 128  # the prompt length profiles are tuned for
OPT_PAST = 256  # the cache length decode profiles are tuned for


@dataclass(frozen=True)
class BuildConfig:
    precision: str = "fp16"
    memory_limit: int | None = None  # bytes of builder workspace; None: TensorRT's default
    timing_cache: Path | None = None  # None: <export>/engines/timing.cache, reused across builds
    progress: bool = True  # a progress bar over the graphs

    def __post_init__(self):
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise EngineError(f"--memory-limit must be positive, got {self.memory_limit}")


# ---------------------------------------------------------------- profiles (no TensorRT needed)
def axis_ranges(manifest: Manifest, phase: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named axis, for phase "prefill", "decode" or "encode" (vision/perceiver)."""
    lim, info = manifest.limits, manifest.model
    opt_prompt = min(OPT_PROMPT, lim.max_seq_len)
    opt_past = min(OPT_PAST, lim.max_seq_len - 1) if lim.max_seq_len > 1 else 1
    ranges = {
        "batch": (1, 1, lim.max_batch),
        "images": (1, 1, lim.max_images),
        "num_images": (1, 1, lim.max_batch * lim.max_images),
        "image_tokens": (info.image_seq_len, info.image_seq_len, lim.max_images * info.image_seq_len),
    }
    if phase == "prefill":  # the whole prompt at once, empty past; logits of the last (or every) position
        ranges.update(seq=(1, opt_prompt, lim.max_seq_len), past_seq=(0, 0, 0), total_seq=(1, opt_prompt, lim.max_seq_len),
                      kept_seq=(1, 1, lim.max_seq_len))
    elif phase == "decode":  # one token against the static cache (slots + 1 mask columns)
        ranges.update(seq=(1, 1, 1), past_seq=(1, opt_past, lim.max_seq_len),
                      total_seq=(2, opt_past + 1, lim.max_seq_len + 1), kept_seq=(1, 1, 1))
    elif phase != "encode":
        raise ValueError(f"unknown phase {phase!r}")
    return ranges


def profiles(manifest: Manifest, spec: GraphSpec) -> list[dict[str, list[list[int]]]]:
    """One profile per phase the graph serves: {input: [min shape, opt shape, max shape]}."""
    phases = ["prefill", "decode"] if spec.name == "decoder" else ["encode"]
    result = []
    for phase in phases:
        ranges = axis_ranges(manifest, phase)
        profile = {}
        for tensor in spec.inputs:
            unknown = [d for d in tensor.shape if isinstance(d, str) and d not in ranges]
            if unknown:
                raise EngineError(f"{spec.file}: input {tensor.name} has axes {unknown} with no profile range")
            profile[tensor.name] = [[ranges[d][k] if isinstance(d, str) else d for d in tensor.shape] for k in range(3)]
        result.append(profile)
    return result


def trt_profiles(shapes: list[dict[str, list[list[int]]]]) -> list:
    """Polygraphy Profiles from `profiles()`."""
    from polygraphy.backend.trt import Profile

    result = []
    for shape_set in shapes:
        profile = Profile()
        for tensor, (lo, opt, hi) in shape_set.items():
            profile.add(tensor, min=lo, opt=opt, max=hi)
        result.append(profile)
    return result


# ---------------------------------------------------------------- building (TensorRT + GPU)
def build_engines(folder: Path, config: BuildConfig = BuildConfig()) -> list[EngineInfo]:
    """Build one engine per graph of `config.precision`; returns their metadata."""
    manifest = Manifest.load(folder)
    variant = manifest.variants.get(config.precision)
    if config.precision != "fp32" and variant is None:
        raise EngineError(f"{folder}: this export has no {config.precision} graphs; re-export with --{config.precision}")
    if variant is not None and "tensorrt" not in variant.backends:
        raise EngineError(f"{config.precision} graphs use operators TensorRT cannot read (backends: "
                          f"{variant.backends}); build from fp16 or int8")
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    capability, device = gpu_identity()
    cache = config.timing_cache or Path(folder) / ENGINE_DIR / "timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    built = []
    graphs = manifest.graphs_for(config.precision)
    bar = tqdm(graphs.items(), desc=f"TensorRT {config.precision} engines", unit="engine", disable=not config.progress)
    for name, spec in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        shapes = profiles(manifest, spec)
        network = NetworkFromOnnxPath(str(Path(folder) / spec.file), strongly_typed=True)
        pools = {trt.MemoryPoolType.WORKSPACE: config.memory_limit} if config.memory_limit else None
        builder_config = CreateConfig(profiles=trt_profiles(shapes), memory_pool_limits=pools,
                                      load_timing_cache=str(cache) if cache.exists() else None)
        log.info("building the %s %s engine (%d profile(s))", config.precision, name, len(shapes))
        serialized = EngineBytesFromNetwork(network, config=builder_config,
                                            save_timing_cache=str(cache))()
        engine_path, info_path = engine_paths(folder, name, config.precision)
        info = EngineInfo(graph=name, precision=config.precision, onnx_file=spec.file,
                          onnx_sha256=sha256_file(Path(folder) / spec.file), tensorrt_version=trt.__version__,
                          compute_capability=capability, device=device, profiles=shapes,
                          built=time.strftime("%Y-%m-%dT%H:%M:%S"))
        # engine first, its metadata last, each through a temporary name: a crash leaves no engine
        # that looks loadable
        info_path.unlink(missing_ok=True)
        with atomic_file(engine_path) as f:
            f.write(bytes(serialized))
        with atomic_file(info_path) as f:
            f.write(json.dumps(asdict(info), indent=2).encode())
        log.info("%s built in %.0f s", engine_path.name, time.perf_counter() - start)
        built.append(info)
    return built

