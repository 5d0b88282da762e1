"""An ONNX Runtime-only graph that ONNX Runtime refuses never fails the export (exporter.ort.refusal).

A model whose attention head size is 8 (hidden 64, 8 heads): ONNX Runtime 1.32's CPU
GroupQueryAttention takes multiples of 16 only, where the exporter's old rule said 8, so
`idefics-export --int8 --int8-weight-only --ort-optimized` exited 1 on it. Now each --ort-optimized
graph is run in ONNX Runtime as it is written; one that ONNX Runtime refuses to load or run is left
out with a warning that names the graph, the op and ONNX Runtime's reason, the manifest does not
list it, and the portable graphs serve. What ONNX Runtime refuses is measured here with a one-node
graph of its own, not assumed: with a version that takes head size 8, the ORT decoders are written
and must then be listed and validated."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter.graphs.comparison import ort_session
from exporter.ort.refusal import Refused, explain
from runtime.manifest import Manifest
from tests.runtime.test_generate import make_batch
from tests.util import hf_generate

HEAD_8 = dict(num_attention_heads=8)  # "tiny" with 8 heads: 64 / 8, head size 8
# the graphs built on the decoder's GroupQueryAttention (int8: from decoder.ort.onnx)
GQA_FILES = ("decoder.ort.onnx", "decoder.ort.int8wo.onnx", "decoder.ort.int8wo.prompt.onnx", "decoder.ort.int8.onnx")


def gqa_refusal(head_size: int, heads: int = 2) -> str | None:
    """ONNX Runtime's message where its CPU GroupQueryAttention (as the ORT decoder writes it: packed
    QKV, rotary inside, a shared FP32 buffer) refuses `head_size`, or None where it runs it."""
    import onnxruntime as ort

    slots, seq = 4, 2
    half = head_size // 2
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos", "sin"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=heads, scale=1.0, do_rotary=1,
                            rotary_interleaved=0)
    cache = [1, heads, slots, head_size]
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, seq, 3 * heads * head_size]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_key", "present_value")],
        [helper.make_tensor("cos", TensorProto.FLOAT, [slots, half], np.ones(slots * half).tolist()),
         helper.make_tensor("sin", TensorProto.FLOAT, [slots, half], np.zeros(slots * half).tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"qkv": np.zeros((1, seq, 3 * heads * head_size), np.float32),
                           "past_key": np.zeros(cache, np.float32), "past_value": np.zeros(cache, np.float32),
                           "seqlens_k": np.array([seq - 1], np.int32), "total": np.array(seq, np.int32)})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's pybind errors subclass Exception only
        return explain(exc)[1]
    return None


def _graph_files(manifest: Manifest) -> set[str]:
    return {spec.file for spec in manifest.all_graphs()}


def _validated(variant, graph: str) -> list[dict]:
    """Every accuracy row the export recorded for one graph of a variant (its validation)."""
    return [row for case in variant.accuracy.get(graph, {}).values() for row in case.values()]


@pytest.fixture(scope="module")
def head8(tmp_path_factory):
    """(transformers model, export folder, exit status, stderr) of `idefics-export --int8
    --int8-weight-only --ort-optimized` on the head-size-8 model, and ONNX Runtime's own reason."""
    import contextlib
    import io

    from exporter.cli import main
    from runtime.reference.sources import variant_model

    root = tmp_path_factory.mktemp("head8")
    model = variant_model(HEAD_8)
    assert model.config.hidden_size // model.config.num_attention_heads == 8
    model.save_pretrained(root / "ckpt")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(root / "out"), "--model", str(root / "ckpt"), "--int8", "--int8-weight-only",
                   "--ort-optimized", "--quiet", "--calibration-size", "4"])
    return model, root / "out", rc, err.getvalue(), gqa_refusal(8)


def test_export_exits_0_and_names_what_onnx_runtime_refused(head8):
    model, out, rc, err, reason = head8
    assert rc == 0, err
    manifest = Manifest.load(out)
    listed = _graph_files(manifest)
    if reason is None:  # this ONNX Runtime runs head size 8: the ORT decoders are written and listed
        assert {"decoder.ort.onnx", "decoder.ort.int8wo.onnx"} <= listed, listed
        return
    # each refused decoder: a warning naming the graph, the op, ONNX Runtime's reason and the head size
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    for file in ("decoder.ort.onnx", "decoder.ort.int8wo.onnx"):
        named = [w for w in warnings if f"{file}: ONNX Runtime" in w and "refuses to run its GroupQueryAttention node"
                 in w]
        assert named, f"no warning names {file}:\n{err}"
        assert reason in named[0] and "head size 8" in named[0] and "not written" in named[0], named[0]
    assert "decoder.ort.int8.onnx" in err  # built from decoder.ort.onnx: said not to be written either
    assert "Traceback" not in err, err
    # the manifest lists none of them, and none is on disk
    for file in GQA_FILES:
        assert file not in listed and file not in manifest.files and not (out / file).exists(), file
    assert all("decoder" not in variant.graphs and "prompt" not in variant.graphs
               for variant in manifest.ort_optimized.values())
    # the fused encoders do not depend on the decoder's attention: they are still written
    assert "vision" in manifest.ort_graphs("fp32") and "vision" in manifest.ort_graphs("int8wo")


