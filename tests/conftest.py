"""Shared fixtures. Test models come from runtime.reference.sources.variant_model / build_random,
which give them non-zero gating alphas (IDEFICS initialises them at zero, which switches the image
path off and would let image bugs pass unnoticed)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # The embedded default checkpoint is built into a per-run cache, never the user's.
    mp = pytest.MonkeyPatch()
    mp.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture
def opened():
    """runtime.Session(...) that the test's teardown closes (its engine thread and ONNX Runtime
    sessions), whether the test passed or not."""
    from runtime import Session

    sessions = []

    def open_(*args, **kwargs):
        sessions.append(Session(*args, **kwargs))
        return sessions[-1]

    yield open_
    for session in sessions:
        session.close()
