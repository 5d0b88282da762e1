"""scripts/attention_bench.py at a small shape: every variant's attention against PyTorch's
scaled_dot_product_attention on the same cache, GroupQueryAttention's cache bound as past and
present at once (the new token lands in the one buffer), the check refusing a wrong output, and
the JSON a run writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.util import load_script

SMALL = {"heads": 2, "head_dim": 16, "slots": 40}


@pytest.fixture(scope="module")
def bench():
    return load_script("attention_bench")


@pytest.mark.parametrize("variant", ["gqa-fp32", "gqa-int8", "plain", "plain-sliced"])
@pytest.mark.parametrize("position", [1, 7, 40])
def test_each_variant_computes_attention_over_the_filled_slots(bench, variant, position):
    case = bench.Case(variant, bench.Shape(**SMALL), position, threads=1, seed=position)
    case.run()
    q, k, v = (torch.from_numpy(x).double() for x in case.inputs)
    assert k.shape == (2, position, 16)  # the filled slots only
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, None], k, v)[:, 0].numpy()
    np.testing.assert_allclose(case.output(), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gqa-fp32", "gqa-int8"])
def test_gqa_writes_the_new_token_into_the_bound_buffer(bench, variant):
    """past and present are one buffer: after the step slot n-1 holds the new K (quantized in INT8)."""
    case = bench.Case(variant, bench.Shape(**SMALL), 7, threads=1)
    key = case.cache[0].numpy()[0]
    key[:, 6] = 0  # clear the new token's slot, then let the step write it
    case.cache[0].update_inplace(np.ascontiguousarray(key[None]))
    case.run()
    written = case.cache[0].numpy()[0, :, 6].astype(np.float64)
    new_key = case.inputs[1][:, 6].astype(np.float64)
    if variant == "gqa-int8":  # the INT8 slot holds round(k / scale), k already on that grid
        written = written * case.scale[:, 0]
    np.testing.assert_allclose(written, new_key, atol=1e-5)


def test_check_refuses_an_output_unlike_numpys(bench):
    case = bench.Case("plain-sliced", bench.Shape(**SMALL), 7, threads=1)
    assert case.check() < 1e-4
    case.expected = case.expected + 0.01
    with pytest.raises(ValueError, match="plain-sliced at position 7"):
        case.check()


def test_a_run_writes_every_variant_position_and_thread_count(bench, tmp_path):
    out = tmp_path / "attention.json"
    bench.main(["--heads", "2", "--head-dim", "16", "--slots", "40", "--positions", "8", "40",
                "--threads", "1", "2", "--repeats", "1", "--iterations", "2", "--evict", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["evict_mb"] for r in rows} == {1}
    assert {(r["variant"], r["position"], r["threads"]) for r in rows} == {
        (v, p, t) for v in bench.VARIANTS for p in (8, 40) for t in (1, 2)}
    for r in rows:  # the rates follow from the shape and the time: 4 * H * n * hd flops
        assert r["gflops"] == pytest.approx(4 * 2 * r["position"] * 16 / r["ms"] / 1e6, rel=0.02)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv, message", [
    (["--head-dim", "12"], "multiple of 16"),
    (["--head-dim", "24"], "multiple of 16"),
    (["--positions", "2000"], "outside 1..--slots 1100"),
    (["--repeats", "0"], "at least 1"),
    (["--evict", "-1"], "--evict -1: a size in MB"),
])
def test_bad_options_are_refused_by_name(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


EXPORT_WARNINGS: list[str] = []  # ort_export's


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory):
    """The folder of a tiny --int8-weight-only --ort-optimized export; its warnings in EXPORT_WARNINGS
    (its int8wo ORT decoder is optional: left out, with a warning, where it misses the int8wo bound)."""
    from exporter.export import ExportConfig, export
    from tests.left_out import export_warnings

    out = tmp_path_factory.mktemp("attention") / "out"
    with export_warnings() as warnings:
        export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("int8wo",),
                            ort_optimized=True, max_seq_len=48))
    EXPORT_WARNINGS[:] = warnings
    return out


def _ort_decoder(folder, precision: str):
    """The export's ORT decoder of `precision`, which these tests are about: skipped with the export's
    warning where the export left it out (tests.left_out)."""
    from runtime.manifest import Manifest
    from tests.left_out import require_ort_graph

    return require_ort_graph(Manifest.load(folder), precision, "decoder", EXPORT_WARNINGS)


@pytest.mark.parametrize("precision", ["fp32", "int8wo"])
def test_the_decoder_step_writes_only_its_own_slot_of_the_bound_cache(bench, ort_export, precision):
    """The profiled step is a real decode step: its K/V land at slot position-1 of the one buffer
    bound as past and present, and every other slot is left as it was."""
    import onnxruntime as ort

    from exporter.graphs.comparison import ort_session
    from runtime.manifest import Manifest

    manifest = Manifest.load(ort_export)
    spec = _ort_decoder(ort_export, precision)
    sess = ort_session(ort_export / spec.file)
    shape = (1, manifest.model.num_heads, manifest.limits.max_seq_len, manifest.model.head_dim)
    dtype = next(t.dtype for t in spec.inputs if t.name == "past_key.0")
    cache = {t.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for t in spec.inputs
             if t.name.startswith("past_")}
    sess.run_with_iobinding(bench._decoder_binding(sess, spec, manifest.model, 20, 1, cache))
    for name, value in cache.items():
        touched = np.flatnonzero(np.abs(value.numpy()[0].astype(np.float64)).sum(axis=(0, 2)))
        assert touched.tolist() == [19], name


def test_a_decoder_profile_names_the_graphs_ops(bench, ort_export, tmp_path):
    _ort_decoder(ort_export, "int8wo")
    out = tmp_path / "decoder.json"
    bench.main(["--decoder", str(ort_export), "--precision", "int8wo", "--positions", "4", "48", "--threads", "1",
                "--repeats", "1", "--iterations", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["position"] for r in rows] == [4, 48]
    for r in rows:  # the int8wo decoder's weights are MatMulNBits, its self-attention GroupQueryAttention
        assert {"MatMulNBits", "GroupQueryAttention", "MultiHeadAttention"} <= set(r["op_us"])
        assert "MatMul" not in r["op_us"] and r["step_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "no ONNX Runtime-optimized fp16 decoder (the export's: {have})"),
    (["--images", "9"], "--images 9 is outside the export's 1..4"),
    (["--positions", "49"], "--positions 49 is outside the export's 1..48"),
])
def test_a_decoder_profile_refuses_what_the_export_cannot_run(bench, ort_export, argv, message):
    from runtime.manifest import Manifest

    # the ORT decoders the manifest lists (fp32, and int8wo's where the export wrote it)
    have = ", ".join(p for p, v in Manifest.load(ort_export).ort_optimized.items() if "decoder" in v.graphs)
    message = message.format(have=have)
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main(["--decoder", str(ort_export), *argv])
