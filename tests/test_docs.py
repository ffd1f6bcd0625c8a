"""Docs that cannot rot: README.md and docs/*.md checked against the code they describe.

* every ``--flag`` written in a command line (a fenced block, or an inline code span that starts with the
  command) is a flag of that command: ``python lora/train_lora.py`` (and ``python -m lora.train_lora``,
  ``lora-train``, ``torchrun ... lora/train_lora.py``, whose own flags are torchrun's) or ``python
  scripts/X.py``; each command's flags come from its own argparse parser, built in this process (the script
  is imported and its ``main`` stopped at the parse, so nothing runs); ``sweep.py`` and
  ``compare_methods.py`` take ``train_lora.py``'s flags too. A flag quoted on its own in the text
  (```--lora_r 16```) must be some command's;
* every script ``scripts/*.py``, config ``configs/*.yaml``, module ``lora/*.py`` and test ``tests/*.py`` named
  exists;
* every relative link and picture ``[..](path)`` / ``![..](path)`` points at a file that exists, and a
  ``#anchor`` at a heading of that page;
* README.md, the front page, stays under 300 lines.

Each failure names the page, the line and what is wrong.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import shlex
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from lora.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
README_MAX_LINES = 300
TRAIN = "lora/train_lora.py"
TAKE_TRAIN_FLAGS = {"scripts/sweep.py", "scripts/compare_methods.py"}  # "any option of train_lora.py applies"
# flags of other tools the docs quote on their own (the install commands)
OTHER_TOOLS_FLAGS = {"--index-url", "--extra-index-url"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
NAMED_FILE = re.compile(r"(?<![\w./-])((?:scripts|configs|lora|tests)/[\w.-]+\.(?:py|yaml))\b")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Snippet:
    """Text of a page, where it starts and how it was written: ``fence`` (a code block's logical line:
    continuation lines joined) or ``span`` (an inline code span)."""

    page: Path
    line: int
    text: str
    kind: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Page:
    path: Path
    lines: tuple[str, ...]
    snippets: tuple[Snippet, ...]
    prose: tuple[tuple[int, str], ...]  # (line number, text) outside code blocks, code spans removed


def read_page(path: Path) -> Page:
    """``path`` split into code-block lines (with backslash continuations joined), inline code spans (which may
    run over a line break inside a paragraph) and the prose around them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets: list[Snippet] = []
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    language = ""
    pending: tuple[int, str] | None = None  # a code line that ends in a backslash
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph() -> None:
        if not paragraph:
            return
        text = "\n".join(t for _, t in paragraph)
        starts = [n for n, _ in paragraph]
        offsets = [0]
        for _, t in paragraph:
            offsets.append(offsets[-1] + len(t) + 1)
        kept = text
        for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
            line = starts[max(i for i, o in enumerate(offsets[:-1]) if o <= m.start())]
            snippets.append(Snippet(path, line, " ".join(m.group(2).split()), "span"))
            blank = re.sub(r"[^\n]", " ", m.group(0))  # line breaks kept: the prose keeps its line numbers
            kept = kept[: m.start()] + blank + kept[m.end() :]
        for (n, _), piece in zip(paragraph, kept.split("\n"), strict=True):
            prose.append((n, piece))
        paragraph.clear()

    for number, line in enumerate(lines, 1):
        opened = FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1).startswith(fence) and not opened.group(2):
                fence = None
                continue
            if language in ("python", "py", "pycon"):
                continue
            if pending is not None:
                number, line = pending[0], pending[1] + " " + line.strip()
                pending = None
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1])
                continue
            snippets.append(Snippet(path, number, line, "fence"))
            continue
        if opened:
            flush_paragraph()
            fence, language = opened.group(1), opened.group(2).lower()
            continue
        if not line.strip():
            flush_paragraph()
            continue
        paragraph.append((number, line))
    flush_paragraph()
    return Page(path, tuple(lines), tuple(snippets), tuple(prose))


@functools.cache
def pages() -> tuple[Page, ...]:
    return tuple(read_page(p) for p in PAGES)


