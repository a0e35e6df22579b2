"""The documentation cannot rot: every Python snippet's imports resolve, every `mmadapter` command line in it
parses with today's commands and flags, and the site builds strictly (links, pages, API names)."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mmadapter.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(languages: tuple[str, ...]) -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}#{n}", match.group(2))
        for page in PAGES
        for n, match in enumerate(FENCE.finditer(page.read_text()))
        if match.group(1) in languages
    ]


def _command_lines() -> list[tuple[str, str]]:
    """`mmadapter …` lines of bash/console blocks, with comments and prompts removed."""
    lines = []
    for where, block in _blocks(("bash", "console", "sh")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split("  #")[0].strip()
            for part in re.split(r"&&|\|", line):
                part = re.sub(r"\s[12]?>.*$", "", part).strip()  # a redirection is the shell's, not ours
                if part.startswith("mmadapter "):
                    lines.append((where, part))
    return lines


@pytest.mark.parametrize(("where", "code"), _blocks(("python",)), ids=lambda value: str(value)[:60])
def test_python_snippets_compile_and_their_mmadapter_imports_exist(where, code):
    tree = ast.parse(code, filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmadapter"):
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{where}: {node.module} has no {missing}"


@pytest.mark.parametrize(("where", "line"), _command_lines(), ids=lambda value: str(value)[:60])
def test_command_lines_in_the_docs_parse(where, line):
    parser = build_parser()
    argv = [arg for arg in shlex.split(line)[1:] if arg != "..."]
    if "--device" in argv:  # a device this machine may lack (cuda) is checked at parse time
        index = argv.index("--device")
        argv[index + 1] = "cpu"
    try:
        parser.parse_args(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 0, f"{where}: `{line}` no longer parses"


def test_there_are_snippets_to_check():
    assert len(_blocks(("python",))) >= 10 and len(_command_lines()) >= 20


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "recipes" / "index.html").read_text().count("<tr>") > 40  # generated reference
