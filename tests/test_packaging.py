"""The package installs as `mmadapter.*` only, and every package folder is listed in pyproject."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "adapters": "mmadapter.adapters",
    "vision": "mmadapter.vision",
    "train": "mmadapter.train",
    "serve": "mmadapter.serve",
}


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found == listed


def _python_outside_repo(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)


def test_namespace_imports_from_outside_the_repo(tmp_path):
    result = _python_outside_repo(
        "import mmadapter.adapters, mmadapter.vision, mmadapter.train, mmadapter.serve, mmadapter.train.cli", tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_bare_top_level_names_are_not_installed(tmp_path):
    for name in ("train", "serve", "vision", "adapters"):
        result = _python_outside_repo(f"import {name}", tmp_path)
        if name == "adapters" and result.returncode == 0:
            # AdapterHub's `adapters` package may be installed independently; it must not be ours.
            check = _python_outside_repo("import adapters, pathlib; print(pathlib.Path(adapters.__file__))", tmp_path)
            assert str(ROOT) not in check.stdout
            continue
        assert result.returncode != 0, f"`import {name}` should fail outside the repo"


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "mmadapter.train.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "info" in result.stdout
