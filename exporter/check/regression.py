"""Accuracy regression checks of an export: every graph and generation, against the PyTorch model
rebuilt from the manifest, or against golden results recorded earlier (no PyTorch needed).

Rows: (kind, precision, graph or stage, case, output, max abs error, mean abs error, cosine,
threshold, ok). The check passes only when every row does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.graphs.bounds import BoundsError, load_tolerances
from runtime.cpu import describe as cpu_description
from runtime.errors import ReferenceMismatchError, ToolkitError
from runtime.manifest import Manifest

log = logging.getLogger(__name__)

GOLDEN_FORMAT = "idefics-check-golden"
GOLDEN_VERSION = 1
# A golden result is today's output of the same graphs on the same runtime: only run-to-run noise.
GOLDEN_TOLERANCE = dict(max_rel=1e-4, mean_rel=1e-5, cosine=0.99999, top1=1.0, check_top1=1.0)
# Generation: FP32 must give transformers' tokens exactly; reduced precisions the `check_top1` share
# of teacher-forced next-token agreement of exporter.graphs.bounds.
TOKENS = 16


class CheckError(ToolkitError):
    """The check could not run: missing export or reference weights, golden files of another model."""


@dataclass
class Row:
    kind: str  # "graph" | "generation" | "digest" | "golden" (what the golden files cover)
    precision: str
    graph: str
    case: str
    output: str
    max_abs: float = math.nan  # NaN: no such figure for this row (digest, golden, generation rows)
    mean_abs: float = math.nan
    cosine: float = math.nan
    threshold: str = ""
    ok: bool = True
    note: str = ""
    top1: float = math.nan  # generation rows: teacher-forced next-token top-1 agreement


@dataclass
class CheckReport:
    reference: str  # "pytorch" | "golden"
    rows: list[Row] = field(default_factory=list)
    localisation: dict[str, Any] = field(default_factory=dict)  # "precision/graph" -> first diverging tensor
    # runtime.cpu.describe() of the CPU checked on, and of the one the export was validated on (its manifest)
    cpu: dict[str, Any] = field(default_factory=dict)
    export_cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "ok": self.ok, "rows": [asdict(r) for r in self.rows],
                "localisation": self.localisation, "cpu": self.cpu, "export_cpu": self.export_cpu}


def thresholds(overrides: Path | None = None) -> dict[str, dict]:
    """exporter.graphs.bounds.TOLERANCES, with any precision's values replaced from a JSON file
    {"fp16": {"cosine": 0.99}} (the format of idefics-export --tolerances)."""
    try:
        return load_tolerances(overrides)
    except BoundsError as exc:
        raise CheckError(str(exc)) from exc


def rows_from_report(report: dict, precision: str, tolerance: dict) -> list[Row]:
    return [
        Row("graph", precision, graph, case, name, r["max_abs_diff"], r["mean_abs_diff"], r["cosine"],
            f"<= {r['limit']:.2e}, cos >= {tolerance['cosine']}", bool(r["ok"]), _relative_note(r, tolerance))
        for graph, cases in report.items() for case, outputs in cases.items() for name, r in outputs.items()
    ]


def _relative_note(row: dict, tolerance: dict) -> str:
    """The errors in units of the output's RMS, as the bounds judge them (only where a bound is missed)."""
    if row.get("note"):
        return row["note"]
    if row["ok"] or "max_rel" not in row:
        return ""
    return (f"max|err| {row['max_rel']:.3g} rms (<= {tolerance['max_rel']:g}), mean|err| {row['mean_rel']:.3g} rms "
            f"(<= {tolerance['mean_rel']:g})" + ("" if row.get("finite", True) else ", not finite"))


# ---------------------------------------------------------------- PyTorch reference
def load_reference(manifest: Manifest, model: str | None = None):
    """runtime.reference.sources.load_reference, its errors as CheckError naming the flags to pass."""
    from runtime.reference.sources import load_reference as rebuild

    try:
        return rebuild(manifest, model)
    except ReferenceMismatchError as exc:
        raise CheckError(f"{exc}; pass the checkpoint the export was made from with --model") from exc
    except ToolkitError as exc:
        raise CheckError(f"{exc}; pass --model PATH or --golden DIR") from exc


