"""Tensor sources for the layer-streamed export: an IDEFICS checkpoint read one tensor at a time, or
seeded random weights of a preset's shapes made one tensor at a time. Neither ever holds a whole
state dict, so exporting idefics-9b / idefics-80b needs the memory of the layer being exported.

    with open_checkpoint(Path("idefics-9b")) as source:        # safetensors or .bin, sharded or not
        layer = source.module_state("model.layers.3.")         # {"self_attn.q_proj.weight": ..., ...}
    source = RandomSource(build_config("80b"), seed=0)         # 160 GB of weights that never exist at once
    write_random_checkpoint(Path("random-9b"), build_config("9b"))   # ~18 GB of bf16 safetensors shards

Names and shapes are learnt from an IdeficsForVisionText2Text built on the meta device (no memory):
`names()` are its state-dict names, the ones transformers' save_pretrained writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from runtime.errors import ModelLoadError
from runtime.files import atomic_folder
from runtime.reference.sources import GATE_RANGE, build_config

log = logging.getLogger(__name__)

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
LAYOUTS = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)  # looked for in this order
GATES = ("alpha_cross_attn", "alpha_dense")
UNIT_NORMAL = ("latents", "class_embedding")  # transformers' _init_weights draws these with std 1


# ---------------------------------------------------------------- names and shapes
@dataclass(frozen=True)
class ModelLayout:
    """The tensors of a config's IdeficsForVisionText2Text, learnt from a model on the meta device."""

    shapes: dict[str, tuple[int, ...]]  # state-dict name -> shape, in state-dict order
    tied: dict[str, str]  # a tied name (lm_head.weight) -> the name it shares storage with

    @property
    def stored(self) -> list[str]:
        """The names a checkpoint holds: transformers saves one name per tied group."""
        return [name for name in self.shapes if name not in self.tied]


def model_layout(config: IdeficsConfig) -> ModelLayout:
    with torch.device("meta"):
        model = IdeficsForVisionText2Text(copy.deepcopy(config))
    # state_dict leaves out the non-persistent buffers (rotary inv_freq, position_ids): not checkpoint tensors
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            tied[name] = owner
    return ModelLayout(shapes, tied)


