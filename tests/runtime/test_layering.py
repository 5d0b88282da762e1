"""The layering rule: runtime/ never imports exporter/ or calibration/ (they import runtime).

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), `import x`, `from x import y` and `from x.y import z` alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
FORBIDDEN = ("exporter", "calibration")


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """'line: module' for each import of a FORBIDDEN package in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {m}" for m in modules if m.split(".")[0] in FORBIDDEN]
    return found


def test_runtime_imports_neither_exporter_nor_calibration():
    files = sorted(RUNTIME.rglob("*.py"))
    assert RUNTIME / "__init__.py" in files and RUNTIME / "runners" / "torch.py" in files  # the right folder
    offences = {str(p.relative_to(RUNTIME.parent)): hits for p in files
                if (hits := forbidden_imports(p.read_text(), str(p)))}
    assert not offences, f"runtime/ must not import {' or '.join(FORBIDDEN)}: {offences}"


@pytest.mark.parametrize("source", [
    "import exporter",
    "import exporter.check as check",
    "import numpy, calibration.cache",
    "from exporter.graphs import graph_modules",
    "from calibration import cache_root",
    "def load():\n    from exporter.check import load_reference\n    return load_reference",
    "class A:\n    def f(self):\n        try:\n            import exporter.load\n        except ImportError:\n            pass",
])
def test_every_form_of_import_is_caught(source):
    assert forbidden_imports(source)


@pytest.mark.parametrize("source", [
    "import runtime.reference.sources",
    "from runtime.reference.modules import graph_modules",
    "from . import exporter_like",
    "import exporters, calibrations",
    "x = 'exporter'",
])
def test_other_imports_pass(source):
    assert not forbidden_imports(source)
