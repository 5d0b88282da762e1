"""manifest.json: written by the exporter, read by everything downstream.

The one place that knows the file's schema. It holds the graphs' IO (names, dtypes, shapes with
named dynamic axes), the model facts a generation loop needs to size its caches, the export's
limits, the source model (enough to rebuild the PyTorch reference), versions, the validation
report and a sha256 of every file. Readers never re-derive names or shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ManifestError

FORMAT_VERSION = 2  # 2: ONNX Runtime-optimized variants record each graph's devices
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("vision", "perceiver", "decoder")
# The precisions idefics-export writes and the flag that makes each (fp32 always).
EXPORT_FLAGS = {"fp32": "", "fp16": "--fp16", "int8": "--int8", "int8wo": "--int8-weight-only",
                "int4wo": "--int4-weight-only"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph, as the graph declares it."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings name a dynamic axis

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> name of every dynamic axis."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the export: its file (relative to the export folder) and its IO."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None  # weights file beside the graph when it passes 2 GB

    def input(self, name: str) -> TensorSpec:
        """The input called `name`; KeyError naming the graph's inputs when there is none."""
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        """The output called `name`; KeyError naming the graph's outputs when there is none."""
        return _by_name(self.outputs, name, self.name)


def _by_name(specs: tuple[TensorSpec, ...], name: str, graph: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"graph {graph!r} has no tensor {name!r}; it has {[s.name for s in specs]}")


@dataclass(frozen=True)
class ModelInfo:
    """What a generation loop needs to know of the model to size caches and masks."""

    num_layers: int
    num_cross_layers: int
    cross_layer_interval: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int  # logits width: base plus additional vocabulary
    vision_seq_len: int  # S: tokens per image out of the vision encoder (patches + CLS)
    vision_dim: int  # Dv
    image_seq_len: int  # L: tokens per image the decoder attends to (resampler latents or S)
    image_size: int
    use_resampler: bool
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    image_token_ids: tuple[int, ...] = ()  # <image>, <fake_token_around_image> when a processor is present


@dataclass(frozen=True)
class CacheNames:
    """Name templates of the per-layer tensors ({i}: decoder layer, {j}: cross-attention layer), so
    readers format names instead of searching the graphs for them."""

    cross_key: str
    cross_value: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    def cross(self, j: int) -> tuple[str, str]:
        return self.cross_key.format(j=j), self.cross_value.format(j=j)

    def past(self, i: int) -> tuple[str, str]:
        return self.past_key.format(i=i), self.past_value.format(i=i)

    def present(self, i: int) -> tuple[str, str]:
        return self.present_key.format(i=i), self.present_value.format(i=i)

    def cache_pairs(self, num_layers: int) -> list[tuple[str, str]]:
        """(past, present) name of every self-attention cache buffer, layer by layer, key first."""
        return [pair for i in range(num_layers) for pair in zip(self.past(i), self.present(i))]


@dataclass(frozen=True)
class Limits:
    """What the export promises to serve (idefics-export --max-batch, --max-images, --max-seq-len).

    A Session refuses a request past any of them before anything runs, naming the limit. The
    embedded default's export: 8 rows, 4 images per prompt, 512 tokens.
    """

    max_batch: int
    max_images: int  # per prompt
    max_seq_len: int  # prompt plus generated tokens

    def __post_init__(self):
        for key, value in dataclasses.asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"export limit {key} must be a positive integer, got {value!r}")


@dataclass
class Variant:
    """Reduced-precision copies of the three graphs (same names and shapes; dtypes may differ)."""

    precision: str  # "fp16" | "int8"
    graphs: dict[str, GraphSpec]
    high_precision_nodes: dict[str, list[str]] = field(default_factory=dict)  # graph -> nodes kept fp32
    calibration: dict[str, Any] = field(default_factory=dict)  # digest, size, source (int8)
    accuracy: dict[str, Any] = field(default_factory=dict)  # graph -> case -> output -> metrics
    backends: list[str] = field(default_factory=list)  # which backends can run these graphs
    # graph -> [{node, op, reason ("rule" | "overflow" | "accuracy"), detail}]: why each node is at
    # the higher precision (exporter.precision.mixed); empty in manifests written before the search existed
    kept_nodes: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # budget, rounds spent, bounds, end-to-end top-1
    # graph -> the device kinds ("cpu", "cuda") whose ONNX Runtime provider runs it (the ORT flavour:
    # CUDA's GroupQueryAttention takes FP16 only, QAttention is CPU only); a graph not listed runs on any
    devices: dict[str, list[str]] = field(default_factory=dict)

    def runs_on(self, graph: str, device: str) -> bool:
        """Whether `graph` runs on `device` ("cpu", "cuda", "cuda:1", ...)."""
        kinds = self.devices.get(graph)
        return kinds is None or str(device).partition(":")[0] in kinds


