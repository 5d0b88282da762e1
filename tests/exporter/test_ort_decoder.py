"""The ONNX Runtime decoder (exporter.ort.decoder: GroupQueryAttention over one shared past/present
buffer, rotary inside, per-row lengths, Simplified/SkipSimplifiedLayerNormalization) gives the
PyTorch DecoderGraph's logits within the FP32 tolerance: a right-padded prefill of rows of
different lengths from slot 0, decode steps at per-row positions, the K/V it writes into the shared
buffers, and the same logits as the portable module fed the rows left-padded. The test models have
non-zero gating alphas, so the image path counts; corrupted graphs show that the checks can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from exporter.graphs.comparison import ort_session
from exporter.ort.decoder import (
    build_ort_decoder,
    check_report,
    ort_feeds,
    reference_check,
    run_shared,
)
from exporter.graphs.specs import model_info
from runtime.errors import ExportError
from runtime.reference.modules import DecoderGraph
from runtime.reference.presets import CONFIG_VARIANTS
from runtime.reference.sources import variant_model

VARIANTS = ["tiny", "no-resampler", "cross-interval-1", "cross-interval-4", "qk-layer-norms", "alpha-vector", "gelu",
            "tied-embeddings", "no-additional-vocab"]


def _decoder(name: str):
    hf = variant_model(CONFIG_VARIANTS[name], seed=0).eval()
    return DecoderGraph(hf).eval(), model_info(hf.config)


def _session(tmp_path, model, name="decoder.ort.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return ort_session(path, threads=1)


@pytest.fixture(scope="module")
def tiny():
    module, info = _decoder("tiny")
    model, spec = build_ort_decoder(module, info, 64)
    return module, info, model, spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_ort_decoder_matches_pytorch(variant, tmp_path):
    module, info = _decoder(variant)
    model, spec = build_ort_decoder(module, info, 64)
    assert any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    report = reference_check(_session(tmp_path, model), module, info, spec, lengths=(9, 4, 7), steps=3)
    assert set(report) == {"prefill", "decode0", "decode1", "decode2", "cache"}
    assert check_report(report) == []


def test_a_head_size_onnx_runtime_refuses_is_refused_by_name(tmp_path):
    """odd-sizes (head size 12): the graph is built, but ONNX Runtime's GroupQueryAttention does not
    run it. What it takes is ONNX Runtime's to say (exporter.ort.refusal): write_ort_decoder runs the
    graph, removes it and raises Refused (an ExportError) naming the op, ONNX Runtime's reason and
    the model's head size; the export leaves it out (tests/exporter/test_ort_refused.py)."""
    from onnx import save_model

    from exporter.ort.decoder import write_ort_decoder
    from exporter.ort.refusal import Refused

    module, info = _decoder("odd-sizes")  # head size 12
    model, _ = build_ort_decoder(module, info, 64)
    assert [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]

    def write(proto, spec):
        save_model(proto, str(tmp_path / spec.file))
        return spec

    with pytest.raises(ExportError, match="GroupQueryAttention.*head size 12") as caught:
        write_ort_decoder(module, info, 64, tmp_path, write)
    assert isinstance(caught.value, Refused) and caught.value.op == "GroupQueryAttention" and caught.value.reason
    assert not (tmp_path / "decoder.ort.onnx").exists()


def test_embedded_default_matches_pytorch(tmp_path):
    from tests.util import default_hf

    hf, _ = default_hf()
    module, info = DecoderGraph(hf).eval(), model_info(hf.config)
    model, spec = build_ort_decoder(module, info, 64)
    report = reference_check(_session(tmp_path, model), module, info, spec, lengths=(8, 5), steps=2)
    assert check_report(report) == []


def test_fused_ops_in_the_graph(tiny):
    _, info, model, spec = tiny
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == info.num_layers
    assert "SkipSimplifiedLayerNormalization" in ops and "SimplifiedLayerNormalization" in ops
    # one buffer per layer and tensor, past and present of the same shape
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            assert spec.input(f"past_{kind}.{i}").shape == spec.output(f"present_{kind}.{i}").shape
    assert spec.input("seqlens_k").dtype == "int32" and spec.input("total_sequence_length").shape == ()


