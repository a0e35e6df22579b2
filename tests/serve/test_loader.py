"""Base folder + adapter folder -> a served model: template from the adapter, mergeable parts merged."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from huggingface_hub import constants

from mmadapter.adapters import attach_adapter, make_config, save_adapter
from mmadapter.adapters.io.hub import push_to_hub
from mmadapter.cli.main import main
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.loader import load_served_model
from mmadapter.serve.sampling import SamplingParams
from tests.helpers.fake_hub import FakeHub
from tests.helpers.perturb import perturb_adapter

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture
def base_folder(tiny_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def saved_adapter(tiny_llama, tmp_path, method: str, template: str | None = "alpaca", **options):
    model = tiny_llama()
    attach_adapter(model, make_config(method, **options))
    perturb_adapter(model)
    return model, save_adapter(model, tmp_path / f"{method}-adapter", prompt_template=template)


def test_v1_adapter_serves_like_the_model_it_was_saved_from(tiny_llama, tiny_tokenizer, base_folder, tmp_path):
    model, folder = saved_adapter(
        tiny_llama, tmp_path, "llama-adapter-v1", "chat65b", adapted_layers=2, prompt_length=3
    )
    served = load_served_model(base_folder, folder, device="cpu")
    assert served.name == folder.name and served.template.name == "chat65b" and served.method == "llama-adapter-v1"
    expected = GenerationEngine(model, tiny_tokenizer).generate(["the red"], GREEDY)[0].token_ids
    assert served.engine.generate(["the red"], GREEDY)[0].token_ids == expected


def test_adapter_by_hub_repo_id_and_revision(tiny_llama, tiny_tokenizer, base_folder, tmp_path, monkeypatch, capsys):
    """`--adapter` also takes a hub repo id (fetched through the hub cache); `--revision` picks the branch."""
    model, folder = saved_adapter(
        tiny_llama, tmp_path, "llama-adapter-v1", "chat65b", adapted_layers=2, prompt_length=3
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    repo = "someone/tiny-v1"
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        push_to_hub(folder, repo, revision="v2", token="hf_test")  # only the v2 branch holds the adapter

        served = load_served_model(base_folder, repo, revision="v2", device="cpu")
        assert served.name == repo and served.template.name == "chat65b" and served.method == "llama-adapter-v1"
        expected = GenerationEngine(model, tiny_tokenizer).generate(["the red"], GREEDY)[0].token_ids
        assert served.engine.generate(["the red"], GREEDY)[0].token_ids == expected

        monkeypatch.setattr(sys, "stdin", io.StringIO("the red\n"))
        chat = ["chat", "--base", str(base_folder), "--adapter", repo, "--temperature", "0", "--max-new-tokens", "2"]
        assert main([*chat, "--revision", "v2"]) == 0
        assert f"chatting with {repo} (llama-adapter-v1; template chat65b" in capsys.readouterr().out
        assert main(chat) == 2  # main has no adapter
        assert f"{repo} ({hub.url}): no mmadapter_config.json" in capsys.readouterr().err


def test_template_defaults_to_the_base_models_usual_one(base_folder):
    served = load_served_model(base_folder, device="cpu")
    assert served.template.name == "alpaca" and served.method is None
    assert served.defaults.temperature == 0.1 and served.defaults.top_p == 0.75  # LLaMA-Adapter's demo settings


def test_a_preset_base_needs_a_tokenizer_folder():
    with pytest.raises(ValueError, match="--tokenizer"):
        load_served_model("tiny-llama", device="cpu")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (
            "llama-adapter-v2",
            {
                "clip_model": "mmadapter-tiny-vit",
                "visual_width": 32,
                "visual_depth": 1,
                "visual_heads": 2,
                "prompt_length": 4,
                "lora_rank": 4,
                "scale_linears": ["q", "up"],
                "instruction_trains": ["bias", "scale", "norms", "lora"],
            },
        ),
        ("lora", {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ],
)
def test_merged_serving_equals_the_unmerged_adapter(base_folder, tmp_path, tiny_llama, method, options):
    _, folder = saved_adapter(tiny_llama, tmp_path, method, **options)
    merged = load_served_model(base_folder, folder, device="cpu")
    unmerged = load_served_model(base_folder, folder, device="cpu", merge=False)
    ids = torch.tensor([merged.engine.encode("what colour is the square")])
    inputs = {}
    if merged.takes_images:
        from mmadapter.serve.chat import visual_inputs

        inputs = visual_inputs(merged, None)
    with torch.no_grad():
        merged_logits = merged.model(ids, **inputs).logits
        unmerged_logits = unmerged.model(ids, **inputs).logits
        base_logits = load_served_model(base_folder, device="cpu").model(ids).logits
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter does change the model
    assert merged.engine.generate([ids[0].tolist()], GREEDY, inputs)[0].token_ids == (
        unmerged.engine.generate([ids[0].tolist()], GREEDY, inputs)[0].token_ids
    )
    # V2 keeps LoRA on k/v of prompt layers unmerged on purpose (prompt keys/values use the plain weights).
    lora = {name: m.merged for name, m in merged.model.named_modules() if hasattr(m, "lora_A")}
    assert lora and all(done for name, done in lora.items() if not name.endswith(("k_proj", "v_proj")))
