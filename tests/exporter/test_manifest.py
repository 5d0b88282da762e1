"""manifest.json against the files it describes: ONNX graph IO read with the `onnx` package, sha256
computed with hashlib, the model config of the preset, installed package versions, and ONNX Runtime's
own shape checks. One export of `random:tiny` (about 3 s) serves the whole module."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import version

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.export import ExportConfig, export
from runtime.errors import ManifestError
from runtime.manifest import MANIFEST_NAME, Manifest
from runtime.reference.presets import PRESETS

GRAPHS = ("vision", "perceiver", "decoder")
TINY = PRESETS["tiny"]  # plain data: the shape the preset promises, independent of the exporter


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDEFICS_TOOLKIT_CACHE", str(root / "cache"))
        out = root / "export"
        manifest = export(ExportConfig(output=out, model="random:tiny", progress=False))
    return out, manifest


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onnx_io(value_infos) -> list[tuple[str, str, tuple]]:
    rows = []
    for vi in value_infos:
        t = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        rows.append((vi.name, dtype, dims))
    return rows


def _spec_io(specs) -> list[tuple[str, str, tuple]]:
    return [(s.name, s.dtype, tuple(s.shape)) for s in specs]


def _load_proto(folder, name):
    return onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)


# ------------------------------------------------------------------ graph IO
@pytest.mark.parametrize("name", GRAPHS)
def test_graph_io_matches_manifest(exported, name):
    out, manifest = exported
    graph = manifest.graphs[name]
    assert graph.file == f"{name}.onnx"
    proto = _load_proto(out, name)
    assert _onnx_io(proto.graph.input) == _spec_io(graph.inputs), f"{name}.onnx inputs"
    assert _onnx_io(proto.graph.output) == _spec_io(graph.outputs), f"{name}.onnx outputs"


def test_graph_io_sizes_follow_the_model_config(exported):
    # Fixed sizes checked against the preset's numbers, not against the exporter's own derivation.
    out, _ = exported
    vc, heads = TINY["vision_config"], TINY["num_attention_heads"]
    head_dim = TINY["hidden_size"] // heads
    vision_seq = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    vision = dict((n, d) for n, _, d in _onnx_io(_load_proto(out, "vision").graph.output))
    assert vision["image_hidden_states"][1:] == (vision_seq, vc["embed_dim"])
    decoder = _load_proto(out, "decoder")
    outputs = dict((n, d) for n, _, d in _onnx_io(decoder.graph.output))
    assert outputs["logits"][2] == TINY["vocab_size"] + TINY["additional_vocab_size"]
    n_layers = TINY["num_hidden_layers"]
    assert {n for n in outputs if n.startswith("present_")} == {
        f"present_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")
    }
    n_cross = n_layers // TINY["cross_layer_interval"]
    inputs = dict((n, d) for n, _, d in _onnx_io(decoder.graph.input))
    assert {n for n in inputs if n.startswith("cross_")} == {
        f"cross_{kv}.{j}" for j in range(n_cross) for kv in ("key", "value")
    }
    assert inputs["past_key.0"] == ("batch", heads, "past_seq", head_dim)


def test_vision_size_is_fixed_and_enforced_by_onnxruntime(exported):
    out, manifest = exported
    size = TINY["vision_config"]["image_size"]
    assert manifest.source["config"]["vision_config"]["image_size"] == size
    (pixels,) = _load_proto(out, "vision").graph.input
    dims = pixels.type.tensor_type.shape.dim
    assert dims[2].HasField("dim_value") and dims[3].HasField("dim_value")
    assert (dims[1].dim_value, dims[2].dim_value, dims[3].dim_value) == (3, size, size)

    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"pixel_values": np.zeros((2, 3, size, size), np.float32)})
    assert result.shape[0] == 2  # the right size runs: the refusal below is about the size only
    with pytest.raises(Exception, match="(?i)dimension"):
        session.run(None, {"pixel_values": np.zeros((2, 3, size + 2, size + 2), np.float32)})


def test_opset_recorded_and_used(exported):
    out, manifest = exported
    assert manifest.opset == 18
    for name in GRAPHS:
        opsets = {o.domain: o.version for o in _load_proto(out, name).opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) == 18, name


# ------------------------------------------------------------------ manifest file
def test_load_round_trips(exported, tmp_path):
    out, manifest = exported
    loaded = Manifest.load(out)
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert json.loads(json.dumps(loaded.to_dict())) == on_disk
    loaded.write(tmp_path)
    assert Manifest.load(tmp_path).to_dict() == loaded.to_dict()
    # What export() returns is what a reader of the folder gets (no int keys that JSON turns into str).
    assert loaded.to_dict() == manifest.to_dict()


def test_every_file_has_its_sha256(exported):
    out, manifest = exported
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest.files) == on_disk == {f"{g}.onnx" for g in GRAPHS}
    for name, digest in manifest.files.items():
        assert _sha256(out / name) == digest, name
    manifest.verify_files(out)  # the untouched export verifies (control for the corruption tests)


def test_records_limits_versions_and_source(exported):
    _, manifest = exported
    assert (manifest.limits.max_batch, manifest.limits.max_images) == (8, 4)
    assert manifest.limits.max_seq_len == min(TINY["max_position_embeddings"], 2048)
    assert manifest.precision == "fp32"
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        assert manifest.versions[package] == version(package), package
    assert (manifest.source["kind"], manifest.source["ref"], manifest.source["seed"]) == ("preset", "tiny", 0)
    config = manifest.source["config"]
    assert config["model_type"] == "idefics"
    for key, value in TINY.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                assert config[key][sub] == subvalue, f"{key}.{sub}"
        else:
            assert config[key] == value, key


def test_validation_report_covers_every_output(exported):
    out, manifest = exported
    assert manifest.validation["precision"] == "fp32"
    report = manifest.validation["report"]
    assert set(report) == set(GRAPHS)
    assert set(report["decoder"]) == {"prefill", "decode", "decode-static"}
    for name in GRAPHS:
        outputs = [vi.name for vi in _load_proto(out, name).graph.output]
        assert report[name], name
        for case, rows in report[name].items():
            assert list(rows) == outputs, f"{name}/{case}"
            for output, row in rows.items():
                diff = row["max_abs_diff"]
                assert isinstance(diff, float) and 0.0 <= diff <= row["limit"], f"{name}/{case}/{output}"
                assert row["ok"] is True


# ------------------------------------------------------------------ corruption and bad manifests
@pytest.fixture
def copy_of_export(exported, tmp_path):
    out, _ = exported
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


@pytest.mark.parametrize("name", [f"{g}.onnx" for g in GRAPHS])
def test_verify_files_detects_one_changed_byte(copy_of_export, name):
    manifest = Manifest.load(copy_of_export)
    manifest.verify_files(copy_of_export)
    path = copy_of_export / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert _sha256(path) != manifest.files[name]
    with pytest.raises(ManifestError, match=name.replace(".", r"\.")) as info:
        manifest.verify_files(copy_of_export)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", [f"{g}.onnx" for g in GRAPHS])
def test_verify_files_detects_missing_file(copy_of_export, name):
    manifest = Manifest.load(copy_of_export)
    (copy_of_export / name).unlink()
    with pytest.raises(ManifestError, match="missing") as info:
        manifest.verify_files(copy_of_export)
    assert str(copy_of_export / name) in str(info.value)


def test_load_without_manifest(tmp_path):
    (tmp_path / "vision.onnx").write_bytes(b"x")
    with pytest.raises(ManifestError) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


def test_load_invalid_json(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"format_version": 1, "graphs": ')
    with pytest.raises(ManifestError) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


def test_load_other_format_version(exported, tmp_path):
    out, _ = exported
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["format_version"] = 999
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="999") as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)