# ---------------------------------------------------------------- localisation
def localise(folder: Path, graph_file: str, reference_file: Path, feed: dict[str, np.ndarray],
             tolerance: dict) -> dict | None:
    """First intermediate tensor (in the checked graph's order) that differs from the reference
    graph's tensor of the same name past `tolerance`; outputs of every node are marked, as
    Polygraphy's `--onnx-outputs mark all` does."""
    import onnx
    from polygraphy import constants
    from polygraphy.backend.onnx import modify_outputs

    from exporter.graphs.comparison import compare, ort_session

    results = []
    for path in (folder / graph_file, reference_file):
        model = modify_outputs(onnx.load(str(path)), outputs=constants.MARK_ALL)
        with tempfile.TemporaryDirectory() as tmp:
            marked = Path(tmp) / "marked.onnx"
            onnx.save_model(model, str(marked), save_as_external_data=True, location="marked.onnx.data")
            session = ort_session(marked)
            names = [o.name for o in session.get_outputs()]
            inputs = {i.name: i.type for i in session.get_inputs()}
            cast = {k: v.astype(np.float16 if inputs[k] == "tensor(float16)" else v.dtype) for k, v in feed.items()}
            results.append(dict(zip(names, session.run(names, cast))))
    checked, reference = results
    for name, value in checked.items():
        ref = reference.get(name)
        if ref is None or ref.shape != value.shape or not np.issubdtype(value.dtype, np.floating):
            continue
        row = compare([name], [ref], [value], tolerance)[name]
        if not row["ok"]:
            return {"tensor": name, "max_abs_diff": row["max_abs_diff"], "cosine": row["cosine"]}
    return None


def reference_onnx(manifest: Manifest, module, graph: str, folder: Path) -> Path:
    """The FP32 graph re-exported from the trusted PyTorch module: same tracer, same tensor names."""
    from exporter.graphs.trace import EXTERNAL_DATA_THRESHOLD, export_graph, trace_args

    spec = manifest.graphs[graph]
    export_graph(module, trace_args(manifest.model)[graph], spec, folder, manifest.opset,
                 EXTERNAL_DATA_THRESHOLD)
    return folder / spec.file


# ---------------------------------------------------------------- generation
def generation_sets(manifest: Manifest, folder: Path):
    """{"images": Request, "text-only": Request}: real photos (1 and 2 per prompt) and text alone."""
    from calibration.images import builtin_images, synthetic_prompts
    from runtime.prompts import PromptEncoder
    from runtime.session import check_request

    photos = builtin_images(3)
    info = manifest.model
    if manifest.processor_files:
        encoder = PromptEncoder(folder)
        image_prompts = [["User:", photos[0], "Describe this image.<end_of_utterance>\nAssistant:"],
                         ["User:", photos[1], "and", photos[2], "What differs?<end_of_utterance>\nAssistant:"]]
        text_prompts = [["User: Tell me about rockets.<end_of_utterance>\nAssistant:"],
                        ["User: What is coffee made of?<end_of_utterance>\nAssistant:"]]
        sets = {}
        for name, prompts in (("images", image_prompts), ("text-only", text_prompts)):
            enc = encoder.encode(prompts)
            pixels = enc.pixel_values if enc.image_attention_mask.any() else None
            sets[name] = check_request(manifest, enc.input_ids, enc.attention_mask, pixels, enc.image_attention_mask)
        return sets
    ids, ones, pixels, mask = synthetic_prompts([photos[:2], photos[:2]], info.image_size,
                                                info.vocab_size - len(info.image_token_ids), length=16)
    return {"images": check_request(manifest, ids, ones, pixels, mask),
            "text-only": check_request(manifest, ids, ones, None, None)}


