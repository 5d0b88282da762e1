"""TensorRT engine support that needs no GPU: profiles derived from the manifest, engine metadata
and the compatibility check, and the errors when TensorRT is missing. The build itself is a
`tensorrt`-marked test that skips where TensorRT is not installed."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from exporter.engines.build import BuildConfig, axis_ranges, build_engines, profiles
from runtime.engines import EngineError, EngineInfo, check_compatible
from exporter.engines.cli import main as build_main, parse_size
from exporter.export import ExportConfig, export
from runtime.manifest import Manifest, sha256_file

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines") / "out"
    export(ExportConfig(output=folder, progress=False, precisions=("fp16", "int8wo"), max_batch=3,
                        max_images=2, max_seq_len=96))
    return folder


def test_profiles_cover_every_input_within_the_limits(out):
    manifest = Manifest.load(out)
    lim, info = manifest.limits, manifest.model
    for precision in ("fp32", "fp16"):
        for name, spec in manifest.graphs_for(precision).items():
            sets = profiles(manifest, spec)
            assert len(sets) == (2 if name == "decoder" else 1)
            for shapes in sets:
                assert set(shapes) == {t.name for t in spec.inputs}
                for tensor in spec.inputs:
                    lo, opt, hi = (np.array(s) for s in shapes[tensor.name])
                    assert (lo <= opt).all() and (opt <= hi).all(), tensor.name
                    for axis, dim in enumerate(tensor.shape):  # fixed sizes stay fixed
                        if isinstance(dim, int):
                            assert lo[axis] == opt[axis] == hi[axis] == dim
            if name == "vision":
                assert sets[0]["pixel_values"][2][0] == lim.max_batch * lim.max_images
    decoder = manifest.graphs["decoder"]
    prefill, decode = profiles(manifest, decoder)
    # prefill: the whole prompt with an empty past; decode: one token against up to max_seq_len slots
    assert prefill["input_ids"][2] == [lim.max_batch, lim.max_seq_len]
    assert prefill["past_key.0"][2][2] == 0
    assert [shape[1] for shape in decode["input_ids"]] == [1, 1, 1] and decode["input_ids"][2][0] == lim.max_batch
    assert decode["past_key.0"][2] == [lim.max_batch, info.num_heads, lim.max_seq_len, info.head_dim]
    # attention_mask covers past + new token in every corner of the decode profile
    for k in range(3):
        assert decode["attention_mask"][k][1] == decode["past_key.0"][k][2] + decode["input_ids"][k][1]
    assert decode["cross_key.0"][2][2] == lim.max_images * info.image_seq_len


def test_axis_ranges_reject_unknown_phase(out):
    with pytest.raises(ValueError, match="phase"):
        axis_ranges(Manifest.load(out), "training")


def _info(out, **changes) -> EngineInfo:
    spec = Manifest.load(out).graphs_for("fp16")["decoder"]
    info = EngineInfo(graph="decoder", precision="fp16", onnx_file=spec.file,
                      onnx_sha256=sha256_file(out / spec.file), tensorrt_version="11.0.0",
                      compute_capability="9.0", device="NVIDIA H100")
    return dataclasses.replace(info, **changes)


def test_compatible_engine_is_accepted(out):
    info = _info(out)
    check_compatible(info, sha256_file(out / info.onnx_file), "11.0.0", "9.0")


@pytest.mark.parametrize("what, expected", [
    ("graph", "built from another decoder.fp16.onnx"),
    ("tensorrt", "built with TensorRT 10.9.0"),
    ("gpu", "compute capability 8.0"),
])
def test_engine_built_elsewhere_is_refused_with_rebuild_advice(out, what, expected):
    info = _info(out, **{"graph": {}, "tensorrt": {"tensorrt_version": "10.9.0"},
                         "gpu": {"compute_capability": "8.0", "device": "A100"}}[what])
    sha = sha256_file(out / info.onnx_file) if what != "graph" else "0" * 64
    with pytest.raises(EngineError, match="idefics-build-engines") as raised:
        check_compatible(info, sha, "11.0.0", "9.0")
    assert expected in str(raised.value)


def test_int8_weight_only_graphs_are_refused_for_tensorrt(out):
    with pytest.raises(EngineError, match="TensorRT cannot read"):
        build_engines(out, BuildConfig(precision="int8wo"))


def test_missing_precision_names_the_flag(out):
    with pytest.raises(EngineError, match="--int8"):
        build_engines(out, BuildConfig(precision="int8"))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_cli_says_what_to_install(out, capsys):
    assert build_main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "Traceback" not in err


def test_memory_limit_sizes():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("1024") == 1024
    with pytest.raises(Exception):
        parse_size("lots")
    with pytest.raises(EngineError):
        BuildConfig(memory_limit=0)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_build_fp16_engines(out):  # pragma: no cover - runs only on a GPU host with TensorRT
    infos = build_engines(out, BuildConfig(precision="fp16"))
    assert {i.graph for i in infos} == {"vision", "perceiver", "decoder"}


def test_polygraphy_api_used_by_the_builder_exists():
    """The build runs only with TensorRT and a GPU; the Polygraphy calls it makes are checked here
    against the installed Polygraphy (which imports TensorRT lazily)."""
    import inspect

    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    def accepts(cls, *names):
        params = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                params |= set(inspect.signature(klass.__init__).parameters)
        return set(names) <= params

    assert accepts(CreateConfig, "profiles", "memory_pool_limits", "load_timing_cache")
    assert accepts(EngineBytesFromNetwork, "network", "config", "save_timing_cache")
    assert accepts(NetworkFromOnnxPath, "path", "strongly_typed")
    assert {"name", "min", "opt", "max"} <= set(inspect.signature(Profile.add).parameters)
