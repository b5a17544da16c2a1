"""The docs stay true to the tool: every `dsk-provision ...` command line in a code block of
docs/*.md or README.md names a real command and real options (parsed against the CLI's
click command tree, so a renamed option or command fails here), and every message that
docs/troubleshooting.md quotes from a source file is in that file."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click import ClickException  # typer's own copy of click

from dsk_provision.cli import app

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]

# `dsk-provision` as a command word: not inside a path such as /var/lib/dsk-provision/.
COMMAND = re.compile(r"(?:^|(?<=[\s$(]))dsk-provision(?=\s|$)")
INLINE_COMMAND = re.compile(r"`(dsk-provision [^`]+)`")
# Inline code that names a command without the program: `bootstrap --tags ssh_trust`.
INLINE_SHORT = re.compile(r"`([a-z]+ [^`]*-[^`]*)`")
FENCE = re.compile(r"^\s*(```|~~~)")
# A source file named in backquotes: `dsk_provision/lock.py`, `roles/x/tasks/main.yml`.
SOURCE_PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|yml|yaml|sh|j2|toml))`")


def code_blocks(text: str) -> list[tuple[int, list[str], tuple[str, ...]]]:
    """The code blocks of a Markdown text, fenced or indented by four spaces after a blank
    line (list items' continuation lines are not code): (first line number, lines,
    sources). A fenced block whose lead-in (the paragraph just above it) names source
    files in backquotes quotes their messages: those are its sources."""
    blocks: list[tuple[int, list[str], tuple[str, ...]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            sources = _lead_in_sources(lines, i)
            start = i + 1
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                i += 1
            blocks.append((start + 1, lines[start:i], sources))
            i += 1
        elif (lines[i].startswith("    ") and lines[i].strip()
              and (i == 0 or not lines[i - 1].strip())
              and not _in_list(lines, i)):
            start = i
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            blocks.append((start + 1, lines[start:i], ()))
        else:
            i += 1
    return blocks


def _lead_in_sources(lines: list[str], fence: int) -> tuple[str, ...]:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    lead_in = []
    while j >= 0 and lines[j].strip() and not FENCE.match(lines[j]):
        lead_in.insert(0, lines[j])
        j -= 1
    return tuple(dict.fromkeys(SOURCE_PATH.findall(" ".join(lead_in))))


def _in_list(lines: list[str], i: int) -> bool:
    """Whether an indented line continues a list item (the paragraph above it, across
    blank lines, is a list item or its continuation) rather than starting a code block."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    while j >= 0 and lines[j].strip():
        if re.match(r"\s*([-*+]|\d+\.)\s", lines[j]):
            return True
        if not lines[j].startswith(" "):
            return False
        j -= 1
    return False


def command_lines(text: str) -> list[tuple[int, str]]:
    """Each `dsk-provision ...` command of a Markdown text: in its code blocks
    (continuation lines ending in a backslash joined), and in inline code that starts
    with `dsk-provision ` or with one of its commands and names an option
    (`bootstrap --limit`, given `dsk-provision` here): (line number, text from
    `dsk-provision` on). Blocks that quote a source file's messages are left to the
    quote check: their text is the source's."""
    found = []
    for first, block, sources in code_blocks(text):
        if sources:
            continue
        k = 0
        while k < len(block):
            line, number = block[k], first + k
            while line.rstrip().endswith("\\") and k + 1 < len(block):
                k += 1
                line = line.rstrip()[:-1] + " " + block[k].strip()
            for match in COMMAND.finditer(line):
                found.append((number, line[match.start():]))
            k += 1
    for match in INLINE_COMMAND.finditer(text):
        found.append((text.count("\n", 0, match.start()) + 1, " ".join(match[1].split())))
    commands = set(_cli().list_commands(None))
    for match in INLINE_SHORT.finditer(text):
        span = " ".join(match[1].split())
        if span.split()[0] in commands and any(w.startswith("-") for w in span.split()):
            found.append((text.count("\n", 0, match.start()) + 1, f"dsk-provision {span}"))
    return found


