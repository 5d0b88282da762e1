"""The documentation: README.md and the MkDocs site under docs/.

- `mkdocs build --strict` passes (mkdocs.yml makes a dead link or anchor, or a page missing from
  the nav, a warning, and --strict turns warnings into a failure).
- Every fenced code block in README.md and docs/*.md runs as written, or says why it cannot. The rule:
    * ```text blocks are listings, diagrams and output: never run;
    * ```bash and ```python blocks run as written, unless the line right above the fence is
        <!-- not run here: REASON -->            the block is not run, for REASON (a GPU, the hub,
                                                  a server in the foreground, hours of work...);
        <!-- run from "TEXT": REASON -->          only the block from TEXT on runs (e.g. the README's
                                                  fresh-machine command after its venv and pip set-up);
      a marker without a reason fails, and so does a fence in any other language (or none);
    * each document's blocks run in order in a scratch folder of their own, as a reader would run
      them from a checkout's root: `docs/` and `scripts/` are there (links to the checkout's), and
      whatever an earlier block made (`out/` from `idefics-export out/`...). bash blocks run with
      `set -e`; python blocks each in a fresh interpreter. The console scripts are this checkout's
      (pyproject.toml's [project.scripts]), whatever the environment has installed;
    * a block that is not run is still checked: an `idefics-*` command's long flags must appear in
      its `--help`, a `python scripts/X.py` command's in X.py or its `--help`, and a Python block
      must parse, with every keyword of a `Session(...)` call one that `Session` takes.
- The README: at most 250 lines, its test command is `.ci/run`'s verbatim, its links and anchors
  into docs/ resolve.
- docs/readme-tables.md: each table the README held before the site (the list there) is still in
  the page section the list names, with at least as many rows.
- No figure (number) of the README before the site (commit 5bd983b) is missing from README.md and
  docs/ (skipped where git or that commit is not at hand).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
OLD_README_COMMIT = "5bd983b"  # the last README before the documentation site
BLOCK_TIMEOUT = 300

FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run here:(.*?)-->\s*$")
RUN_FROM = re.compile(r'^<!--\s*run from "([^"]+)":(.*?)-->\s*$')
ANY_MARKER = re.compile(r"^<!--\s*(not run|run from)\b")


# ------------------------------------------------------------------ reading the documents
@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None = None  # the reason
    run_from: str | None = None

    def __str__(self):
        return f"{self.document}:{self.line} ({self.language})"


def blocks(document: str) -> list[Block]:
    lines = (REPO / document).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, end = i, i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{document}:{start + 1}: a fence that never closes")
        block = Block(document, start + 1, match.group(1), "\n".join(lines[start + 1:end]) + "\n")
        above = lines[start - 1].strip() if start else ""
        if ANY_MARKER.match(above):
            not_run, run_from = NOT_RUN.match(above), RUN_FROM.match(above)
            reason = (not_run or run_from).group(1 if not_run else 2).strip() if (not_run or run_from) else ""
            if len(reason.split()) < 3:
                raise AssertionError(f"{block}: the marker above it gives no reason: {above!r}")
            if not_run:
                block.not_run = reason
            else:
                block.run_from = run_from.group(1)
                if block.run_from not in block.code:
                    raise AssertionError(f"{block}: run from {block.run_from!r}, which it does not contain")
        found.append(block)
        i = end + 1
    return found


def slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"[`*]", "", heading), "-")


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, anchor) of every heading outside code blocks."""
    found, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6})\s+(.*?)\s*$", line)):
            found.append((i, len(m.group(1)), slug(m.group(2))))
    return found


def table_cells(row: str) -> list[str]:
    return [c.strip().replace("`", "").replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def tables(text: str) -> list[tuple[int, list[str], int]]:
    """(line index, header cells without markup, data rows) of every table."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s|:-]+\|\s*$", lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            found.append((i, table_cells(lines[i]), end - i - 2))
            i = end
        else:
            i += 1
    return found


# ------------------------------------------------------------------ running them
@cache
def console_scripts() -> dict[str, str]:
    """name -> "module:function", from pyproject.toml's [project.scripts]."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", text, re.S | re.M).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    """A bin folder with this checkout's console scripts and `python`: this interpreter."""
    folder = tmp_path_factory.mktemp("bin")
    for name, target in console_scripts().items():
        module, function = target.split(":")
        code = f"import sys; from {module} import {function} as main; sys.argv[0] = {name!r}; sys.exit(main())"
        (folder / name).write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} \"$@\"\n")
        (folder / name).chmod(0o755)
    (folder / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (folder / "python").chmod(0o755)
    return folder


def environment(shims: Path) -> dict[str, str]:
    env = dict(os.environ)  # IDEFICS_TOOLKIT_CACHE and HF_HUB_OFFLINE come from conftest.py
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["NO_MKDOCS_2_WARNING"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_block(block: Block, folder: Path, env: dict[str, str]) -> None:
    code = block.code[block.code.index(block.run_from):] if block.run_from else block.code
    if block.language == "bash":
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block} ran past {BLOCK_TIMEOUT} s:\n{code}\n{exc.stdout or ''}{exc.stderr or ''}")
    if done.returncode:
        pytest.fail(f"{block} exited {done.returncode}:\n{code}\n--- stdout\n{done.stdout[-4000:]}\n"
                    f"--- stderr\n{done.stderr[-6000:]}")


def commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block: continuations joined, comments dropped, split at && ; |."""
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for word in words:
            if word in ("&&", "||", ";", "|"):
                found.append(current)
                current = []
            else:
                current.append(word)
        found.append(current)
    return [c for c in found if c]


@cache
def help_text(*command: str) -> str:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=environment(Path(command[0]).parent) if "/" in command[0] else None).stdout


