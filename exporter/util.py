"""Small helpers shared by the exporter's modules."""

from __future__ import annotations

import contextlib
import logging


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