def test_left_padded_portable_rows_equal_ort_rows_at_slot_zero(tiny, tmp_path):
    """What the portable decoder gives for left-padded rows (HF's position ids), the ORT decoder
    gives for the same rows placed at slot 0 with their lengths."""
    module, info, model, spec = tiny
    lengths, t = (10, 6, 3), 10
    gen = torch.Generator().manual_seed(5)
    b = len(lengths)
    ids = torch.randint(3, module.cfg.vocab_size, (b, t), generator=gen)
    mask = torch.zeros(b, t, dtype=torch.long)
    image_mask = torch.zeros(b, t, 1, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, t - n:] = 1
        image_mask[r, t - n + 1:, 0] = 1
    pos = torch.where(mask == 0, 1, mask.cumsum(-1) - 1)
    cross = [torch.randn(b, info.num_heads, info.image_seq_len, info.head_dim, generator=gen)
             for _ in range(2 * info.num_cross_layers)]
    past = [torch.zeros(b, info.num_heads, 0, info.head_dim) for _ in range(2 * info.num_layers)]
    with torch.no_grad():
        portable = module(ids, mask, pos, image_mask, torch.arange(t), *cross, *past)[0].numpy()

    right_ids = np.zeros((b, t), np.int64)
    right_image = np.zeros((b, t, 1), np.int64)
    for r, n in enumerate(lengths):
        right_ids[r, :n] = ids[r, t - n:].numpy()
        right_image[r, :n] = image_mask[r, t - n:].numpy()
    buffers = [np.random.default_rng(i).standard_normal((b, info.num_heads, t + 2, info.head_dim)).astype(np.float32)
               for i in range(2 * info.num_layers)]
    feed = ort_feeds(right_ids, [n - 1 for n in lengths], t, right_image, np.arange(t),
                     [c.numpy() for c in cross], buffers, spec)
    logits = run_shared(_session(tmp_path, model), feed, spec, buffers)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(logits[r, :n], portable[r, t - n:], atol=1e-4, rtol=1e-4)


def _corrupt(model, op_type: str, **attrs):
    corrupted = type(model)()
    corrupted.CopyFrom(model)
    for node in corrupted.graph.node:
        if node.op_type == op_type:
            kept = [a for a in node.attribute if a.name not in attrs]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])
    return corrupted


@pytest.mark.parametrize("change", ["no rotary", "scale", "no image gate"])
def test_checks_fail_on_a_wrong_graph(tiny, tmp_path, change):
    module, info, model, spec = tiny
    if change == "no rotary":
        wrong = _corrupt(model, "GroupQueryAttention", do_rotary=0)
    elif change == "scale":
        wrong = _corrupt(model, "GroupQueryAttention", scale=0.5)
    else:  # the gate's ReduceMax over images made a ReduceMin: each token sees one of two images, so
        # every gate is 0 and the image path is switched off
        wrong = type(model)()
        wrong.CopyFrom(model)
        for node in wrong.graph.node:
            if node.op_type == "ReduceMax":
                node.op_type = "ReduceMin"
    report = reference_check(_session(tmp_path, wrong), module, info, spec, lengths=(9, 4), steps=1)
    assert check_report(report), f"a graph with {change} passed the reference check"


