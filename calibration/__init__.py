"""Calibration data for INT8 engines: real photos and prompts (data), a tensor cache (cache).

numpy and Pillow only; no torch, so a TensorRT build host needs nothing more."""

from calibration.cache import cached_arrays
from calibration.data import (
    DEFAULT_PROMPTS,
    CalibrationData,
    calibration_data,
    interleaved_prompts,
    load_image_folder,
    load_prompts,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "CalibrationData",
    "cached_arrays",
    "calibration_data",
    "interleaved_prompts",
    "load_image_folder",
    "load_prompts",
]
