"""The layer-streamed export (exporter.stream): graphs written piece by piece give what the whole
traced graphs and transformers give, their weights in one external-data file each, and the
per-piece validation names the piece at fault.

References are independent of exporter.stream: the whole PyTorch modules (runtime.reference.modules,
as exporter.graphs.validate.reference_cases runs them), the whole traced graph's int8wo transform,
and transformers' greedy generate."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporter.graphs.bounds import TOLERANCES, judge, measure
from exporter.graphs.comparison import ort_session
from exporter.graphs.inputs import positions_from_mask
from exporter.graphs.specs import graph_specs, model_info
from exporter.graphs.trace import EXTERNAL_DATA_THRESHOLD, export_graph, trace_args
from exporter.graphs.validate import reference_cases
from exporter.precision.activations import cast_feed
from exporter.precision.transforms import to_fp16, to_int8_weight_only
from exporter.stream import writer as stream_writer
from exporter.stream.pieces import StateDictSource, graph_pieces
from exporter.stream.writer import GraphWriter, stream_graphs, trace_piece
from runtime.errors import ValidationError
from runtime.reference.modules import graph_modules
from runtime.reference.presets import CONFIG_VARIANTS
from runtime.reference.sources import variant_model
from tests.runtime.test_generate import make_batch
from tests.util import hf_generate


def _stream(model, folder, precisions=("fp32",), validate=False):
    info = model_info(model.config)
    specs = graph_specs(model.config, info)
    result = stream_graphs(StateDictSource(model), info, specs, folder, list(precisions), validate=validate,
                           progress=False)
    return info, {name: s.graph_spec() for name, s in specs.items()}, result


def _run_cases(folder, graphs, cases, bound):
    """{(graph, case, output): judged row} of the streamed graphs in ONNX Runtime on PyTorch's cases."""
    sessions = {name: ort_session(folder / spec.file) for name, spec in graphs.items()}
    rows = {}
    for case in cases:
        names = [o.name for o in graphs[case.graph].outputs]
        got = sessions[case.graph].run(names, cast_feed(sessions[case.graph], case.feed))
        for name, value in zip(names, got):
            rows[(case.graph, case.name, name)] = judge(measure(case.expected[name], value), bound)
    return rows


def _greedy(folder, graphs, info, batch, steps):
    """Greedy tokens [B, steps] of the three streamed graphs chained in ONNX Runtime, past concatenated."""
    sessions = {name: ort_session(folder / spec.file) for name, spec in graphs.items()}
    pixels = batch["pixel_values"]
    b, n = pixels.shape[:2]
    (hidden,) = sessions["vision"].run(None, {"pixel_values": pixels.flatten(0, 1).numpy()})
    cross = sessions["perceiver"].run(None, {"image_hidden_states": hidden.reshape(b, n, *hidden.shape[1:])})
    cross = dict(zip([o.name for o in graphs["perceiver"].outputs], cross))
    past = {s.name: np.zeros((b, info.num_heads, 0, info.head_dim), np.float32)
            for s in graphs["decoder"].inputs if s.name.startswith("past_")}
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    pos = positions_from_mask(batch["attention_mask"]).numpy()
    image_mask = batch["image_attention_mask"].numpy()
    names = [o.name for o in graphs["decoder"].outputs]
    tokens = []
    for _ in range(steps):
        feed = dict(input_ids=ids, attention_mask=mask, position_ids=pos, image_attention_mask=image_mask,
                    logits_positions=np.array([ids.shape[1] - 1]), **cross, **past)
        out = dict(zip(names, sessions["decoder"].run(names, feed)))
        token = out["logits"][:, -1].argmax(-1)
        tokens.append(token)
        past = {k: np.concatenate([v, out[k.replace("past_", "present_")]], axis=2) for k, v in past.items()}
        ids, pos, image_mask = token[:, None], pos[:, -1:] + 1, image_mask[:, -1:]
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1)