# ---------------------------------------------------------------------------------------------------------
# Each command's flags, from its own parser


class _Parsed(BaseException):  # not an Exception: no command's error guard catches it
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
    raise _Parsed(self)


def option_strings(parser: argparse.ArgumentParser) -> frozenset[str]:
    return frozenset(o for action in parser._actions for o in action.option_strings)


@functools.cache
def flags_of(command: str) -> frozenset[str] | None:
    """The flags ``command`` (``lora/train_lora.py``, ``scripts/X.py`` or ``torchrun``) accepts, read from the
    parser it builds; ``None`` when it has no command line. A script is imported and its ``main`` called with
    argparse's parse replaced by a stop, so the parser is complete and nothing after the parse runs."""
    if command == TRAIN:
        return option_strings(build_parser())
    if command == "torchrun":
        from torch.distributed.run import get_args_parser

        return option_strings(get_args_parser())
    module = importlib.import_module(command.removesuffix(".py").replace("/", "."))
    main = getattr(module, "main", None)
    if main is None:
        return None
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", _stop),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", _stop),
    ):
        try:
            main(["--help"])
        except _Parsed as parsed:
            flags = option_strings(parsed.parser)
        else:
            raise AssertionError(f"{command}'s main returned without parsing its arguments")
    return flags | flags_of(TRAIN) if command in TAKE_TRAIN_FLAGS else flags


def all_flags() -> frozenset[str]:
    known = {*flags_of(TRAIN), *flags_of("torchrun"), *OTHER_TOOLS_FLAGS}
    for script in sorted((ROOT / "scripts").glob("*.py")):
        known |= flags_of(f"scripts/{script.name}") or set()
    return frozenset(known)


# ---------------------------------------------------------------------------------------------------------
# Command lines in the text


def words(text: str) -> list[str]:
    """Shell words, comments dropped (a span cut short, or a placeholder's quote, falls back to spaces)."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split("#")[0].split()


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(command, its words after the program)`` for each command line in ``text``: ``train_lora.py`` run
    any way, a script of ``scripts/``, and torchrun (its own words, then the training's). Words are cut at
    ``&&``, ``||``, ``;`` and ``|``."""
    found: list[tuple[str, list[str]]] = []
    segment: list[str] = []
    for word in [*words(text), ";"]:
        if word in ("&&", "||", ";", "|") or word.endswith(";"):
            if word.endswith(";") and word != ";":
                segment.append(word[:-1])
            found.extend(_command(segment))
            segment = []
        else:
            segment.append(word)
    return found


def _command(segment: list[str]) -> list[tuple[str, list[str]]]:
    for i, word in enumerate(segment):
        rest = segment[i + 1 :]
        if word == "lora-train":
            return [(TRAIN, rest)]
        if word == "torchrun":
            script = next((j for j, w in enumerate(rest) if w.endswith("train_lora.py")), len(rest))
            return [("torchrun", rest[:script]), (TRAIN, rest[script + 1 :])]
        if re.fullmatch(r"python3?", word) and rest:
            if rest[:2] == ["-m", "lora.train_lora"]:
                return [(TRAIN, rest[2:])]
            if rest[0].endswith("train_lora.py"):  # lora/train_lora.py, or train_lora.py from inside lora/
                return [(TRAIN, rest[1:])]
            if re.fullmatch(r"scripts/[\w-]+\.py", rest[0]):
                return [(rest[0], rest[1:])]
    return []


def starts_with_command(text: str) -> bool:
    """Whether an inline code span is a command line (after ``NAME=value`` settings and ``time``)."""
    first = [w for w in text.split() if not ASSIGNMENT.match(w) and w != "time"][:2]
    return bool(first) and (
        first[0] in ("lora-train", "torchrun")
        or (re.fullmatch(r"python3?", first[0]) is not None and len(first) > 1 and first[1] != "-c")
    )