def words(command: str) -> list[str]:
    """A documented command line as argument words: a trailing comment, a pipe or a
    second command dropped, optional parts (`[--gpus 8]`) and ellipses unwrapped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|;&")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[str] = []
    for word in lexer:
        if word and set(word) <= set("|;&"):
            break
        word = word.strip("[]")
        if word in ("...", "…"):
            # "--reason ..." elides a value; "--os debian-12 ..." more of the same
            if out and out[-1].startswith("-"):
                out.append("VALUE")
        elif word:
            out.append(word)
    return out[1:]                      # the words after dsk-provision


@functools.cache
def _cli():
    """The CLI's command tree, as typer hands it to click."""
    return typer.main.get_command(app)


def check_command(args: list[str]) -> str | None:
    """What is wrong with `dsk-provision ARGS` for the CLI, or None: each word is parsed
    by the option parser of the command it reaches in the CLI's command tree. Values are
    not converted: documents write placeholders (INV, NODE) where a value goes."""
    cmd = _cli()
    path = ["dsk-provision"]
    while True:
        group = hasattr(cmd, "get_command")
        ctx = typer.Context(cmd, info_name=path[-1])
        parser = cmd.make_parser(ctx)
        parser.allow_interspersed_args = not group
        try:
            opts, rest, _ = parser.parse_args(list(args))
        except ClickException as e:
            return f"{' '.join(path)}: {e.format_message()}"
        if opts.get("help") or opts.get("version"):
            return None
        if not group:
            # the parser gave each argument its words: what is left, none takes
            return f"{' '.join(path)}: unexpected argument(s) {rest}" if rest else None
        if not rest:
            return None                 # a group alone prints its commands
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return f"{' '.join(path)}: no command {rest[0]!r}"
        cmd, args = sub, rest[1:]
        path.append(rest[0])


def documented_commands() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(REPO)}:{number}", text)
            for path in DOCS for number, text in command_lines(path.read_text())]


def test_docs_show_commands():
    """The docs show commands (the scan below finds them), the quickstart many of them."""
    where = [w for w, _ in documented_commands()]
    assert len(where) > 40
    assert sum(w.startswith("docs/quickstart.md:") for w in where) >= 10


@pytest.mark.parametrize(("where", "command"), documented_commands())
def test_documented_command_parses(where, command):
    args = words(command)
    problem = check_command(args)
    if problem and args and args[-1].startswith("-"):
        # prose may name an option without its value: `bootstrap --limit`
        problem = check_command([*args, "VALUE"]) and problem
    assert problem is None, f"{where}: `{command.strip()}`: {problem}"


@pytest.mark.parametrize("command", [
    "dsk-provision bootstrap -i INV --limt gpu01",        # a misspelt option
    "dsk-provision nodes evict -i INV gpu01",             # no such command
    "dsk-provision jobs stop -i INV exp1 exp2",           # one argument too many
    "dsk-provision check -i",                             # an option without its value
    "dsk-provision hostkeys scan -i INV --yes",           # an option of another command
    "dsk-provision --runs-dir /tmp/runs runs shw",        # after a global option
])
def test_checker_refuses_wrong_commands(command):
    assert check_command(words(command)) is not None