@pytest.mark.parametrize("variant", ["tiny", *(v for v in CONFIG_VARIANTS if v != "tiny")])
def test_streamed_fp32_matches_the_whole_graphs_and_transformers(variant, tmp_path):
    model = variant_model(variant)
    info, graphs, result = _stream(model, tmp_path)
    assert {name: g.file for name, g in result.graphs["fp32"].items()} == {
        "vision": "vision.onnx", "perceiver": "perceiver.onnx", "decoder": "decoder.onnx"}
    for name, spec in graphs.items():  # IO exactly the spec's: names, order, dtypes, axes
        proto = onnx.load(str(tmp_path / spec.file), load_external_data=False)
        for values, specs in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
            assert [v.name for v in values] == [s.name for s in specs]
            for value, s in zip(values, specs):
                dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
                assert dims == list(s.shape), (name, value.name)
    cases = reference_cases(graphs, graph_modules(model), info)  # the whole PyTorch modules
    rows = _run_cases(tmp_path, graphs, cases, TOLERANCES["fp32"])
    worst = max(rows.items(), key=lambda kv: kv[1]["max_rel"])
    assert worst[1]["max_rel"] < 1e-5, worst
    assert {c.name for c in cases if c.graph == "decoder"} == {"prefill", "decode", "decode-static"}

    batch = make_batch(model.config, [2, 1], length=9)
    expected = hf_generate(model, batch, max_new_tokens=6)[:, 9:]
    np.testing.assert_array_equal(_greedy(tmp_path, graphs, info, batch, 6), expected)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """tiny, streamed in fp32, fp16, int8 and int8wo with per-piece validation."""
    model = variant_model("tiny")
    folder = tmp_path_factory.mktemp("stream")
    info, graphs, result = _stream(model, folder, ("fp32", "fp16", "int8", "int8wo"), validate=True)
    return model, info, graphs, result, folder


def test_validation_table_has_every_piece(streamed):
    result = streamed[3]
    labels = [r["piece"] for r in result.table if r["graph"] == "decoder" and r["precision"] == "fp32"]
    assert labels == ["head", "cross 0", "layer 0 self", "layer 1 self", "cross 1", "layer 2 self", "layer 3 self",
                      "tail"]
    assert {r["precision"] for r in result.table} == {"fp32", "fp16", "int8", "int8wo"}
    assert all(r["ok"] for r in result.table), result.table
    assert all(r["max_rel"] < 1e-4 for r in result.table if r["precision"] == "fp32")


def test_int8wo_within_bounds_and_weights_as_the_whole_graph_transform(streamed, tmp_path):
    model, info, graphs, result, folder = streamed
    int8 = result.graphs["int8wo"]
    assert {name: g.file for name, g in int8.items()} == {
        "vision": "vision.int8wo.onnx", "perceiver": "perceiver.int8wo.onnx", "decoder": "decoder.int8wo.onnx"}
    cases = reference_cases(graphs, graph_modules(model), info)
    rows = _run_cases(folder, int8, cases, TOLERANCES["int8wo"])
    assert all(r["ok"] for r in rows.values()), {k: r for k, r in rows.items() if not r["ok"]}
    assert max(r["max_rel"] for r in rows.values()) > 1e-4  # really quantized

    # the whole traced decoder through the whole-graph transform: the same MatMulNBits weights
    spec = graphs["decoder"]
    whole = export_graph(graph_modules(model)["decoder"], trace_args(info)["decoder"], spec, tmp_path, 18,
                         EXTERNAL_DATA_THRESHOLD)
    converted, _, _ = to_int8_weight_only(onnx.load(str(tmp_path / whole.file)), spec)

    def nbits(proto):
        inits = {t.name: t for t in proto.graph.initializer}
        found = []
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                b, scales = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
                found.append((b.shape, b.tobytes(), scales.tobytes()))
        return sorted(found)

    streamed_weights = nbits(onnx.load(str(folder / int8["decoder"].file)))
    # self layers: q, k, v, o, gate, up, down; cross layers: q, o, gate, up, down (K/V in the perceiver); lm_head
    assert len(streamed_weights) == 7 * info.num_layers + 5 * info.num_cross_layers + 1
    assert streamed_weights == nbits(converted)


