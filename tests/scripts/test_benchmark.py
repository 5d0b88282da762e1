"""scripts/benchmark.py on CPU: the decoder's weight bytes behind the memory-bandwidth floor, a smoke
run of the whole benchmark on the tiny preset, and the refused option combinations. The GPU mode
needs a GPU and is not run here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exporter.export import ExportConfig, export
from runtime.manifest import Manifest
from tests.util import load_script



@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark")


def onnx_sizes(out: Path, precision: str) -> int:
    """The decoder's ONNX file(s) of `precision`, straight from manifest.json."""
    data = json.loads((out / "manifest.json").read_text())
    spec = data["graphs"]["decoder"] if precision == "fp32" else data["variants"][precision]["graphs"]["decoder"]
    files = [spec["file"]] + ([spec["external_data"]] if spec.get("external_data") else [])
    model = data["model"]  # the embedding table, from the manifest's model facts: vocab x hidden
    table = model["vocab_size"] * model["hidden_size"] * (2 if precision == "fp16" else 4)
    return sum(os.path.getsize(out / name) for name in files) - table


def test_decoder_weight_bytes(bench, tmp_path):
    out = tmp_path / "out"
    export(ExportConfig(output=out, progress=False, precisions=("fp16",)))
    fp32, fp16 = bench.decoder_weight_bytes(out, "fp32"), bench.decoder_weight_bytes(out, "fp16")
    assert fp32 == onnx_sizes(out, "fp32")
    assert fp16 == onnx_sizes(out, "fp16")
    assert fp16 < 0.75 * fp32  # the FP16 file holds half-width weights
    # DECODE/PREFILL: the decode part's graphs
    assert bench.decoder_weight_bytes(out, "fp16/fp32") == fp16
    assert bench.decoder_weight_bytes(out, "fp32/fp16") == fp32


def test_measure_bandwidth(bench):
    bandwidth = bench.measure_bandwidth("cpu", 16 * 1024**2)
    assert 1e8 < bandwidth < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s


def test_smoke_run(bench, tmp_path, monkeypatch):
    seen, real = {}, bench.decoder_weight_bytes

    def spy(out, precision, flavour="portable"):  # the export lives in a temporary folder: check it while it exists
        value = real(out, precision, flavour)
        manifest = Manifest.load(out)
        if flavour == "portable":
            assert value == onnx_sizes(Path(out), precision.split("/")[0])
        else:  # the --ort-optimized decoder's own file, less the same embedding table
            table = manifest.model.vocab_size * manifest.model.hidden_size * 4
            assert value == os.path.getsize(Path(out) / "decoder.ort.onnx") - table
        assert manifest.variants == {}  # fp32 only was asked for
        seen[(flavour, precision)] = value
        return value

    hf_runs, real_hf = [], bench.time_hf

    def timed_hf(*args, **kwargs):  # the real measurement, recorded: the row must hold their medians
        hf_runs.append(real_hf(*args, **kwargs))
        return hf_runs[-1]

    monkeypatch.setattr(bench, "decoder_weight_bytes", spy)
    monkeypatch.setattr(bench, "time_hf", timed_hf)
    bench.main(["--preset", "tiny", "--tokens", "3", "--positions", "8", "--batches", "1", "--images", "1",
                "--repeats", "3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["repeats"] == 3 and len(hf_runs) == 1 + 3  # the warm-up, then 3 turns
    assert (result["search_rounds"], result["searches"]) == (16, {})  # fp32 only: no search
    turns = hf_runs[1:]
    assert {r["hf_ttft_s"] for r in result["rows"]} == {sorted(t for t, _ in turns)[1]}
    assert {r["hf_decode_ms"] for r in result["rows"]} == {sorted(d for _, d in turns)[1] * 1e3}
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["bandwidth_gb_s"] > 0 and machine["date"]
    assert "gpu" not in machine
    assert seen.keys() == {("portable", "fp32"), ("ort", "fp32")}  # both flavours by default on cpu
    rows = result["rows"]
    assert [(r["batch"], r["images"], r["position"], r["backend"], r["precision"], r["flavour"]) for r in rows] == [
        (1, 1, 8, "onnxruntime", "fp32", "portable"), (1, 1, 8, "onnxruntime", "fp32", "ort")]
    assert "onnxruntime:fp32 (ort)" in bench.table(rows)
    for row in rows:
        floor_ms = seen[(row["flavour"], row["precision"])] / (machine["bandwidth_gb_s"] * 1e9) * 1e3
        assert row["weight_bytes"] == seen[(row["flavour"], row["precision"])]
        assert row["floor_ms"] == pytest.approx(floor_ms, rel=1e-9)
        assert row["floor_ratio"] == pytest.approx(row["session_decode_ms"] / floor_ms, rel=1e-9)
        assert row["decode_speedup"] == pytest.approx(row["hf_decode_ms"] / row["session_decode_ms"])
    assert "floor ratio" in bench.table(rows) and f"{rows[0]['floor_ratio']:.2f}x" in bench.table(rows)


@pytest.mark.parametrize("argv", [
    ["--backends", "tensorrt", "--precisions", "fp32"],
    ["--device", "cuda", "--backends", "tensorrt", "--precisions", "fp16", "int8wo/fp16"],
    ["--backends", "tensorrt", "--precisions", "fp16"],  # TensorRT needs --device cuda
    ["--precisions", "fp8"],
    ["--backends", "triton"],
    ["--tokens", "1"],
    ["--repeats", "0"],
    ["--device", "cuda", "--backends", "tensorrt", "--precisions", "fp16", "--flavours", "ort"],  # ORT graphs: onnxruntime
    ["--flavours", "tensorrt"],
    ["--search-rounds", "-1"],
])
def test_refused_options(bench, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_search_rounds_reach_the_export(bench, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def export(config):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(bench, "export", export)
    monkeypatch.setattr(bench, "measure_bandwidth", lambda device: 1e10)
    with pytest.raises(Stop):
        bench.main(["--preset", "tiny", "--precisions", "int8", "--search-rounds", "5", "--out", str(tmp_path)])
    assert seen[0].search.rounds == 5 and seen[0].precisions == ("int8",)
    assert bench.parse_args([]).search_rounds == 16  # idefics-export's default


def test_main_refuses_tensorrt_fp32(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--backends", "tensorrt", "--precisions", "fp32", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert not (tmp_path / "benchmark.json").exists()


def test_device_defaults(bench):
    cpu = bench.parse_args([])
    assert (cpu.device, cpu.backends, cpu.precisions, cpu.batches) == ("cpu", ["onnxruntime"], ["fp32"], [1, 4])
    assert cpu.flavours == ["portable", "ort"]
    gpu = bench.parse_args(["--device", "cuda", "--backends", "onnxruntime", "tensorrt"])
    assert (gpu.precisions, gpu.batches, gpu.flavours) == (["fp16"], [1, 8], ["portable"])
    explicit = bench.parse_args(["--device", "cuda", "--precisions", "fp32", "--batches", "2"])
    assert (explicit.precisions, explicit.batches) == (["fp32"], [2])