@dataclass
class Manifest:
    """The contents of an export's manifest.json: `Manifest.load(folder)` reads and checks it.

    Attributes:
        source: the model the export was made from (kind, ref, seed, its full IdeficsConfig):
            enough to rebuild the PyTorch reference (idefics-check does).
        precision: the reduced precision the export was asked for first ("fp32" without one); a
            Session's default follows its backend and device instead (`default_precision`).
        opset: the ONNX opset of every graph.
        model: the model facts a generation loop needs to size caches and masks.
        limits: the largest batch, images per prompt and sequence the export serves.
        graphs: the FP32 graphs ("vision", "perceiver", "decoder"), the reference for the others.
        names: the name templates of the per-layer cache and cross-attention tensors.
        versions: the library versions the export was made and validated with.
        processor_files: the tokenizer and processor files (empty: prompts must come as token ids).
        validation: the accuracy report of the export's validation, and the CPU it ran on.
        variants: the reduced precisions ("fp16", "int8", "int8wo"): graphs, nodes kept at higher
            precision and why, calibration, measured accuracy, the backends that read them.
        ort_optimized: per precision, the ONNX Runtime-only graphs of `idefics-export --ort-optimized`
            and the devices each runs on.
        files: the sha256 of every file, by path relative to the export folder.
        format_version: the manifest's format (2: ONNX Runtime-optimized graphs record their devices).
    """

    source: dict[str, Any]  # kind, ref, seed, config (IdeficsConfig.to_dict())
    precision: str
    opset: int
    model: ModelInfo
    limits: Limits
    graphs: dict[str, GraphSpec]
    names: CacheNames
    versions: dict[str, str]
    processor_files: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)  # precision -> reduced-precision graphs
    # precision -> ONNX Runtime-optimized graphs (idefics-export --ort-optimized), backends ["onnxruntime"]:
    # a "decoder" (exporter.ort.decoder) with GroupQueryAttention over one shared past/present buffer
    # per layer and seqlens_k / total_sequence_length inputs (its own IO), absent where
    # GroupQueryAttention cannot run the model; in "fp32", a "vision" and, where a fusion applies, a
    # "perceiver" (exporter.ort.encoders: fused Attention / LayerNorm / Gelu, the portable graphs' IO).
    # The portable graphs above are untouched by it.
    ort_optimized: dict[str, Variant] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format_version: int = FORMAT_VERSION
    # a layer-streamed export (idefics-export --stream): {"precisions": the ones written}. It writes
    # only the precisions asked for, so `graphs` (the FP32 IO every precision shares) may name files
    # it did not write; empty for a whole-model export, which always writes FP32
    streamed: dict[str, Any] = field(default_factory=dict)

    def wrote(self, precision: str) -> bool:
        """Whether the export holds `precision`'s graph files (FP32: always, unless streamed without it)."""
        if precision == "fp32":
            return not self.streamed or "fp32" in self.streamed.get("precisions", ())
        return precision in self.variants

    def graphs_for(self, precision: str | None = None) -> dict[str, GraphSpec]:
        """The graphs of a precision ("fp32" or a variant); None: the manifest's `precision` field (the
        reduced precision the export was asked for first; Session's default is default_precision())."""
        precision = precision or self.precision
        if precision == "fp32":
            if not self.wrote("fp32"):
                have = ", ".join(self.variants)
                raise ManifestError(f"this export has no fp32 graphs (it has: {have}): a streamed export "
                                    "(--stream) writes only the precisions asked for; re-export with --fp32")
            return self.graphs
        if precision not in self.variants:
            have = ", ".join(["fp32", *self.variants])
            if precision not in EXPORT_FLAGS:
                known = ", ".join(f"{p} ({flag})" if flag else p for p, flag in EXPORT_FLAGS.items())
                raise ManifestError(f"{precision!r} is not a precision idefics-export writes; the precisions are "
                                    f"{known}; this export has: {have}")
            raise ManifestError(f"this export has no {precision} graphs (it has: {have}); "
                                f"re-export with {EXPORT_FLAGS[precision]}")
        return self.variants[precision].graphs

    def all_graphs(self) -> list[GraphSpec]:
        """Every graph of the export: FP32, the reduced precisions', the ONNX Runtime-optimized ones."""
        return [*(self.graphs.values() if self.wrote("fp32") else ()),
                *(g for v in self.variants.values() for g in v.graphs.values()),
                *(g for v in self.ort_optimized.values() for g in v.graphs.values())]

    def ort_graphs(self, precision: str = "fp32", device: str | None = None) -> dict[str, GraphSpec]:
        """The ONNX Runtime-optimized graphs of a precision ({} when the export has none); given a
        `device`, those that run there (Variant.devices)."""
        variant = self.ort_optimized.get(precision)
        if variant is None:
            return {}
        return {name: spec for name, spec in variant.graphs.items() if device is None or variant.runs_on(name, device)}

    # ---- writing
    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (what `write` writes)."""
        return dataclasses.asdict(self)

    def write(self, folder: str | Path) -> Path:
        """Write manifest.json into `folder`; returns its path."""
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    def record_files(self, folder: str | Path) -> None:
        """Hash every file the export wrote (graphs, external data, processor files)."""
        folder = Path(folder)
        names = [g.file for g in self.all_graphs()]
        names += [g.external_data for g in self.all_graphs() if g.external_data]
        names += self.processor_files
        # the int4wo variant's TensorRT form (idefics-export --int4-weight-only: NAME.int4wo.trt.onnx)
        names += [f for v in self.variants.values() for f in v.calibration.get("tensorrt_form", {}).get("files", [])]
        self.files = {name: sha256_file(folder / name) for name in sorted(names)}

    # ---- reading
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {version!r} is not supported by this toolkit "
                f"(it reads version {FORMAT_VERSION}); re-export with this version"
            )
        try:
            graphs = _graphs(data["graphs"])
            def variant(v: dict) -> Variant:  # the reduced precisions' and the ONNX Runtime flavour's alike
                return Variant(
                    precision=v["precision"], graphs=_graphs(v["graphs"]),
                    high_precision_nodes=v.get("high_precision_nodes", {}),
                    calibration=v.get("calibration", {}), accuracy=v.get("accuracy", {}),
                    backends=list(v.get("backends", [])), kept_nodes=v.get("kept_nodes", {}),
                    search=v.get("search", {}), devices={g: list(d) for g, d in v.get("devices", {}).items()},
                )

            variants = {precision: variant(v) for precision, v in data.get("variants", {}).items()}
            model = dict(data["model"])
            model["image_token_ids"] = tuple(model.get("image_token_ids", ()))
            return cls(
                source=data["source"], precision=data["precision"], opset=data["opset"],
                model=ModelInfo(**model), limits=Limits(**data["limits"]), graphs=graphs,
                names=CacheNames(**data["names"]),
                versions=data["versions"], processor_files=list(data.get("processor_files", [])),
                validation=data.get("validation", {}), files=data.get("files", {}), variants=variants,
                ort_optimized={precision: variant(v) for precision, v in data.get("ort_optimized", {}).items()},
                format_version=version, streamed=dict(data.get("streamed", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read `folder`/manifest.json; ManifestError when it is missing, unreadable or malformed."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: not found; is {folder} an idefics-export output folder?")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object")
        return cls.from_dict(data, where=str(path))

    def verify_files(self, folder: str | Path, names: list[str] | None = None) -> None:
        """Raise ManifestError naming the first file that is missing or whose sha256 differs."""
        folder = Path(folder)
        for name in names if names is not None else sorted(self.files):
            if name not in self.files:
                raise ManifestError(f"{folder / MANIFEST_NAME}: lists no sha256 for {name}")
            path = folder / name
            if not path.is_file():
                raise ManifestError(f"{path}: missing (listed in {MANIFEST_NAME})")
            if sha256_file(path) != self.files[name]:
                raise ManifestError(
                    f"{path}: sha256 differs from {MANIFEST_NAME}; the file is corrupt or was changed "
                    "after export (re-export it)"
                )


# What a Session loads when no precision is named, by where it runs: on ONNX Runtime's CPU, INT8
# weight-only decodes fastest and FP16 / INT8 Q/DQ are slower than FP32 (no FP16 or INT8 GEMM
# kernels there); on a GPU, FP16 first (the safer one), then INT8 Q/DQ. INT4 weight-only only where
# the export has no INT8 weight-only graphs (it is the less accurate of the two: it is for memory).
DEFAULT_ORDER = {"cpu": ("int8wo", "int4wo"), "gpu": ("fp16", "int8")}  # then fp32


def default_precision(manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu") -> str:
    """The precision a Session on `backend`/`device` loads by default, among the export's: ONNX
    Runtime on the CPU: int8wo if present, else int4wo, else fp32; TensorRT or ONNX Runtime on CUDA: fp16, else
    int8, else fp32. A variant counts only if its `backends` include `backend` (a manifest that
    lists none predates the field: any). backend "torch" runs the FP32 modules: fp32."""
    if backend == "torch":
        return "fp32"
    gpu = backend == "tensorrt" or str(device).partition(":")[0] != "cpu"
    for precision in DEFAULT_ORDER["gpu" if gpu else "cpu"]:
        variant = manifest.variants.get(precision)
        if variant is not None and (not variant.backends or backend in variant.backends):
            return precision
    return "fp32"


def _graphs(data: dict[str, Any]) -> dict[str, GraphSpec]:
    return {
        name: GraphSpec(
            name=g["name"], file=g["file"], external_data=g.get("external_data"),
            inputs=tuple(_tensor(t) for t in g["inputs"]), outputs=tuple(_tensor(t) for t in g["outputs"]),
        )
        for name, g in data.items()
    }


def _tensor(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