def _within_bound(streamed, precision: str) -> tuple[dict, dict]:
    """The streamed `precision` graphs (NAME.PRECISION.onnx) against the whole PyTorch modules on
    the reference cases, every row within the precision's bound: (their specs, the rows)."""
    model, info, graphs, result, folder = streamed
    written = result.graphs[precision]
    assert {name: g.file for name, g in written.items()} == {
        name: f"{name}.{precision}.onnx" for name in ("vision", "perceiver", "decoder")}
    cases = reference_cases(graphs, graph_modules(model), info)
    rows = _run_cases(folder, written, cases, TOLERANCES[precision])
    assert all(r["ok"] for r in rows.values()), {k: r for k, r in rows.items() if not r["ok"]}
    return written, rows


def test_fp16_within_bounds_and_typed_as_the_whole_graph_transform(streamed, tmp_path):
    """The streamed FP16 graphs against the whole PyTorch modules (left-padded rows: fully masked
    attention rows, where a mask passed through FP16 would give NaN), within FP16's bound and
    really converted; their IO typed as the whole traced graph's to_fp16 types it (caches and
    hidden states FP16, pixel_values and logits FP32)."""
    model, info, graphs, _, folder = streamed
    fp16, rows = _within_bound(streamed, "fp16")
    assert max(r["max_rel"] for r in rows.values()) > 1e-4  # really FP16
    for name, spec in graphs.items():
        whole = export_graph(graph_modules(model)[name], trace_args(info)[name], spec, tmp_path, 18,
                             EXTERNAL_DATA_THRESHOLD)
        _, whole_spec, _ = to_fp16(onnx.load(str(tmp_path / whole.file)), spec)
        assert [(t.name, t.dtype) for t in (*fp16[name].inputs, *fp16[name].outputs)] == \
            [(t.name, t.dtype) for t in (*whole_spec.inputs, *whole_spec.outputs)], name
        proto = onnx.load(str(folder / fp16[name].file), load_external_data=False)
        weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), name


def test_int4wo_fitted_on_the_calibration_prefill_beats_plain_rounding(tmp_path):
    """Streamed int4wo with its calibration prefill (AWQ / GPTQ per MatMul) against the same export
    rounded to nearest (calibration=None): judged by the whole PyTorch modules on the validation
    cases (other prompts), the fitted graphs' errors are smaller where the image path and the
    decode step read them."""
    model = variant_model("tiny")
    info = model_info(model.config)
    specs = graph_specs(model.config, info)
    graphs = {name: s.graph_spec() for name, s in specs.items()}
    cases = reference_cases(graphs, graph_modules(model), info)
    errors = {}
    for name, calibration in (("fitted", stream_writer.CALIBRATION_CASE), ("plain", None)):
        folder = tmp_path / name
        result = stream_graphs(StateDictSource(model), info, specs, folder, ["int4wo"], validate=True,
                               progress=False, calibration=calibration)
        methods = [r["int4"] for r in result.table]
        assert all(sum(m.values()) == 0 for m in methods) if calibration is None else \
            sum(m["awq"] + m["gptq"] for m in methods) >= 7 * info.num_layers
        rows = _run_cases(folder, result.graphs["int4wo"], cases, TOLERANCES["int4wo"])
        errors[name] = {k: r["mean_rel"] for k, r in rows.items()}
    for key in (("vision", "photos", "image_hidden_states"), ("perceiver", "photos", "cross_key.0"),
                ("decoder", "decode", "logits")):
        assert errors["fitted"][key] < 0.9 * errors["plain"][key], (key, errors["fitted"][key], errors["plain"][key])


