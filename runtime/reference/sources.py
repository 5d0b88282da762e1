"""Turn `--model` into a loaded IdeficsForVisionText2Text (and its processor when it has one).

Three kinds of source, one loading path: the embedded default is built from a seed and saved as an
ordinary checkpoint folder, so it is loaded exactly as a user's local checkpoint is.

  (none) / "default"   the embedded tiny default (presets "tiny" + the offline tokenizer, tokenizer.py)
  random:NAME          random weights in a preset's shape (tiny, medium, 9b-slice, 9b, 80b), no processor
  a folder             a save_pretrained checkpoint (config.json + weights [+ processor files])
  owner/name           a Hugging Face hub id (needs network access to the hub)

`load_reference` rebuilds an export's model from the source its manifest records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from runtime.errors import ModelLoadError, ReferenceMismatchError, ToolkitError
from runtime.manifest import Manifest
from runtime.files import atomic_folder
from runtime.paths import cache_root
from runtime.reference.presets import CONFIG_VARIANTS, PRESETS, TINY_TOKENIZER_SIZE, deep_update, preset_kwargs

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
# Bump when the embedded default's recipe changes, so stale cached checkpoints are rebuilt.
DEFAULT_RECIPE_VERSION = 1
# IDEFICS initialises its gates at zero, which switches the image path off; models built here get
# gates of this size so that image bugs change the logits.
GATE_RANGE = (0.5, 1.5)
TINY_INIT_RANGE = 0.1  # larger than HF's 0.02 so tiny random logits are not flat (clear greedy argmax)


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "default" | "preset" | "local" | "hub"
    ref: str  # preset name, folder or hub id
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ref": self.ref, "seed": self.seed}


@dataclass
class LoadedModel:
    model: IdeficsForVisionText2Text
    source: ModelSource
    processor: Any = None  # IdeficsProcessor or None
    checkpoint_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_source(spec: str | None, seed: int = 0) -> ModelSource:
    if spec in (None, "", DEFAULT_MODEL):
        return ModelSource("default", "tiny", seed)
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ModelLoadError(f"--model {spec}: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return ModelSource("preset", name, seed)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        return ModelSource("local", str(path.resolve()), seed)
    return ModelSource("hub", spec, seed)


def load(source: ModelSource) -> LoadedModel:
    if source.kind == "default":
        folder = ensure_default_checkpoint(source.seed)
        loaded = _load_local(folder, source)
        return loaded
    if source.kind == "preset":
        return LoadedModel(build_random(source.ref, source.seed), source)
    if source.kind == "local":
        return _load_local(Path(source.ref), source)
    return _load_hub(source)


def build_config(preset: str, **overrides: Any) -> IdeficsConfig:
    kwargs = preset_kwargs(preset)
    if preset == "tiny":
        kwargs.setdefault("initializer_range", TINY_INIT_RANGE)
    kwargs.update(overrides)
    return IdeficsConfig(**kwargs)


def build_random(preset: str, seed: int = 0, **overrides: Any) -> IdeficsForVisionText2Text:
    """Random weights in a preset's shape, with non-zero gates; refuses shapes that do not fit in RAM."""
    config = build_config(preset, **overrides)
    _check_fits_in_memory(config, preset)
    return random_model(config, seed)


def variant_model(overrides: str | dict[str, Any], seed: int = 0) -> IdeficsForVisionText2Text:
    """A random tiny model with a config variant (a CONFIG_VARIANTS name or overrides of "tiny")."""
    if isinstance(overrides, str):
        overrides = CONFIG_VARIANTS[overrides]
    kwargs = deep_update(preset_kwargs("tiny"), overrides)
    kwargs.setdefault("initializer_range", TINY_INIT_RANGE)
    return random_model(IdeficsConfig(**kwargs), seed)


def random_model(config: IdeficsConfig, seed: int = 0) -> IdeficsForVisionText2Text:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    set_gates(model, seed)
    return model


