"""LLaMA-Adapter V2 adapter folders (with the vision side) and parameter counts of every preset."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from mmadapter.adapters import attach_adapter, load_adapter, make_config, save_adapter, trainable_parameters
from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.adapters.io.checkpoint import WEIGHTS_FILE
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from mmadapter.cli.main import main
from mmadapter.vision import FrozenCLIPEncoder
from tests.helpers.llama_v2_setup import EVERYTHING, pixels, tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import left_padded


def test_save_and_load_round_trip_with_the_vision_side(tiny_llama, tmp_path):
    clip_dir = FrozenCLIPEncoder("mmadapter-tiny-vit", seed=7).save(tmp_path / "clip")
    model = tiny_llama()
    attach_adapter(model, tiny_v2_config(**EVERYTHING, clip_pretrained=str(clip_dir)))
    perturb_adapter(model)
    ids, mask = left_padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(model, pixels())).logits
    save_adapter(model, tmp_path / "adapter")

    with safe_open(tmp_path / "adapter" / WEIGHTS_FILE, "pt") as file:
        keys = set(file.keys())
    assert keys == set(trainable_parameters(model, None))
    assert any(key.startswith("visual_projector.visual_blocks.") for key in keys)
    assert not any(key.startswith("vision_encoder.") for key in keys)  # frozen CLIP is never saved

    moved = shutil.move(clip_dir, tmp_path / "elsewhere")  # CLIP weights live at a machine-specific path
    fresh = tiny_llama()  # the same seeded base weights
    load_adapter(fresh, tmp_path / "adapter", clip_pretrained=str(moved))
    assert fresh.adapter_config.clip_pretrained == str(moved)
    with torch.no_grad():
        logits = fresh(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(fresh, pixels())).logits
    assert torch.equal(logits, expected)


def test_info_builds_the_multimodal_model_on_the_meta_device():
    model = build_base_model(base_config("llama-7b"), device="meta")
    attach_adapter(model, make_config("llama-adapter-v2", "lora-bias-7b"))
    assert model.vision_encoder.device.type == "meta"
    assert all(param.is_meta for param in model.parameters())  # no memory for LLaMA, LoRA or ViT-L/14


# Arithmetic in README "LLaMA-Adapter V2"; spec llama-adapter.md §5.2-5.3. The released files hold one more
# gate (layer 0's, never used) per model, and LORA-BIAS's 32 new_gates fold into the gates on import.
COUNTS = [
    ("llama-65b", "chat65b", None, 13_811_712),
    ("llama-7b", "chat65b", None, 2_764_800),
    ("llama-7b", "multimodal-7b", None, 63_095_520),
    ("llama-7b", "multimodal-7b", "caption", 61_731_552),
    ("llama-7b", "multimodal-7b", "instruction", 1_363_968),
    ("llama-7b", "lora-bias-7b", None, 103_072_480),
    ("llama-7b", "paper", None, 64_758_528),
    ("llama-7b", "v1-multimodal", None, 4_379_584),
]


@pytest.mark.parametrize(("base", "preset", "stage", "trainable"), COUNTS)
def test_info_reports_each_preset(capsys, base, preset, stage, trainable):
    argv = ["info", "--base", base, "--method", "llama-adapter-v2", "--preset", preset, "--json"]
    assert main(argv + (["--stage", stage] if stage else [])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == trainable
    if (preset, stage) == ("multimodal-7b", None):
        # LLaMA-7B 6,738,415,616 + frozen CLIP ViT-L/14 tower 303,966,208 + new adapter tensors
        # (63,095,520 minus the 266,240 norm weights LLaMA already has).
        assert report["total_params"] == 6_738_415_616 + 303_966_208 + 63_095_520 - 266_240
