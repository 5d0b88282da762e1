"""scripts/triton_load.py at smoke size against a real Triton server (the same server environment as
tests/serving): every variant runs, no request fails, each gets the tokens it asked for."""

from __future__ import annotations

import json
import platform
import sys

import pytest

from tests.serving.test_server import triton_env  # noqa: F401 - the session-scoped server environment
from tests.util import load_script

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                 reason="nvidia-pytriton's tritonserver is for Linux x86_64")]


def test_smoke_run(triton_env, tmp_path, monkeypatch):  # noqa: F811
    import tempfile

    monkeypatch.setenv("IDEFICS_TRITON_ENV", str(triton_env))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the script's repositories go
    script = load_script("triton_load")
    out = tmp_path / "triton.json"
    result = script.main(["--smoke", "--duration", "1", "--json", str(out)])
    assert json.loads(out.read_text())["variants"].keys() == result["variants"].keys()
    assert set(result["variants"]) == {"server", "server-bls", "session", "static"}
    for name, s in result["variants"].items():
        assert s["requests"] >= 1 and s["errors"] == 0, (name, s["first_error"])
        assert s["tokens"] == 6 * s["requests"], name  # --smoke asks 6 new tokens of each request
        assert s["tok_s"] > 0 and s["ttft_p50_s"] > 0
    assert set(result["per_token_ms"]) == {"session", "server", "server-bls"}
    assert result["bls_over_inprocess_per_token"] > 0
    assert not [p.name for p in scratch.glob("triton-load-*")]  # each run's repository removed after it
