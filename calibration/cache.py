"""A disk cache for calibration tensors, keyed by what produced them.

Collecting calibration tensors means running the model over the calibration data, which can take
minutes on a large model; an engine rebuild with the same model, data and graph should not pay that
again. The key names everything the tensors depend on (model digest, data digest, size, graph), and
the file stores its own key, so a file is only reused for exactly that key.

The cache is never the source of truth: an unreadable, corrupt or mismatched file is recomputed,
and a cache that cannot be written only costs the recomputation next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.files import atomic_file
from runtime.paths import cache_root

log = logging.getLogger(__name__)

KEY_ARRAY = "__key__"

# What np.load raises for a damaged or foreign file: bad zip structure or CRC, a truncated member,
# a bad .npy header, an array that would need pickle.
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def key_json(key: Mapping[str, Any]) -> str:
    """Canonical JSON of `key`: sorted keys, no whitespace, so equal dicts give equal text."""
    if not isinstance(key, Mapping):
        raise TypeError(f"cache key must be a dict, got {type(key).__name__}")
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"cache key must be JSON-serialisable (str, int, float, bool, None, lists, dicts): {error}") from error


def cache_path(key: Mapping[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(key_json(key).encode("utf-8")).hexdigest()
    return Path(root if root is not None else cache_root()) / "calibration" / f"{digest}.npz"


def cached_arrays(
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, np.ndarray]],
    root: Path | None = None,
    label: str = "calibration",
) -> dict[str, np.ndarray]:
    """The arrays stored for `key`, or `compute()`'s, which are then stored for next time."""
    text = key_json(key)
    path = cache_path(key, root)
    arrays = _read(path, text, label)
    if arrays is not None:
        log.info("reusing cached %s tensors from %s", label, path)
        return arrays
    arrays = _checked(compute())
    _write(path, text, arrays, label)
    return arrays


def _checked(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"compute() must return a dict of name -> array, got {type(arrays).__name__}")
    out = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or name == KEY_ARRAY:
            raise ValueError(f"array name {name!r} cannot be stored (must be a non-empty str other than {KEY_ARRAY})")
        array = np.asarray(value)
        if array.dtype.hasobject:  # would need pickle to store and to load: never load pickles from disk
            raise ValueError(f"array {name!r} has dtype object; calibration tensors must be numeric")
        out[name] = array
    return out


def _read(path: Path, text: str, label: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {name: npz[name] for name in npz.files}
    except _READ_ERRORS as error:
        log.warning("cached %s tensors at %s are unreadable (%s); deleting and recomputing", label, path, error)
        _remove(path)
        return None
    stored_key = stored.pop(KEY_ARRAY, None)
    if stored_key is None or str(stored_key) != text:
        # a hash collision, or a file copied in from elsewhere: not ours to reuse; overwritten below
        log.warning("cached %s tensors at %s were made for another key; recomputing", label, path)
        return None
    return stored


def _write(path: Path, text: str, arrays: dict[str, np.ndarray], label: str) -> None:
    try:
        # readers (and a crash) see the old file or the complete new one, never half of one
        with atomic_file(path) as f:
            _write_npz(f, {KEY_ARRAY: np.asarray(text), **arrays})
        log.info("cached %s tensors in %s", label, path)
    except OSError as error:  # a read-only or full disk costs a recomputation next time, nothing more
        log.warning("could not cache %s tensors in %s (%s)", label, path, error)


def _write_npz(file: Any, arrays: dict[str, np.ndarray]) -> None:
    # Written member by member rather than with np.savez, whose own keyword arguments ("file",
    # "allow_pickle") would clash with arrays of those names.
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not delete %s (%s)", path, error)