def test_checker_reads_blocks_and_lines():
    text = ("Some text, `dsk-provision runs\nlist --last 3`, `runs show --json`\n\n"
            "    dsk-provision check -i INV   # a comment\n\n"
            "- a list item\n\n    continued: dsk-provision nosuch\n\n"
            "```sh\ndsk-provision train -i INV \\\n  --config x.toml --detach\n"
            "see /var/lib/dsk-provision/sandbox\n"
            "  hint: dsk-provision nodes cordon -i INV NODE --reason ...\n```\n"
            "What `dsk_provision/x.py` prints:\n```\nerror: dsk-provision nosuch\n```\n")
    assert [(b[0], b[2]) for b in code_blocks(text)] == [
        (4, ()), (11, ()), (18, ("dsk_provision/x.py",))]
    assert command_lines(text) == [
        (4, "dsk-provision check -i INV   # a comment"),
        (11, "dsk-provision train -i INV  --config x.toml --detach"),
        (14, "dsk-provision nodes cordon -i INV NODE --reason ..."),
        (1, "dsk-provision runs list --last 3"), (2, "dsk-provision runs show --json")]
    assert all(check_command(words(c)) is None for _, c in command_lines(text))
    assert words("dsk-provision nodes add -i INV [--gpus 8] [--os a ...] | tee x") == [
        "nodes", "add", "-i", "INV", "--gpus", "8", "--os", "a"]


# --- quoted messages of troubleshooting.md ---------------------------------------------

TROUBLE = REPO / "docs" / "troubleshooting.md"
FRAMING = re.compile(r"^\s*(error:|hint:|- )?\s*")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>|\.\.\.|…")


def quoted_messages(text: str) -> list[tuple[int, tuple[str, ...], str]]:
    """The messages a troubleshooting text quotes (code_blocks: the fenced blocks whose
    lead-in names source files). Each line of such a block yields its literal fragments:
    the parts the tool fills in are written `<...>` (or `...`) and split the line; the
    `error:`/`hint:` framing is the CLI's. Fragments shorter than 6 characters say too
    little to check. (line number, sources, fragment)."""
    out = []
    for first, block, sources in code_blocks(text):
        for k, line in enumerate(block if sources else []):
            # The CLI's framing of every error (render.py, errors.py, the inventory's
            # list of problems) is not the source's message.
            for fragment in PLACEHOLDER.split(FRAMING.sub("", line)):
                fragment = fragment.strip(" :")
                if len(fragment) >= 6:
                    out.append((first + k, sources, fragment))
    return out


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@functools.cache
def _source_text(path: str) -> str:
    """The file's text with implicit string concatenation undone ("a " "b", also across
    lines) and whitespace folded, so that a message split over literals, or folded in a
    YAML block, reads as one line."""
    text = (REPO / path).read_text()
    text = re.sub(r"""(["'])\s*\n\s*[rfb]*(["'])""", "", text)
    text = re.sub(r"""(["'])[ \t]+[rfb]*(["'])""", "", text)
    return _normalize(text)


def _quotes():
    if not TROUBLE.exists():
        return []
    return [(f"docs/troubleshooting.md:{n}", sources, fragment)
            for n, sources, fragment in quoted_messages(TROUBLE.read_text())]


def test_troubleshooting_quotes_messages():
    """troubleshooting.md exists and quotes messages from many source files."""
    quotes = _quotes()
    assert len({s for _, sources, _ in quotes for s in sources}) >= 8
    assert len(quotes) >= 20


@pytest.mark.parametrize(("where", "sources", "fragment"), _quotes())
def test_quoted_message_is_in_source(where, sources, fragment):
    for source in sources:
        assert (REPO / source).is_file(), f"{where}: no file {source}"
    assert any(_normalize(fragment) in _source_text(s) for s in sources), (
        f"{where}: {fragment!r} is in none of {', '.join(sources)}")


def test_quote_checker_finds_fragments():
    text = ("What `dsk_provision/lock.py` prints:\n\n```text\n"
            "cluster <name> is busy: <command> (pid <pid>, ...)\n```\n"
            "Not a quote:\n```\nanything at all here\n```\n")
    quotes = quoted_messages(text)
    assert quotes == [(4, ("dsk_provision/lock.py",), "cluster"),
                      (4, ("dsk_provision/lock.py",), "is busy")]
    assert all(_normalize(f) in _source_text("dsk_provision/lock.py")
               for _, _, f in quotes)
    assert "cluster is busy" not in _source_text("dsk_provision/lock.py")
