"""`idefics-export` as a user meets it: clear refusals without tracebacks, an output folder that
appears only complete, --force that never loses the previous export, hub ids, and external data.

The CLI runs in-process through exporter.cli.main (plus one real `idefics-export --help`). Files are
compared with hashlib, graph facts read with the `onnx` package, and ONNX Runtime's outputs against
the PyTorch decoder module built from the same seed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exporter.export as export_mod
import runtime.reference.sources as loading
from exporter.cli import main
from exporter.export import ExportConfig, export
from runtime.errors import ModelLoadError, ValidationError
from runtime.manifest import MANIFEST_NAME
from runtime.reference.modules import DecoderGraph
from runtime.reference.presets import PRESETS

TINY = PRESETS["tiny"]
FLAGS = ("--model", "--seed", "--opset", "--max-batch", "--max-images", "--max-seq-len",
         "--force", "--no-validate", "--quiet", "--verbose", "--help")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEFICS_TOOLKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """One finished export of random:tiny (seed 0); tests work on copies of it."""
    root = tmp_path_factory.mktemp("cli-base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDEFICS_TOOLKIT_CACHE", str(root / "cache"))
        export(ExportConfig(output=root / "export", model="random:tiny", progress=False))
    return root / "export"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_user_error(rc, err, *names):
    assert rc != 0
    assert "Traceback" not in err, err
    assert "idefics-export: error:" in err, err
    for name in names:
        assert str(name) in err, f"{name!r} not in {err!r}"


# ------------------------------------------------------------------ user errors
def test_missing_checkpoint_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    rc, _, err = _run(["--quiet", "--model", missing, tmp_path / "out"], capsys)
    _assert_user_error(rc, err, missing)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_checkpoint_of_another_model_type(tmp_path, capsys):
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    rc, _, err = _run(["--quiet", "--model", ckpt, tmp_path / "out"], capsys)
    _assert_user_error(rc, err, ckpt / "config.json", "llama")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_weights(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "idefics"}))
    rc, _, err = _run(["--quiet", "--model", ckpt, tmp_path / "out"], capsys)
    _assert_user_error(rc, err, ckpt)
    assert "weight" in err
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    loading.build_random("tiny").save_pretrained(ckpt)
    (weights,) = ckpt.glob("*.safetensors")
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    rc, _, err = _run(["--quiet", "--model", ckpt, tmp_path / "out"], capsys)
    _assert_user_error(rc, err, ckpt)
    assert weights.name in err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_unknown_preset(tmp_path, capsys):
    rc, _, err = _run(["--quiet", "--model", "random:nope", tmp_path / "out"], capsys)
    _assert_user_error(rc, err, "nope")
    for known in PRESETS:
        assert known in err
    assert not (tmp_path / "out").exists()


def test_failed_export_removes_the_parents_it_created(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    rc, _, err = _run(["--quiet", "--model", "random:nope", out], capsys)
    _assert_user_error(rc, err, "nope")
    assert not (tmp_path / "a").exists()


def test_max_seq_len_beyond_the_model(tmp_path, capsys):
    limit = TINY["max_position_embeddings"]
    rc, _, err = _run(["--quiet", "--model", "random:tiny", "--max-seq-len", limit + 1, tmp_path / "out"], capsys)
    _assert_user_error(rc, err, "--max-seq-len", limit + 1, limit)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_9b_refused_for_memory_before_building(tmp_path, capsys, monkeypatch):
    # fp32 9B weights alone are ~36 GB. On a machine with much more memory, pretend to be the 24 GB one.
    avail = _mem_available()
    if avail is None or avail > 64 * 2**30:
        monkeypatch.setattr(loading, "available_memory", lambda: 24 * 2**30)

    def must_not_build(*args, **kwargs):
        raise AssertionError("random:9b was built before the memory check refused it")

    monkeypatch.setattr(loading, "random_model", must_not_build)
    start = time.perf_counter()
    # --no-stream: the whole-model path (unasked, a model this large streams: test_stream_export.py)
    rc, _, err = _run(["--quiet", "--no-stream", "--model", "random:9b", tmp_path / "out"], capsys)
    elapsed = time.perf_counter() - start
    _assert_user_error(rc, err, "random:9b", "GiB", "--stream")
    assert elapsed < 10, f"refusal took {elapsed:.1f} s"
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_output_is_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "photos"
    (out / "sub").mkdir(parents=True)
    (out / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (out / "sub" / "notes.txt").write_text("keep me")
    before = _hashes(out)
    rc, _, err = _run(["--quiet", "--force", "--model", "random:tiny", out], capsys)
    _assert_user_error(rc, err, out)
    assert _hashes(out) == before
    assert not _leftovers(tmp_path, "photos")


def test_existing_export_needs_force(base_export, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(base_export, out)
    before = _hashes(out)
    rc, _, err = _run(["--quiet", "--model", "random:tiny", "--seed", 1, out], capsys)
    _assert_user_error(rc, err, out, "--force")
    assert _hashes(out) == before
    assert not _leftovers(tmp_path, "export")


def test_force_replaces_an_export(base_export, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(base_export, out)
    before = _hashes(out)
    rc, stdout, err = _run(["--model", "random:tiny", "--seed", 1, "--force", out], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    assert "decoder" in stdout  # the validation table
    after = _hashes(out)
    assert after.keys() == before.keys()
    # Seed 1 gives other weights: every graph file changed, and the manifest describes the new files.
    for name in ("vision.onnx", "perceiver.onnx", "decoder.onnx"):
        assert after[name] != before[name], name
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["seed"] == 1
    assert manifest["files"] == {k: v for k, v in after.items() if k != MANIFEST_NAME}
    assert not _leftovers(tmp_path, "export")


def test_help_documents_every_flag():
    exe = Path(sys.executable).parent / "idefics-export"  # this venv's console script, not another's
    exe = str(exe) if exe.is_file() else shutil.which("idefics-export")
    assert exe, "idefics-export is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        assert flag in proc.stdout, flag
    assert "output" in proc.stdout.lower()
    from exporter.cli import build_parser

    for action in build_parser()._actions:  # nothing added to the parser goes undocumented
        for option in action.option_strings:
            assert option in proc.stdout, option


# ------------------------------------------------------------------ the console
PROTOBUF_DUMP = ("op_type:", "data_type", "dims:", "Consider add these nodes")
TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")


@contextlib.contextmanager
def _fresh_root_logger():
    """The root logger as a fresh interpreter has it. pytest hangs its capture handlers there, which
    would turn a CLI's logging.basicConfig into a no-op and hide what a terminal shows."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    for handler in saved:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield root
    finally:
        for handler in root.handlers[:]:  # what the command left behind
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def _console(argv, capsys) -> tuple[int, str, str, dict]:
    """main() as on a terminal; also the logging state it leaves behind."""
    with _fresh_root_logger() as root:
        rc = main([str(a) for a in argv])
        after = {"root handlers": len(root.handlers), "root level": root.level,
                 "onnxruntime": logging.getLogger("onnxruntime").level}
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, after