def test_every_listed_graph_is_on_disk_validated_and_loads(head8):
    from tests.left_out import check_ort_listing

    _, out, rc, err, _ = head8
    assert rc == 0, err
    manifest = Manifest.load(out)
    manifest.verify_files(out)  # every file listed is there, as hashed
    # every ORT graph asked for is listed (and validated) or left out by a warning naming it
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    asked = [("fp32", "decoder"), ("fp32", "vision"), ("int8wo", "decoder"), ("int8wo", "prompt"),
             ("int8wo", "vision"), ("int8wo", "perceiver"), ("int8", "decoder")]
    check_ort_listing(manifest, out, warnings, asked)
    assert _graph_files(manifest) <= set(manifest.files)
    on_disk = {p.name for p in out.glob("*.onnx")}
    assert on_disk == _graph_files(manifest), "a graph on disk that the manifest does not list, or the reverse"
    for variant in manifest.ort_optimized.values():
        for name, spec in variant.graphs.items():
            rows = _validated(variant, name)
            assert rows and all(row["ok"] for row in rows), (variant.precision, name)
    for spec in manifest.all_graphs():
        ort_session(out / spec.file, threads=1)  # loads


def test_sessions_on_the_export_generate(head8, opened):
    """The Session serves every precision from what was written: the fused encoders with the
    portable decoders. FP32 gives transformers' greedy tokens; int8wo and int8 the portable-only
    Session's decoder, and tokens of the same length."""
    model, out, rc, err, reason = head8
    assert rc == 0, err
    batch = make_batch(model.config, [1, 3, 0])
    inputs = {k: v.numpy() for k, v in batch.items()}
    fp32 = opened(out, precision="fp32")
    assert fp32.flavour == "ort" and fp32.graphs.vision.spec.file == "vision.ort.onnx"
    if reason is not None:
        assert fp32.graphs.decoder.spec.file == "decoder.onnx" and not fp32.graphs.shared_cache
    np.testing.assert_array_equal(fp32.generate(**inputs, max_new_tokens=12).sequences,
                                  hf_generate(model, batch, max_new_tokens=12))
    for precision in ("int8wo", "int8"):
        session = opened(out, precision=precision)
        portable = opened(out, precision=precision, portable=True)
        if reason is not None:
            assert session.graphs.decoder.spec.file == portable.graphs.decoder.spec.file == f"decoder.{precision}.onnx"
        got = session.generate(**inputs, max_new_tokens=8).sequences
        want = portable.generate(**inputs, max_new_tokens=8).sequences
        assert got.shape == want.shape == (3, batch["input_ids"].shape[1] + 8)
        np.testing.assert_array_equal(got[:, :batch["input_ids"].shape[1]], batch["input_ids"].numpy())


def test_no_validate_runs_the_graph_too(tmp_path, caplog, opened):
    """--no-validate loaded the ORT decoder only, so an export wrote a decoder ONNX Runtime could not
    run and the Session failed at its first prompt. Every graph is run once as it is written."""
    from exporter.export import ExportConfig, export
    from runtime.reference.sources import variant_model

    if gqa_refusal(8) is None:
        pytest.skip(f"ONNX Runtime {__import__('onnxruntime').__version__} runs GroupQueryAttention at head size 8")
    variant_model(HEAD_8).save_pretrained(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="exporter.export"):
        manifest = export(ExportConfig(output=tmp_path / "out", model=str(tmp_path / "ckpt"), progress=False,
                                       validate=False, ort_optimized=True))
    assert "decoder.ort.onnx" in caplog.text and "GroupQueryAttention" in caplog.text
    assert "decoder" not in manifest.ort_graphs("fp32") and not (tmp_path / "out" / "decoder.ort.onnx").exists()
    session = opened(tmp_path / "out")
    assert session.graphs.decoder.spec.file == "decoder.onnx"
    batch = make_batch(variant_model(HEAD_8).config, [1])
    assert session.generate(**{k: v.numpy() for k, v in batch.items()}, max_new_tokens=3).sequences.shape[0] == 1


