"""Which tensor source a streamed export reads, for each kind of `--model`:

  (none) / default   the embedded default's checkpoint folder (safetensors), read tensor by tensor
  random:NAME        RandomSource weights of the preset's shapes, written once as bf16 safetensors
                     shards with an index (in the toolkit's cache), so the real loading path runs;
                     random:80b (and its 4-layer slice) is made on the fly (160 GB would not fit a disk)
  a folder           its safetensors shards (or .bin, the slower fallback)
  owner/name         the hub's files, downloaded to the hub cache (weights are not loaded whole)

The weights of random:NAME here are RandomSource's, not those of the whole-model path's
build_random (torch's initialisation in one pass): the two exports of one preset are different
models, so the manifest records `weights: stream` and the checkpoint folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from exporter.stream.checkpoint import RandomSource, TensorSource, open_checkpoint, plan_checkpoint, write_random_checkpoint
from runtime.errors import ExportError, ModelLoadError
from runtime.paths import cache_root
from runtime.reference import sources as loading

log = logging.getLogger(__name__)

ON_THE_FLY = ("80b", "80b-slice")  # presets whose random checkpoint is never written (160 GB of bf16)
RANDOM_RECIPE = 1  # bump when RandomSource's scheme changes, so cached random checkpoints are rebuilt


def random_checkpoint_folder(preset: str, seed: int) -> Path:
    return cache_root() / "random-checkpoints" / f"{preset}-seed{seed}-v{RANDOM_RECIPE}"


def tensor_source(source: loading.ModelSource, progress: bool = True) -> tuple[TensorSource, Any, dict]:
    """(the tensor source, the processor or None, what the manifest records of the source)."""
    record = {**source.to_dict(), "weights": "stream"}
    if source.kind == "default":
        folder = loading.ensure_default_checkpoint(source.seed)
        return open_checkpoint(folder), loading._load_processor(folder), {**record, "checkpoint": str(folder)}
    if source.kind == "preset":
        if source.ref in ON_THE_FLY:
            return RandomSource.preset(source.ref, source.seed), None, {**record, "checkpoint": None}
        folder = ensure_random_checkpoint(source.ref, source.seed, progress)
        return open_checkpoint(folder), None, {**record, "checkpoint": str(folder)}
    folder = Path(source.ref) if source.kind == "local" else _hub_folder(source.ref)
    loading.check_checkpoint_folder(folder)
    return open_checkpoint(folder), loading._load_processor(folder), {**record, "checkpoint": str(folder)}


def ensure_random_checkpoint(preset: str, seed: int, progress: bool = True) -> Path:
    """The random checkpoint of a preset, written once (bf16 safetensors shards + index) and reused."""
    folder = random_checkpoint_folder(preset, seed)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    config = loading.build_config(preset)
    need = plan_checkpoint(config).total_size
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if need > free * 0.9:
        raise ExportError(f"random:{preset}: its bf16 checkpoint needs {need / 1e9:.1f} GB in {folder.parent}, which "
                          f"has {free / 1e9:.1f} GB free (set IDEFICS_TOOLKIT_CACHE to a larger disk)")
    log.warning("random:%s: writing its random bf16 checkpoint once (%.1f GB) to %s", preset, need / 1e9, folder)
    return write_random_checkpoint(folder, config, seed, progress=progress)


def _hub_folder(hub_id: str) -> Path:
    """The hub checkpoint's files in the hub cache (weights as files, never loaded whole)."""
    from huggingface_hub import snapshot_download

    offline = loading.hub_unreachable()
    try:
        return Path(snapshot_download(hub_id, local_files_only=offline is not None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        why = f" (the hub cannot be reached: {offline})" if offline else ""
        raise ModelLoadError(f"--model {hub_id}: could not fetch the checkpoint's files{why}: "
                             f"{type(exc).__name__}: {exc}") from exc