def test_export_writes_the_ort_decoder_beside_the_portable_graphs(tmp_path):
    from exporter.cli import build_parser
    from exporter.export import ExportConfig, export
    from runtime.manifest import Manifest

    assert build_parser().parse_args(["x", "--ort-optimized"]).ort_optimized
    out = tmp_path / "export"
    written = export(ExportConfig(output=out, progress=False, max_seq_len=48, ort_optimized=True))
    manifest = Manifest.load(out)
    assert manifest == written
    variant = manifest.ort_optimized["fp32"]
    # beside the fused vision graph (exporter.ort.encoders; tests/exporter/test_ort_encoders.py)
    assert variant.backends == ["onnxruntime"] and set(variant.graphs) == {"decoder", "vision"}
    spec = manifest.ort_graphs("fp32")["decoder"]
    assert spec.file == "decoder.ort.onnx" and spec.file in manifest.files
    manifest.verify_files(out)
    # validated at export: prefill, decode steps and the shared buffers, every row within the bound
    rows = [row for case in variant.accuracy["decoder"].values() for row in case.values()]
    assert rows and all(row["ok"] for row in rows)
    assert set(variant.accuracy["decoder"]) >= {"prefill", "decode0", "cache"}
    # the portable graphs are as without the flag
    assert manifest.graphs["decoder"].file == "decoder.onnx"
    assert [s.name for s in manifest.graphs["decoder"].inputs][:2] == ["input_ids", "attention_mask"]
    assert manifest.ort_graphs("int8wo") == {}
    # the rotary caches cover the export's max_seq_len positions
    import onnx

    proto = onnx.load(str(out / spec.file))
    caches = {t.name: t.dims for t in proto.graph.initializer if t.name.startswith(("cos_cache", "sin_cache"))}
    assert caches and all(dims[0] == 48 for dims in caches.values())


def test_manifest_without_ort_graphs_reads_as_before(tmp_path):
    from exporter.export import ExportConfig, export
    from runtime.manifest import Manifest

    out = tmp_path / "plain"
    export(ExportConfig(output=out, model="random:tiny", progress=False, validate=False))
    manifest = Manifest.load(out)
    assert manifest.ort_optimized == {} and manifest.ort_graphs() == {}
    assert not (out / "decoder.ort.onnx").exists()


@pytest.mark.parametrize("variant", ["tiny", "qk-layer-norms", "gelu"])
def test_int8_weight_only_ort_decoder_within_its_bound(variant, tmp_path):
    from exporter.ort.decoder import BOUNDS
    from exporter.precision.transforms import matmul_nbits

    module, info = _decoder(variant)
    model, spec = build_ort_decoder(module, info, 64)
    quantized = matmul_nbits(model)
    ops = [n.op_type for n in quantized.graph.node]
    # every weight MatMul (QKV, o_proj, MLPs, lm_head) is MatMulNBits; cross-attention runs in
    # MultiHeadAttention over the perceiver's K/V, so no FP32 MatMul is left
    assert ops.count("MatMulNBits") == 5 * info.num_layers + 5 * info.num_cross_layers + 1
    assert ops.count("MatMul") == 0 and ops.count("MultiHeadAttention") == info.num_cross_layers
    report = reference_check(_session(tmp_path, quantized), module, info, spec, lengths=(9, 4), steps=2,
                             bound=BOUNDS["int8wo"])
    assert check_report(report, BOUNDS["int8wo"]) == []
    # and it is not FP32: the FP32 bound fails, so the quantization took place and is measured
    assert check_report(report, BOUNDS["fp32"])


@pytest.mark.parametrize("variant", ["tiny", "gelu"])
def test_int8wo_prompt_graph_within_its_bound(variant, tmp_path):
    """int8wo's prompt graph: every weight MatMul (QKV, o_proj, MLPs, lm_head) per-token INT8 x
    per-channel INT8 MatMulInteger, an FP32 cache, within the int8wo bound of the PyTorch decoder on
    prompts and decode steps, and not within FP32's."""
    from exporter.ort.decoder import BOUNDS
    from exporter.precision.transforms import per_token_int8

    module, info = _decoder(variant)
    model, spec = build_ort_decoder(module, info, 64)
    quantized = per_token_int8(model)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulInteger") == 5 * info.num_layers + 5 * info.num_cross_layers + 1
    assert ops.count("MatMul") == 0 and ops.count("MatMulNBits") == 0
    assert spec.input("past_key.0").dtype == "float32"
    report = reference_check(_session(tmp_path, quantized), module, info, spec, lengths=(9, 4), steps=2,
                             bound=BOUNDS["int8wo"])
    assert check_report(report, BOUNDS["int8wo"]) == []
    assert check_report(report, BOUNDS["fp32"])


