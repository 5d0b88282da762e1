"""One reduced-precision variant of the three graphs, searched until it meets its bounds.

For each graph: the transform (exporter.precision.transforms) with the nodes kept so far, its rows against
PyTorch (exporter.graphs.validate's cases, exporter.graphs.bounds), and while a row misses, the mixed-precision
search (exporter.precision.mixed) keeps the nodes that cause it. Then, end to end, the decoder's
teacher-forced next-token top-1 agreement with FP32 on real-photo prompts (EndToEnd) must reach
the precision's `top1` bound; while it does not, the search goes on in the graph furthest from
its bounds. FP16 first keeps in FP32 the nodes whose calibration activations come near FP16's
range; INT8 first smooths its activations (exporter.precision.smoothing), alpha chosen on calibration data.
Past the budget, ValidationError lists the misses and the nodes kept, and nothing is written.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from exporter.precision import activations, mixed, smoothing
from exporter.graphs.bounds import describe, excess, measure
from exporter.graphs.comparison import Case, failures, run_cases
from exporter.precision.mixed import Kept, SearchBudget
from exporter.precision.transforms import (BACKENDS, GPTQ_ROWS, INT4_BLOCK, QUANTIZED_OPS, fp16_rule,
                                           gptq_int8_qdq, int4_calibrate, int8_targets, to_fp16,
                                           to_int4_weight_only, to_int8, to_int8_weight_only, unquantize,
                                           weight_nodes)
from runtime.errors import ValidationError
from runtime.manifest import GraphSpec, Manifest, Variant

log = logging.getLogger(__name__)

DRAWS = 4  # nudged reads of each reduced precision once its search ends (Agreement)
NUDGE = 1e-7  # relative: below FP32's rounding of most pixels, as another CPU's SGEMM differs


QUESTIONS = ("Describe this image.", "What is in the picture?", "What colours do you see?", "Where was this taken?")


# ---------------------------------------------------------------- end to end
class EndToEnd:
    """Teacher-forced next-token top-1 agreement with the FP32 graphs (runtime.compare's measure):
    FP32 generates `tokens` greedy tokens for `prompts` real-photo prompts; a variant's decoder,
    fed its own vision and perceiver outputs, reads that same sequence and its argmax at each
    generated position is compared with FP32's. The prompts run in requests of at most the
    export's max_batch rows, so an export for one row is judged on as many prompts as any."""

    def __init__(self, folder: Path, manifest: Manifest, prompts: int = 8, tokens: int = 32,
                 reference: Path | None = None):
        """`reference`: a file `save_reference` wrote for this export (the FP32 tokens and argmax, which
        need no re-measuring where only the reduced precisions' CPU differs: an emulated one runs them
        hours slower). Without it they are generated here, and `feeds` made for the search."""
        from runtime.compare import teacher_forced_logits
        from runtime.loop import Timings, generate_tokens
        from runtime.sampling import SamplingConfig

        self.folder, self.manifest, self.tokens = folder, manifest, tokens
        self._runners: dict[str, tuple] = {}
        self._teacher_forced = teacher_forced_logits
        self.requests, whole = _requests(folder, manifest, prompts)
        if reference is not None:
            self._load_reference(Path(reference))
            self.feeds = None  # the search's: an export never reads a saved reference
            return
        reference = self._chain(manifest.graphs)
        cfg = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens)
        self.sequences = []
        for request in self.requests:
            generated = np.stack([s.tokens for s in generate_tokens(reference.graphs, request, cfg, Timings())], 1)
            self.sequences.append(np.concatenate([request.input_ids, generated], axis=1))
        self.reference = [self._argmax(reference, r, s) for r, s in zip(self.requests, self.sequences)]
        self.feeds = self._graph_feeds(reference, whole)
        self._release(set())  # the FP32 sessions are loaded again only if a measure needs them

    @property
    def prompts(self) -> int:
        return sum(r.input_ids.shape[0] for r in self.requests)

    def save_reference(self, path: Path) -> None:
        """Write FP32's tokens and teacher-forced argmax, keyed to this export's FP32 decoder and
        these prompts, for EndToEnd(reference=path) on another CPU."""
        np.savez(path, decoder_sha256=self._decoder_digest(), tokens=self.tokens,
                 **{f"prompt_{i}": r.input_ids for i, r in enumerate(self.requests)},
                 **{f"sequence_{i}": s for i, s in enumerate(self.sequences)},
                 **{f"argmax_{i}": a for i, a in enumerate(self.reference)})

    def _decoder_digest(self) -> str:
        return self.manifest.files.get(self.manifest.graphs["decoder"].file, "")

    def _load_reference(self, path: Path) -> None:
        from runtime.errors import ManifestError

        try:
            saved = np.load(path)
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: not a saved end-to-end reference ({exc})") from exc
        with saved:
            wrong = []
            if str(saved["decoder_sha256"]) != self._decoder_digest():
                wrong.append("it was measured on another export's FP32 decoder (sha256 differs)")
            if int(saved["tokens"]) != self.tokens:
                wrong.append(f"it holds {int(saved['tokens'])} tokens per prompt, not {self.tokens}")
            prompts = [k for k in saved.files if k.startswith("prompt_")]
            if len(prompts) != len(self.requests) or any(
                    not np.array_equal(saved[f"prompt_{i}"], r.input_ids) for i, r in enumerate(self.requests)):
                wrong.append("its prompts are not the ones this export's measure encodes")
            if wrong:
                raise ManifestError(f"{path}: cannot serve as {self.folder}'s reference: {'; '.join(wrong)}")
            self.sequences = [saved[f"sequence_{i}"] for i in range(len(self.requests))]
            self.reference = [saved[f"argmax_{i}"] for i in range(len(self.requests))]

    def _argmax(self, chain, request, sequences) -> np.ndarray:
        return self._teacher_forced(chain, request, sequences, self.tokens).argmax(-1)

    def _graph_feeds(self, reference, req) -> dict[str, dict[str, np.ndarray]]:
        """Each graph's FP32 input on all the prompts in one batch `req` (the decoder's: the
        teacher-forced prefill of FP32's tokens), for localising what costs top-1. One batch past
        max_batch is fine here: these feeds go to the ONNX graphs alone, whose batch axis is dynamic."""
        from runtime.loop import Timings, encode_images, prefill_feed

        generated = np.concatenate([s[:, -self.tokens:] for s in self.sequences])
        g, sequences = reference.graphs, np.concatenate([req.input_ids, generated], axis=1)
        b, total = sequences.shape
        prompt = req.input_ids.shape[1]
        mask = np.concatenate([req.attention_mask, np.ones((b, total - prompt), np.int64)], axis=1)
        image_mask = np.concatenate([req.image_attention_mask,
                                     np.repeat(req.image_attention_mask[:, -1:], total - prompt, axis=1)], axis=1)
        feeds = {"decoder": prefill_feed(g, np.ascontiguousarray(sequences[:, :-1]), mask[:, :-1],
                                         image_mask[:, :-1], encode_images(g, req, Timings()), keep=self.tokens)}
        if req.pixel_values is not None:
            pixels = req.pixel_values.reshape(-1, *req.pixel_values.shape[2:])
            hidden = g.run(g.vision, {"pixel_values": pixels})["image_hidden_states"]
            feeds["vision"] = {"pixel_values": pixels}
            feeds["perceiver"] = {"image_hidden_states": hidden.reshape(b, -1, *hidden.shape[1:])}
        return {name: {k: np.asarray(v) for k, v in feed.items()} for name, feed in feeds.items()}

    def _chain(self, graphs: dict[str, GraphSpec]):
        from runtime.loop import Graphs
        from runtime.runners.onnxruntime import OnnxRuntimeRunner

        self._release({spec.file for spec in graphs.values()})  # before loading: one decoder in memory at a time
        runners = {}
        for name, spec in graphs.items():
            path = self.folder / spec.file
            stat = path.stat()
            key = (spec.file, stat.st_mtime_ns, stat.st_size)  # the search rewrites a graph in place
            if self._runners.get(spec.file, (None,))[0] != key:
                runner = OnnxRuntimeRunner(spec, path)
                runner.activate()
                self._runners[spec.file] = (key, runner)
            runners[name] = self._runners[spec.file][1]
        return _Chain(Graphs(self.manifest, runners))

    def _release(self, keep: set[str]) -> None:
        """Close the cached sessions of graph files not in `keep` (a 9B-wide decoder's is 5 GB)."""
        for file in [f for f in self._runners if f not in keep]:
            self._runners.pop(file)[1].deactivate()

    def top1(self, graphs: dict[str, GraphSpec]) -> float:
        return self.read(graphs)

    def agreement(self, graphs: dict[str, GraphSpec], draws: int = DRAWS) -> Agreement:
        """Top-1 of `graphs` on the prompts as they are, and in `draws` reads nudged as another CPU's
        rounding nudges them (`logits`; see Agreement)."""
        return Agreement(self.read(graphs), tuple(self.read(graphs, d) for d in range(1, draws + 1)))

    def read(self, graphs: dict[str, GraphSpec], draw: int = 0) -> float:
        """Top-1 of one read: the share of generated positions where `graphs`' argmax is FP32's."""
        agree = []
        for i, (logits, ref) in enumerate(zip(self.logits(graphs, draw), self.reference)):
            agree.append((logits.argmax(-1) == ref).ravel())
            log.debug("top-1 of %s%s: request %d/%d read, %.1f%% so far", graphs["decoder"].file,
                      f" (draw {draw})" if draw else "", i + 1, len(self.requests), 100 * np.mean(np.concatenate(agree)))
        return float(np.mean(np.concatenate(agree)))

    def logits(self, graphs: dict[str, GraphSpec], draw: int = 0):
        """Each request's teacher-forced logits [B, tokens, V] through `graphs`, one at a time. Draw 0:
        as they are. Draw d > 0: the photos' pixels and the FP32 tensors that pass between the graphs
        (the vision encoder's and the perceiver's outputs) are multiplied by 1 + NUDGE x N(0, 1),
        seeded by d: last-bit changes, as another CPU's kernels round the FP32 arithmetic feeding them."""
        chain = self._chain(graphs)
        rng = np.random.default_rng(draw)
        if draw:
            chain = _Chain(_Nudged(chain.graphs, rng))
        for request, sequences in zip(self.requests, self.sequences):
            if draw and request.pixel_values is not None:
                request = replace(request, pixel_values=_nudge(request.pixel_values, rng))
            yield self._teacher_forced(chain, request, sequences, self.tokens)