# ---------------------------------------------------------------- the interface
class TensorSource:
    """A model's tensors by state-dict name, one at a time. A context manager; `close` drops
    whatever files it holds open."""

    config: IdeficsConfig
    where: str  # for messages: the folder, or "random:9b (seed 0)"

    def __init__(self, config: IdeficsConfig, where: str):
        self.config = config
        self.where = where
        self.layout = model_layout(config)

    def names(self) -> list[str]:
        return list(self.layout.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return self.layout.shapes[name]

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` converted to `dtype`, in memory of its own."""
        self._check_name(name)
        return self._get_impl(name, dtype)

    def module_state(self, prefix: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` ("model.layers.3."), keyed without the prefix: a state dict
        for that module's load_state_dict."""
        if not prefix.endswith("."):
            raise ValueError(f"prefix {prefix!r} must end with '.' (else 'model.layers.1' takes in model.layers.10)")
        names = [name for name in self.layout.shapes if name.startswith(prefix)]
        if not names:
            raise KeyError(f"{self.where}: no tensor name begins with {prefix!r}")
        return {name[len(prefix):]: self.get(name, dtype) for name in names}

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_name(self, name: str) -> None:
        if name not in self.layout.shapes:
            raise KeyError(f"{self.where}: {name!r} is not a tensor of this config's IdeficsForVisionText2Text")

    def _get_impl(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- checkpoint folders
def open_checkpoint(folder: Path) -> TensorSource:
    """A checkpoint folder as a TensorSource: config.json with safetensors (model.safetensors.index.json
    or model.safetensors) or, slower, pickled .bin weights (pytorch_model.bin.index.json or
    pytorch_model.bin). ModelLoadError names the file at fault."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder (expected a save_pretrained checkpoint)")
    found = next((name for name in LAYOUTS if (folder / name).is_file()), None)
    if found is None:
        raise ModelLoadError(f"{folder}: no checkpoint weights; looked for {', '.join(LAYOUTS)}")
    config = _read_config(folder)
    if found.startswith("model.safetensors"):
        return SafetensorsSource(folder, config, found)
    log.warning("%s: reading pickled .bin weights, the slower fallback: each shard is unpickled whole "
                "(memory-mapped), where safetensors is read tensor by tensor", folder)
    return PickleSource(folder, config, found)


def _read_config(folder: Path) -> IdeficsConfig:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: missing; {folder} is not a transformers checkpoint") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("model_type") != "idefics":
        raise ModelLoadError(f"{path}: model_type {data.get('model_type') if isinstance(data, dict) else None!r} "
                             "is not 'idefics' (IdeficsForVisionText2Text)")
    return IdeficsConfig.from_dict(data)


class _Checkpoint(TensorSource):
    """What both file formats share: which file holds a tensor, tied names, the shape check."""

    def __init__(self, folder: Path, config: IdeficsConfig, layout_file: str):
        super().__init__(config, str(folder))
        self.folder = folder
        self.listing = folder / layout_file  # the index, or the single weights file
        if layout_file.endswith(".index.json"):
            self.weight_map = _read_index(self.listing)
        else:
            self.weight_map = dict.fromkeys(self._keys(self.listing), layout_file)

    def _get_impl(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        stored = name
        if name not in self.weight_map and name in self.layout.tied:  # transformers saves a tied tensor once
            stored = self.layout.tied[name]
        if stored not in self.weight_map:
            raise ModelLoadError(f"{self.listing}: has no tensor {name}")
        file = self.folder / self.weight_map[stored]
        got, expected = self._stored_shape(stored, file), self.layout.shapes[name]
        if got != expected:
            raise ModelLoadError(f"{file}: tensor {stored} has shape {got}; the config "
                                 f"({self.folder / 'config.json'}) makes it {expected}")
        return self._read(stored, file).to(dtype, copy=True)  # a copy: nothing refers into the file

    def _keys(self, file: Path) -> list[str]:
        raise NotImplementedError

    def _stored_shape(self, name: str, file: Path) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str, file: Path) -> torch.Tensor:
        raise NotImplementedError


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: unreadable index ({type(exc).__name__}: {exc})") from exc
    for file in sorted(set(weight_map.values())):
        if not (path.parent / file).is_file():
            raise ModelLoadError(f"{path.parent / file}: missing (named by {path})")
    return weight_map


class SafetensorsSource(_Checkpoint):
    """Safetensors shards: their headers (names, shapes) read once through handles kept open; `get`
    reads the one tensor asked for through a handle of its own, closed (unmapped) at once."""

    def __init__(self, folder: Path, config: IdeficsConfig, layout_file: str):
        self._handles: dict[Path, Any] = {}
        super().__init__(folder, config, layout_file)

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise ModelLoadError(f"{file}: unreadable safetensors file ({exc})") from exc
        return self._handles[file]

    def _keys(self, file: Path) -> list[str]:
        return list(self._handle(file).keys())

    def _stored_shape(self, name: str, file: Path) -> tuple[int, ...]:
        try:
            return tuple(self._handle(file).get_slice(name).get_shape())  # the header only
        except SafetensorError as exc:
            raise ModelLoadError(f"{file}: has no tensor {name} ({exc})") from exc

    def _read(self, name: str, file: Path) -> torch.Tensor:
        # A handle maps its whole shard, and every page a read touches stays in this process's
        # resident memory until the handle goes: with the shards kept open, a streamed 9B export's
        # RSS grew by each layer's bf16 bytes (0.4 GB a layer). The data is read through a handle
        # of its own, unmapped once the tensor is copied out; the kept handles read headers only.
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name).clone()

    def close(self) -> None:
        self._handles.clear()


class PickleSource(_Checkpoint):
    """Pickled .bin shards: the slower fallback. torch.load must unpickle a shard whole, so one is
    loaded at a time (memory-mapped, so its tensors are read as they are used) and dropped before
    the next: read layer by layer, each shard is loaded about once."""

    def __init__(self, folder: Path, config: IdeficsConfig, layout_file: str):
        self._shard: tuple[Path, dict[str, torch.Tensor]] | None = None
        super().__init__(folder, config, layout_file)

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if self._shard is not None and self._shard[0] == file:
            return self._shard[1]
        self._shard = None  # dropped before the next is loaded: at most one shard open
        try:
            tensors = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise ModelLoadError(f"{file}: unreadable .bin shard ({exc})") from exc
        if not isinstance(tensors, dict):
            raise ModelLoadError(f"{file}: holds a {type(tensors).__name__}, not a state dict")
        self._shard = (file, tensors)
        return tensors

    def _keys(self, file: Path) -> list[str]:
        return list(self._load(file))

    def _stored_shape(self, name: str, file: Path) -> tuple[int, ...]:
        tensors = self._load(file)
        if name not in tensors:
            raise ModelLoadError(f"{file}: has no tensor {name} (the index {self.listing} says it does)")
        return tuple(tensors[name].shape)

    def _read(self, name: str, file: Path) -> torch.Tensor:
        return self._load(file)[name]

    def close(self) -> None:
        self._shard = None


# ---------------------------------------------------------------- seeded random weights
def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor `name`: from sha256, stable across processes and Python versions
    (Python's hash of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.Generator takes it


class RandomSource(TensorSource):
    """Random weights of a config's shapes, each tensor made when asked for from (seed, name) alone:
    the same tensor whatever else was asked for before, in any process; memory is that one tensor.

    Tensor `name` is drawn in float32 by a torch.Generator seeded with tensor_seed(seed, name),
    then converted to the dtype asked for:
      alpha_cross_attn, alpha_dense   uniform in GATE_RANGE (IDEFICS starts them at zero, which
                                      switches the image path off; here image bugs must show)
      *.bias                          zeros
      1-D *.weight (the norms)        ones
      latents, class_embedding        normal(0, 1), as transformers' _init_weights draws them
      every other tensor              normal(0, config.initializer_range): Linear, Embedding,
                                      Conv2d and position-embedding weights, vision tower included
                                      (transformers initialises those with the top-level range too)
    A tied name (lm_head.weight with tie_word_embeddings) gives the tensor it is tied to."""

    def __init__(self, config: IdeficsConfig, seed: int = 0, *, label: str | None = None):
        super().__init__(config, f"random:{label} (seed {seed})" if label else f"random (seed {seed})")
        self.seed = seed

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> RandomSource:
        """Random weights of a preset's shapes (runtime.reference.presets: 9b, 80b, tiny, ...)."""
        return cls(build_config(name), seed, label=name)

    def _get_impl(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        name = self.layout.tied.get(name, name)
        shape = self.layout.shapes[name]
        leaf = name.rpartition(".")[2]
        if leaf in GATES:
            low, high = GATE_RANGE
            generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
            return torch.empty(shape).uniform_(low, high, generator=generator).to(dtype)
        if leaf == "bias":
            return torch.zeros(shape, dtype=dtype)
        if leaf == "weight" and len(shape) == 1:  # LayerNorm / RMSNorm scales: the only 1-D weights
            return torch.ones(shape, dtype=dtype)
        std = 1.0 if leaf in UNIT_NORMAL else self.config.initializer_range
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
        return torch.empty(shape).normal_(0.0, std, generator=generator).to(dtype)


# ---------------------------------------------------------------- random checkpoints on disk
@dataclass(frozen=True)
class CheckpointPlan:
    """Which safetensors shard holds which tensor, as transformers' save_pretrained splits a state
    dict (huggingface_hub.split_torch_state_dict_into_shards), known before any tensor exists."""

    shards: dict[str, list[str]]  # file name -> tensor names, in writing order
    total_size: int  # bytes of all tensors
    total_parameters: int

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: file for file, names in self.shards.items() for name in names}


def plan_checkpoint(config: IdeficsConfig, dtype: torch.dtype = torch.bfloat16,
                    shard_bytes: int = 2**30) -> CheckpointPlan:
    """The shards of a `dtype` checkpoint of `config`, at most `shard_bytes` each (a larger tensor
    gets a shard of its own). Always model-0000i-of-0000N.safetensors, one shard included."""
    layout = model_layout(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = total_size = total_parameters = 0
    for name in layout.stored:
        numel = math.prod(layout.shapes[name])
        size = numel * itemsize
        total_size += size
        total_parameters += numel
        if size > shard_bytes:  # the same order as huggingface_hub: a big tensor's shard comes first
            shards.append([name])
            continue
        if current_size + size > shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards)}
    return CheckpointPlan(files, total_size, total_parameters)


def write_random_checkpoint(folder: Path, config: IdeficsConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            shard_bytes: int = 2**30, progress: bool = True) -> Path:
    """Write RandomSource(config, seed)'s weights as a save_pretrained checkpoint that
    IdeficsForVisionText2Text.from_pretrained loads: config.json, safetensors shards of at most
    `shard_bytes` and model.safetensors.index.json, whose metadata also records that the weights
    are random and their seed. One shard is in memory at a time. The folder appears whole or not
    at all (runtime.files.atomic_folder), replacing what was there."""
    folder = Path(folder)
    plan = plan_checkpoint(config, dtype, shard_bytes)
    source = RandomSource(config, seed)
    saved = copy.deepcopy(config)
    saved.dtype = dtype  # config.json records the weights' dtype, as save_pretrained does
    index = {
        "metadata": {"total_size": plan.total_size, "total_parameters": plan.total_parameters,
                     "weights": "random (exporter.stream.checkpoint.RandomSource)", "seed": seed},
        "weight_map": dict(sorted(plan.weight_map.items())),
    }
    bar = tqdm(total=len(plan.weight_map), desc=f"random checkpoint {folder.name}", unit="tensor", disable=not progress)
    with atomic_folder(folder, mode=0o755) as tmp, bar:
        saved.save_pretrained(tmp)
        for file, names in plan.shards.items():
            tensors = {}
            for name in names:
                tensors[name] = source.get(name, dtype)
                bar.update()
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors  # one shard in memory at a time
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: %d shards, %.2f GB of %s random weights (seed %d)",
             folder, len(plan.shards), plan.total_size / 1e9, dtype, seed)
    return folder
