"""The console of every command-line tool (idefics-export, -check, -build-engines, -generate): one
set-up for the length of one command, and the helpers that keep libraries' chatter off it.

By default a command's console holds its progress bar, its result and warnings; `--verbose` adds
the toolkit's INFO records and the libraries' own; `--quiet` leaves errors only. Everything is
restored afterwards, since main() may run in-process (the tests call it so).

Needs only the standard library: polygraphy, transformers and huggingface_hub are touched only when
installed (a deployment host has none of them)."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

# Libraries whose INFO/DEBUG records are their own business, not the user's: below WARNING they stay
# silent unless --verbose (onnxruntime's float16 converter alone logs a protobuf dump per shared
# initializer at INFO).
THIRD_PARTY = ("onnxruntime", "onnx", "onnx_ir", "onnxscript", "torch", "transformers", "huggingface_hub",
               "optimum", "polygraphy", "Polygraphy", "tensorrt", "safetensors", "PIL", "skimage", "matplotlib",
               "urllib3", "httpx", "filelock", "accelerate")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def level_for(verbose: bool = False, quiet: bool = False, verbose_level: int = logging.INFO) -> int:
    """The toolkit's own records shown on the console: warnings by default, errors only with
    `quiet`, `verbose_level` (INFO, or DEBUG for a command whose debug records help) with `verbose`."""
    return verbose_level if verbose else logging.ERROR if quiet else logging.WARNING


@contextlib.contextmanager
def console_logging(level: int, verbose: bool = False, quiet: bool = False, model_bars: bool = True):
    """Log records on stderr for the length of one command: the toolkit's at `level` and above; the
    THIRD_PARTY libraries' at WARNING and above (INFO with `verbose`; `level` where that is higher),
    Python warnings hidden where `level` is above WARNING. With `model_bars` (a command that loads a
    PyTorch model), transformers' progress bars ("Loading weights", "Writing model shards") show
    only with `verbose`, and the hub's download bars not with `quiet`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    library_level = logging.INFO if verbose else max(logging.WARNING, level)
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
        with warnings.catch_warnings(), polygraphy_severity(verbose), \
                progress_bars(transformers=verbose, hub=not quiet) if model_bars else contextlib.nullcontext():
            if level > logging.WARNING:
                warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for logger, previous in raised.items():
            logger.setLevel(previous)


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
def polygraphy_severity(verbose: bool):
    """Polygraphy's own logger (and TensorRT's builder, through it): warnings and above, INFO with
    `verbose`; restored afterwards. Nothing to do where Polygraphy is not installed."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        yield
        return
    saved = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.WARNING
    try:
        yield
    finally:
        G_LOGGER.module_severity = saved


@contextlib.contextmanager
def progress_bars(transformers: bool, hub: bool | None = None):
    """Show or hide transformers' own progress bars (`transformers`) and huggingface_hub's download
    bars (`hub`; None leaves them as they are) for a block, as
    transformers.utils.logging.disable_progress_bar() does, restoring both afterwards. Without
    transformers installed (a deployment host) there is nothing to hide."""
    try:
        from huggingface_hub import utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    _set_bars(hf_logging, hub_utils, transformers, was[1] if hub is None else hub)
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