def test_int8_within_bounds_against_the_whole_modules(streamed):
    """The streamed Q/DQ graphs (SmoothQuant and quantize_static per piece, calibrated on the
    calibration prefill) against the whole PyTorch modules on the validation cases, within INT8's
    bound, and really quantized."""
    folder = streamed[4]
    int8, rows = _within_bound(streamed, "int8")
    assert max(r["mean_rel"] for r in rows.values()) > 1e-3  # really INT8
    for name, spec in int8.items():
        ops = {n.op_type for n in onnx.load(str(folder / spec.file), load_external_data=False).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name


def test_external_data_one_file_per_graph(streamed):
    _, _, _, result, folder = streamed
    files = {g.file for by_graph in result.graphs.values() for g in by_graph.values()}
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("tmp")) == sorted(
        [*files, *(f"{f}.data" for f in files)])
    for by_graph in result.graphs.values():
        for spec in by_graph.values():
            assert spec.external_data == f"{spec.file}.data"
            proto = onnx.load(str(folder / spec.file), load_external_data=False)
            ranges = []
            for tensor in proto.graph.initializer:
                assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data, tensor.name
                entry = {e.key: e.value for e in tensor.external_data}
                assert entry["location"] == spec.external_data
                ranges.append((int(entry["offset"]), int(entry["length"])))
            ranges.sort()
            assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(ranges)), spec.file
            assert ranges[-1][0] + ranges[-1][1] <= (folder / spec.external_data).stat().st_size
            onnx.checker.check_model(str(folder / spec.file))


def test_the_writer_holds_no_weight_bytes(tmp_path):
    model = variant_model("tiny")
    info = model_info(model.config)
    spec = graph_specs(model.config, info)["decoder"].graph_spec()
    piece = graph_pieces(StateDictSource(model), info)["decoder"][2]  # layer 0 self
    module = piece.build()
    args = dict(zip([s.name for s in spec.inputs], trace_args(info)["decoder"]))
    args.update({"hidden.1": torch.randn(2, 5, info.hidden_size), "rope_cos": torch.randn(2, 1, 5, info.head_dim),
                 "rope_sin": torch.randn(2, 1, 5, info.head_dim), "self_mask": torch.zeros(2, 1, 5, 8)})
    (tmp_path / "scratch").mkdir()
    proto = trace_piece(module, tuple(args[n] for n in piece.inputs), piece, spec, 18, tmp_path / "scratch")
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    writer = GraphWriter(tmp_path, spec)
    try:
        writer.append(proto, piece.key, set(piece.inputs) | set(piece.outputs))
        assert weight_bytes > 0 and len(writer.model.graph.initializer) > 0
        assert not any(t.raw_data or t.float_data for t in writer.model.graph.initializer)
        assert not any(t.raw_data for t in proto.graph.initializer)  # the piece's copy was emptied too
        assert writer.model.ByteSize() < weight_bytes / 4
    finally:
        writer.close()
    assert (tmp_path / "decoder.onnx.data").stat().st_size >= weight_bytes


def test_a_corrupted_layer_fails_validation_naming_it(tmp_path, monkeypatch):
    """One weight of decoder layer 1 changed on the ONNX side only: that piece's rows fail, no other's."""
    real = stream_writer.trace_piece

    def corrupted(module, args, piece, spec, opset, scratch):
        proto = real(module, args, piece, spec, opset, scratch)
        if piece.label == "layer 1 self":
            weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
            values = numpy_helper.to_array(weight).copy()
            values.flat[0] += 10 * np.abs(values).max()
            weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        return proto

    monkeypatch.setattr(stream_writer, "trace_piece", corrupted)
    with pytest.raises(ValidationError, match="decoder layer 1 self") as raised:
        _stream(variant_model("tiny"), tmp_path, ("fp32", "int8wo"), validate=True)
    table = raised.value.report["pieces"]
    assert {(r["piece"], r["precision"]) for r in table if not r["ok"]} == {
        ("layer 1 self", "fp32"), ("layer 1 self", "int8wo")}
    assert len(table) == 2 * (3 + 1 + 8)  # every piece was still written and measured
    assert (tmp_path / "decoder.onnx").exists()
