"""Helpers shared by test modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