def _nudge(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if values.dtype != np.float32:  # an FP16 tensor: a 1e-7 nudge is below its rounding
        return values
    return (values * (1 + NUDGE * rng.standard_normal(values.shape, dtype=np.float32))).astype(np.float32)


class _Nudged:
    """runtime.loop.Graphs whose vision and perceiver outputs come out nudged (EndToEnd.logits)."""

    def __init__(self, graphs, rng: np.random.Generator):
        self._graphs, self._rng = graphs, rng

    def __getattr__(self, name):
        return getattr(self._graphs, name)

    def run(self, runner, inputs: dict) -> dict:
        outputs = self._graphs.run(runner, inputs)
        if runner is self._graphs.vision or runner is self._graphs.perceiver:
            outputs = {k: _nudge(np.asarray(v), self._rng) for k, v in outputs.items()}
        return outputs


@dataclass(frozen=True)
class Agreement:
    """A variant's teacher-forced top-1 against FP32: on the prompts as they are (`top1`), and on the
    nudged draws (`draws`).

    Why the draws. Another CPU computes the FP32 parts of an INT8 graph with other SGEMM kernels,
    which round differently in the last bit (measured on random:medium: the FP32 graphs' logits
    move by 2e-6 between this VNNI CPU and an emulated AVX2 one). Every activation that lies within
    that of a quantization step's boundary rounds to the other step there, a whole step, and the
    layers after carry it on: the INT8 graphs' logits moved by 0.05 (9 % of their rms), as much
    as INT8's own error at the positions it gets wrong, and 6 of 32 positions changed their top-1.
    Moving the pixels by 1e-7 does the same on one CPU (logits moved by 0.05, 4-5 of those 32
    flipped); `EndToEnd.logits` also nudges the FP32 tensors passed between the graphs. So the
    draws show the spread of the figure an export gives on the CPUs it may be served on: on
    random:medium 94.1-96.1 % over 8 draws for an export whose read as it is gave 95.3 %. (How far
    a nudge reaches depends on the graphs: on the embedded default's INT8 export it moved the
    logits by 2e-6 only, as FP32's, and the draws equal the read as it is.)

    The search answers to the lowest of the read as it is and the DRAWS nudged reads (`lowest`):
    one read is one draw from the spread, and a search that stops at the first read past the bound
    leaves the others below it. Measured on random:medium with GPTQ-rounded INT8 weights: stopping at
    the read as it is gave 96.1 % there and 94.1-94.5 % in the 4 nudged reads. (Before GPTQ,
    INT8 started 4 points lower, and the lowest of 5 reads did not reach 95 % in 16 rounds.)"""

    top1: float
    draws: tuple[float, ...] = ()

    @property
    def lowest(self) -> float:
        return min((self.top1, *self.draws))

    def describe(self) -> str:
        if not self.draws:
            return f"{self.top1:.1%}"
        return (f"{self.lowest:.1%}, the lowest of {1 + len(self.draws)} reads: {self.top1:.1%} as it is, "
                f"{min(self.draws):.1%}-{max(self.draws):.1%} nudged")


@dataclass
class _Chain:
    graphs: object  # runtime.loop.Graphs: what runtime.compare reads of a Session


def _requests(folder: Path, manifest: Manifest, n: int) -> tuple[list, object]:
    """`n` prompts on the built-in photos (with the export's processor, else seeded random tokens),
    encoded once: as requests of at most max_batch rows (check_request's limit; each request's rows
    sliced from the whole, less the left padding they all share), and all in one request."""
    from calibration.images import builtin_images, synthetic_prompts
    from runtime.loop import left_padding
    from runtime.session import check_request

    photos = builtin_images(n)
    if manifest.processor_files:
        from runtime.prompts import PromptEncoder

        prompts = [["User:", photos[i], f"{QUESTIONS[i % 4]}<end_of_utterance>\nAssistant:"] for i in range(n)]
        enc = PromptEncoder(folder).encode(prompts)
        arrays = (enc.input_ids, enc.attention_mask, enc.pixel_values, enc.image_attention_mask)
    else:
        info = manifest.model
        arrays = synthetic_prompts([[photo] for photo in photos], info.image_size,
                                   info.vocab_size - len(info.image_token_ids))
    whole = check_request(replace(manifest, limits=replace(manifest.limits, max_batch=n)), *arrays)
    requests = []
    for start in range(0, n, manifest.limits.max_batch):
        rows = slice(start, start + manifest.limits.max_batch)
        first = int(left_padding(whole.attention_mask[rows]).min())
        requests.append(check_request(manifest, whole.input_ids[rows, first:], whole.attention_mask[rows, first:],
                                      whole.pixel_values[rows], whole.image_attention_mask[rows, first:]))
    return requests, whole


# ---------------------------------------------------------------- one graph's plan
@dataclass
class Plan:
    """How to build one graph of the variant with a set of nodes kept, and what to measure it by."""

    name: str
    build: Callable[[set[str]], tuple]  # keep -> (ModelProto, GraphSpec, nodes at higher precision)
    reference: object  # the FP32 ModelProto whose tensors the reduced graph's are compared with
    candidates: set[str]  # nodes the search may keep
    weight_ops: set[str]
    rule: list[Kept] = field(default_factory=list)
    kept: dict[str, Kept] = field(default_factory=dict)  # overflow and accuracy, in order
    model: object = None  # the last build
    spec: GraphSpec | None = None
    higher: list[str] = field(default_factory=list)
    reference_path: Path | None = None  # the FP32 graph's file: localisation reads its tensors through it

    @property
    def searched(self) -> int:
        return sum(k.reason == "accuracy" for k in self.kept.values())

    def rebuild(self) -> None:
        self.model, self.spec, self.higher = self.build(set(self.kept))

    def kept_table(self) -> list[dict]:
        return [k.to_dict() for k in (*self.rule, *self.kept.values())]


def fp16_candidates(model, absmax: dict[str, float], rule: list[str] | None = None) -> set[str]:
    """The nodes an FP16 graph may keep in FP32 beyond the rule (fp16_rule): those with a measured
    output, Constants aside."""
    ruled = set(fp16_rule(model) if rule is None else rule)
    return {n.name for n in model.graph.node if n.name not in ruled and n.op_type != "Constant"
            and any(o in absmax for o in n.output)}


def fp16_plan(name: str, model, spec: GraphSpec, absmax: dict[str, float], fraction: float) -> Plan:
    """`model`: the FP32 ModelProto, or the path of its graph file. From a path only the structure
    stays in memory, each build reads the weights afresh and converts them in place, and the search
    localises through the file: the FP32 weights are held once, only while a build converts them."""
    import onnx

    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is not None:
        model = onnx.load(str(path), load_external_data=False)
    rule = fp16_rule(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    candidates = fp16_candidates(model, absmax, rule)

    def build(keep: set[str]):
        converted, new_spec, higher = to_fp16(model if path is None else onnx.load(str(path)), spec, sorted(keep))
        return converted, new_spec, higher

    plan = Plan(name, build, model, candidates, set(weight_nodes(model)),
                rule=[Kept(n, ops[n], "rule", _rule_detail(ops[n])) for n in rule], reference_path=path)
    for kept in mixed.overflow_nodes(model, absmax, candidates, fraction,
                                     base_dir=None if path is None else str(path.parent)):
        plan.kept[kept.node] = kept
    return plan


def _rule_detail(op: str) -> str:
    if op in ("Softmax", "Add"):
        return "softmax and its mask stay FP32"
    if op in ("Cos", "Sin", "Where", "Range", "CumSum"):
        return "rotary angles and masks stay FP32"
    return "reductions and norms stay FP32"


def int8_plan(name: str, src: Path, spec: GraphSpec, feeds: list[dict], scratch: Path, score: Callable,
              mean_bound: float, alphas=smoothing.ALPHAS, gptq_max_bytes: int | None = None):
    """Smooth (or not), quantize, then re-round the INT8 weights by GPTQ at their scales
    (transforms.gptq_int8_qdq; MatMuls whose GPTQ would hold more than `gptq_max_bytes` keep
    nearest rounding); returns (Plan, smoothing summary). alpha is the value whose quantized graph
    is furthest inside its bounds on both the calibration feeds (the worst output's mean|err|
    against FP32, in units of the bound) and the export's validation cases (`score`: (ModelProto,
    GraphSpec) -> worst excess): calibration alone overfits its own prompts."""
    import onnx

    model = onnx.load(str(src))
    targets = int8_targets(model)
    found = smoothing.groups(model, targets)
    _, channel_max = activations.statistics(model, feeds, {g.activation for g in found})
    fp32_outputs = _outputs(model, feeds)
    best, trials = None, {}
    for alpha in (None, *alphas):
        smoothed, record = (model, smoothing.Smoothing(None)) if alpha is None else \
            smoothing.smooth(model, found, channel_max, alpha)
        path = scratch / f"{name}.smoothed-{alpha}.onnx"
        _save(smoothed, path)
        trial_path = scratch / f"{name}.int8-{alpha}.onnx"
        new_spec, higher = to_int8(path, trial_path, spec, feeds, targets)
        trial = onnx.load(str(trial_path))
        reads = {n.name: n.input[0] for n in smoothed.graph.node if n.input}
        rows = activations.matmul_inputs(smoothed, feeds, {reads[n] for n in targets if n in reads}, rows=GPTQ_ROWS)
        refit = gptq_int8_qdq(trial, smoothed, rows, gptq_max_bytes)
        del rows
        calibration = _calibration_error(trial, feeds, fp32_outputs) / mean_bound
        value = max(calibration, score(trial, new_spec))
        trials[str(alpha)] = round(value, 4)
        log.debug("%s int8, smoothing alpha %s: calibration %.4g, with validation %.4g; GPTQ %s", name, alpha,
                  calibration, value, refit)
        if best is None or value < best[0]:
            best = (value, smoothed, record, trial, new_spec, higher, refit)
    value, smoothed, record, quantized, new_spec, higher, refit = best
    ops = {n.name: n.op_type for n in smoothed.graph.node}

    def build(keep: set[str]):
        return unquantize(quantized, smoothed, keep), new_spec, sorted({*higher, *keep})

    others = [n.name for n in smoothed.graph.node if n.op_type in QUANTIZED_OPS and n.name not in targets]
    weights = set(weight_nodes(smoothed))
    rule = [Kept(n, ops[n], "rule", "lm_head (logits)" if n in weights else "activation x activation") for n in others]
    summary = {**record.summary(), "tried": trials, "gptq": refit}
    return Plan(name, build, smoothed, set(targets), weights, rule=rule), summary


def _save(model, path: Path) -> None:
    """Save a scratch graph, its weights beside it when the protobuf would pass 2 GB."""
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > 1 << 30
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data")


def _outputs(model, feeds) -> list[list[np.ndarray]]:
    import tempfile

    from exporter.graphs.comparison import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        _save(model, path)
        session = ort_session(path)
        return [session.run(None, activations.cast_feed(session, feed)) for feed in feeds]


def _calibration_error(model, feeds, expected) -> float:
    """The worst output's mean|err| / rms against FP32, averaged over the calibration feeds."""
    got = _outputs(model, feeds)
    return float(np.mean([max(measure(r, g)["mean_rel"] for r, g in zip(ref, out)) for ref, out in zip(expected, got)]))


def int8wo_plan(name: str, model, spec: GraphSpec) -> Plan:
    def build(keep: set[str]):
        return to_int8_weight_only(model, spec)

    return Plan(name, build, model, set(), set())  # MatMulNBits renames nodes: no search (yet)


def int4wo_plan(name: str, model, spec: GraphSpec, feeds: list[dict] | None, score: Callable, mean_bound: float):
    """4-bit MatMulNBits, with AWQ (per-MatMul input-channel scales and per-block clipping searched
    on the calibration activations, transforms.awq_search) or plain rounding: whichever graph is
    further inside its bounds on both the calibration feeds and the validation cases (`score`),
    as int8_plan chooses SmoothQuant's alpha. The search may keep any weight MatMul at the higher
    precision, here 8-bit MatMulNBits (MatMulNBits keeps its MatMul's name). Returns (Plan, AWQ summary)."""
    from exporter.precision import activations

    targets = [n for n in weight_nodes(model, ("MatMul",))]
    options: dict[str, dict | None] = {"plain": None}
    if feeds:
        wanted = set(targets)
        rows = activations.matmul_inputs(model, feeds, {n.input[0] for n in model.graph.node if n.name in wanted},
                                         rows=GPTQ_ROWS)
        options["awq"] = int4_calibrate(model, rows, targets)
        del rows
    fp32_outputs = _outputs(model, feeds) if feeds else None
    best, trials = None, {}
    for option, calibrated in options.items():
        trial, new_spec, _ = to_int4_weight_only(model, spec, calibrated=calibrated)
        calibration = _calibration_error(trial, feeds, fp32_outputs) / mean_bound if feeds else 0.0
        value = max(calibration, score(trial, new_spec))
        trials[option] = round(value, 4)
        log.debug("%s int4wo, %s: %.4g", name, option, value)
        if best is None or value < best[0]:
            best = (value, option, calibrated)
    _, option, calibrated = best

    def build(keep: set[str]):
        return to_int4_weight_only(model, spec, keep, calibrated)

    ops = {n.name: n.op_type for n in model.graph.node}
    rule = [Kept(n, ops[n], "rule", "not a MatMul with a 2-D weight") for n in weight_nodes(model) if n not in targets]
    summary = {"method": "per MatMul, AWQ (input-channel scales mean|x|^alpha, per-block clipping) or GPTQ, "
                         "whichever has the smaller held-out error on the calibration activations"
                         if option == "awq" else "plain rounding",
               "per_matmul": {} if calibrated is None else
               dict(Counter(v["method"] for v in calibrated.values())),
               "gptq": sorted(n for n, v in (calibrated or {}).items() if v["method"] == "gptq"),
               "chosen": option, "tried": trials, "bits": 4, "block_size": INT4_BLOCK}
    return Plan(name, build, model, set(targets), set(weight_nodes(model)), rule=rule), summary


# ---------------------------------------------------------------- the search
@dataclass
class Search:
    precision: str
    bound: dict
    budget: SearchBudget
    cases: list[Case]
    write: Callable  # (ModelProto, GraphSpec) -> GraphSpec as written in the export folder
    folder: Path
    rounds: int = 0
    history: list[str] = field(default_factory=list)

    def graph_rows(self, plan: Plan) -> dict:
        plan.rebuild()
        plan.spec = self.write(plan.model, plan.spec)
        report, _ = run_cases(self.folder, {plan.name: plan.spec}, [c for c in self.cases if c.graph == plan.name],
                              self.bound)
        return report

    def fit(self, plan: Plan) -> dict:
        """Rows of `plan`'s graph once it meets its bounds; ValidationError past the budget."""
        report = self.graph_rows(plan)
        while failures(report, self.bound):
            if not self.step(plan, *self.case_feed(plan, report), "missed its bounds"):
                raise self.error(report, [plan], failures(report, self.bound))
            report = self.graph_rows(plan)
        return report

    def step(self, plan: Plan, feed: dict[str, np.ndarray], where: str, why: str) -> bool:
        """One round: localise on `feed` and keep the culprits of the largest gains; False when the
        budget is spent or nothing is left to keep."""
        room = self.budget.nodes - plan.searched
        if self.rounds >= self.budget.rounds or room <= 0 or not plan.candidates:
            return False
        ref = activations.intermediates(plan.reference_path or plan.reference, feed)
        got = activations.intermediates(plan.model, feed)
        blames = mixed.rank(plan.model, ref, got, plan.candidates, plan.weight_ops, self.bound)
        picked = mixed.choose(blames, set(plan.kept), room, self.budget.per_round)
        if not picked:
            return False
        self.rounds += 1
        ops = {n.name: n.op_type for n in plan.reference.graph.node}
        for blame, nodes in picked:
            for node in nodes:
                at = "" if node == blame.node else f" at {blame.op} {blame.node}"
                plan.kept[node] = Kept(node, ops.get(node, "?"), "accuracy",
                                       f"round {self.rounds}: adds {_gain(blame.gain)} the bound{at} ({where})")
        self.history.append(f"round {self.rounds}: {plan.name} keeps {sum(len(n) for _, n in picked)} node(s) ({why})")
        log.info("%s %s", self.precision, self.history[-1])
        return True

    def case_feed(self, plan: Plan, report: dict) -> tuple[dict, str]:
        name, _ = worst_case(report[plan.name], self.bound)
        case = next(c for c in self.cases if c.graph == plan.name and c.name == name)
        return case.feed, f"case {name}"

    def excess(self, plan_name: str, model, spec: GraphSpec) -> float:
        """Worst excess over a graph's validation cases of `model` (written in place of the variant)."""
        written = self.write(model, spec)
        report, _ = run_cases(self.folder, {plan_name: written}, [c for c in self.cases if c.graph == plan_name],
                              self.bound)
        return worst_case(report[plan_name], self.bound)[1]

    def error(self, report: dict, plans: list[Plan], failed: list[str]) -> ValidationError:
        kept = ", ".join(f"{p.name} {p.searched}" for p in plans)
        spent = (f"{self.rounds} of {self.budget.rounds} rounds; nodes kept of at most {self.budget.nodes} "
                 f"per graph: {kept}")
        table = mixed.format_kept({p.name: p.kept_table() for p in plans})
        return ValidationError(
            f"{len(failed)} {self.precision} result(s) miss their bounds ({describe(self.bound)}, "
            f"top-1 >= {self.bound['top1']}) after the mixed-precision search ({spent}):\n  "
            + "\n  ".join(failed) + f"\nnodes kept at higher precision:\n{table}\n"
            "widen the bounds with --tolerances FILE or the budget with --search-rounds / --search-nodes",
            report)


def _gain(gain: float) -> str:
    return "non-finite values to" if np.isinf(gain) else f"{gain:.2g}x"


def worst_case(cases: dict, bound: dict) -> tuple[str, float]:
    """(case, excess) of a graph's case furthest from its bound."""
    scored = [(max(excess(row, bound) for row in outputs.values()), name) for name, outputs in cases.items()]
    value, name = max(scored)
    return name, value


def make_variant(precision: str, folder: Path, manifest: Manifest, cases: list[Case], bound: dict,
                 budget: SearchBudget, write: Callable, feeds: dict | None, end_to_end: EndToEnd | None,
                 bar=None, fp16_fraction: float = mixed.OVERFLOW_FRACTION, calibration: dict | None = None) -> Variant:
    import onnx

    plans: dict[str, Plan] = {}
    notes: dict = {}
    search = Search(precision, bound, budget, cases, write, folder)
    scratch = folder / f".{precision}-scratch"
    scratch.mkdir()
    try:
        for name, spec in manifest.graphs.items():
            if bar is not None:
                bar.set_postfix_str(f"{precision} {name}")
            if precision == "fp16":
                path = folder / spec.file  # by path: a graph past 2 GB is never copied in memory
                absmax, _ = activations.statistics(path, feeds[name]) if feeds else ({}, {})
                plans[name] = fp16_plan(name, path, spec, absmax, fp16_fraction)
            elif precision == "int8":
                plans[name], notes[name] = int8_plan(name, folder / spec.file, spec, feeds[name], scratch,
                                                     lambda m, s, n=name: search.excess(n, m, s), bound["mean_rel"])
            elif precision == "int4wo":
                plans[name], notes[name] = int4wo_plan(name, onnx.load(str(folder / spec.file)), spec,
                                                       (feeds or {}).get(name),
                                                       lambda m, s, n=name: search.excess(n, m, s), bound["mean_rel"])
            else:
                plans[name] = int8wo_plan(name, onnx.load(str(folder / spec.file)), spec)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_postfix_str(f"measuring {precision} accuracy")
        report = {}
        for name, plan in plans.items():
            report.update(search.fit(plan))
        agreement = None if end_to_end is None else _fit_top1(search, plans, report, manifest, end_to_end)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if bar is not None:
        bar.update(1)
    return Variant(
        precision=precision, graphs={n: p.spec for n, p in plans.items()},
        high_precision_nodes={n: sorted(p.higher) for n, p in plans.items()},
        calibration={**(calibration or {}),
                     **({"awq" if precision == "int4wo" else "smoothing": notes} if notes else {})},
        accuracy=report, backends=BACKENDS[precision],
        kept_nodes={n: p.kept_table() for n, p in plans.items()},
        search={"budget": {"rounds": budget.rounds, "nodes": budget.nodes, "per_round": budget.per_round},
                "rounds": search.rounds, "history": search.history, "bound": dict(bound),
                "top1": None if agreement is None else agreement.top1,
                "top1_draws": None if agreement is None else list(agreement.draws),  # the spread over CPUs
                "top1_prompts": None if end_to_end is None else end_to_end.prompts,
                "top1_tokens": None if end_to_end is None else end_to_end.tokens},
    )


def _fit_top1(search: Search, plans: dict[str, Plan], report: dict, manifest: Manifest,
              end_to_end: EndToEnd) -> Agreement:
    """Search until the end-to-end top-1 meets its bound in every read, as it is and DRAWS more
    with the photos nudged (Agreement.lowest: the figure's spread over CPUs), in the graph whose
    reduced precision alone (the others FP32) costs the most top-1, localised on the prompts' own
    inputs to that graph."""
    bound = search.bound["top1"]
    agreement = end_to_end.agreement({n: p.spec for n, p in plans.items()})
    searchable = [p for p in plans.values() if p.candidates and p.name in end_to_end.feeds]
    alone: dict[str, float] = {}  # top-1 with only this graph reduced; changes only when the graph does

    def measure_alone(plan: Plan) -> None:
        alone[plan.name] = end_to_end.top1({**manifest.graphs, plan.name: plan.spec}) if len(searchable) > 1 else 0.0

    while agreement.lowest < bound:
        why = f"end-to-end top-1 {agreement.describe()} < {bound:.0%}"
        for plan in searchable:
            if plan.name not in alone:
                measure_alone(plan)
        for plan in sorted(searchable, key=lambda p: alone[p.name]):
            if search.step(plan, end_to_end.feeds[plan.name], "top-1 prompts",
                           f"{why}; {alone[plan.name]:.1%} with only {plan.name} reduced"):
                report.update(search.fit(plan))
                alone.pop(plan.name)
                break
        else:
            failed = [f"end to end: teacher-forced top-1 agreement with FP32 {agreement.describe()} (min "
                      f"{bound:.0%} in each, {end_to_end.prompts} prompts x {end_to_end.tokens} tokens)"]
            raise search.error(report, list(plans.values()), failed)
        agreement = end_to_end.agreement({n: p.spec for n, p in plans.items()})
    return agreement