def _lines(text: str) -> int:
    return text.count("\n")  # as a terminal shows them: a progress bar redraws its line with \r


def test_fp16_export_fits_a_screen(tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err, after = _console(["--fp16", out], capsys)
    assert rc == 0, err
    for noise in PROTOBUF_DUMP + TRANSFORMERS_BARS:
        assert noise not in stdout + err, noise
    assert not any(line.startswith("INFO onnx") for line in err.splitlines()), err
    assert _lines(stdout) + _lines(err) <= 24, stdout + err
    assert f"export written to {out}" in err  # where the files went
    assert "idefics-export: 100%" in err  # the progress bar
    # the accuracy table: a row per precision, graph and case (its worst output)
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["fp32"], ["fp16"])]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (p, g, c) for p in ("fp32", "fp16") for g, c in (("vision", "photos"), ("perceiver", "photos"),
                                                          ("decoder", "prefill"), ("decoder", "decode"),
                                                          ("decoder", "decode-static"))}
    assert all(r[-1] == "yes" for r in rows)
    assert "a Session loads fp32 on the CPU, fp16 on a GPU" in stdout
    assert after == {"root handlers": 0, "root level": logging.WARNING, "onnxruntime": logging.NOTSET}
    assert not [line for line in err.splitlines() if line.startswith(("INFO ", "DEBUG "))], err  # --verbose's


