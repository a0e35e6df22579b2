"""The import contract in pyproject.toml holds, and it would catch an import that crosses a layer upwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_the_source_tree_keeps_the_contract():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _replica(tmp_path: Path) -> Path:
    """The project's packages and contract under another root name (`mmx`), so the check runs on a copy
    that the test may break without touching the installed `mmadapter`."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = tmp_path / "mmx" / package.removeprefix("mmadapter.")
        shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
        for source in target.rglob("*.py"):
            source.write_text(source.read_text().replace("mmadapter.", "mmx."))
    config = (ROOT / "pyproject.toml").read_text()
    start = config.index("[tool.importlinter]")
    (tmp_path / "contract.toml").write_text(config[start:].replace("mmadapter.", "mmx."))
    return tmp_path


def test_an_upward_import_breaks_the_contract(tmp_path):
    replica = _replica(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(replica)}
    kept = _lint_imports(replica, "--config", "contract.toml", env=env)
    assert kept.returncode == 0, kept.stdout + kept.stderr  # the copy itself is clean

    core_files = replica / "mmx" / "core" / "files.py"
    core_files.write_text(core_files.read_text() + "\nimport mmx.serve.generate  # an upward import\n")
    broken = _lint_imports(replica, "--config", "contract.toml", env=env)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "mmx.core.files -> mmx.serve.generate" in broken.stdout


def test_the_architecture_page_draws_the_contracts_layers_in_order():
    """docs/architecture.md's picture names every layer of the contract, top to bottom, in its order."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers" and "containers" not in c)
    inner = next(c["layers"] for c in contracts if c.get("containers") == ["mmadapter.adapters"])
    picture = (ROOT / "docs" / "architecture.md").read_text().split("```text")[1].split("```")[0]
    packages = [name.strip() for layer in layers for name in layer.split("|")]
    positions = [picture.index(f"{package} ") for package in packages]
    assert positions == sorted(positions)  # train and serve share a row, train drawn left
    inner_positions = [picture.index(f"│   {name} ") for name in inner]
    assert inner_positions == sorted(inner_positions)
