"""Where the toolkit keeps files of its own (no dependencies beyond the standard library)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """The toolkit's cache folder ($IDEFICS_TOOLKIT_CACHE or ~/.cache/idefics-toolkit), for the
    embedded default checkpoint (runtime.reference.sources) and calibration tensors alike."""
    return Path(os.environ.get("IDEFICS_TOOLKIT_CACHE") or Path.home() / ".cache" / "idefics-toolkit")


@contextlib.contextmanager
def staging(target: Path, mode: int | None = None) -> Iterator[Path]:
    """A hidden folder beside `target` (`.NAME.partial-XXXX`, same filesystem, so one rename moves
    it into place: `move_into_place`) for writing a result whole. Whatever is left of the folder
    after the block is removed, so a failed or interrupted write leaves nothing half-written.
    `mode`: the folder's mode (mkdtemp makes it 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there once moved into place


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename folder `tmp` onto `target`, replacing what is there: the old folder is renamed aside
    first and removed after, so `target` is never missing half of either."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
