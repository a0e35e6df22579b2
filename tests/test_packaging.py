"""The package installs as `mmadapter.*` only, and every package folder is listed in pyproject."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
#: folder -> package, as pyproject maps them (cli, train, serve, adapters, vision, core).
FOLDERS = {folder: package for package, folder in SETUPTOOLS["package-dir"].items()}


def test_every_package_folder_is_listed():
    listed = set(SETUPTOOLS["packages"])
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
        "import mmadapter.adapters, mmadapter.vision, mmadapter.train, mmadapter.serve, mmadapter.cli.main, mmadapter.core",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_bare_top_level_names_are_not_installed(tmp_path):
    for name in FOLDERS:
        result = _python_outside_repo(f"import {name}", tmp_path)
        if name == "adapters" and result.returncode == 0:
            # AdapterHub's `adapters` package may be installed independently; it must not be ours.
            check = _python_outside_repo("import adapters, pathlib; print(pathlib.Path(adapters.__file__))", tmp_path)
            assert str(ROOT) not in check.stdout
            continue
        assert result.returncode != 0, f"`import {name}` should fail outside the repo"


def test_installed_console_script_runs(tmp_path):
    """The `mmadapter` script pip installed beside this interpreter (not `python -m`), run outside the repo."""
    script = Path(sys.executable).parent / "mmadapter"
    assert script.is_file(), f"no console script at {script}: is the package installed?"
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("info", "train", "demo", "serve"))
