"""`idefics-generate`: generate text from an export on the command line, streamed as it comes.

    idefics-generate out/ "User:<image>What is in the picture?<end_of_utterance>\\nAssistant:" --image photo.jpg

A thin layer over runtime.Session: the prompt's `<image>` placeholders take the --image files in
order (runtime.prompts.build_prompt), Session.stream prints the new text piece by piece, and
--json prints Session.generate's result instead. A caller's mistake (folder, file, count, setting)
exits 2 with one line on stderr naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from runtime.chat import chat_generation_settings, is_chat_prompt, question_to_prompt
from runtime.console import console_logging, level_for
from runtime.errors import ManifestError, ToolkitError
from runtime.manifest import Manifest
from runtime.prompts import IMAGE_PLACEHOLDER, build_prompt
from runtime.runners import BACKENDS
from runtime.sampling import SamplingConfig
from runtime.session import Session

PROG = "idefics-generate"
PRECISIONS = ("fp32", "fp16", "int8", "int8wo", "int4wo")  # what idefics-export writes (--fp16, --int8, --int8-weight-only, --int4-weight-only)

log = logging.getLogger(PROG)

DESCRIPTION = """\
Generate text with an IDEFICS export (an idefics-export output folder) and print it as it is
produced. A plain question gets IDEFICS's chat template (runtime.chat, as the OpenAI endpoint and
Session(messages=) do): "What is this?" with one --image becomes
"User:<image>What is this?<end_of_utterance>\\nAssistant:", and generation then also stops at
<end_of_utterance> and never emits image tokens. A prompt already in the chat format (it has
"User:", "Assistant:" or <end_of_utterance>) is used unchanged, as is any prompt with --raw.
In the prompt, each <image> marks where an image goes; the --image files
fill the placeholders in order (without placeholders, a question's images go first). In the prompt, the two-character sequences \\n and \\t become a
newline and a tab (shells pass them literally; write \\\\ for a backslash), so the usual IDEFICS
chat layout fits on one line:

  "User:<image>What is in the picture?<end_of_utterance>\\nAssistant:"

Decoding is greedy unless --do-sample; settings mean what they mean in transformers' generate().
Text prompts need the export's processor files (tokenizer.json, tokenizer_config.json,
processor_config.json); an export without them takes token ids through the Python API
(runtime.Session(...).generate(input_ids=...)).
"""

EPILOG = """\
output:
  the new text on stdout, streamed, then a newline; with --json one JSON object instead:
  {"sequences": [[prompt and new token ids]], "prompt_length": N, "texts": [new text],
   "timings": {"vision", "perceiver", "prefill": seconds, "decode": [seconds per token]}}
  errors: one line on stderr and exit status 2

examples:
  idefics-generate out/ "What is in the picture?" --image docs/astronaut.jpg
  idefics-generate out/ "User:<image>Describe this image.<end_of_utterance>\\nAssistant:" --image docs/astronaut.jpg
  idefics-generate out/ "User:<image>and<image>Which is larger?<end_of_utterance>\\nAssistant:" --image a.png --image b.jpg
  idefics-generate out/ "User: Write a haiku.<end_of_utterance>\\nAssistant:" --do-sample --temperature 0.7 --seed 1
  idefics-generate out/ "..." --image photo.jpg --backend tensorrt --device cuda --precision fp16
  idefics-generate out/ "..." --image photo.jpg --json --max-new-tokens 8
"""

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(prompt: str) -> str:
    r"""The two-character sequences \n, \t and \\ -> newline, tab and one backslash; nothing else."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], prompt)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, name: str, check, rule: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, "positive_int", lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, "non_negative_int", lambda v: v >= 0, "0 or more")