def test_report_names_the_ort_graphs_the_limits_and_the_kept_nodes(tmp_path, capsys):
    """The report's summary names every --ort-optimized graph on disk and the export's limits; the
    nodes kept at higher precision are counted by default and listed with --verbose."""
    import dataclasses

    from exporter.cli import format_report
    from runtime.manifest import Manifest

    out = tmp_path / "out"
    rc, stdout, err, _ = _console(["--fp16", "--ort-optimized", "--max-batch", 3, "--max-images", 2,
                                   "--max-seq-len", 96, out], capsys)
    assert rc == 0, err
    on_disk = sorted(p.name for p in out.glob("*.ort*.onnx"))
    assert on_disk, "the tiny default has ONNX Runtime-optimized graphs"
    ort_line = next(line for line in stdout.splitlines() if line.startswith("ONNX Runtime-optimized graphs"))
    assert sorted(word.strip(",;") for word in ort_line.split() if word.endswith((".onnx", ".onnx,", ".onnx;"))) == on_disk
    assert "96 tokens" in stdout and "batch 3" in stdout and "2 images per prompt" in stdout

    manifest = Manifest.load(out)
    kept = {"vision": [{"node": "/encoder/layers.0/mlp/fc1/MatMul", "op": "MatMul", "reason": "overflow",
                        "detail": "7.1e4 > 6.55e4"},
                       {"node": "/encoder/Softmax", "op": "Softmax", "reason": "rule", "detail": "reduces"}],
            "decoder": [{"node": "/layers.1/self_attn/o_proj/MatMul", "op": "MatMul", "reason": "accuracy",
                         "detail": "top-1 +2.0%"}]}
    search = {"budget": {"rounds": 16, "nodes": 64, "per_round": 4}, "rounds": 2, "bound": {"top1": 0.95},
              "top1": 0.97, "history": []}
    variant = dataclasses.replace(manifest.variants["fp16"], kept_nodes=kept, search=search)
    manifest = dataclasses.replace(manifest, variants={"fp16": variant})
    short, full = format_report(manifest), format_report(manifest, every_output=True)
    assert "fp16: end-to-end top-1 vs fp32 97.0% (min 95%); search rounds 2 of 16" in short
    nudged = dataclasses.replace(variant, search={**search, "top1_draws": [0.96, 0.955, 0.99, 0.97]})
    assert ("fp16: end-to-end top-1 vs fp32 97.0% (min 95% in each read; 4 more with the photos nudged, as "
            "another CPU rounds: 95.5%-99.0%)"
            in format_report(dataclasses.replace(manifest, variants={"fp16": nudged})))
    assert "2 node(s) kept at higher precision" in short and "fc1" not in short and "o_proj" not in short
    assert "/encoder/layers.0/mlp/fc1/MatMul" in full and "/layers.1/self_attn/o_proj/MatMul" in full


