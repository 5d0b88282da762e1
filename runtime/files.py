"""Writing a result whole or not at all: the one place where the toolkit builds a folder (an export,
a Triton repository, the server's environment) or a file (the calibration cache) beside its
target and renames it into place. A failed or interrupted write leaves nothing half-written, and
a reader sees the old result or the new one, never a mix.

    with atomic_folder(out) as tmp:        # .out.partial-PID-XXXX beside out/
        write_everything_into(tmp)         # moved onto out/ when the block ends without error
    with atomic_file(path) as f:           # a temp file in path's folder, fsynced, then renamed
        f.write(data)

Standard library only: runtime/, exporter/, calibration/ and scripts/ all use it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_folder(target: Path, mode: int | None = None,
                  keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside `target` (`staging`); when the block ends without an
    exception, move it onto `target`, replacing what is there (`move_into_place`). An exception
    (or KeyboardInterrupt) removes the staging folder and leaves `target` as it was. `mode`: the
    folder's mode (mkdtemp makes it 0700). `keep`: called with `target` at the end; where it says
    True (another process made a good one meanwhile) the staged folder is dropped instead."""
    target = Path(target)
    with staging(target, mode) as tmp:
        yield tmp
        if keep is None or not keep(target):
            move_into_place(tmp, target)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a temp file in `path`'s folder (same filesystem); when the block ends without an
    exception it is flushed, fsynced and renamed onto `path` in one step. An exception removes it
    and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    tmp = Path(handle.name)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


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
        log.warning("removed %s, left by process %s that ended while writing %s", folder, pid, target)
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
