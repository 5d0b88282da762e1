"""runtime.files.staging / move_into_place: a result appears whole or not at all. A failed block
leaves nothing; a replaced target never goes missing; a staging folder left by a process that was
killed (nothing runs on SIGKILL) is removed by the next write of the same target, while a live
writer's folder is kept. End to end: an idefics-export killed with SIGKILL mid-export leaves its
hidden folder, and the next export of the same output removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.files import atomic_file, atomic_folder, move_into_place, remove_orphans, staging


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_failed_block_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staging(target) as tmp:
            (tmp / "half.onnx").write_bytes(b"x" * 100)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_replaces_the_target_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staging(target, mode=0o755) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.partial-{os.getpid()}-")
        assert tmp.stat().st_mode & 0o777 == 0o755
        (tmp / "new.txt").write_text("new")
        move_into_place(tmp, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]



def test_atomic_folder_replaces_or_leaves_the_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "old.txt").read_text() == "old"
    with atomic_folder(target, mode=0o755) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o755 and not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing shows before the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_atomic_folder_keeps_a_target_made_meanwhile(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target, keep=lambda made: (made / "done").is_file()) as tmp:
        (tmp / "ours").write_text("ours")
        target.mkdir()  # another process finished first
        (target / "done").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in target.iterdir()) == ["done"]
    with atomic_folder(target, keep=lambda made: (made / "missing").is_file()) as tmp:
        (tmp / "ours").write_text("ours")
    assert sorted(p.name for p in target.iterdir()) == ["ours"]


def test_atomic_file_is_whole_or_untouched(tmp_path):
    path = tmp_path / "cache" / "tensors.npz"
    with atomic_file(path) as f:
        f.write(b"first")
        assert not path.exists()
    assert path.read_bytes() == b"first"
    with pytest.raises(OSError):
        with atomic_file(path) as f:
            f.write(b"half of the sec")
            raise OSError("disk full")
    assert path.read_bytes() == b"first" and sorted(p.name for p in path.parent.iterdir()) == ["tensors.npz"]
    with atomic_file(path, "w") as f:
        f.write("second")
    assert path.read_text() == "second"


def test_nothing_else_renames_into_place():
    """runtime/files.py is the one place that writes a result beside its target and renames it: a
    module that does it again by hand (os.replace, Path.rename) duplicates it, with its own bugs."""
    root = Path(__file__).resolve().parents[2]
    hand_made = [f"{p.relative_to(root)}:{n}" for package in ("exporter", "runtime", "calibration", "scripts")
                 for p in sorted((root / package).rglob("*.py")) if p != root / "runtime" / "files.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if "os.replace(" in line or ".rename(" in line]
    assert not hand_made, f"use runtime.files.atomic_folder / atomic_file: {hand_made}"

def test_orphans_of_dead_writers_are_removed(tmp_path, caplog):
    target = tmp_path / "out"
    dead = tmp_path / f".out.partial-{_dead_pid()}-abc"
    live = tmp_path / f".out.partial-{os.getpid()}-def"
    other = tmp_path / ".other.partial-1-ghi"  # another target's
    unnamed = tmp_path / ".out.partial-xyz"  # no process id: not ours to judge
    for folder in (dead, live, other, unnamed):
        folder.mkdir()
        (folder / "decoder.onnx.data").write_bytes(b"\0" * 10)
    assert remove_orphans(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists() and unnamed.exists()
    assert str(dead) in caplog.text


@pytest.mark.slow
def test_killed_export_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", "import sys; from exporter.cli import main; sys.exit(main())", "--quiet", str(out)]
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.partial-") and any(p.iterdir()) for p in tmp_path.iterdir()):
            assert child.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:  # never leave the export running, whatever failed above
        if child.poll() is None:
            child.kill()
            child.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert left and not out.exists()  # SIGKILL: nothing could clean up
    subprocess.run(command, cwd=root, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "manifest.json").is_file()