def test_export_with_int8_weight_only_writes_both_ort_decoders(tmp_path, caplog):
    """--int8-weight-only --ort-optimized: the int8wo ORT decode graph (MatMulNBits) and its prompt
    graph (per-token INT8 products, FP32 K/V out), each validated against PyTorch, in the manifest.
    Both are optional (the export leaves one out with a warning where it misses the int8wo bound):
    what the manifest lists must be validated, and what it does not list must have been left out by
    the export's warning. This test is about the two graphs: it is skipped, with that warning, where
    the export left one out."""
    import logging

    from exporter.export import ExportConfig, export
    from runtime.manifest import Manifest
    from tests.left_out import check_ort_listing, require_ort_graph

    out = tmp_path / "export"
    with caplog.at_level(logging.WARNING, logger="exporter"):
        export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("int8wo",),
                            ort_optimized=True))
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("exporter")]
    manifest = Manifest.load(out)
    manifest.verify_files(out)
    assert set(manifest.ort_optimized) <= {"fp32", "int8wo"}
    # every ORT graph listed is on disk and validated (accuracy rows within the bound); one asked for
    # but not listed was left out by a warning naming it
    check_ort_listing(manifest, out, warnings, [("fp32", "decoder"), ("int8wo", "decoder"), ("int8wo", "prompt"),
                                                ("int8wo", "vision"), ("int8wo", "perceiver")])
    decoder = require_ort_graph(manifest, "int8wo", "decoder", warnings)
    assert decoder.file == "decoder.ort.int8wo.onnx"
    assert manifest.ort_optimized["int8wo"].backends == ["onnxruntime"]
    # and its prompt graph (per-token INT8 products, FP32 K/V out), validated the same way
    prompt = require_ort_graph(manifest, "int8wo", "prompt", warnings)
    assert prompt.file == "decoder.ort.int8wo.prompt.onnx" and prompt.input("past_key.0").dtype == "float32"
    assert [(t.name, t.shape) for t in prompt.inputs] == [(t.name, t.shape) for t in decoder.inputs]


# ---------------------------------------------------------------- the int8wo decoder's INT8 KV cache
def test_kv_scales_take_each_rotary_pairs_peak_and_skip_padding():
    """Scales computed here independently: a key's channels d and d + hd/2 share the peak of the
    pair's norm (rotary turns one into the other), a value's channel its own peak; padded
    positions (attention_mask 0) do not count, however large."""
    from exporter.ort.decoder import KV_MARGIN, kv_scales

    module, info = _decoder("tiny")
    rng = np.random.default_rng(0)
    half = info.head_dim // 2
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batches = []
    for _ in range(2):
        arrays = [rng.standard_normal((2, info.num_heads, 5, info.head_dim)).astype(np.float32)
                  for _ in range(2 * info.num_layers)]
        for a in arrays:
            a[0, :, :2] = 1e6  # padding: ignored
        batches.append((arrays, mask))
    scales = kv_scales(batches, info)
    assert len(scales) == 2 * info.num_layers
    for i, scale in enumerate(scales):
        tokens = np.concatenate([np.concatenate([arrays[i][0][:, 2:], arrays[i][1]], axis=1)
                                 for arrays, _ in batches], axis=1)  # [H, valid tokens, hd]
        if i % 2 == 0:
            pair = np.hypot(tokens[..., :half], tokens[..., half:]).max(axis=1)
            peak = np.concatenate([pair, pair], axis=-1)
        else:
            peak = np.abs(tokens).max(axis=1)
        assert scale.shape == (1, info.num_heads, 1, info.head_dim) and scale.dtype == np.float32
        np.testing.assert_allclose(scale[0, :, 0], KV_MARGIN * peak / 127, rtol=1e-6)


