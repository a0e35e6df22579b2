"""Two CPU processes (torchrun, gloo) train the same adapter as one process with the same global batch.

Tolerance: rtol 1e-4, atol 5e-5 (the learning rates are 0.05-0.3). DDP averages gradients in another
summation order than one process summing its micro-batches, so gradients agree to float32 rounding.
Adam divides by the gradient's running RMS, which turns the rounding of a near-zero gradient into a
visible step (with eps 1e-8 one LayerNorm bias of the V2 projector ends 1.2e-4 apart), so the V2 run
uses eps 1e-6; then the largest difference is 1e-5. The losses logged at every step agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmadapter.train.loop import train
from mmadapter.train.recipe import parse_recipe
from tests.helpers.train_data import COLOURS, alpaca_rows, write_image, write_json, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def adapters_close(a: Path, b: Path) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert set(left) == set(right)
    for key in left:
        torch.testing.assert_close(
            left[key], right[key], rtol=1e-4, atol=5e-5, msg=lambda text, key=key: f"{key}: {text}"
        )


@pytest.mark.slow
def test_two_processes_match_one_process(make_recipe, tmp_path):
    # 1. LLaMA-Adapter V1 on text; 2. V2 with caption and instruction data mixed in every step (each kind
    # updates only its own parameters: manual gradient averaging instead of DDP's hooks).
    images = tmp_path / "images"
    images.mkdir()
    captions = []
    for i, colour in enumerate(list(COLOURS) * 2):
        write_image(images / f"{i}.png", colour)
        captions.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    mixed_data = [
        {
            "format": "caption-jsonl",
            "path": str(write_jsonl(tmp_path / "c.jsonl", captions)),
            "images": str(images),
            "trains": "caption",
        },
        {"format": "alpaca", "path": str(write_json(tmp_path / "a.json", alpaca_rows(8))), "trains": "instruction"},
    ]
    documents = {
        "v1": make_recipe(train={"lr": 0.3, "max_steps": 6, "batch_size": 8}, parsed=False),
        "v2-mixed": make_recipe(
            data=mixed_data,
            method="llama-adapter-v2",
            train={"max_steps": 4, "batch_size": 8, "eps": 1e-6},
            parsed=False,
        ),
    }
    paths = []
    for name, document in documents.items():
        document["output_dir"] = str(tmp_path / f"{name}-one")
        train(parse_recipe(document))
        document = dict(
            document, output_dir=str(tmp_path / f"{name}-two"), train={**document["train"], "batch_size": 4}
        )
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(document))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests/train/ddp_driver.py"),
        *map(str, paths),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in documents:
        adapters_close(tmp_path / f"{name}-one/adapter", tmp_path / f"{name}-two/adapter")
        one, two = (
            json.loads((tmp_path / f"{name}-{n}/adapter/training_summary.json").read_text()) for n in ("one", "two")
        )
        assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"]
        losses = [[h["loss"] for h in s["stages"][0]["history"]] for s in (one, two)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
