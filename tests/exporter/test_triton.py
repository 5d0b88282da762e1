"""`idefics-triton`: the model repository written from an export.

Every config.pbtxt is parsed with Triton's own schema (tritonclient's model_config_pb2) and compared
with the manifest's tensor specs and with the ONNX file's own inputs/outputs (read with `onnx`);
the graph files are checked by sha256 against the manifest. Refusals go through
exporter.triton.cli.main: exit status 2, one message, no traceback, nothing touched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from exporter.export import ExportConfig, export
from exporter.triton.repository import RepositoryConfig, write_repository
from runtime.serving import ServerConfig
from exporter.triton.cli import main
from runtime.manifest import Manifest

GRAPHS = ("vision", "perceiver", "decoder")
DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int64": mc.TYPE_INT64}
ONNX_DTYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
               onnx.TensorProto.INT64: mc.TYPE_INT64}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "export"
    export(ExportConfig(output=out, progress=False, max_images=2))
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return Manifest.load(export_dir)


@pytest.fixture(scope="module")
def repo(export_dir, tmp_path_factory):
    """--graphs bls: the three graph models beside the idefics model."""
    return write_repository(export_dir, tmp_path_factory.mktemp("triton_repo") / "repo", RepositoryConfig(graphs="bls"))


@pytest.fixture(scope="module")
def inprocess_repo(export_dir, tmp_path_factory):
    return write_repository(export_dir, tmp_path_factory.mktemp("triton_inprocess") / "repo")


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def config_io(tensors) -> list[tuple[str, int, list[int]]]:
    return [(t.name, t.data_type, list(t.dims)) for t in tensors]


def spec_io(specs, batched: bool) -> list[tuple[str, int, list[int]]]:
    out = []
    for t in specs:
        shape = t.shape[1:] if batched else t.shape
        out.append((t.name, DTYPES[t.dtype], [d if isinstance(d, int) else -1 for d in shape]))
    return out


def onnx_io(values, batched: bool) -> list[tuple[str, int, list[int]]]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        out.append((v.name, ONNX_DTYPES[tt.elem_type], dims[1:] if batched else dims))
    return out


# ---------------------------------------------------------------- the repository
def test_layout(repo, manifest):
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["decoder", "idefics", "perceiver", "vision"]
    for name in (*GRAPHS, "idefics"):
        assert (repo / name / "config.pbtxt").is_file()
    version = repo / "idefics" / "1"
    assert (version / "model.py").is_file()
    assert (version / "runtime" / "serving.py").is_file()
    assert (version / "runtime" / "__init__.py").is_file()
    assert not list(version.rglob("__pycache__"))
    assert (version / "export" / "manifest.json").is_file()
    assert manifest.processor_files
    for name in manifest.processor_files:
        assert (version / "export" / name).is_file()
    # no leftover partial folders beside the repository
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".repo.partial-")]


def test_export_files_are_copies(repo, export_dir, manifest):
    for name in ["manifest.json", *manifest.processor_files]:
        assert (repo / "idefics" / "1" / "export" / name).read_bytes() == (export_dir / name).read_bytes()
    Manifest.load(repo / "idefics" / "1" / "export").verify_files(repo / "idefics" / "1" / "export",
                                                                   manifest.processor_files)


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_config(repo, manifest, name):
    spec = manifest.graphs_for(manifest.precision)[name]
    cfg = parse(repo / name / "config.pbtxt")
    assert cfg.name == name
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.default_model_filename == "model.onnx"
    batched = name in ("vision", "perceiver")
    if batched:
        assert cfg.max_batch_size > 0
        assert cfg.HasField("dynamic_batching")
    else:
        assert cfg.max_batch_size == 0
        assert not cfg.HasField("dynamic_batching")
    if name == "vision":
        assert cfg.max_batch_size == manifest.limits.max_batch * manifest.limits.max_images
    if name == "perceiver":
        assert cfg.max_batch_size == manifest.limits.max_batch
    assert config_io(cfg.input) == spec_io(spec.inputs, batched)
    assert config_io(cfg.output) == spec_io(spec.outputs, batched)
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]

    path = repo / name / "1" / "model.onnx"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.files[spec.file]
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    assert config_io(cfg.input) == onnx_io(inputs, batched)
    assert config_io(cfg.output) == onnx_io(graph.output, batched)
    # the ONNX file names the same dynamic axes as the manifest
    for values, specs in ((inputs, spec.inputs), (graph.output, spec.outputs)):
        for v, t in zip(values, specs):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            assert tuple(dims) == tuple(t.shape), v.name


def test_idefics_config(repo, manifest):
    cfg = parse(repo / "idefics" / "config.pbtxt")
    assert cfg.name == "idefics"
    assert cfg.backend == "python"
    assert cfg.platform == ""
    assert cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled is True
    names = ["prompt", "images", "images_base64", "input_ids", "attention_mask", "pixel_values",
             "image_attention_mask", "settings"]
    assert [t.name for t in cfg.input] == names
    types = {t.name: t.data_type for t in cfg.input}
    assert all(types[n] == mc.TYPE_STRING for n in ("prompt", "images", "images_base64", "settings"))
    assert types["pixel_values"] == mc.TYPE_FP32 and types["input_ids"] == mc.TYPE_INT64
    # either a prompt or arrays: every input is optional, the model checks which were sent
    assert all(t.optional for t in cfg.input)
    assert [(t.name, t.data_type) for t in cfg.output] == [("text", mc.TYPE_STRING), ("tokens", mc.TYPE_INT64),
                                                           ("prompt_tokens", mc.TYPE_INT64),
                                                           ("finish_reason", mc.TYPE_STRING)]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"graphs": "bls", "backend": "onnxruntime", "device": "cpu", "precision": manifest.precision,
                      "max_queued": "64", "image_cache_bytes": str(256 * 2**20),
                      "max_image_bytes": str(20 * 2**20), "max_image_pixels": str(4096 * 4096),
                      "max_new_tokens": "256"}
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    # the parameters are exactly what the idefics model reads (runtime.serving.ServerConfig)
    assert ServerConfig.from_parameters(params).graphs == "bls"


def test_inprocess_repository_holds_the_graphs_in_the_idefics_model(inprocess_repo, export_dir, manifest):
    repo = inprocess_repo
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["idefics"]
    bundled = repo / "idefics" / "1" / "export"
    for spec in manifest.graphs_for(manifest.precision).values():
        assert (bundled / spec.file).read_bytes() == (export_dir / spec.file).read_bytes()
    Manifest.load(bundled).verify_files(bundled, [g.file for g in manifest.graphs_for(manifest.precision).values()])
    assert not (repo / "idefics" / "1" / "runtime" / "reference").exists()  # torch-only, not served
    cfg = parse(repo / "idefics" / "config.pbtxt")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["graphs"] == "inprocess" and params["device"] == "cuda"  # the default kind is KIND_GPU
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    readme = (repo / "README.txt").read_text()
    assert "idefics-serve" in readme and "NumPy 1.x" in readme and "tokenizers" in readme


def test_bls_python_graph_models(export_dir, manifest, tmp_path):
    repo = write_repository(export_dir, tmp_path / "repo", RepositoryConfig(graphs="bls-python", kind="KIND_CPU"))
    for name in GRAPHS:
        cfg = parse(repo / name / "config.pbtxt")
        assert cfg.backend == "python" and cfg.max_batch_size == 0 and not cfg.platform
        spec = manifest.graphs_for(manifest.precision)[name]
        assert config_io(cfg.input) == spec_io(spec.inputs, False)
        assert (repo / name / "1" / "model.py").is_file() and (repo / name / "1" / "model.onnx").is_file()


def test_export_without_processor_files_is_said(tmp_path, caplog):
    out = tmp_path / "bare"
    export(ExportConfig(output=out, model="random:tiny", progress=False, validate=False))
    with caplog.at_level("WARNING"):
        repo = write_repository(out, tmp_path / "repo", RepositoryConfig(kind="KIND_CPU"))
    assert "no processor files" in caplog.text
    assert "send input_ids" in (repo / "README.txt").read_text()


def test_bundled_runtime_imports(repo, tmp_path):
    """model.py imports the runtime copy beside it (what Triton's Python backend does)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('model', {str(repo / 'idefics' / '1' / 'model.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(sys.modules[m.TritonPythonModel.__module__].__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == repo / "idefics" / "1" / "runtime" / "serving.py"


def test_cli_options(export_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    rc = main([str(export_dir), str(repo), "--instances", "3", "--kind", "KIND_CPU", "--max-batch", "2",
               "--max-new-tokens", "32", "--max-image-bytes", "1000", "--max-image-pixels", "64", "--graphs", "bls",
               "--max-queued", "5", "--image-cache-bytes", "0", "--prefill-chunk", "16"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    for name in GRAPHS:
        cfg = parse(repo / name / "config.pbtxt")
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, mc.ModelInstanceGroup.KIND_CPU)]
    assert parse(repo / "vision" / "config.pbtxt").max_batch_size == 2 * 2
    assert parse(repo / "perceiver" / "config.pbtxt").max_batch_size == 2
    cfg = parse(repo / "idefics" / "config.pbtxt")
    assert [g.count for g in cfg.instance_group] == [3]
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "graphs": "bls", "backend": "onnxruntime", "device": "cpu", "precision": "fp32", "max_batch": "2",
        "max_queued": "5", "image_cache_bytes": "0", "max_image_bytes": "1000", "max_image_pixels": "64",
        "max_new_tokens": "32", "prefill_chunk": "16"}
    assert ServerConfig.from_parameters({"prefill_chunk": "16"}).prefill_chunk == 16


# ---------------------------------------------------------------- refusals
def refused(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("idefics-triton: error: ")
    assert "Traceback" not in err
    return err


def test_tensorrt_needs_engines(export_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    err = refused(capsys, [str(export_dir), str(repo), "--backend", "tensorrt"])
    assert "idefics-build-engines" in err
    assert not repo.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder left


def test_max_batch_above_export(export_dir, manifest, tmp_path, capsys):
    repo = tmp_path / "repo"
    err = refused(capsys, [str(export_dir), str(repo), "--max-batch", str(manifest.limits.max_batch + 1)])
    assert "--max-batch" in err
    assert not repo.exists()


def test_bad_options(export_dir, tmp_path, capsys):
    refused(capsys, [str(export_dir), str(tmp_path / "r"), "--instances", "0"])
    refused(capsys, [str(export_dir), str(tmp_path / "r"), "--max-batch", "0"])
    refused(capsys, [str(export_dir), str(tmp_path / "r"), "--max-queued", "0"])
    assert "bls-python" in refused(capsys, [str(export_dir), str(tmp_path / "r"), "--graphs", "bls-python",
                                            "--backend", "tensorrt"])
    assert not (tmp_path / "r").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_foreign_folder_untouched(export_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(folder)
    err = refused(capsys, [str(export_dir), str(folder)])
    assert "--force" in err
    assert snapshot(folder) == before
    err = refused(capsys, [str(export_dir), str(folder), "--force"])
    assert "not a model repository" in err
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_existing_repository_needs_force(export_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main([str(export_dir), str(repo)]) == 0
    (repo / "marker").write_text("old")
    before = snapshot(repo)
    err = refused(capsys, [str(export_dir), str(repo)])
    assert "--force" in err
    assert snapshot(repo) == before
    assert main([str(export_dir), str(repo), "--force", "--instances", "2", "--graphs", "bls"]) == 0
    assert not (repo / "marker").exists()
    assert [g.count for g in parse(repo / "decoder" / "config.pbtxt").instance_group] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_empty_folder_is_fine(export_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert write_repository(export_dir, repo, RepositoryConfig()) == repo
    assert (repo / "idefics" / "config.pbtxt").is_file()


def test_tensorrt_repository_takes_each_graphs_engine_of_the_precision(tmp_path):
    """Engines of two precisions side by side: each model.plan is its own graph's engine of the
    chosen precision (engine files once shared one name across precisions)."""
    from runtime.engines import engine_paths

    export_dir = tmp_path / "export"
    export(ExportConfig(output=export_dir, progress=False, precisions=("fp16",)))
    for precision in ("fp16", "fp32"):  # the wanted precision first: a shared file name would hold fp32's
        for graph in GRAPHS:
            engine, meta = engine_paths(export_dir, graph, precision)
            engine.parent.mkdir(exist_ok=True)
            engine.write_bytes(f"{graph} {precision} plan".encode())
            meta.write_text("{}")
    repo = write_repository(export_dir, tmp_path / "repo", RepositoryConfig(backend="tensorrt", precision="fp16",
                                                                            graphs="bls"))
    for graph in GRAPHS:
        assert (repo / graph / "1" / "model.plan").read_bytes() == f"{graph} fp16 plan".encode()
        assert parse(repo / graph / "config.pbtxt").platform == "tensorrt_plan"
    # in-process: the idefics model's bundled export holds the fp16 engines where the TensorRT runner looks
    repo = write_repository(export_dir, tmp_path / "inprocess", RepositoryConfig(backend="tensorrt", precision="fp16"))
    for graph in GRAPHS:
        engine, _ = engine_paths(repo / "idefics" / "1" / "export", graph, "fp16")
        assert engine.read_bytes() == f"{graph} fp16 plan".encode()


def test_default_precision_follows_the_served_device(tmp_path):
    # what a Session would load there: INT8 weight-only on a CPU instance, FP16 on a GPU one
    export_dir = tmp_path / "export"
    export(ExportConfig(output=export_dir, progress=False, precisions=("fp16", "int8wo")))
    for kind, want in (("KIND_CPU", "int8wo"), ("KIND_GPU", "fp16")):
        repo = write_repository(export_dir, tmp_path / kind, RepositoryConfig(kind=kind))
        params = {k: v.string_value for k, v in parse(repo / "idefics" / "config.pbtxt").parameters.items()}
        assert params["precision"] == want, kind
        spec = Manifest.load(export_dir).graphs_for(want)["decoder"]
        assert (repo / "idefics" / "1" / "export" / spec.file).is_file()


def test_inprocess_repository_bundles_the_ort_optimized_graphs(tmp_path):
    """An --ort-optimized export served in-process on ONNX Runtime: its Session prefers the ORT
    graphs, so the repository bundles them and the bundled export loads in that flavour."""
    from runtime import Session

    out = tmp_path / "export"
    manifest = export(ExportConfig(output=out, progress=False, max_images=2, ort_optimized=True))
    repo = write_repository(out, tmp_path / "repo", RepositoryConfig(kind="KIND_CPU"))
    bundled = repo / "idefics" / "1" / "export"
    ort_files = [g.file for v in manifest.ort_optimized.values() for g in v.graphs.values()]
    assert "decoder.ort.onnx" in ort_files
    for name in ort_files:
        assert (bundled / name).read_bytes() == (out / name).read_bytes()
    session = Session(bundled)  # verifies the sha256 of every file it loads
    assert session.flavour == "ort" and session.graphs.decoder.spec.file == "decoder.ort.onnx"
    session.close()