def check_flags(block: Block, shims: Path) -> None:
    for words in commands(block.code):
        flags = sorted({w.split("=")[0] for w in words[1:] if re.match(r"^--[a-z]", w)})
        if words[0].startswith("idefics-"):
            assert words[0] in console_scripts(), f"{block}: {words[0]} is not a console script of pyproject.toml"
            text = help_text(str(shims / words[0]), "--help")
            missing = [f for f in flags if f not in text]
            assert not missing, f"{block}: {words[0]} --help names no {missing}"
        elif words[0] in ("python", "python3") and len(words) > 1 and words[1].startswith("scripts/"):
            script = REPO / words[1]
            assert script.exists(), f"{block}: no {words[1]}"
            source = script.read_text()
            unseen = [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]
            if unseen:
                text = help_text(str(shims / "python"), str(script), "--help")
                missing = [f for f in unseen if f not in text]
                assert not missing, f"{block}: {words[1]} takes no {missing}"
        elif words[0] == "bash" and len(words) > 1 and words[1].startswith("scripts/"):
            assert (REPO / words[1]).exists(), f"{block}: no {words[1]}"


def check_python(block: Block) -> None:
    from runtime import Session

    parameters = set(inspect.signature(Session.__init__).parameters)
    tree = ast.parse(block.code, filename=str(block))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Session":
            unknown = [k.arg for k in node.keywords if k.arg not in parameters]
            assert not unknown, f"{block}: Session takes no {unknown}"


# ------------------------------------------------------------------ the tests
def test_mkdocs_build_strict(tmp_path, shims):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=environment(shims), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_block_is_text_bash_or_python(document):
    for block in blocks(document):
        assert block.language in ("text", "bash", "python"), (
            f"{block}: fence it as text (a listing, not run), bash or python (run, or marked not run with a reason)")
        assert not (block.language == "text" and (block.not_run or block.run_from)), f"{block}: text is never run"


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_snippets_run_as_written(document, shims, tmp_path):
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in ("docs", "scripts"):
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    env = environment(shims)
    for block in blocks(document):
        if block.language not in ("bash", "python"):
            continue
        if block.not_run:
            check_flags(block, shims) if block.language == "bash" else check_python(block)
        else:
            run_block(block, folder, env)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the docs are for the rest"


def test_readme_test_command_is_what_ci_runs():
    readme = [b for b in blocks("README.md") if "pytest" in b.code]
    assert len(readme) == 1, "one README block holds the test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert readme[0].code.strip() in ci.splitlines(), ".ci/run does not run the README's test command verbatim"


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), f"README.md links to {target}: no such file"
        if anchor:
            anchors = [a for _, _, a in headings((REPO / path).read_text())]
            assert anchor in anchors, f"README.md links to {target}: {path} has no heading #{anchor}"


def inventory() -> list[tuple[str, list[str], int, str, str]]:
    """(entry, header cells, rows, page, anchor) of each table docs/readme-tables.md lists."""
    entries = []
    for line in (REPO / "docs" / "readme-tables.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 5 and cells[0].isdigit():
            link = re.fullmatch(r"\[[^]]+\]\(([\w.-]+\.md)#([\w-]+)\)", cells[4])
            assert link, f"readme-tables.md, table {cells[0]}: 'now in' is not a link to a page section"
            header = [c.replace("\\|", "|") for c in cells[2].split(" · ")]
            entries.append((cells[0], header, int(cells[3]), link.group(1), link.group(2)))
    return entries


def test_readme_tables_are_where_the_list_says():
    entries = inventory()
    assert len(entries) >= 18, "docs/readme-tables.md lists the README's 18 tables"
    taken: set[tuple[str, int]] = set()
    for entry, header, rows, page, anchor in entries:
        text = (REPO / "docs" / page).read_text()
        marks = headings(text)
        start = [(i, level) for i, level, a in marks if a == anchor]
        assert start, f"table {entry}: {page} has no section #{anchor}"
        first, level = start[0]
        end = next((i for i, lv, _ in marks if i > first and lv <= level), len(text.splitlines()))
        candidates = [(i, n) for i, cells, n in tables(text)
                      if first < i < end and cells == header and (page, i) not in taken]
        assert candidates, f"table {entry} ({' | '.join(header)}) is not in {page}#{anchor}"
        i, n = candidates[0]
        assert n >= rows, f"table {entry} in {page}#{anchor} has {n} rows, not {rows}"
        taken.add((page, i))


FIGURE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:e[-+]?\d+)?(?:\s{0,3}(?:x|×|%|ms|s|GB/s|GB|MB|GiB|GFLOP/s|TOPS|px|min))?(?!\w)")


def figures(text: str) -> set[str]:
    return {re.sub(r"\s", "", m.group(0).replace("×", "x")) for m in FIGURE.finditer(text)}


def test_no_figure_of_the_old_readme_is_lost():
    try:
        old = subprocess.run(["git", "show", f"{OLD_README_COMMIT}:README.md"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    except OSError:
        pytest.skip("no git here")
    if old.returncode:
        pytest.skip(f"commit {OLD_README_COMMIT} is not in this clone")
    now = figures("".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")]))
    lost = sorted(figures(old.stdout) - now)
    assert not lost, f"figures of the README at {OLD_README_COMMIT} found nowhere in README.md or docs/: {lost}"
