"""scripts/int8_kernels.py, small: the two ways of exact INT8 on any CPU, measured on random:tiny
(the README's figures come from random:medium). The 7-bit export's weights are checked in the
graph itself, and each search record against the export's own log lines."""

from __future__ import annotations

import json

import pytest

from tests.util import load_script

pytestmark = pytest.mark.slow


def test_int8_kernels_smoke(tmp_path, caplog):
    script = load_script("int8_kernels")
    result = script.main(["--model", "random:tiny", "--repeats", "1", "--tokens", "3", "--out", str(tmp_path),
                          "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    eight, seven = result["accuracy"]["8-bit weights"], result["accuracy"]["7-bit weights"]
    assert eight["written"] and eight["weights"] == {"min": -127, "max": 127}
    if seven["written"]:  # what the 7-bit export is for: no weight past 64 (255 x 64 x 2 < 32767)
        assert -64 <= seven["weights"]["min"] and seven["weights"]["max"] <= 64 and seven["weights"]["max"] > 32
    for record in (eight, seven):
        assert record["rounds"] >= 0 and 0 < record["top1_all_int8"] <= 1
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("int8 round 1:")]
    assert len(logged) == sum(1 for r in (eight, seven) if r["rounds"]), logged
    for precision in ("int8", "int8wo"):
        row = result["speed"][precision]
        for mode in ("auto", "exact"):
            assert row[mode]["ttft_s"] > 0 and row[mode]["decode_ms"] > 0
        assert row["decode_ratio"] == pytest.approx(row["exact"]["decode_ms"] / row["auto"]["decode_ms"])


def test_bad_options_are_refused(capsys):
    script = load_script("int8_kernels")
    with pytest.raises(SystemExit):
        script.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
