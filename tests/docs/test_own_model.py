"""docs/own-model.md's walkthrough runs exactly as written: data → recipe → train → eval → chat → push --dry-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    page = (ROOT / "docs" / "own-model.md").read_text()
    script = re.search(r"```bash\n(.*?)```", page, re.DOTALL).group(1)  # the first block is the walkthrough
    shutil.copytree(ROOT / "assets" / "tiny-llama", tmp_path / "assets" / "tiny-llama")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    adapter = tmp_path / "my-run" / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["final_loss"] < summary["stages"][0]["history"][0]["loss"]  # it learned something
    evaluation = json.loads((tmp_path / "my-run" / "eval.json").read_text())
    assert evaluation["samples"] == 4 and evaluation["eval_perplexity"] > 1
    assert "yourname/my-first-adapter" in result.stdout and "Traceback" not in result.stderr
