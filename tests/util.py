"""Helpers shared by test modules."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before it runs: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def hf_generate(model, batch, **settings):
    """transformers' greedy `generate` [B, prompt + new] as numpy, on one torch thread: the tiny test
    models' ops are too small to share, and spinning OpenMP threads on a busy 2-core machine make
    generate many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model.generate(**batch, do_sample=False, **settings).numpy()
    finally:
        torch.set_num_threads(threads)


def default_hf():
    """(IdeficsForVisionText2Text, processor) of the checkpoint the embedded default is exported from."""
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    from runtime.reference.sources import ensure_default_checkpoint

    folder = ensure_default_checkpoint(0)
    return IdeficsForVisionText2Text.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def run_threads(work, count, stagger=0.003, timeout=120):
    """Start work(i) for i < count from threads `stagger` seconds apart, wait for them (bounded), and
    return the errors they raised."""
    import threading
    import time

    errors: list[BaseException] = []

    def guarded(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return errors


def export_variant(root: Path, variant: str = "tiny", **config):
    """A random config variant (runtime.reference.presets.CONFIG_VARIANTS) saved as a checkpoint in
    root/ckpt and exported to root/out with ExportConfig `config`: (transformers model, Manifest,
    root/out)."""
    from exporter.export import ExportConfig, export
    from runtime.reference.sources import variant_model

    model = variant_model(variant)
    model.save_pretrained(root / "ckpt")
    manifest = export(ExportConfig(output=root / "out", model=str(root / "ckpt"), progress=False, **config))
    return model, manifest, root / "out"


def hf_last_logits(model, request):
    """transformers' FP32 logits [B, V] at the last prompt position of a runtime.loop.Request."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(request.input_ids),
                     attention_mask=torch.from_numpy(request.attention_mask),
                     pixel_values=torch.from_numpy(request.pixel_values),
                     image_attention_mask=torch.from_numpy(request.image_attention_mask)).logits[:, -1].numpy()


# ../shared/cpu/avx2: qemu-user emulating a Haswell (AVX2, no AVX-512, no VNNI), whatever the host
AVX2_WRAPPER = Path(os.environ.get("IDEFICS_AVX2_WRAPPER", ROOT.parent / "shared" / "cpu" / "avx2"))


def avx2_run(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run this venv's Python with `args` on the emulated AVX2-only CPU: through ../shared/cpu/avx2
    where the project's machines have it, else through qemu-user's Haswell directly; skipped where
    neither is (failed in CI, which must prove the AVX2 behaviour)."""
    import shutil

    if AVX2_WRAPPER.is_file():
        command = [str(AVX2_WRAPPER)]
    elif shutil.which("qemu-x86_64"):
        command = ["qemu-x86_64", "-cpu", os.environ.get("AVX2_CPU", "Haswell")]
    else:
        message = f"no AVX2-only CPU emulator: neither {AVX2_WRAPPER} nor qemu-x86_64 (apt-get install qemu-user)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, **(env or {})}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([*command, sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def engine_with_chunks(session, prefill_chunk: int | None):
    """`session` with its engine swapped, for the block, for one that joins in chunks of
    `prefill_chunk` prompt tokens (None: the session's own engine, untouched); restored after."""
    from runtime.engine import Engine

    engine = session.engine
    if prefill_chunk:
        session.engine = Engine(session.graphs, engine.capacity, prefill_chunk=prefill_chunk)
    try:
        yield session.engine
    finally:
        if session.engine is not engine:
            session.engine.close()
            session.engine = engine
