"""Where the toolkit keeps files of its own (no dependencies beyond the standard library)."""

from __future__ import annotations

import contextlib
import logging
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
    `mode`: the folder's mode (mkdtemp makes it 0700). The folder's name carries the writer's
    process id, so one left by a process that was killed (SIGKILL, the OOM killer: nothing runs
    then) is removed by the next write of the same target (`remove_orphans`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
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


def remove_orphans(target: Path) -> list[Path]:
    """Remove the staging folders of `target` whose writer process is gone (on this machine) and
    return them. Folders of a live process, or without a process id in their name, are kept."""
    removed = []
    for folder in target.parent.glob(f".{target.name}.partial-*"):
        pid = folder.name[len(f".{target.name}.partial-"):].partition("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logging.getLogger(__name__).warning("removed %s, left by process %s that ended while writing %s",
                                            folder, pid, target)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
