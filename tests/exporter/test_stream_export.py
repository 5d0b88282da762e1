"""idefics-export --stream (exporter.export._export_streamed over exporter.stream): the folder a
Session loads, from each kind of source, gives transformers' greedy tokens; only the precisions
asked for are written; what the streamed export cannot write yet is refused by name.
(The graphs themselves, piece by piece and for every config variant: test_stream_graphs.py; the
tensor sources: test_checkpoint.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import IdeficsForVisionText2Text

from exporter.cli import main as export_main
from exporter.graphs.bounds import TOLERANCES
from runtime.compare import compare_sessions
from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.reference import sources as loading
from runtime.reference.sources import variant_model
from runtime.session import check_request
from tests.runtime.test_generate import make_batch
from tests.util import default_hf, hf_generate

NEW = 8
ROWS = [1, 2, 0]  # one image, two images, text only; left-padded


def _inputs(batch):
    return {k: v.numpy() for k, v in batch.items()}


@pytest.fixture(scope="module")
def default_streamed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "out"
    assert export_main(["--stream", "--fp32", "--int8-weight-only", "--quiet", str(out)]) == 0
    return out


def test_the_embedded_default_streamed_gives_transformers_tokens(default_streamed, opened):
    model, _ = default_hf()
    batch = make_batch(model.config, ROWS)
    expected = hf_generate(model, batch, max_new_tokens=NEW)
    session = opened(default_streamed, precision="fp32")
    np.testing.assert_array_equal(session.generate(**_inputs(batch), max_new_tokens=NEW).sequences, expected)


def test_its_int8wo_graphs_agree_with_its_fp32_within_the_bound(default_streamed, opened):
    """The streamed int8wo graphs (written from the same pieces) in a Session: teacher-forced top-1
    against the streamed FP32 graphs at least int8wo's check_top1, and not trivially 100% agreement
    of identical graphs (their files differ)."""
    fp32, int8wo = opened(default_streamed, precision="fp32"), opened(default_streamed)
    assert int8wo.precision == "int8wo"  # the CPU default
    files = {g.spec.file for g in (int8wo.graphs.vision, int8wo.graphs.perceiver, int8wo.graphs.decoder)}
    assert files == {"vision.int8wo.onnx", "perceiver.int8wo.onnx", "decoder.int8wo.onnx"}
    batch = make_batch(default_hf()[0].config, [1, 1])
    request = check_request(fp32.manifest, *(_inputs(batch)[k] for k in
                                             ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")))
    agreement = compare_sessions(fp32, int8wo, request, 16)
    assert agreement.top1_share >= TOLERANCES["int8wo"]["check_top1"], agreement


def test_the_manifest_records_every_piece_and_the_streamed_source(default_streamed):
    manifest = Manifest.load(default_streamed)
    cfg = manifest.source["config"]
    assert manifest.streamed == {"precisions": ["fp32", "int8wo"]}
    assert manifest.source["weights"] == "stream" and manifest.source["checkpoint"]
    table = manifest.validation["pieces"]
    assert all(row["ok"] for row in table)
    decoder = {row["piece"] for row in table if row["graph"] == "decoder" and row["precision"] == "fp32"}
    layers = cfg["num_hidden_layers"]
    cross = layers // cfg["cross_layer_interval"]
    assert {f"layer {i} self" for i in range(layers)} | {f"cross {j}" for j in range(cross)} <= decoder
    vision = {row["piece"] for row in table if row["graph"] == "vision" and row["precision"] == "int8wo"}
    assert {f"layer {i}" for i in range(cfg["vision_config"]["num_hidden_layers"])} <= vision
    manifest.verify_files(default_streamed)  # every file it lists is there, as hashed


def test_a_local_checkpoint_of_a_config_variant(tmp_path, opened):
    """A save_pretrained folder (safetensors shards) of a variant with cross-attention every layer and
    odd sizes elsewhere, read tensor by tensor: the Session's tokens are transformers'."""
    model = variant_model("cross-interval-1", seed=3)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    out = tmp_path / "out"
    assert export_main(["--stream", "--model", str(folder), "--quiet", str(out)]) == 0
    assert Manifest.load(out).streamed == {"precisions": ["fp32"]}
    batch = make_batch(model.config, ROWS)
    expected = hf_generate(model, batch, max_new_tokens=NEW)
    got = opened(out, precision="fp32").generate(**_inputs(batch), max_new_tokens=NEW).sequences
    np.testing.assert_array_equal(got, expected)


def test_random_preset_weights_are_written_once_and_loaded_as_a_checkpoint(tmp_path, monkeypatch, opened):
    """random:tiny streamed: its RandomSource weights are written as bf16 shards with an index in the
    cache (the real loading path), reused by a second export; transformers loading that folder
    gives the Session's tokens."""
    monkeypatch.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert export_main(["--stream", "--model", "random:tiny", "--seed", "5", "--quiet", str(out)]) == 0
    manifest = Manifest.load(out)
    folder = manifest.source["checkpoint"]
    index = json.loads((tmp_path / "cache" / "random-checkpoints" / "tiny-seed5-v1" /
                        "model.safetensors.index.json").read_text())
    assert folder.endswith("tiny-seed5-v1") and index["metadata"]["seed"] == 5
    model = IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.float32).eval()
    gates = torch.stack([layer.alpha_cross_attn.detach().flatten()[0] for layer in model.model.gated_cross_attn_layers])
    assert (gates.abs() > 0.1).all()  # the image path is on
    batch = make_batch(model.config, ROWS)
    expected = hf_generate(model, batch, max_new_tokens=NEW)
    np.testing.assert_array_equal(opened(out).generate(**_inputs(batch), max_new_tokens=NEW).sequences, expected)
    stamp = (tmp_path / "cache" / "random-checkpoints" / "tiny-seed5-v1" / "config.json").stat().st_mtime_ns
    assert export_main(["--stream", "--model", "random:tiny", "--seed", "5", "--quiet", "--force", str(out)]) == 0
    assert (tmp_path / "cache" / "random-checkpoints" / "tiny-seed5-v1" / "config.json").stat().st_mtime_ns == stamp


