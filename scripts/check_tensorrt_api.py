"""Check, without a GPU, that the TensorRT names this toolkit calls exist in a TensorRT release.

    python scripts/check_tensorrt_api.py [--version 11.4.0.106]

TensorRT's Python bindings cannot be imported here (they need libnvinfer, whose wheel comes from
an unreachable host), but the bindings wheel itself is on PyPI. This downloads it
(`tensorrt-cu13-bindings`), reads the identifiers compiled into its `tensorrt.so`, and reports
every attribute the TensorRT runner and the engine builder use that is not among them. It checks
names only, not signatures or behaviour. Exit status 1 when a name is missing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "runtime" / "runners" / "tensorrt.py", ROOT / "exporter" / "engines.py", ROOT / "runtime" / "engines.py"]
# attributes reached through these names in the sources are TensorRT's
RECEIVERS = r"(?:trt|engine|self\.engine|context|self\.context)"
# classes defined in the bindings' __init__.py rather than compiled in
PYTHON_LEVEL = {"Logger", "Runtime", "WARNING"}


def used_names() -> set[str]:
    names = set()
    for path in SOURCES:
        text = path.read_text()
        for chain in re.findall(rf"\b{RECEIVERS}((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):  # trt.Logger.WARNING
            names |= set(chain.strip(".").split("."))
        names |= set(re.findall(r"\btrt\.Runtime\([^)]*\)\.([A-Za-z_][A-Za-z0-9_]*)", text))  # ...(logger).deserialize
    return names - {"__version__", "engine", "context"}


def compiled_identifiers(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith("tensorrt.so"))
        data = archive.read(member)
    names = {m.decode() for m in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{2,}", data)}
    # the linker stores a string literal that ends another one as that one's tail ("INPUT" inside
    # "ATTENTION_INPUT"), so the parts after an underscore count as present too
    return names | {name[i + 1:] for name in names for i, c in enumerate(name) if c == "_"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="11.4.0.106", help="tensorrt-cu13-bindings version (default: 11.4.0.106)")
    parser.add_argument("--wheel", type=Path, help="a bindings wheel already downloaded (skips pip)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                            f"tensorrt-cu13-bindings=={args.version}"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        known = compiled_identifiers(wheel) | PYTHON_LEVEL
        used = used_names()
        missing = sorted(used - known)
    print(f"{wheel.name}: {len(used)} TensorRT names used, {len(missing)} missing")
    for name in sorted(used):
        print(f"  {'MISSING ' if name in missing else 'ok      '}{name}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
