"""Export every config variant the toolkit is tested on and print the validation figures as a
Markdown table (the README's "variants" table comes from this script).

    python scripts/variants_report.py [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from exporter.export import ExportConfig, export
from exporter.graphs.bounds import TOLERANCES
from runtime.reference.presets import CONFIG_VARIANTS
from runtime.reference.sources import variant_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    rows = {}
    for name in CONFIG_VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            variant_model(name).save_pretrained(ckpt)
            start = time.perf_counter()
            manifest = export(ExportConfig(output=Path(tmp) / "out", model=str(ckpt), progress=False))
            seconds = time.perf_counter() - start
        report = manifest.validation["report"]
        rows[name] = {
            f"{graph}/{case}": max(r["max_abs_diff"] for r in outputs.values())
            for graph, cases in report.items() for case, outputs in cases.items()
        }
        rows[name]["export_s"] = seconds
    columns = list(next(iter(rows.values())))
    tol = TOLERANCES["fp32"]
    print(f"max abs diff, ONNX Runtime vs PyTorch (fp32 limit: {tol['max_rel']:g} x rms(ref))\n")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.1f}" if c == "export_s" else f"{row[c]:.1e}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