def _pytorch_prompt(module, info, n: int, gen, image_from: int = 1):
    """(ids, image_mask, cross K/V, the PyTorch decoder's present K/V) of a random one-row prompt of
    n tokens over 2 random images, attending to one of them from position `image_from`."""
    ids = torch.randint(3, module.cfg.vocab_size, (1, n), generator=gen)
    cross = [torch.randn(1, info.num_heads, 2 * info.image_seq_len, info.head_dim, generator=gen)
             for _ in range(2 * info.num_cross_layers)]
    image_mask = torch.zeros(1, n, 2, dtype=torch.long)
    image_mask[:, image_from:, image_from % 2] = 1
    past = [torch.zeros(1, info.num_heads, 0, info.head_dim) for _ in range(2 * info.num_layers)]
    with torch.no_grad():
        out = module(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], image_mask, torch.arange(n),
                     *cross, *past)
    return ids, image_mask, cross, [o.numpy() for o in out[1:]]


def _int8_cache_scales_for(module, info, seed=1):
    """Scales from the PyTorch decoder's K/V on random prompts (as export calibrates on photos)."""
    from exporter.ort.decoder import kv_scales

    gen = torch.Generator().manual_seed(seed)
    return kv_scales([(_pytorch_prompt(module, info, n, gen)[3], np.ones((1, n), np.int64)) for n in (40, 32, 24, 16)],
                     info)


def test_int8_kv_cache_holds_pytorch_kv_to_half_a_step(tmp_path):
    """With FP32 weights and the INT8 cache, every K/V the decoder writes, dequantized with its
    scale, is PyTorch's to within half a quantization step (where calibration's range holds it),
    layer by layer and channel by channel: the scales reach the right heads, channels and buffers."""
    from exporter.ort.decoder import BOUNDS
    from runtime.cache import int8_cache_scales

    module, info = _decoder("tiny")
    scales = _int8_cache_scales_for(module, info)
    model, spec = build_ort_decoder(module, info, 64, kv_scales=scales)
    assert spec.input("past_key.0").dtype == "int8" and spec.outputs[1].dtype == "int8"
    session = _session(tmp_path, model)
    names = [s.name for s in spec.inputs if s.name.startswith("past_")]
    read = int8_cache_scales(tmp_path / "decoder.ort.onnx")  # what the Session reads back
    assert list(read) == names and all(np.array_equal(read[n], s) for n, s in zip(names, scales))

    n = 10
    ids, image_mask, cross, ref = _pytorch_prompt(module, info, n, torch.Generator().manual_seed(5), image_from=2)
    buffers = [np.zeros((1, info.num_heads, n + 4, info.head_dim), np.int8) for _ in names]
    feed = ort_feeds(ids.numpy(), [n - 1], n, image_mask.numpy(), np.arange(1), [c.numpy() for c in cross],
                     buffers, spec)
    run_shared(session, feed, spec, buffers)
    inside = 0
    # layer 0's K/V come from the embedding through FP32 weights: exact but for the rounding (deeper
    # layers attend over dequantized K/V, so theirs move a little: reference_check bounds them)
    for buffer, scale, k in list(zip(buffers, scales, ref))[:2]:
        k = k[0]  # [H, n, hd]
        got = buffer[0, :, :n].astype(np.float32) * scale[0]
        held = np.abs(k) <= 127 * scale[0]  # calibration's range (a random prompt may pass it)
        inside += held.mean()
        err = np.abs(got - k)[held]
        assert (err <= 0.5 * np.broadcast_to(scale[0], k.shape)[held] + 1e-4).all()
        assert not np.array_equal(buffer[0, :, :n], np.zeros_like(buffer[0, :, :n]))
    assert inside / 2 > 0.99
    # decode steps over it stay within the int8wo bound; scales a sixteenth as large (clipping) do not
    report = reference_check(session, module, info, spec, lengths=(9, 4), steps=2, bound=BOUNDS["int8wo"],
                             kv_scales=scales)
    assert check_report(report, BOUNDS["int8wo"]) == []
    wrong, _ = build_ort_decoder(module, info, 64, kv_scales=[s / 16 for s in scales])
    report = reference_check(_session(tmp_path, wrong, "wrong.onnx"), module, info, spec, lengths=(9, 4), steps=1,
                             bound=BOUNDS["int8wo"], kv_scales=scales)
    assert check_report(report, BOUNDS["int8wo"])