def flag_words(args: list[str]) -> list[str]:
    """The ``--flags`` among a command's words (``--flag=value`` as ``--flag``; placeholders such as
    ``--no-<name>`` and a bare ``--`` skipped)."""
    out = []
    for word in args:
        flag = word.split("=", 1)[0]
        if re.fullmatch(r"--[A-Za-z][\w-]*", flag):
            out.append(flag)
    return out


def hint(flag: str, known: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(flag, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def flag_problems(pages: Iterable[Page]) -> tuple[list[str], int]:
    """``page:line: --flag is not a flag of command`` for each flag a command line gives that its command lacks,
    and how many flags were checked."""
    problems = []
    checked = 0
    for page in pages:
        for snippet in page.snippets:
            if snippet.kind == "span" and not starts_with_command(snippet.text):
                continue
            for command, args in commands(snippet.text):
                if command != "torchrun" and not (ROOT / command).is_file():
                    continue  # a missing script is named by file_problems
                known = flags_of(command)
                where = f"{shown(snippet.page)}:{snippet.line}"
                if known is None:
                    problems.append(f"{where}: {command} has no command line, but is run as one")
                    continue
                for flag in flag_words(args):
                    checked += 1
                    if flag not in known:
                        problems.append(f"{where}: {flag} is not a flag of {command}{hint(flag, known)}")
    return problems, checked


def lone_flag_problems(pages: Iterable[Page]) -> list[str]:
    """```--lora_r 16``` in a sentence: a flag of train_lora.py, a script, torchrun or the install's pip."""
    known = all_flags()
    problems = []
    for page in pages:
        for snippet in page.snippets:
            if snippet.kind != "span" or not snippet.text.startswith("--"):
                continue
            for flag in flag_words(snippet.text.split()):
                if flag not in known:
                    problems.append(
                        f"{shown(snippet.page)}:{snippet.line}: {flag} is no command's flag{hint(flag, known)}"
                    )
    return problems


def file_problems(pages: Iterable[Page]) -> list[str]:
    """``page:line: scripts/x.py does not exist`` for each script, config, module or test named that is not."""
    problems = []
    for page in pages:
        for number, line in enumerate(page.lines, 1):
            for name in NAMED_FILE.findall(line):
                if not (ROOT / name).is_file():
                    problems.append(f"{shown(page.path)}:{number}: {name} does not exist")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Links and pictures


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fence = not fence
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not fence:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def link_problems(pages: Iterable[Page]) -> tuple[list[str], int]:
    """``page:line: target does not exist`` (or has no such anchor) for each relative link and picture, and
    how many were checked; web addresses are not followed."""
    problems = []
    links = 0
    for page in pages:
        for number, text in page.prose:
            for target in LINK.findall(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                links += 1
                where = f"{shown(page.path)}:{number}"
                path_part, _, anchor = target.partition("#")
                file = (page.path.parent / path_part).resolve() if path_part else page.path
                if not file.exists():
                    problems.append(f"{where}: {target} does not exist")
                elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                    problems.append(f"{where}: {target}: no heading of {file.name} has the anchor #{anchor}")
    return problems, links


# ---------------------------------------------------------------------------------------------------------
# The pages


def test_every_flag_in_a_command_line_is_a_flag_of_that_command() -> None:
    problems, checked = flag_problems(pages())
    assert not problems, "\n".join(problems)
    assert checked > 200, f"only {checked} flags found in command lines: is the parsing of the pages broken?"


def test_every_flag_quoted_alone_is_some_commands_flag() -> None:
    problems = lone_flag_problems(pages())
    assert not problems, "\n".join(problems)


def test_every_named_script_config_module_and_test_exists() -> None:
    problems = file_problems(pages())
    assert not problems, "\n".join(problems)


def test_every_link_and_picture_points_at_something_that_exists() -> None:
    problems, links = link_problems(pages())
    assert not problems, "\n".join(problems)
    assert links > 30, f"only {links} links found: is the parsing of the pages broken?"


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines; the front page stays under {README_MAX_LINES}: move detail to docs/"
    )


# ---------------------------------------------------------------------------------------------------------
# The checks themselves, on text made to fail them


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python lora/train_lora.py --lora_r 8 --task text", [(TRAIN, ["--lora_r", "8", "--task", "text"])]),
        ("cd lora && python train_lora.py --lora_r 16   # from inside", [(TRAIN, ["--lora_r", "16"])]),
        ("MALLOC_X=1 python scripts/sweep.py --mode rank", [("scripts/sweep.py", ["--mode", "rank"])]),
        ("torchrun --nproc_per_node 4 lora/train_lora.py --batch_size 16",
         [("torchrun", ["--nproc_per_node", "4"]), (TRAIN, ["--batch_size", "16"])]),
        ('resume with: python -m lora.train_lora --resume "runs/a b"', [(TRAIN, ["--resume", "runs/a b"])]),
        ("pip install torch==2.13.0 -e . && python -m pytest -q", []),
    ],
)  # fmt: skip
def test_commands_are_found_with_their_words(text: str, expected: list) -> None:
    assert commands(text) == expected


