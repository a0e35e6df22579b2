"""No silent minute: a command that loads models says so before it imports torch (the slow part)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: Runs the command line with `import torch` made to fail, so whatever it printed before is what a user sees
#: during the seconds (or, on a first run, the minute) that importing torch takes.
PROGRAM = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise ImportError("torch import reached")
sys.meta_path.insert(0, NoTorch())
from mmadapter.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--quick"],
        ["chat", "--base", "tiny-llama"],
        ["serve", "--base", "tiny-llama", "--port", "0"],
        ["info", "--base", "tiny-llama", "--method", "lora"],
        ["eval", "some-adapter", "--data", "dev.json"],
        ["train", "recipe.yaml"],
    ],
    ids=lambda argv: argv[0],
)
def test_model_loading_commands_speak_before_importing_torch(argv, tmp_path):
    base = Path(__file__).resolve().parents[2] / "assets" / "tiny-llama"
    (tmp_path / "a.json").write_text('[{"instruction": "Say hi.", "output": "hi"}]')
    (tmp_path / "recipe.yaml").write_text(
        f"model: {{base: {base}}}\nadapter: {{method: llama-adapter-v1}}\n"
        "train: {epochs: 1, lr: 0.01}\ndata: {train: [{format: alpaca, path: a.json}]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, *argv, "--debug"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "torch import reached" in result.stderr, result.stderr  # it did go on to import torch
    first = result.stderr.splitlines()[0]
    assert first.startswith("mmadapter: loading ") and "first run" in first