positive_float = _number(float, "positive_float", lambda v: v > 0, "> 0")
probability = _number(float, "probability", lambda v: 0 < v <= 1, "in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an idefics-export output folder (holds manifest.json)")
    p.add_argument("prompt", help="the prompt text; each <image> is replaced by the next --image file; "
                                  "\\n and \\t become newline and tab")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                   help="an image file (JPEG, PNG, ... anything Pillow reads) for the next <image> "
                        "placeholder; repeat once per placeholder, in order")
    p.add_argument("--raw", action="store_true",
                   help="use the prompt as it is, without the chat template (a completion prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="most tokens to generate; generation stops earlier at the end-of-sequence token "
                        "(default: 32; prompt plus N must fit the export's --max-seq-len)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="which of the export's graphs to run (default: the fastest the export has for the "
                        "backend and device: int8wo, else int4wo, else fp32 on the CPU; fp16, else int8, else fp32 on a GPU); "
                        "the export must hold that precision")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (default; CPU, or CUDA with onnxruntime-gpu), tensorrt (engines from "
                        "idefics-build-engines, NVIDIA GPU) or torch (the FP32 PyTorch modules, a reference; "
                        "needs the export extra: torch and transformers)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="ONNX Runtime CPU threads per graph (default: ONNX Runtime's choice)")
    p.add_argument("--do-sample", action="store_true",
                   help="sample the next token instead of taking the most likely one (greedy, the default)")
    p.add_argument("--temperature", type=positive_float, default=None, metavar="T",
                   help="with --do-sample: divide the logits by T; below 1 is more conservative (default: 1)")
    p.add_argument("--top-k", type=non_negative_int, default=None, metavar="K",
                   help="with --do-sample: sample among the K most likely tokens; 0 turns it off (default: 50)")
    p.add_argument("--top-p", type=probability, default=None, metavar="P",
                   help="with --do-sample: sample among the most likely tokens whose probabilities add up to "
                        "P (nucleus sampling; default: 1, off)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="with --do-sample: seed of the sampler, so the same seed gives the same text "
                        "(numpy's generator: not the tokens torch would sample)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (sequences, prompt_length, texts, timings) when generation "
                        "ends, instead of streaming the text")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="log what happens on stderr: loading, timings, the libraries' info messages")
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="nothing on stderr but errors (no warnings)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad flag (2, message already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        # records of runtime.* at DEBUG with --verbose; transformers' bars only for the torch backend
        with console_logging(level_for(args.verbose, args.quiet, verbose_level=logging.DEBUG), verbose=args.verbose,
                             quiet=args.quiet, model_bars=args.backend == "torch"):
            return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `idefics-generate ... | head -c 10`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's final flush quiet
        return 0


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_of(args)
        prompt = unescape(args.prompt)
        templated = not args.raw and not is_chat_prompt(prompt)
        if templated:  # a plain question: IDEFICS's chat template, its images first unless placed
            prompt = question_to_prompt(prompt, 0 if IMAGE_PLACEHOLDER in prompt else len(args.image))
        items = prepare(args, prompt)  # every check of the request before a model loads
        session = load_session(args)
    except (ToolkitError, ValueError, TypeError) as exc:
        return fail(exc)
    if templated and session.encoder is not None:  # what a chat turn generates with (runtime.chat)
        settings = {**chat_generation_settings(session.encoder.tokenizer, session.manifest), **settings}
    with session:
        try:
            if args.json:
                start = time.perf_counter()
                result = session.generate(prompts=[items], **settings)
                log.info("%d new tokens in %.2f s", result.new_tokens.shape[1], time.perf_counter() - start)
                print(json.dumps(result_json(result), default=_plain))
                return 0
            return stream(session, items, settings)
        except (ToolkitError, ValueError, TypeError) as exc:
            return fail(exc)


def fail(exc: BaseException) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__  # one line
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    given = {name: value for name, value in sampling.items() if value is not None}
    if given and not args.do_sample:
        log.warning("%s %s only with --do-sample; decoding greedily",
                    ", ".join("--" + name.replace("_", "-") for name in given), "apply" if len(given) > 1 else "applies")
    settings.update(given)
    SamplingConfig.from_kwargs(**settings)  # a bad combination fails here, before anything loads
    return settings


def prepare(args: argparse.Namespace, prompt: str) -> list[Any]:
    """The interleaved prompt, checked against the image files and the export's manifest before any
    model loads: placeholders vs --image, the files, the folder, the processor, the image limit."""
    placeholders, files = prompt.count(IMAGE_PLACEHOLDER), list(args.image)
    if placeholders != len(files):
        raise ValueError(
            f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder{'s' * (placeholders != 1)} but "
            f"{len(files)} --image file{'s were' if len(files) != 1 else ' was'} given "
            f"(one --image FILE per {IMAGE_PLACEHOLDER}, in order)")
    images = [read_image(path) for path in files]
    if not args.export.is_dir():
        raise ManifestError(f"{args.export}: {'not a folder' if args.export.exists() else 'no such folder'}; "
                            "pass an idefics-export output folder")
    manifest = Manifest.load(args.export)
    if not manifest.processor_files:
        raise ToolkitError(
            f"{args.export}: this export has no processor files (tokenizer.json, tokenizer_config.json, "
            "processor_config.json), so a text prompt cannot be tokenized; export a model with a processor, or "
            f"pass token ids through the Python API: Session({str(args.export)!r}).generate(input_ids=..., "
            "pixel_values=..., image_attention_mask=...)")
    items = build_prompt(prompt, images, max_images=manifest.limits.max_images,
                         labels=[f"image file {path}" for path in files])
    return items


def read_image(path: Path) -> bytes:
    if not path.exists():
        raise ValueError(f"image file {path}: no such file")
    if path.is_dir():
        raise ValueError(f"image file {path}: is a folder, not an image")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"image file {path}: cannot be read ({exc.strerror or exc})") from exc


def load_session(args: argparse.Namespace):
    start = time.perf_counter()
    try:
        session = Session(args.export, backend=args.backend, device=args.device, threads=args.threads,
                          precision=args.precision)
    except ImportError as exc:  # the torch backend without torch / transformers
        raise ToolkitError(f"--backend {args.backend} needs a package that is not installed ({exc}); "
                           "for --backend torch: pip install 'idefics-toolkit[export]'") from exc
    log.info("loaded %s (%s, %s, %s) in %.2f s", args.export, session.backend, session.device, session.precision,
             time.perf_counter() - start)
    return session


def stream(session, items: list, settings: dict[str, Any]) -> int:
    start, pieces, shown = time.perf_counter(), session.stream(prompts=[items], **settings), False
    try:
        for piece in pieces:  # the request is checked at the first step: an error comes before any text
            sys.stdout.write(piece)
            sys.stdout.flush()
            shown = True
    except BaseException:
        if shown:  # interrupted mid-text: end the line before the message
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    finally:
        pieces.close()  # frees the request's rows when left early
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.info("generated in %.2f s", time.perf_counter() - start)
    return 0


def result_json(result) -> dict[str, Any]:
    return {"sequences": result.sequences.tolist(), "prompt_length": int(result.prompt_length),
            "texts": result.texts, "timings": result.timings}


def _plain(value: Any):
    """numpy scalars and arrays in timings -> JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if __name__ == "__main__":
    sys.exit(main())