def test_sweep_takes_train_lora_flags_and_generate_only_its_own() -> None:
    assert {"--mode", "--seeds", "--lora_r", "--max_steps"} <= flags_of("scripts/sweep.py")
    assert "--lora_r" not in flags_of("scripts/generate.py")
    assert {"--adapter", "--prompt", "--batched"} <= flags_of("scripts/generate.py")
    assert flags_of("scripts/bench_report.py") is None  # a module of the benchmark's, no command line


def test_a_wrong_flag_a_missing_file_and_a_broken_link_are_named(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "Run `python lora/train_lora.py --lora_rank\n8` and then `--top_k 40`, not `--topk 40`.\n\n"  # lines 3-4
        "```bash\n"
        "python scripts/generate.py --base B \\\n"  # line 7, continued on line 8
        "    --adapters A --prompt x   # --comment\n"
        "torchrun --nproc_per_node 2 --bogus 1 lora/train_lora.py --seed 1\n"  # line 9
        "python scripts/no_such_script.py --x 1\n"  # line 10
        "```\n\n"
        "See [there](missing.md), [here](#title), [gone](#nowhere), [that](other.md#a-section) and\n"
        "![a picture](other.md#nothing) in `configs/nothing.yaml`.\n",
        encoding="utf-8",
    )
    got = read_page(page)
    assert [(s.line, s.text) for s in got.snippets if s.kind == "span"] == [
        (3, "python lora/train_lora.py --lora_rank 8"), (4, "--top_k 40"), (4, "--topk 40"),
        (14, "configs/nothing.yaml"),
    ]  # fmt: skip
    flags, checked = flag_problems([got])
    assert flags == [
        "page.md:3: --lora_rank is not a flag of lora/train_lora.py (did you mean --lora_r?)",
        "page.md:7: --adapters is not a flag of scripts/generate.py (did you mean --adapter?)",
        "page.md:9: --bogus is not a flag of torchrun",
    ]
    assert checked == 7  # --lora_rank; --base --adapters --prompt; --nproc_per_node --bogus --seed
    assert lone_flag_problems([got]) == ["page.md:4: --topk is no command's flag (did you mean --top_k?)"]
    assert file_problems([got]) == [
        "page.md:10: scripts/no_such_script.py does not exist",
        "page.md:14: configs/nothing.yaml does not exist",
    ]
    links, count = link_problems([got])
    assert count == 5
    assert links == [
        "page.md:13: missing.md does not exist",
        "page.md:13: #nowhere: no heading of page.md has the anchor #nowhere",
        "page.md:14: other.md#nothing: no heading of other.md has the anchor #nothing",
    ]
    assert slug("Talking to a model: `scripts/chat.py`") == "talking-to-a-model-scriptschatpy"
    assert slug("LoRA variants: DoRA, PiSSA, OLoRA, LoRA+ and a 4-bit base") == (
        "lora-variants-dora-pissa-olora-lora-and-a-4-bit-base"
    )