def test_verbose_brings_the_libraries_info_back(tmp_path, capsys):
    rc, stdout, err, _ = _console(["--fp16", "--verbose", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "INFO onnxruntime.transformers.float16" in err
    assert "Loading weights" in err
    assert "present_key.0" in stdout and "present_value.0" in stdout  # every output's row


def test_quiet_shows_nothing_not_even_transformers_bars(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    rc, stdout, err, after = _console(["--quiet", tmp_path / "out"], capsys)  # loads a checkpoint folder
    assert rc == 0, err
    assert (stdout, err) == ("", "")
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process
    assert after["root handlers"] == 0


# ------------------------------------------------------------------ atomicity
def _interrupt_decoder(monkeypatch, seen: dict):
    real = export_mod.export_graph

    def fake(module, args, graph, tmp, *options):
        if graph.name == "decoder":
            seen["written"] = sorted(p.name for p in Path(tmp).glob("*.onnx"))
            seen["tmp"] = Path(tmp)
            raise KeyboardInterrupt
        return real(module, args, graph, tmp, *options)

    monkeypatch.setattr(export_mod, "export_graph", fake)


def test_interrupt_leaves_nothing(tmp_path, capsys, monkeypatch):
    seen: dict = {}
    _interrupt_decoder(monkeypatch, seen)
    out = tmp_path / "out"
    rc, _, err = _run(["--quiet", "--model", "random:tiny", out], capsys)
    assert rc != 0 and rc != 2  # interrupted, not a user error
    assert "Traceback" not in err
    assert seen["written"] == ["perceiver.onnx", "vision.onnx"]  # it really was mid-export
    assert seen["tmp"].parent == tmp_path and not seen["tmp"].exists()
    assert not out.exists()
    assert not _leftovers(tmp_path, "out")


def test_interrupted_force_keeps_previous_export(base_export, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    shutil.copytree(base_export, out)
    before = _hashes(out)
    seen: dict = {}
    _interrupt_decoder(monkeypatch, seen)
    rc, _, err = _run(["--quiet", "--force", "--model", "random:tiny", "--seed", 1, out], capsys)
    assert rc != 0
    assert "Traceback" not in err
    assert seen["written"] == ["perceiver.onnx", "vision.onnx"]
    assert _hashes(out) == before
    assert not _leftovers(tmp_path, "export")


def test_validation_failure_leaves_nothing(tmp_path, monkeypatch):
    real = DecoderGraph.forward
    offset = 1e-2

    def skewed(self, *args):
        outputs = real(self, *args)
        if torch.jit.is_tracing():  # the ONNX graph stays right; the PyTorch reference moves
            return outputs
        return (outputs[0] + offset, *outputs[1:])

    monkeypatch.setattr(DecoderGraph, "forward", skewed)
    out = tmp_path / "out"
    with pytest.raises(ValidationError) as info:
        export(ExportConfig(output=out, model="random:tiny", progress=False))
    message = str(info.value)
    assert "decoder" in message and "logits" in message
    assert "present_" not in message and "vision" not in message and "perceiver" not in message
    for case in ("prefill", "decode", "decode-static"):
        row = info.value.report["decoder"][case]["logits"]
        assert row["ok"] is False
        assert abs(row["max_abs_diff"] - offset) < 1e-3, row
    assert not out.exists()
    assert not _leftovers(tmp_path, "out")


# ------------------------------------------------------------------ hub ids
def test_parse_source_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named like the hub id can shadow it
    assert (loading.parse_source("HuggingFaceM4/idefics-9b").kind,
            loading.parse_source("HuggingFaceM4/idefics-9b").ref) == ("hub", "HuggingFaceM4/idefics-9b")
    for spec, expected in (("./x", tmp_path / "x"), ("/abs/x", Path("/abs/x")), ("a/b/c", tmp_path / "a/b/c")):
        source = loading.parse_source(spec)
        assert (source.kind, source.ref) == ("local", str(expected)), spec
    assert (loading.parse_source("random:9b").kind, loading.parse_source("random:9b").ref) == ("preset", "9b")
    assert loading.parse_source(None).kind == "default"
    # An existing folder wins over the hub reading of owner/name.
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert loading.parse_source("owner/name").kind == "local"


def test_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # read once at import; the env alone is too late
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted in offline mode")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    hub_id = "HuggingFaceM4/idefics-9b"
    with pytest.raises(ModelLoadError) as info:
        loading.load(loading.parse_source(hub_id))
    assert hub_id in str(info.value)
    assert "AssertionError" not in str(info.value)


def _hub_unreachable(monkeypatch, tmp_path):
    """Online mode, but the hub's address refuses connections (as a machine without the network
    sees it, minus the DNS wait); the hub cache is an empty folder of the test's."""
    import huggingface_hub.constants as hf

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch, capsys):
    """Offline, `--model owner/name` used to spend 29 s in transformers' retries, each warning
    printed twice, before its last line: now one probe of the hub, then one line naming the id."""
    _hub_unreachable(monkeypatch, tmp_path)

    def retrying(*args, **kwargs):
        raise AssertionError("from_pretrained was called with the hub unreachable and nothing cached")

    monkeypatch.setattr(loading.IdeficsForVisionText2Text, "from_pretrained", retrying)
    rc, stdout, err = _run(["--quiet", "--model", "someone/idefics-9b-copy", tmp_path / "out"], capsys)
    _assert_user_error(rc, err, "someone/idefics-9b-copy", "cannot be reached", "http://127.0.0.1:9",
                       str(tmp_path / "hub"))
    assert "AssertionError" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_loads_from_its_cache(tmp_path, monkeypatch, caplog):
    """A hub id already in the hub's cache loads from there when the hub cannot be reached (the
    same weights as the checkpoint that was put there)."""
    folder = loading.ensure_default_checkpoint()
    snapshot = tmp_path / "hub" / "models--someone--idefics-copy" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    _hub_unreachable(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        loaded = loading.load(loading.parse_source("someone/idefics-copy"))
    assert "loading someone/idefics-copy from its cache" in caplog.text
    expected = loading.load(loading.parse_source(str(folder))).model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_mistyped_local_folder_is_named_offline(tmp_path, monkeypatch, capsys):
    # "checkpoints/idefics" reads as owner/name; with no such folder and no hub, both are said
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint").mkdir()  # the folder that does exist, one letter off
    rc, _, err = _run(["--quiet", "--model", "checkpoints/idefics", tmp_path / "out"], capsys)
    _assert_user_error(rc, err, "no folder checkpoints/idefics here", "hub id could not be fetched (offline?)")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ external data
def test_external_data(tmp_path):
    out = tmp_path / "out"
    umask = os.umask(0)
    os.umask(umask)
    manifest = export(ExportConfig(output=out, model="random:tiny", progress=False, external_data_threshold=0))
    for name, graph in manifest.graphs.items():
        data = f"{name}.onnx.data"
        assert graph.external_data == data, name
        assert (out / data).is_file()
        assert manifest.files[data] == hashlib.sha256((out / data).read_bytes()).hexdigest()
        proto = onnx.load(str(out / graph.file), load_external_data=False)
        locations = {
            entry.value
            for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data if entry.key == "location"
        }
        assert locations == {data}, name
        # onnx creates the data file 0600; the export gives it the graph's mode (umask-based)
        assert (out / data).stat().st_mode & 0o777 == (out / graph.file).stat().st_mode & 0o777 == 0o666 & ~umask
    assert set(manifest.files) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}

    # ONNX Runtime runs the decoder from the folder, giving the PyTorch module's logits ...
    session = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed, torch_args = _decoder_inputs(session)
    logits = session.run(["logits"], feed)[0]
    with torch.no_grad():
        expected = DecoderGraph(loading.build_random("tiny", 0))(*torch_args)[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    # ... and the weights really are in the .data file: the graph alone does not load.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "decoder.onnx", alone)
    with pytest.raises(Exception):
        ort.InferenceSession(str(alone / "decoder.onnx"), providers=["CPUExecutionProvider"])


def _decoder_inputs(session):
    b, t, p, n = 1, 3, 2, 1
    sizes = {"batch": b, "seq": t, "past_seq": p, "total_seq": p + t, "images": n,
             "image_tokens": n * TINY["perceiver_config"]["resampler_n_latents"]}
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for inp in session.get_inputs():
        shape = [(t if d == "kept_seq" else sizes[d]) if isinstance(d, str) else d for d in inp.shape]
        if inp.name == "input_ids":
            x = torch.randint(3, 100, shape, generator=gen)
        elif inp.name == "attention_mask" or inp.name == "image_attention_mask":
            x = torch.ones(shape, dtype=torch.long)
        elif inp.name == "logits_positions":
            x = torch.arange(t)
        elif inp.name == "position_ids":
            x = torch.arange(p, p + t)[None].expand(shape).contiguous()
        else:
            x = torch.randn(shape, generator=gen)
        tensors.append((inp.name, x))
    return {k: v.numpy() for k, v in tensors}, tuple(v for _, v in tensors)