def hf_reference(model, request, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy tokens [B,N] and, on that sequence, its next-token logits [B,N,V]."""
    import torch

    b, _, n = request.image_attention_mask.shape
    size = model.config.vision_config.image_size
    pixels = request.pixel_values  # transformers needs pixel_values even when no token sees an image
    pixels = torch.zeros(b, n, 3, size, size) if pixels is None else torch.from_numpy(pixels)
    inputs = dict(input_ids=torch.from_numpy(request.input_ids),
                  attention_mask=torch.from_numpy(request.attention_mask), pixel_values=pixels,
                  image_attention_mask=torch.from_numpy(request.image_attention_mask))
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        new = seq.shape[1] - request.input_ids.shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], new, dtype=torch.long)], 1)
        image_mask = torch.cat([inputs["image_attention_mask"],
                                inputs["image_attention_mask"][:, -1:].expand(-1, new, -1)], 1)
        logits = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                       image_attention_mask=image_mask[:, :-1]).logits[:, -new:]
    return seq[:, -new:].numpy(), logits.float().numpy()


def runner_factory(folder: Path, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu"):
    """A `session_factory` for comparison.run_cases that runs each graph file through the runtime's
    runner of `backend` on `device` (the same runners Session uses)."""
    from runtime.runners import create_runner

    by_file = {g.file: g for p in ("fp32", *manifest.variants) for g in manifest.graphs_for(p).values()}
    by_file.update({g.file: g for v in manifest.ort_optimized.values() for g in v.graphs.values()})

    class _Session:
        def __init__(self, path: Path):
            self.runner = create_runner(backend, by_file[Path(path).name], folder, device, manifest=manifest)
            self.runner.activate()

        def run(self, names, feed):
            outputs = self.runner.infer(feed)
            return [outputs[name] for name in names]

    return _Session


def generation_rows(folder: Path, manifest: Manifest, precisions: list[str], reference: dict,
                    backend: str = "onnxruntime", device: str = "cpu",
                    table: dict | None = None) -> tuple[list[Row], dict]:
    """reference: {set: (tokens, logits or None)}; logits None means golden mode (tokens must match).
    `table`: the bounds (exporter.graphs.bounds; default its TOLERANCES), whose `check_top1` each precision must reach."""
    from runtime.compare import teacher_forced_logits, token_agreement
    from runtime.loop import Timings, generate_tokens
    from runtime.sampling import SamplingConfig
    from runtime.session import Session

    sets = generation_sets(manifest, folder)
    rows, produced = [], {}
    for precision in precisions:
        session = Session(folder, backend=backend, device=device, precision=precision, verify=False)
        for name, request in sets.items():
            ref_tokens, ref_logits = reference[name]
            n = ref_tokens.shape[1]
            cfg = SamplingConfig(max_new_tokens=n, min_new_tokens=n)
            tokens = np.stack([s.tokens for s in generate_tokens(session.graphs, request, cfg, Timings())], axis=1)
            produced.setdefault(precision, {})[name] = tokens.tolist()
            share, first = token_agreement(ref_tokens, tokens)
            note = divergence_note(share, first, n)
            if ref_logits is None or precision == "fp32":
                ok, threshold, top1 = share == 1.0, "tokens exact", math.nan
            else:
                seq = np.concatenate([request.input_ids, ref_tokens], axis=1)
                ours = teacher_forced_logits(session, request, seq, n)
                top1 = float((ours.argmax(-1) == ref_logits.argmax(-1)).mean())
                bound = (table or thresholds())[precision]["check_top1"]
                ok, threshold = top1 >= bound, f"top-1 >= {bound}"
            rows.append(Row("generation", precision, "generate", name, "tokens", threshold=threshold, ok=bool(ok),
                            note=note, top1=top1))
        session.close()
    return rows, produced


def divergence_note(share: float, first: list[int], tokens: int) -> str:
    """"tokens equal 100%, identical", or the share and, per row, the first differing token."""
    if share == 1.0:
        return "tokens equal 100%, identical"
    rows = ", ".join(str(f) if f < tokens else "none" for f in first)
    return f"tokens equal {share:.0%}, first divergence per row at token {rows}"


# ---------------------------------------------------------------- golden files
def _model_identity(manifest: Manifest) -> dict:
    source = manifest.source
    config = json.dumps(source.get("config", {}), sort_keys=True).encode()
    return {"kind": source.get("kind"), "ref": source.get("ref"), "seed": source.get("seed"),
            "config_sha256": hashlib.sha256(config).hexdigest()}


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its INFO lines and the 'colored' hint are noise here


def save_golden(folder: Path, manifest: Manifest, cases, outputs: dict, tokens: dict) -> None:
    """inputs.json (Polygraphy data-loader JSON), outputs.json (Polygraphy RunResults, one runner per
    precision, one iteration per case), golden.json (format, model, file digests, versions, tokens)."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    _quiet_polygraphy()
    folder.mkdir(parents=True, exist_ok=True)
    save_json([c.feed for c in cases], str(folder / "inputs.json"))
    results = RunResults()
    for precision, by_case in outputs.items():
        results.append((precision, [IterationResult(by_case[(c.graph, c.name)], runner_name=precision) for c in cases]))
    results.save(str(folder / "outputs.json"))
    meta = {
        "format": GOLDEN_FORMAT, "version": GOLDEN_VERSION, "model": _model_identity(manifest),
        "files": manifest.files, "versions": manifest.versions, "cases": [[c.graph, c.name] for c in cases],
        "precisions": list(outputs), "tokens": tokens,
    }
    (folder / "golden.json").write_text(json.dumps(meta, indent=2))


def load_golden(folder: Path, manifest: Manifest):
    """(cases with golden expected outputs per precision, tokens, file digests)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from exporter.graphs.comparison import Case

    _quiet_polygraphy()
    meta_path = folder / "golden.json"
    if not meta_path.is_file():
        raise CheckError(f"{meta_path}: not found; record golden results with --save-golden {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        feeds = load_json(str(folder / "inputs.json"))
        results = RunResults.load(str(folder / "outputs.json"))
    except Exception as exc:
        raise CheckError(f"{folder}: unreadable golden files ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != GOLDEN_FORMAT or meta.get("version") != GOLDEN_VERSION:
        raise CheckError(f"{meta_path}: not {GOLDEN_FORMAT} version {GOLDEN_VERSION} files")
    if meta["model"] != _model_identity(manifest):
        raise CheckError(f"{folder}: golden results were recorded for model {meta['model']['kind']}:"
                         f"{meta['model']['ref']} (config {meta['model']['config_sha256'][:12]}); this export is "
                         f"{_model_identity(manifest)['kind']}:{_model_identity(manifest)['ref']} "
                         f"(config {_model_identity(manifest)['config_sha256'][:12]})")
    per_precision = {}
    for precision, iterations in results.items():
        per_precision[precision] = [Case(g, n, dict(feed), dict(it)) for (g, n), feed, it
                                    in zip(meta["cases"], feeds, iterations)]
    return per_precision, meta["tokens"], meta["files"]


# ---------------------------------------------------------------- the whole check
def run_check(folder: Path, precisions: list[str] | None = None, golden: Path | None = None,
              save_golden_to: Path | None = None, model: str | None = None, thresholds_file: Path | None = None,
              generation: bool = True, localise_failures: bool = True, backend: str = "onnxruntime",
              device: str = "cpu") -> CheckReport:
    """`backend`/`device`: the runtime checked (graph rows and generation), as Session takes them."""
    from exporter.graphs.comparison import run_cases

    folder = Path(folder)
    manifest = Manifest.load(folder)
    make = runner_factory(folder, manifest, backend, device)
    localise_failures = localise_failures and backend == "onnxruntime"  # it reads intermediate tensors via ORT
    available = ["fp32", *manifest.variants]
    asked = bool(precisions)
    precisions = precisions or available
    for p in precisions:
        manifest.graphs_for(p)  # names the missing precision and the flag
    table = thresholds(thresholds_file)
    report = CheckReport("golden" if golden else "pytorch", cpu=cpu_description(),
                         export_cpu=manifest.validation.get("cpu", {}))

    if golden:
        cases_by_precision, golden_tokens, golden_files = load_golden(Path(golden), manifest)
        report.rows += _file_rows(folder, manifest)  # a file changed after export, manifest not updated
        recorded = [p for p in precisions if p in cases_by_precision]
        # what the golden files and the export do not share: named, no figures, never a digest change
        held = ", ".join(cases_by_precision)
        report.rows += [_golden_row(p, f"not recorded in the golden files, which hold {held}: no result; record "
                                       "it with --save-golden, or leave it out with --precision")
                        for p in precisions if p not in cases_by_precision]
        if not asked:  # every precision: the recorded ones this export lacks too
            report.rows += [_golden_row(p, f"in the golden files, but this export has no {p} graphs (it has: "
                                           f"{', '.join(available)}); re-export with it, or re-record with "
                                           "--save-golden")
                            for p in cases_by_precision if p not in available]
        changed = _digest_rows(manifest, golden_files, recorded)
        report.rows += changed
        unchanged = [p for p in recorded if not any(r.precision == p for r in changed)]
        no_tokens = [p for p in unchanged if p not in golden_tokens]
        if generation and no_tokens:
            raise CheckError(f"{golden}: no golden tokens for {no_tokens} (recorded with --no-generation); "
                             "pass --no-generation or re-record with --save-golden")
        for p in unchanged:
            part, _ = run_cases(folder, manifest.graphs_for(p), cases_by_precision[p], GOLDEN_TOLERANCE,
                                session_factory=make)
            report.rows += rows_from_report(part, p, GOLDEN_TOLERANCE)
        if generation:  # each precision against its own recorded tokens
            for p in unchanged:
                reference = {name: (np.asarray(tokens), None) for name, tokens in golden_tokens[p].items()}
                report.rows += generation_rows(folder, manifest, [p], reference, backend, device)[0]
        return report

    report.rows += _file_rows(folder, manifest)
    loaded = load_reference(manifest, model)
    from runtime.reference.modules import graph_modules  # the PyTorch side: only here, not in golden mode
    from exporter.graphs.validate import reference_cases

    modules = graph_modules(loaded.model)
    cases = reference_cases(manifest.graphs, modules, manifest.model)
    outputs = {}
    for p in precisions:
        part, outputs[p] = run_cases(folder, manifest.graphs_for(p), cases, table[p], session_factory=make)
        rows = rows_from_report(part, p, table[p])
        report.rows += rows
        if localise_failures:
            report.localisation.update(_localise_failures(folder, manifest, modules, cases, rows, p, table[p]))
        if backend == "onnxruntime":  # the ORT-only graphs: ONNX Runtime reads them, TensorRT does not
            report.rows += _ort_encoder_rows(folder, manifest, cases, p, table[p], make)
            report.rows += _ort_decoder_rows(folder, manifest, modules["decoder"], p, table[p])
    tokens = {}
    if generation:
        sets = generation_sets(manifest, folder)
        reference = {name: hf_reference(loaded.model, request, TOKENS) for name, request in sets.items()}
        rows, tokens = generation_rows(folder, manifest, precisions, reference, backend, device, table)
        report.rows += rows
    if save_golden_to:
        save_golden(Path(save_golden_to), manifest, cases, outputs, tokens)
    return report


def _ort_decoder_rows(folder: Path, manifest: Manifest, decoder, precision: str, bound: dict) -> list[Row]:
    """The --ort-optimized decoder of `precision`, if the export has one, against the PyTorch decoder:
    a right-padded prefill from slot 0 and decode steps at per-row lengths (exporter.ort.decoder);
    its prompt graph too where the precision has one (int8wo)."""
    from exporter.graphs.comparison import ort_session
    from exporter.ort.decoder import reference_check
    from runtime.cache import int8_cache_scales

    reports = {}
    for name in ("decoder", "prompt"):  # the decode graph, and the prompt graph where the precision has one
        spec = manifest.ort_graphs(precision).get(name)
        if spec is None:
            continue
        path = folder / spec.file
        scales = int8_cache_scales(path)
        reports[spec.file.removesuffix(".onnx")] = reference_check(
            ort_session(path), decoder, manifest.model, spec, bound=bound,
            kv_scales=None if scales is None else list(scales.values()))
    return rows_from_report(reports, precision, bound) if reports else []


def _ort_encoder_rows(folder: Path, manifest: Manifest, cases, precision: str, bound: dict, make) -> list[Row]:
    """The --ort-optimized vision / perceiver of `precision` on the same cases as the portable ones."""
    from exporter.graphs.comparison import run_cases

    graphs = {name: spec for name, spec in manifest.ort_graphs(precision).items() if name in ("vision", "perceiver")}
    if not graphs:
        return []
    part, _ = run_cases(folder, graphs, [c for c in cases if c.graph in graphs], bound, session_factory=make)
    return rows_from_report({graphs[g].file.removesuffix(".onnx"): rows for g, rows in part.items()}, precision, bound)


def _file_rows(folder: Path, manifest: Manifest) -> list[Row]:
    """A failing row per file that is missing or whose sha256 differs from the manifest's."""
    from runtime.manifest import sha256_file

    rows = []
    for name, digest in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise CheckError(f"{path}: missing (listed in the manifest)")
        if sha256_file(path) != digest:
            rows.append(Row("digest", "-", name.split(".")[0], "-", name, ok=False, threshold="manifest sha256",
                            note="file changed after export"))
    return rows


def _golden_row(precision: str, note: str) -> Row:
    return Row("golden", precision, "-", "-", "-", ok=False, threshold="recorded in both", note=note)


def _digest_rows(manifest: Manifest, golden_files: dict, precisions: list[str]) -> list[Row]:
    rows = []
    for p in precisions:
        for graph, spec in manifest.graphs_for(p).items():
            for name in filter(None, (spec.file, spec.external_data)):
                if golden_files.get(name) != manifest.files.get(name):
                    rows.append(Row("digest", p, graph, "-", name, ok=False, threshold="same sha256",
                                    note="graph changed since the golden results were recorded: not an accuracy "
                                         "result; re-record with --save-golden if the change is intended"))
    return rows


def _localise_failures(folder, manifest, modules, cases, rows, precision, tolerance) -> dict:
    found = {}
    failed_graphs = {r.graph for r in rows if not r.ok}
    with tempfile.TemporaryDirectory() as tmp:
        for graph in sorted(failed_graphs):
            case = next(c for c in cases if c.graph == graph and any(
                not r.ok and r.case == c.name for r in rows if r.graph == graph))
            reference = reference_onnx(manifest, modules[graph], graph, Path(tmp))
            spec = manifest.graphs_for(precision)[graph]
            hit = localise(folder, spec.file, reference, case.feed, tolerance)
            found[f"{precision}/{graph}"] = hit or {"tensor": None, "note": "no intermediate tensor differs by name"}
    return found
