"""Shared fixtures: an isolated model cache, and small IDEFICS models built from config variants.

Every test model has non-zero gating alphas (exporter.load.set_gates): IDEFICS initialises them at
zero, which switches the image path off and would let image bugs pass unnoticed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from exporter.load import TINY_INIT_RANGE, random_model
from exporter.presets import preset_kwargs


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # The embedded default checkpoint is built into a per-run cache, never the user's.
    mp = pytest.MonkeyPatch()
    mp.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


def deep_update(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def variant_model(overrides: dict, seed: int = 0):
    from transformers import IdeficsConfig

    kwargs = deep_update(preset_kwargs("tiny"), overrides)
    kwargs.setdefault("initializer_range", TINY_INIT_RANGE)
    return random_model(IdeficsConfig(**kwargs), seed)


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