def set_gates(model: IdeficsForVisionText2Text, seed: int, low_high: tuple[float, float] = GATE_RANGE) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    low, high = low_high
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            for alpha in (layer.alpha_cross_attn, layer.alpha_dense):
                alpha.copy_(low + (high - low) * torch.rand(alpha.shape, generator=gen))


def _check_fits_in_memory(config: IdeficsConfig, preset: str) -> None:
    # fp32 weights are held by the model and again by the exported graph while it is written.
    n = approx_params(config)
    need = 3 * 4 * n
    avail = available_memory()
    if avail and need > avail:
        raise ModelLoadError(
            f"random:{preset} has about {n / 1e9:.1f}B parameters and needs about {need / 2**30:.0f} GiB of "
            f"memory to export in fp32; this machine has {avail / 2**30:.0f} GiB available: export it "
            "layer by layer (idefics-export --stream)"
        )


def approx_params(c: IdeficsConfig) -> int:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size + c.additional_vocab_size
    dv = c.vision_config.embed_dim
    text = c.num_hidden_layers * (4 * d * d + 3 * d * f) + 2 * v * d
    cross = (c.num_hidden_layers // c.cross_layer_interval) * (2 * d * d + 2 * d * dv + 3 * d * f)
    vision = c.vision_config.num_hidden_layers * (4 * dv * dv + 2 * dv * c.vision_config.intermediate_size)
    return text + cross + vision


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- an export's model
_NOT_COMPARED = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


def _comparable(config: dict) -> dict:
    """A config dict without what says how it was loaded rather than what the model is, at every
    level: a streamed export records its checkpoint's vision and perceiver sub-configs with dtype
    None, where the model rebuilt in memory says float32."""
    return {k: _comparable(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _NOT_COMPARED}


def load_reference(manifest: Manifest, model: str | None = None) -> LoadedModel:
    """Rebuild the exported model from the manifest's source (or `model`), checked against its config.

    ModelLoadError when it cannot be loaded; ReferenceMismatchError when it loads but its config
    is not the exported one."""
    source = manifest.source
    try:
        if model is not None:
            spec = parse_source(model, source.get("seed", 0))
        else:
            spec = ModelSource(source["kind"], source["ref"], source.get("seed", 0))
        loaded = load(spec)
    except ToolkitError as exc:
        raise ModelLoadError(f"cannot rebuild the PyTorch reference ({exc})") from exc
    got = _comparable(json.loads(json.dumps(loaded.model.config.to_dict())))
    expected = _comparable(source.get("config", {}))
    differing = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    if differing:
        raise ReferenceMismatchError(f"the reference model's config differs from the exported one in {differing[:6]}")
    return loaded


# ---------------------------------------------------------------- local checkpoints and the hub
def _load_local(folder: Path, source: ModelSource) -> LoadedModel:
    check_checkpoint_folder(folder)
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ModelLoadError(f"{folder}: no weight files (*.safetensors or *.bin) beside config.json")
    model = _from_pretrained(str(folder), where=f"{folder} ({', '.join(weights)})")
    return LoadedModel(model, source, processor=_load_processor(folder), checkpoint_dir=folder)


def check_checkpoint_folder(folder: Path) -> None:
    """ModelLoadError unless `folder` holds an IDEFICS config.json (the weights are each loader's to find)."""
    if not folder.is_dir():
        raise ModelLoadError(f"--model {folder}: no such folder (expected a save_pretrained checkpoint)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path}: missing; {folder} is not a transformers checkpoint")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{config_path}: unreadable ({exc})") from exc
    if model_type != "idefics":
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported; this toolkit exports IDEFICS "
            "(model_type 'idefics', IdeficsForVisionText2Text)"
        )


def _load_hub(source: ModelSource) -> LoadedModel:
    local_only = False
    if (unreachable := hub_unreachable()) is not None:
        # offline: fail in a second, not after transformers' retries (29 s, each warning twice),
        # unless the hub's own cache holds the checkpoint
        if not _in_hub_cache(source.ref):
            from huggingface_hub import constants

            raise ModelLoadError(f"--model {source.ref}: {_no_folder(source.ref)}the hub id could not be fetched "
                                 f"(offline?): the Hugging Face hub at {constants.ENDPOINT} cannot be reached "
                                 f"({unreachable}) and {source.ref} is not in its cache ({constants.HF_HUB_CACHE}). "
                                 "Pass a local checkpoint folder, or download the model where the hub is reachable.")
        log.warning("the Hugging Face hub cannot be reached (%s): loading %s from its cache", unreachable, source.ref)
        local_only = True
    try:
        model = _from_pretrained(source.ref, where=f"hub id {source.ref}", local_files_only=local_only)
    except ModelLoadError as exc:
        # owner/name reads as a relative folder too: a mistyped local checkpoint lands here
        if isinstance(exc.__cause__, OSError) and _no_folder(source.ref):
            raise ModelLoadError(f"--model {source.ref}: {_no_folder(source.ref)}the hub id could not be "
                                 f"fetched (offline?); {exc}") from exc.__cause__
        raise
    return LoadedModel(model, source, processor=_load_processor(source.ref, local_files_only=local_only))


HUB_PROBE_SECONDS = 5.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (one HEAD request through the hub library's
    own session, so its proxy settings count; a few seconds at most), or None. In offline mode
    (HF_HUB_OFFLINE) there is nothing to probe: transformers reads the cache without the network."""
    from huggingface_hub import constants, utils

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        utils.get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as exc:  # any transport error: DNS, refused, timeout, proxy
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return None


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # not a valid repo id, an unreadable cache: not there
        return False


def _no_folder(ref: str) -> str:
    """'no folder REF here, and ' where owner/name could have been meant as a relative folder."""
    return f"no folder {ref} here, and " if "/" in ref and not Path(ref).expanduser().exists() else ""


def _from_pretrained(ref: str, where: str, local_files_only: bool = False) -> IdeficsForVisionText2Text:
    try:
        model, info = IdeficsForVisionText2Text.from_pretrained(
            ref, dtype=torch.float32, attn_implementation="eager", output_loading_info=True,
            local_files_only=local_files_only,
        )
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors...
        raise ModelLoadError(f"could not load {where}: {type(exc).__name__}: {exc}") from exc
    # Tied lm_head weights are legitimately absent from the file; anything else means a corrupt
    # or foreign checkpoint that transformers would silently fill with random values.
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head.")]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelLoadError(f"could not load {where}: {len(missing)} weights missing from the checkpoint ({shown}, ...)")
    return model.eval()


def _load_processor(ref: str | Path, local_files_only: bool = False):
    folder = Path(ref)
    if folder.is_dir() and not (folder / "processor_config.json").is_file() and not (
        folder / "preprocessor_config.json"
    ).is_file():
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(ref), local_files_only=local_files_only)
    except Exception as exc:
        log.warning("no usable processor in %s (%s); the export will have none", ref, exc)
        return None


# ---------------------------------------------------------------- the embedded default
def ensure_default_checkpoint(seed: int = 0) -> Path:
    """Build the embedded default checkpoint once (seconds) and reuse it; the folder appears atomically."""
    folder = cache_root() / f"default-tiny-seed{seed}-v{DEFAULT_RECIPE_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    # where another process won the race, its folder is as good as ours: kept
    with atomic_folder(folder, mode=0o755, keep=lambda made: (made / "config.json").is_file()) as tmp:
        write_default_checkpoint(tmp, seed)
    return folder


def write_default_checkpoint(folder: Path, seed: int = 0) -> None:
    from runtime.reference.tokenizer import build_processor, build_tokenizer

    log.info("building the embedded default model (seed %d) in %s", seed, folder)
    model = build_random("tiny", seed)
    tokenizer = build_tokenizer(TINY_TOKENIZER_SIZE)
    processor = build_processor(tokenizer, model.config.vision_config.image_size)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
