"""The import picture of exporter/'s subpackages: arrows only point down, and nothing is circular.

Layers, lowest first (exporter/__init__.py says the same in words):
  graphs (specs, tracing, validation) < precision (variants) < ort (--ort-optimized graphs)
  < stream (the layer-streamed export: checkpoints read tensor by tensor, graphs written layer by layer) < check;
  engines and triton stand on runtime/ alone (no other exporter subpackage);
  the pipeline (exporter.export) and the CLI (exporter.cli) sit on top: no subpackage imports them.
Every import statement counts, at module level or inside a function, as in
tests/runtime/test_layering.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = ROOT / "exporter"
RANK = {"graphs": 0, "precision": 1, "ort": 2, "stream": 3, "check": 4}
ALONE = ("engines", "triton")  # may import runtime/, never another exporter subpackage
TOP = ("export", "cli")  # exporter.export, exporter.cli


def imported(source: str, filename: str = "<source>", modules: set[str] | None = None) -> set[str]:
    """Every module an import statement in `source` names (absolute imports; the toolkit uses no
    relative ones: test_no_relative_imports). `from P import name` counts as P.name where that is
    one of `modules` (a submodule), else as P."""
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if modules is not None and sub in modules else node.module)
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def toolkit_modules() -> dict[str, set[str]]:
    """{module: the toolkit modules it imports} over exporter/, runtime/ and calibration/."""
    files = [p for package in ("exporter", "runtime", "calibration") for p in sorted((ROOT / package).rglob("*.py"))]
    names = {module_name(p) for p in files}
    graph = {}
    for path in files:
        targets = imported(path.read_text(), str(path), names)
        graph[module_name(path)] = {t for t in targets if t in names} - {module_name(path)}
    return graph


def subpackage(module: str) -> str | None:
    """'precision' for exporter.precision and exporter.precision.reduced; None elsewhere."""
    parts = module.split(".")
    return parts[1] if parts[0] == "exporter" and len(parts) > 1 and parts[1] not in TOP else None


def layering_offences(graph: dict[str, set[str]]) -> list[str]:
    offences = []
    for module, targets in graph.items():
        here = subpackage(module)
        if here is None:
            continue
        for target in targets:
            there = subpackage(target)
            if target.split(".")[0] != "exporter" or there == here or target == "exporter":
                continue
            if there is None:  # exporter.export / exporter.cli
                offences.append(f"{module} imports {target}: no subpackage imports the pipeline or its CLI")
            elif here in ALONE or there in ALONE:
                offences.append(f"{module} imports {target}: {', '.join(ALONE)} stand on runtime/ alone")
            elif RANK[there] > RANK[here]:
                offences.append(f"{module} imports {target}: {here} sits below {there}")
    return offences


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each one sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_subpackages_are_there():
    graph = toolkit_modules()
    for package in (*RANK, *ALONE):
        assert f"exporter.{package}" in graph, f"exporter/{package}/__init__.py is missing"
        assert (EXPORTER / package / "__init__.py").read_text().startswith('"""'), \
            f"exporter/{package}/__init__.py states its purpose in a docstring"
    assert set(RANK) | set(ALONE) == {p.name for p in EXPORTER.iterdir() if (p / "__init__.py").exists()}
    assert {m for m in graph if m.startswith("exporter.") and subpackage(m) is None} == {f"exporter.{t}" for t in TOP}


def test_exporter_arrows_point_down():
    assert not layering_offences(toolkit_modules())


def test_no_circles_between_toolkit_modules():
    assert not cycles(toolkit_modules())


def test_no_relative_imports():
    relative = [f"{p.relative_to(ROOT)}:{node.lineno}"
                for package in ("exporter", "runtime", "calibration") for p in (ROOT / package).rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative


# the checks themselves catch what they are meant to catch
@pytest.mark.parametrize("graph, words", [
    ({"exporter.precision.transforms": {"exporter.triton.repository"}}, "stand on runtime/ alone"),
    ({"exporter.graphs.validate": {"exporter.precision.transforms"}}, "graphs sits below precision"),
    ({"exporter.precision.reduced": {"exporter.ort.decoder"}}, "precision sits below ort"),
    ({"exporter.ort.decoder": {"exporter.check.regression"}}, "ort sits below check"),
    ({"exporter.check.regression": {"exporter.export"}}, "no subpackage imports the pipeline"),
    ({"exporter.engines.build": {"exporter.graphs.specs"}}, "stand on runtime/ alone"),
])
def test_offences_are_caught(graph, words):
    offences = layering_offences(graph)
    assert len(offences) == 1 and words in offences[0]


def test_allowed_arrows_pass():
    assert not layering_offences({"exporter.ort.int8": {"exporter.precision.smoothing", "exporter.graphs.bounds",
                                                        "exporter.ort.decoder", "runtime.cpu", "numpy"},
                                  "exporter.export": {"exporter.ort.decoder", "exporter.check.regression"},
                                  "exporter.triton.serve": {"runtime.paths"}})


def test_a_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_from_import_of_a_submodule_counts():
    source = "def f():\n    from exporter.precision import smoothing\n    from exporter.graphs.bounds import judge"
    assert imported(source, modules={"exporter.precision.smoothing"}) == {"exporter.precision.smoothing",
                                                                          "exporter.graphs.bounds"}
