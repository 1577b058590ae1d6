"""The README's and docs/*.md's commands stay true: every `item` and `item-bench` line in their
shell blocks parses with the real command-line parsers (usage lines: once without their
[optional] parts, once with each option's first alternative)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from itemrt.bench.cli import build_parser as bench_parser
from itemrt.cli import build_parser as item_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and every docs page
PARSERS = {"item": item_parser, "item-bench": bench_parser}


def readme_commands(page: Path = README) -> list[str]:
    """`item ...` / `item-bench ...` commands of the bash blocks and of systemd units'
    ExecStart lines (continuations joined, comments cut, pipelines and `&&` chains split), and inline `item ...` spans in the prose that carry arguments (not bare names)."""
    text = page.read_text()
    out = []
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    blocks += [line.split("=", 1)[1] for block in re.findall(r"```ini\n(.*?)```", text, re.DOTALL)
               for line in block.splitlines() if line.startswith("ExecStart=")]  # systemd units
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s(?:\||&&)\s", line.split(" #", 1)[0]):  # `curl ... | item detect -`
                part = re.sub(r"^(\S*/)?(?=item(-bench)?(\s|$))", "", part.strip())  # .venv/bin/item -> item
                if re.match(r"item(-bench)?(\s|$)", part):
                    out.append(" ".join(part.split()))
    for span in re.findall(r"`(item(?:-bench)? [^`]+)`", text):
        words = span.split()
        if len(words) >= 3 and not (words[0] == "item" and "/" in words[1]):  # not `item features/train/...`
            out.append(" ".join(words))
    return list(dict.fromkeys(out))


def variants(line: str) -> list[str]:
    """A usage line as commands: without its [optional] parts, and with them (first of a|b)."""
    if "[" not in line:
        return [line]
    bare = re.sub(r"\s*\[[^\]]*\]", "", line)
    full = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+?)\|\S+", r"\1", m.group(1)), line)
    return [bare, full]


PAGE_COMMANDS = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in readme_commands(page)]
COMMANDS = list(dict.fromkeys(line for _, line in PAGE_COMMANDS))  # the union over the pages


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 20 and any(c.startswith("item-bench") for c in COMMANDS)
    assert len(PAGES) > 1 and readme_commands(README), "docs/ moved away, or the README lost its commands"


@pytest.mark.parametrize(("page", "line"), PAGE_COMMANDS)
def test_readme_command_parses(page, line):
    for cmd in variants(line):
        prog, *argv = shlex.split(cmd)
        try:
            PARSERS[prog]().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{page}: command does not parse ({e.code}): {cmd}")