def test_only_the_precisions_asked_for_are_written(tmp_path, opened):
    out = tmp_path / "out"
    assert export_main(["--stream", "--int4-weight-only", "--quiet", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decoder.int4wo.onnx", "perceiver.int4wo.onnx",
                                                          "vision.int4wo.onnx"]
    with pytest.raises(ManifestError, match="no fp32 graphs.*--fp32"):
        opened(out, precision="fp32")
    session = opened(out)
    assert session.precision == "int4wo"
    model, _ = default_hf()
    assert session.generate(**_inputs(make_batch(model.config, [1])), max_new_tokens=4).sequences.shape[1] > 4


def test_streamed_fp16_in_a_session_agrees_with_fp32(default_streamed, tmp_path, opened):
    """idefics-export --stream --fp16: only the FP16 graphs; a CPU Session asked for them generates
    from photos, and its teacher-forced top-1 against the streamed FP32 graphs of the same default
    model is at least FP16's check_top1; the manifest says what the FP16 graphs kept."""
    out = tmp_path / "out"
    assert export_main(["--stream", "--fp16", "--quiet", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decoder.fp16.onnx", "perceiver.fp16.onnx",
                                                          "vision.fp16.onnx"]
    manifest = Manifest.load(out)
    assert manifest.streamed == {"precisions": ["fp16"]} and manifest.precision == "fp16"
    assert manifest.variants["fp16"].search["streamed"]
    assert {r["precision"] for r in manifest.validation["pieces"]} == {"fp16"}
    assert all(r["ok"] for r in manifest.validation["pieces"])
    fp16, fp32 = opened(out, precision="fp16"), opened(default_streamed, precision="fp32")
    assert fp16.graphs.decoder.spec.file == "decoder.fp16.onnx"
    batch = make_batch(default_hf()[0].config, [1, 2])
    request = check_request(fp32.manifest, *(_inputs(batch)[k] for k in
                                             ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")))
    agreement = compare_sessions(fp32, fp16, request, 16)
    assert agreement.top1_share >= TOLERANCES["fp16"]["check_top1"], agreement
    model, _ = default_hf()
    expected = hf_generate(model, batch, max_new_tokens=NEW)
    got = fp16.generate(**_inputs(batch), max_new_tokens=NEW).sequences
    assert got.shape == expected.shape
    # FP16 may flip a near-tie; most of the greedy tokens are transformers' FP32 ones
    assert (got[:, -NEW:] == expected[:, -NEW:]).mean() >= 0.75, (got, expected)


def test_streamed_int8_in_a_session_agrees_with_fp32(default_streamed, tmp_path, opened):
    """idefics-export --stream --int8: Q/DQ graphs (every weight MatMul but the lm_head behind a
    DequantizeLinear of INT8 weights); a CPU Session asked for them generates from photos, and its
    teacher-forced top-1 against the streamed FP32 graphs of the same default model is at least
    INT8's check_top1."""
    import onnx
    from onnx import TensorProto

    out = tmp_path / "out"
    assert export_main(["--stream", "--int8", "--quiet", str(out)]) == 0
    manifest = Manifest.load(out)
    assert manifest.streamed == {"precisions": ["int8"]} and "int8" in manifest.variants
    assert all(r["ok"] for r in manifest.validation["pieces"])
    decoder = onnx.load(str(out / "decoder.int8.onnx"), load_external_data=False)
    producer = {o: n for n in decoder.graph.node for o in n.output}
    inits = {t.name: t for t in decoder.graph.initializer}
    matmuls = [n for n in decoder.graph.node if n.op_type == "MatMul" and n.input[1] in producer
               and producer[n.input[1]].op_type == "DequantizeLinear"]
    info = manifest.model
    assert len(matmuls) == 7 * info.num_layers + 5 * info.num_cross_layers  # not the lm_head
    assert all(inits[producer[m.input[1]].input[0]].data_type == TensorProto.INT8 for m in matmuls)
    int8, fp32 = opened(out, precision="int8"), opened(default_streamed, precision="fp32")
    batch = make_batch(default_hf()[0].config, [1, 2])
    request = check_request(fp32.manifest, *(_inputs(batch)[k] for k in
                                             ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")))
    agreement = compare_sessions(fp32, int8, request, 16)
    assert agreement.top1_share >= TOLERANCES["int8"]["check_top1"], agreement
    assert int8.generate(**_inputs(batch), max_new_tokens=4).sequences.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.parametrize("flags", [["--ort-optimized"], ["--int8", "--calibration-images", "photos"]])
def test_what_the_streamed_export_cannot_write_is_refused_by_name(tmp_path, capsys, flags):
    out = tmp_path / "out"
    assert export_main(["--stream", *flags, "--quiet", str(out)]) == 2
    assert flags[-1 if len(flags) == 1 else 1] in capsys.readouterr().err
    assert not out.exists()


def test_a_model_too_large_to_export_whole_streams_unasked(monkeypatch, caplog):
    from exporter.export import ExportConfig, _streams

    monkeypatch.setattr(loading, "available_memory", lambda: 2**30)
    assert _streams(ExportConfig(output="x", model="random:medium"))
    assert "layer by layer" in caplog.text
    assert not _streams(ExportConfig(output="x", model="random:medium", stream=False))
    monkeypatch.setattr(loading, "available_memory", lambda: 2**40)
    assert not _streams(ExportConfig(output="x", model="random:medium"))


def test_the_layer_streamed_fp32_reference_is_transformers_forward(default_streamed):
    """exporter.stream.reference (the FP32 reference of scripts/real_size.py at sizes no whole model
    fits): its teacher-forced logits, one piece in memory at a time, against transformers' own
    forward of the whole model on the same sequences (two rows, left padding, images and none)."""
    from exporter.stream.checkpoint import open_checkpoint
    from exporter.stream.reference import teacher_forced_logits

    model, _ = default_hf()
    manifest = Manifest.load(default_streamed)
    batch = make_batch(model.config, [2, 0], length=11)
    ids = batch["input_ids"].numpy()
    new = 5
    extra = np.random.default_rng(0).integers(3, model.config.vocab_size, (2, new))
    sequences = np.concatenate([ids, extra], axis=1)
    request = check_request(manifest, ids, batch["attention_mask"].numpy(), batch["pixel_values"].numpy(),
                            batch["image_attention_mask"].numpy())
    with open_checkpoint(manifest.source["checkpoint"]) as source:
        got = teacher_forced_logits(source, manifest, request, sequences, new)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1)[:, :-1]
    image_mask = batch["image_attention_mask"]
    image_mask = torch.cat([image_mask, image_mask[:, -1:].repeat(1, new, 1)], 1)[:, :-1]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(sequences[:, :-1]), attention_mask=mask,
                     pixel_values=batch["pixel_values"], image_attention_mask=image_mask).logits[:, -new:]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want.numpy().argmax(-1)).all()


def test_idefics_check_takes_a_streamed_export(default_streamed, capsys):
    """idefics-check rebuilds a streamed export's model from the manifest and checks its graphs. (The
    streamed manifest records the checkpoint's vision and perceiver sub-configs with dtype None, the
    model built in memory says float32: that difference was once refused as another model.)"""
    from exporter.check.cli import main as check_main

    rc = check_main([str(default_streamed), "--precision", "int8wo", "--no-localise"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.startswith(("graph ", "generation "))]
    assert {r[2] for r in rows if r[0] == "graph"} == {"vision", "perceiver", "decoder"}
    assert any(r[0] == "generation" and r[1] == "int8wo" for r in rows) and out.rstrip().endswith("PASS")
