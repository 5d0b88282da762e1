"""Small helpers shared by the exporter's modules."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

# Libraries whose INFO/DEBUG records are their own business, not the user's: below WARNING they stay
# silent unless --verbose (onnxruntime's float16 converter alone logs a protobuf dump per shared
# initializer at INFO).
THIRD_PARTY = ("onnxruntime", "onnx", "onnx_ir", "onnxscript", "torch", "transformers", "huggingface_hub",
               "optimum", "polygraphy", "Polygraphy", "tensorrt", "safetensors", "PIL", "skimage", "matplotlib",
               "urllib3", "httpx", "filelock", "accelerate")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR):
    """Raise a logger's level for a block: libraries that log generic advice at WARNING (torch.onnx's
    exporter, onnxruntime.quantization on the root logger) would bury the toolkit's own messages."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def console_logging(level: int, verbose: bool = False, quiet: bool = False, model_bars: bool = True):
    """Log records on stderr for the length of one command (main() may run in-process: everything is
    restored afterwards): the toolkit's at `level` and above; the THIRD_PARTY libraries' at WARNING
    and above, INFO with `verbose`. With `model_bars` (a command that loads a PyTorch model),
    transformers' progress bars ("Loading weights", "Writing model shards") show only with
    `verbose`, and the hub's download bars not with `quiet`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    library_level = logging.INFO if verbose else logging.WARNING
    # also on the handler: a library module imported later may set its logger's level itself
    handler.addFilter(lambda r: r.levelno >= library_level or r.name.split(".")[0] not in THIRD_PARTY)
    root = logging.getLogger()
    saved_root, raised = root.level, {}
    for name in THIRD_PARTY:
        top = logging.getLogger(name)
        # and any child logger that set a lower level of its own (the top's would not reach it)
        children = [logger for key, logger in list(logging.Logger.manager.loggerDict.items())
                    if key.startswith(name + ".") and isinstance(logger, logging.Logger)
                    and logging.NOTSET < logger.level < library_level]
        for logger in (top, *children):
            raised[logger] = logger.level
            logger.setLevel(library_level)
    root.setLevel(level)
    root.addHandler(handler)
    try:
        with polygraphy_severity(verbose), \
                progress_bars(transformers=verbose, hub=not quiet) if model_bars else contextlib.nullcontext():
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for logger, previous in raised.items():
            logger.setLevel(previous)


@contextlib.contextmanager
def polygraphy_severity(verbose: bool):
    """Polygraphy's own logger (and TensorRT's builder, through it): warnings and above, INFO with
    `verbose`; restored afterwards."""
    from polygraphy.logger import G_LOGGER

    saved = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.WARNING
    try:
        yield
    finally:
        G_LOGGER.module_severity = saved


@contextlib.contextmanager
def progress_bars(transformers: bool, hub: bool):
    """Show or hide transformers' own progress bars and huggingface_hub's download bars for a block,
    as transformers.utils.logging.disable_progress_bar() does, restoring both afterwards. Without
    transformers installed (a deployment host) there is nothing to hide."""
    try:
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    _set_bars(hf_logging, hub_utils, transformers, hub)
    try:
        yield
    finally:
        _set_bars(hf_logging, hub_utils, *was)


def _set_bars(hf_logging, hub_utils, transformers: bool, hub: bool) -> None:
    # transformers' switch sets the hub's too, so the hub's goes second
    if transformers:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    if hub:
        hub_utils.enable_progress_bars()
    else:
        hub_utils.disable_progress_bars()


def remove_graph(folder: Path, file: str) -> None:
    """Remove a graph the export wrote and then left out (it missed its bound), with its external
    data (`FILE.data`, the name exporter.export._write_graph gives it), where they exist."""
    for leftover in (file, f"{file}.data"):
        (Path(folder) / leftover).unlink(missing_ok=True)
