"""bench/gpu_check cannot rot between GPU leases: its dry run (same code, tiny shapes, CPU) runs here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check"


@pytest.mark.slow
def test_the_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    # The GPU's time budgets, widened: on a loaded CPU a part cut at its budget would miss rows, not be wrong.
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget-scale", "5", "--deadline", "3000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    parts = ("gpu_tests", "quantized_7b", "serve", "matmul", "train", "generate", "clip_cache", "deepspeed")
    for part in parts:
        assert document[part]["status"] == "ok", (part, document[part])
    for part in ("gpu_tests", "deepspeed"):
        assert "collected" in document[part]["summary"], document[part]
    assert document["serve"]["command_ok"]
    quantized = {name: row for name, row in document["quantized_7b"].items() if isinstance(row, dict)}
    assert len(quantized) == 4 and all(row["step_s"] > 0 for row in quantized.values())
    methods = {"llama-adapter-v1", "llama-adapter-v2", "lora", "ptuning-v2"}
    train = {name: row for name, row in document["train"].items() if isinstance(row, dict)}
    assert set(train) == methods
    assert all(row["step_s"] > 0 and row["tflops"] > 0 and row["trainable"] > 0 for row in train.values())
    generate = {name: row for name, row in document["generate"].items() if isinstance(row, dict)}
    assert set(generate) == methods | {"base"} and generate["base"]["ratio_batch1"] == 1.0
    assert [len(document["tables"][name]["rows"]) for name in ("quantized_7b", "train", "generate")] == [4, 4, 5]
    assert "[train]" in result.stdout  # the tables are printed too

    # --render rebuilds the same tables from the JSON alone (what a lease brings back)
    out.write_text(json.dumps({k: v for k, v in document.items() if k != "tables"}))
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(out)], capture_output=True, check=True, timeout=120)
    assert json.loads(out.read_text())["tables"] == document["tables"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_a_gpu_it_says_so_and_points_to_the_dry_run():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dry-run" in result.stderr
