"""What an export may rightly leave out, and how the tests say so.

The --ort-optimized graphs are optional: the export leaves one out, with a warning and no file, where
it misses its accuracy bound (an INT8 graph on a CPU whose integer kernels lose precision, for one:
perceiver.ort.int8wo, decoder.ort.int8wo.prompt, decoder.ort.int8) or where ONNX Runtime refuses to
load or run it (exporter.ort.refusal). So a test asserts on what the manifest lists
(manifest.ort_optimized), that each graph it lists is on disk, hashed and was validated, and that each
graph it expected but the manifest does not list was left out by a warning of the export's own: never
that a file was written. A test whose whole point is one optional graph asks for it with
require_ort_graph, which skips with the export's warning where the export left it out, and fails
where the graph is missing without one."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import pytest


def ort_file(precision: str, graph: str) -> str:
    """The file of an ORT graph (as the exporter names it): decoder.ort.int8wo.onnx, vision.ort.fp16.onnx, ..."""
    from exporter.ort.decoder import FILES, PROMPT_FILES
    from exporter.ort.encoders import file_for
    from exporter.ort.int8 import FILE

    if graph == "prompt":
        return PROMPT_FILES[precision]
    if graph == "decoder":
        return FILE if precision == "int8" else FILES[precision]
    return file_for(graph, precision)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def export_warnings():
    """The exporter's warnings (logger "exporter": exporter.export, exporter.ort.encoders, ...) while
    the block runs, as a list of messages; for fixtures, which cannot use caplog."""
    logger = logging.getLogger("exporter")
    handler, saved = _Collect(), logger.level
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _names(file: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(file)}(?![\w.]*\w)", text) is not None


def left_out(precision: str, graph: str, warnings: Iterable[str]) -> str | None:
    """The export's warning that says the ORT graph (precision, graph) was not written (on its first
    line: later lines list measurements), or None. A prompt graph is not tried where its decode graph
    was left out: that warning counts for it too."""
    files = [ort_file(precision, graph)] + ([ort_file(precision, "decoder")] if graph == "prompt" else [])
    for warning in warnings:
        head = warning.split("\n", 1)[0]
        if "not written" in head and any(_names(file, head) for file in files):
            return warning
    return None


def check_ort_listing(manifest, folder: Path, warnings: Iterable[str], expected: Iterable[tuple[str, str]] = (),
                      validated: bool = True) -> dict[tuple[str, str], str]:
    """Assert that every ORT graph the manifest lists is on disk, in manifest.files and (`validated`:
    the export validated) has accuracy rows that all passed their bound; and that each of `expected`
    ((precision, graph) pairs the export was asked for) is listed or was left out by a warning of the
    export's. Returns {(precision, graph): warning} of those left out."""
    warnings = list(warnings)
    for precision, variant in manifest.ort_optimized.items():
        for graph, spec in variant.graphs.items():
            assert spec.file == ort_file(precision, graph), (precision, graph, spec.file)
            assert spec.file in manifest.files and (Path(folder) / spec.file).is_file(), spec.file
            if validated:
                rows = [row for case in variant.accuracy.get(graph, {}).values() for row in case.values()]
                assert rows and all(row["ok"] for row in rows), f"{spec.file} is listed but not validated: {rows}"
    missing = {}
    for precision, graph in expected:
        if graph in manifest.ort_graphs(precision):
            continue
        warning = left_out(precision, graph, warnings)
        assert warning, (f"{ort_file(precision, graph)} is not in the manifest and no export warning says it was "
                         f"left out; the warnings: {warnings}")
        assert not (Path(folder) / ort_file(precision, graph)).exists(), f"{ort_file(precision, graph)} left on disk"
        missing[(precision, graph)] = warning
    return missing


def require_ort_graph(manifest, precision: str, graph: str, warnings: Iterable[str]):
    """The GraphSpec of an optional ORT graph a test is about. Where the export left it out (its own
    warning says so) the test is skipped with that warning; where it is missing without one, it fails."""
    return require_written(manifest.ort_graphs(precision), precision, graph, warnings)


def require_written(specs: dict, precision: str, graph: str, warnings: Iterable[str]):
    """require_ort_graph over {graph: GraphSpec} of what a writer returned (exporter.ort.encoders.
    write_ort_encoders, ...) instead of a manifest."""
    spec = specs.get(graph)
    if spec is not None:
        return spec
    file = ort_file(precision, graph)
    warning = left_out(precision, graph, warnings)
    if warning is None:
        pytest.fail(f"{file} was not written and no export warning says it was left out")
    pytest.skip(f"this test is about {file}, which the export left out here: {warning}")