def test_write_ort_decoder_removes_a_graph_onnx_runtime_refuses(tmp_path):
    """write_ort_decoder itself: the graph is written, ONNX Runtime refuses to run it, the file is
    removed and Refused (an ExportError) names the op, ONNX Runtime's reason and the head size; with
    or without validation."""
    from exporter.ort.decoder import write_ort_decoder
    from exporter.graphs.specs import model_info
    from runtime.errors import ExportError
    from runtime.reference.modules import DecoderGraph
    from runtime.reference.sources import variant_model

    reason = gqa_refusal(8)
    if reason is None:
        pytest.skip(f"ONNX Runtime {__import__('onnxruntime').__version__} runs GroupQueryAttention at head size 8")
    hf = variant_model(HEAD_8)
    module, info = DecoderGraph(hf).eval(), model_info(hf.config)

    def write(proto, spec):
        onnx.save_model(proto, str(tmp_path / spec.file))
        return spec

    for validate in (True, False):
        with pytest.raises(Refused) as caught:
            write_ort_decoder(module, info, 32, tmp_path, write, validate=validate)
        assert isinstance(caught.value, ExportError)
        assert (caught.value.file, caught.value.op, caught.value.stage) == ("decoder.ort.onnx", "GroupQueryAttention",
                                                                             "run")
        assert caught.value.reason.startswith(reason) and "head size 8" in str(caught.value)
        assert not (tmp_path / "decoder.ort.onnx").exists()


def test_a_fused_encoder_onnx_runtime_refuses_is_left_out_in_fp32_too(tmp_path, caplog, monkeypatch, opened):
    """The fused vision with an Attention whose head count does not divide its width: ONNX Runtime
    refuses it. A refusal is not an accuracy miss (which fails an FP32 graph): it is left out with a
    warning naming the file and ONNX Runtime's reason, in FP32 too, and the portable vision serves."""
    import exporter.ort.encoders as ort_encoders
    from exporter.export import ExportConfig, export

    real = ort_encoders.fuse

    def wrong_heads(path, num_heads, hidden_size, model_type=ort_encoders.MODEL_TYPE):
        model, fused = real(path, num_heads, hidden_size, model_type)
        for node in model.graph.node:
            if node.op_type == "Attention":
                for attribute in node.attribute:
                    if attribute.name == "num_heads":
                        attribute.i = 5  # 48 is not a multiple of 5
        return model, fused

    monkeypatch.setattr(ort_encoders, "fuse", wrong_heads)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="exporter.ort.encoders"):
        manifest = export(ExportConfig(output=out, model="random:tiny", progress=False, max_seq_len=48,
                                       ort_optimized=True))
    assert "vision.ort.onnx: ONNX Runtime" in caplog.text and "divisible by num_heads" in caplog.text, caplog.text
    assert "not written, Sessions run vision.onnx" in caplog.text
    assert "vision" not in manifest.ort_graphs("fp32") and not (out / "vision.ort.onnx").exists()
    assert "decoder" in manifest.ort_graphs("fp32")  # the rest of --ort-optimized is unaffected
    session = opened(out)
    assert session.graphs.vision.spec.file == "vision.onnx" and session.graphs.decoder.spec.file == "decoder.ort.onnx"


@pytest.mark.parametrize("message, op, reason", [
    ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running GroupQueryAttention "
     "node. Name:'GroupQueryAttention_77' Status Message: head_size shall be a multiple of 16. Got head_size % 16 == 8",
     "GroupQueryAttention",
     "head_size shall be a multiple of 16. Got head_size % 16 == 8 (node GroupQueryAttention_77)"),
    ("Error in execution: Non-zero status code returned while running MultiHeadAttention node. Name:'' "
     "Status Message: bad", "MultiHeadAttention", "bad"),
    ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Foo(1) node with name 'foo_3'",
     "Foo", "Could not find an implementation for Foo(1) node with name 'foo_3' (node foo_3)"),
    ("[ONNXRuntimeError] : 1 : FAIL : attention_validation.h:52 CheckAttentionWeights hidden_size should be "
     "divisible by num_heads:48", None, "attention_validation.h:52 CheckAttentionWeights hidden_size should be "
     "divisible by num_heads:48"),
])
def test_onnx_runtime_messages_name_op_and_reason(message, op, reason):
    assert explain(RuntimeError(message)) == (op, reason)