def test_export_int8wo_ort_decoder_keeps_an_int8_cache(tmp_path):
    """idefics-export --int8-weight-only --ort-optimized: the int8wo ORT decoder's cache is INT8,
    its scales calibrated on the calibration photos and prompts (recorded in the manifest), and its
    validation against PyTorch (cache dequantized) passed."""
    from exporter.export import ExportConfig, export
    from exporter.ort.decoder import KV_MARGIN
    from runtime.manifest import Manifest

    from tests.left_out import export_warnings, require_ort_graph

    out = tmp_path / "export"
    with export_warnings() as warnings:
        export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("int8wo",),
                            ort_optimized=True, calibration_size=4))
    manifest = Manifest.load(out)
    # this test is about the int8wo ORT decoder (optional: skipped with the export's warning where left out)
    require_ort_graph(manifest, "int8wo", "decoder", warnings)
    variant = manifest.ort_optimized["int8wo"]
    assert variant.graphs["decoder"].input("past_key.0").dtype == "int8"
    assert manifest.ort_graphs("fp32")["decoder"].input("past_key.0").dtype == "float32"
    assert variant.calibration["images"] == 4 and f"{KV_MARGIN:g} x the peak" in variant.calibration["method"]
    cache = variant.accuracy["decoder"]["cache"]
    assert cache and all(row["ok"] for row in cache.values())


@pytest.mark.parametrize("margins, cache", [((0.05, 2.0), "int8"), ((0.02, 0.05), "float32")],
                         ids=["second-margin", "fp32-cache"])
def test_int8_cache_margins_are_tried_in_turn(tmp_path, monkeypatch, caplog, margins, cache, opened):
    """Scales that clip past the bound (a twentieth of the peaks) fail the validation: the export
    tries the next margin, and past the last writes the int8wo ORT decoder with an FP32 cache and a
    warning that names the margins that missed; either way the export completes, its decoder within
    the bound, and its Session decodes over the cache chosen."""
    import logging

    import exporter.ort.decoder as ort_decoder
    from exporter.export import ExportConfig, export
    from runtime.manifest import Manifest
    from tests.runtime.test_generate import make_batch

    from tests.left_out import require_ort_graph

    monkeypatch.setattr(ort_decoder, "KV_MARGINS", margins)
    out = tmp_path / "export"
    with caplog.at_level(logging.WARNING, logger="exporter.export"):
        export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("int8wo",),
                            ort_optimized=True, calibration_size=4))
    manifest = Manifest.load(out)
    # this test is about the int8wo ORT decoder's cache: it needs that decoder (the export leaves it
    # out, with a warning, where it misses the int8wo bound with an FP32 cache too: then skipped)
    require_ort_graph(manifest, "int8wo", "decoder", [r.getMessage() for r in caplog.records])
    variant = manifest.ort_optimized["int8wo"]
    assert variant.graphs["decoder"].input("past_key.0").dtype == cache
    rows = [row for case in variant.accuracy["decoder"].values() for row in case.values()]
    assert rows and all(row["ok"] for row in rows)
    if cache == "int8":
        assert "2 x the peak" in variant.calibration["method"] and "FP32" not in caplog.text
    else:
        assert "cache stays FP32" in caplog.text and "0.02 x" in caplog.text and "0.05 x" in caplog.text
        assert "method" not in variant.calibration or "KV cache" not in variant.calibration.get("method", "")
    session = opened(out)  # decodes over the cache the export chose, prompts quantized into it or not
    assert session.graphs.cache_dtype == np.dtype(cache)
    assert (session.graphs.kv_scales is not None) == (cache == "int8")
    from runtime.reference.sources import build_random

    batch = make_batch(build_random("tiny", 0).config, [1, 0])
    got = session.generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=6).sequences
    assert got.shape == (2, batch["input_ids"].shape[1] + 6)


