"""MkDocs hooks: pages generated from the code at build time, so they cannot drift from it.

- The API reference reads the source statically; pyproject maps the top-level folders into the
  `mmadapter` namespace, so a `build/docs-api/mmadapter/` of links gives the reader that view.

- recipes.md: the recipe reference, from the recipe JSON schema (`mmadapter train --schema`).
- troubleshooting.md: every error message the library raises for a user's input, found in the source.
- Any page: `<!-- bench-table: NAME.json#TABLE -->` becomes the table a benchmark printed and stored in
  `bench/results/NAME.json` (bench/benchlib.Table), so figures in the docs are the measured ones.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from mmadapter.train.recipe import recipe_schema

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- generated -->"
#: Exceptions the command line reports as the user's mistake (see mmadapter.cli.errors).
USER_ERRORS = {"ValueError", "FileNotFoundError", "KeyError", "DataError", "ImageLoadError", "PromptTooLongError"}
SOURCE_FOLDERS = ("cli", "train", "serve", "adapters", "vision", "core")


def link_packages() -> None:
    """Link the package folders as `build/docs-api/mmadapter/<folder>` for mkdocstrings' static reader.

    Done when MkDocs loads this hook, before any plugin configures itself: the Python handler only
    searches paths that exist when it starts."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    namespace = ROOT / "build" / "docs-api" / "mmadapter"
    namespace.mkdir(parents=True, exist_ok=True)
    for package, folder in package_dir.items():
        link = namespace / package.removeprefix("mmadapter.")
        if not link.is_symlink():
            link.symlink_to(ROOT / folder, target_is_directory=True)


link_packages()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    generators = {"recipes.md": recipe_reference, "troubleshooting.md": error_catalogue}
    generate = generators.get(page.file.src_uri)
    if generate and MARKER in markdown:
        markdown = markdown.replace(MARKER, generate())
    return BENCH_TABLE.sub(lambda match: bench_table(match["file"], match["table"]), markdown)


# ---------------------------------------------------------------- benchmark tables

BENCH_TABLE = re.compile(r"<!-- bench-table: (?P<file>[\w.-]+\.json)#(?P<table>[\w-]+) -->")
NUMERIC = re.compile(r"^[*~]*[-+]?[\d,.]+\s*(%|×|s|ms|MiB|GiB|GB)?[*]*$")


def bench_table(file: str, table: str) -> str:
    """A markdown table from a benchmark's JSON; a missing file or table fails the (strict) build."""
    path = ROOT / "bench" / "results" / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it and commit the JSON")
    document = json.loads(path.read_text())
    tables = document.get("tables", {})
    if table not in tables:
        raise KeyError(f"{path} has no table {table!r} (it has: {', '.join(tables) or 'none'})")
    columns, rows = tables[table]["columns"], tables[table]["rows"]
    right = [all(NUMERIC.match(row[i]) or row[i] in ("", "–") for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    measured = f", measured {document['date']}" if "date" in document else ""
    return "\n".join(lines) + f"\n\n_From `bench/results/{file}`{measured}._"


# ---------------------------------------------------------------- recipes.md


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[-1]}](#{prop['$ref'].rsplit('/', 1)[-1].lower()})"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}))}" if "items" in prop else "list"
    return prop.get("type", "any").replace("null", "none")


def _table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", ()))
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, prop in schema["properties"].items():
        default = "required" if key in required else f"`{json.dumps(prop.get('default'))}`"
        meaning = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(prop)} | {default} | {meaning} |")
    return "\n".join(rows)


def recipe_reference() -> str:
    schema = recipe_schema()
    parts = ["## Recipe (top level)", _table(schema)]
    for name, section in schema["$defs"].items():
        parts += [f"## {name}", " ".join(section.get("description", "").split()), _table(section)]
    return "\n\n".join(part for part in parts if part)


# ---------------------------------------------------------------- troubleshooting.md


def _message(node: ast.expr) -> str | None:
    """The message template of `raise E("…")` / `raise E(f"…{x}…")`, with placeholders as `{x}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}"
            for part in node.values
        )
    return None


def raised_messages(path: Path) -> list[tuple[int, str, str]]:
    """(line, exception name, message template) of every user-facing raise in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            name = ast.unparse(node.exc.func).rsplit(".", 1)[-1]
            message = _message(node.exc.args[0])
            if name in USER_ERRORS and message:
                found.append((node.lineno, name, " ".join(message.split())))
    return found


def error_catalogue() -> str:
    sections = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rows = [
                f"| `{message.replace('|', '/')}` | {name} | line {line} |"
                for line, name, message in raised_messages(path)
            ]
            if rows:
                module = "mmadapter." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
                sections.append(
                    f"### `{module}`\n\n| message | raised as | where |\n| --- | --- | --- |\n" + "\n".join(rows)
                )
    return "\n\n".join(sections)
