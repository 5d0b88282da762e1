"""scripts/real_size.py (the published sizes, run by hand) in its CI size: random:tiny streamed in
FP32 and int8wo, their Sessions, top-1 against the layer-streamed FP32 reference, and the FP32
Session's greedy tokens against transformers' model loaded whole from the same checkpoint."""

from __future__ import annotations

import pytest

from exporter.graphs.bounds import TOLERANCES
from tests.util import load_script


def test_real_size_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path / "cache"))
    result = load_script("real_size").main(["--model", "random:tiny", "--precisions", "fp32", "int8wo",
                                             "--prompts", "2", "--tokens", "6", "--against-transformers",
                                             "--keep", str(tmp_path / "keep")])
    checkpoint = result["checkpoint"]
    assert checkpoint["written_now"] and checkpoint["bytes"] > 0
    row = result["precisions"]["int8wo"]
    export = row["export"]
    assert export["all_ok"] and export["pieces"] >= 12  # vision 2+, perceiver 1, decoder head + 4 + 2 + tail
    assert sorted(p.name for p in (tmp_path / "keep" / "int8wo").glob("*.onnx")) == [
        "decoder.int8wo.onnx", "perceiver.int8wo.onnx", "vision.int8wo.onnx"]
    assert export["piece_seconds"]["decoder_layer_median"] > 0
    if export["peak_rss_gib"] is not None:  # /usr/bin/time -v where the machine has it
        assert 0.1 < export["peak_rss_gib"] < 8
    session = row["session"]
    assert session["ms_per_token"] > 0 and session["peak_rss_gib"] > 0
    top1 = row["top1"]
    assert top1["positions"] == 2 * 6
    assert top1["top1"] >= TOLERANCES["int8wo"]["check_top1"]
    # FP32: the ONNX Runtime graphs against transformers' modules run piece by piece, and against
    # transformers' whole model: two independent computations of the same answers
    fp32 = result["precisions"]["fp32"]
    assert fp32["top1"]["top1"] == 1.0
    assert fp32["transformers"]["identical_prompts"] == fp32["transformers"]["prompts"] == 2


def test_it_refuses_what_is_not_a_random_preset():
    with pytest.raises(SystemExit):
        load_script("real_size").main(["--model", "/some/folder"])