def _scaled(transform, stem: str):
    """`transform` with every initializer whose name holds `stem` multiplied by 3 after it: a graph
    that cannot meet its bound."""
    from onnx import numpy_helper

    def broken(model):
        model = transform(model)
        for tensor in model.graph.initializer:
            if stem in tensor.name:
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 3, tensor.name))
        return model

    return broken


@pytest.mark.parametrize("graph", ["prompt", "decoder"])
def test_an_int8wo_ort_graph_that_misses_its_bound_is_left_out(tmp_path, monkeypatch, caplog, graph, opened):
    """A prompt graph past the int8wo bound is not written (prompts run in the decode graph); a
    decode graph past it at every margin and with an FP32 cache is not written either (the
    portable int8wo decoder serves, and the prompt graph with it). A warning names the file; the
    export completes and its Session runs."""
    import logging

    import exporter.ort.decoder as ort_decoder
    from exporter.export import ExportConfig, export
    from exporter.precision.transforms import matmul_nbits, per_token_int8
    from runtime.manifest import Manifest
    from runtime.reference.sources import build_random
    from tests.runtime.test_generate import make_batch

    if graph == "prompt":
        monkeypatch.setattr(ort_decoder, "per_token_int8", _scaled(per_token_int8, "weight_scale"))
    else:
        monkeypatch.setattr(ort_decoder, "matmul_nbits", _scaled(matmul_nbits, "scales"))
    from tests.left_out import check_ort_listing, require_ort_graph

    out = tmp_path / "export"
    with caplog.at_level(logging.WARNING, logger="exporter"):
        export(ExportConfig(output=out, model="random:tiny", progress=False, precisions=("int8wo",),
                            ort_optimized=True, calibration_size=4))
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("exporter")]
    manifest = Manifest.load(out)
    graphs = manifest.ort_graphs("int8wo")
    assert "prompt" not in graphs and not (out / "decoder.ort.int8wo.prompt.onnx").exists()
    assert "decoder.ort.int8wo.prompt.onnx" in caplog.text if graph == "prompt" else \
        "decoder" not in graphs and "decoder.ort.int8wo.onnx" in caplog.text
    # the rest: listed and validated, or left out by a warning of the export's (the int8wo encoders)
    check_ort_listing(manifest, out, warnings, [("int8wo", "vision"), ("int8wo", "perceiver")])
    if graph == "prompt":  # the decode graph is not broken here: it is required, unless its own bound left it out
        require_ort_graph(manifest, "int8wo", "decoder", warnings)
    session = opened(out)
    expected = "decoder.ort.int8wo.onnx" if graph == "prompt" else "decoder.int8wo.onnx"
    assert session.graphs.decoder.spec.file == expected
    if graph == "prompt":
        assert session.graphs.prompt_decoder is session.graphs.decoder
    # the encoders do not depend on it: the Session runs what the manifest lists
    assert session.graphs.vision.spec.file == ("vision.ort.int8wo.onnx" if "vision" in graphs else "vision.int8wo.onnx")
    batch = make_batch(build_random("tiny", 0).config, [1, 0])
    assert session.generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=4).sequences.shape[0] == 2


def test_a_graph_written_again_holds_its_own_weights_only(tmp_path):
    """The export writes the int8wo ORT decoder once per KV-cache margin it tries: onnx appends
    external data to a file already there, so each write must start from a fresh .data file, or
    the last would carry every earlier try's weights."""
    from onnx import TensorProto, numpy_helper

    from exporter.graphs.trace import write_graph
    from runtime.manifest import GraphSpec, TensorSpec

    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weights, "w")])
    spec = GraphSpec(name="g", file="g.onnx", inputs=(TensorSpec("x", "float32", (1, 64)),),
                     outputs=(TensorSpec("y", "float32", (1, 64)),))
    for _ in range(3):  # external_data_threshold=0: every weight goes to the .data file
        written = write_graph(helper.make_model(graph), tmp_path, spec, 0, check=False)
    assert written.external_data == "g.onnx.data"
    assert (tmp_path / "g.onnx.data").stat().st_size == weights.nbytes
    import onnx

    loaded = onnx.load(str(tmp_path / "g.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights)
