"""The documentation cannot rot: every Python snippet's imports resolve and its calls of mmadapter functions bind
to today's signatures; a snippet runs here, against the tiny assets, unless the line above it says why it cannot
(`<!-- snippet: needs real weights -->` or `<!-- snippet: needs a running server -->`); every `mmadapter`
command line parses with today's commands and flags; and the site builds strictly (links, pages, API names)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
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


NOT_RUN = re.compile(r"<!-- snippet: needs (real weights|a running server) -->\n*$")


def _python_snippets(run: bool) -> list[tuple[str, str]]:
    """Python blocks that run here (`run`), or those marked as needing what this machine lacks."""
    snippets = []
    for page in PAGES:
        text = page.read_text()
        for n, match in enumerate(FENCE.finditer(text)):
            if match.group(1) == "python" and bool(NOT_RUN.search(text[: match.start()])) != run:
                snippets.append((f"{page.relative_to(ROOT)}#{n}", match.group(2)))
    return snippets


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


@pytest.mark.parametrize(("where", "code"), _blocks(("python",)), ids=lambda value: str(value)[:60])
def test_python_snippets_call_mmadapter_with_arguments_that_bind(where, code):
    """A renamed or removed parameter of a function the docs call fails here, even in snippets that need weights."""
    tree = ast.parse(code, filename=where)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmadapter"):
            module = importlib.import_module(node.module)
            imported |= {alias.asname or alias.name: getattr(module, alias.name) for alias in node.names}
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        function = call.func
        if isinstance(function, ast.Name) and function.id in imported:
            target, name = imported[function.id], function.id
        elif isinstance(function, ast.Attribute) and getattr(function.value, "id", None) in imported:
            target, name = getattr(imported[function.value.id], function.attr), f"{function.value.id}.{function.attr}"
        else:
            continue
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            continue
        try:
            inspect.signature(target).bind(*call.args, **{keyword.arg: None for keyword in call.keywords})
        except TypeError as error:
            pytest.fail(f"{where}: {name}(...) line {call.lineno}: {error}")


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), _python_snippets(run=True), ids=lambda value: str(value)[:60])
def test_python_snippets_run_against_the_tiny_assets(where, code, tmp_path):
    """In a folder holding what the docs' tiny examples name: assets/tiny-llama and an Alpaca file."""
    shutil.copytree(ROOT / "assets" / "tiny-llama", tmp_path / "assets" / "tiny-llama")
    rows = [{"instruction": f"Say {word}.", "input": "", "output": word} for word in ("yes", "no", "maybe", "hi")]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows * 4))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{where}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"


def test_every_python_snippet_runs_or_says_why_not():
    assert _python_snippets(run=True), "no snippet runs: mark only those that need weights or a server"
    assert len(_python_snippets(run=True)) + len(_python_snippets(run=False)) == len(_blocks(("python",)))


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
