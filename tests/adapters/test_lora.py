"""LoRA through peft: exact zero-init, peft-readable folders, merge/unmerge, training, parameter counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mmadapter.adapters import (
    attach_adapter,
    load_adapter,
    make_config,
    mark_trainable,
    save_adapter,
    trainable_parameters,
)
from mmadapter.adapters.methods.lora import DEFAULT_TARGET_MODULES, Lora
from mmadapter.cli.main import main
from tests.helpers.perturb import perturb_adapter

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [0, 0, 61, 200, 4, 33, 19, 250]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


def lora_llama(tiny_llama, gqa=False, dtype=None, **overrides):
    model = tiny_llama(gqa=gqa, dtype=dtype)
    return attach_adapter(model, make_config("lora", **{"r": 4, "alpha": 8.0, "dropout": 0.0, **overrides}))


@pytest.mark.parametrize("gqa", [False, True])
def test_attaching_lora_changes_no_logits(tiny_llama, gqa):
    base = tiny_llama(gqa=gqa)(IDS, attention_mask=MASK).logits
    model = lora_llama(tiny_llama, gqa=gqa)
    assert torch.equal(model(IDS, attention_mask=MASK).logits, base)


def test_lora_on_a_bfloat16_base_keeps_fp32_weights_and_exact_zero_init(tiny_llama):
    base = tiny_llama(dtype=torch.bfloat16)(IDS, attention_mask=MASK).logits
    model = lora_llama(tiny_llama, dtype=torch.bfloat16)
    assert {p.dtype for p in trainable_parameters(model).values()} == {torch.float32}
    assert torch.equal(model(IDS, attention_mask=MASK).logits, base)


def test_llama_defaults_to_q_and_v_and_selects_only_lora_weights(tiny_llama):
    model = lora_llama(tiny_llama)
    selected = mark_trainable(model)
    assert DEFAULT_TARGET_MODULES["llama"] == ("q_proj", "v_proj")
    assert {name.split(".")[4] for name in selected} == {"q_proj", "v_proj"}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in selected)
    # 4 layers x (q: 64->64, v: 64->64 as MHA) x r (in + out)
    assert sum(p.numel() for p in selected.values()) == 4 * 2 * 4 * (64 + 64)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in selected)


def test_unknown_architecture_needs_explicit_targets(tiny_llama):
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default target_modules for model_type 'mystery'"):
        attach_adapter(model, make_config("lora"))


def test_config_validation():
    with pytest.raises(ValueError, match="r must be at least 1"):
        make_config("lora", r=0)
    with pytest.raises(ValueError, match="non-empty list"):
        make_config("lora", target_modules="q_proj")
    with pytest.raises(ValueError, match="unknown lora config field"):
        make_config("lora", rank=4)
    with pytest.raises(ValueError, match="alpha must be positive, got 0"):  # alpha / r = 0: nothing would train
        make_config("lora", alpha=0)
    with pytest.raises(ValueError, match="alpha must be positive, got nan"):
        make_config("lora", alpha=float("nan"))


def test_targets_that_match_nothing_name_the_models_linear_layers(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\['qproj'\] match no layer .* named .*q_proj.*v_proj") as error:
        attach_adapter(model, make_config("lora", target_modules=["qproj"]))
    assert "lm_head" in str(error.value) and not any("lora" in name for name, _ in model.named_modules())


def test_only_lora_weights_change_after_training_steps(tiny_llama):
    model = lora_llama(tiny_llama, dropout=0.1)
    selected = mark_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(selected.values(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(IDS, attention_mask=MASK, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(selected)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_saved_folder_uses_peft_names_and_peft_loads_it(tiny_llama, tmp_path):
    from peft import PeftModel

    model = lora_llama(tiny_llama)
    perturb_adapter(model)
    ours = model(IDS, attention_mask=MASK).logits
    save_adapter(model, tmp_path / "lora")

    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 4 * 2 * 2
    peft_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4 and peft_config["lora_alpha"] == 8.0
    assert sorted(peft_config["target_modules"]) == ["q_proj", "v_proj"]

    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, tiny_llama()(IDS, attention_mask=MASK).logits, atol=1e-3)

    reloaded = load_adapter(tiny_llama(), tmp_path / "lora")
    assert torch.equal(reloaded(IDS, attention_mask=MASK).logits, ours)


def test_merge_equals_unmerged_and_unmerge_restores_the_base(tiny_llama):
    model = lora_llama(tiny_llama)
    perturb_adapter(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(IDS, attention_mask=MASK).logits
    Lora.merge(model, model.adapter_config)
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    assert any(not torch.equal(merged_weights[n], base_weights[n]) for n in base_weights)
    # fp32: one rounding per folded weight; logits of this size agree to ~1e-6.
    torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, unmerged, rtol=0, atol=1e-5)
    Lora.unmerge(model, model.adapter_config)
    for name, weight in base_weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, unmerged, rtol=0, atol=1e-5)


def test_info_counts_lora_on_llama_7b(capsys):
    assert main(["info", "--base", "llama-7b", "--method", "lora", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 32 layers x (q_proj + v_proj) x r=8 x (4096 in + 4096 out)
    assert report["trainable_params"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert report["method"] == "lora"


# ---------------------------------------------------------------------------------------------------
# ChatGLM-6B: fused per-head query_key_value by default (peft's own default for model_type "chatglm").

GLM_IDS = torch.tensor([[5, 100, 200, 130001, 130004, 300, 301], [5, 101, 130001, 130004, 400, 401, 402]])


@pytest.fixture(scope="module")
def chatglm_base():
    from mmadapter.adapters.backbones.presets import base_config, build_base_model

    torch.manual_seed(0)
    return build_base_model(base_config("tiny-chatglm")).requires_grad_(False)


def test_chatglm_lora_at_init_changes_nothing_and_targets_query_key_value(chatglm_base):
    model = attach_adapter(copy.deepcopy(chatglm_base), make_config("lora", dropout=0.0))
    with torch.no_grad():
        assert torch.equal(model(GLM_IDS).logits, chatglm_base(GLM_IDS).logits)
    selected = trainable_parameters(model)
    assert {name.split(".")[4] for name in selected} == {"query_key_value"}
    # 3 layers x r=8 x (64 in + 192 fused q|k|v out)
    assert sum(p.numel() for p in selected.values()) == 3 * 8 * (64 + 192)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_loads_our_chatglm_lora_folder(chatglm_base, tmp_path):
    from peft import PeftModel

    model = attach_adapter(copy.deepcopy(chatglm_base), make_config("lora", preset="chatglm-all-linear"))
    perturb_adapter(model)
    model.eval()
    with torch.no_grad():
        ours = model(GLM_IDS).logits
    save_adapter(model, tmp_path / "glm-lora", prompt_template="chatglm")
    keys = set(load_file(tmp_path / "glm-lora" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight" in keys
    assert "base_model.model.transformer.layers.2.mlp.dense_4h_to_h.lora_B.weight" in keys

    peft_model = PeftModel.from_pretrained(copy.deepcopy(chatglm_base), tmp_path / "glm-lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=GLM_IDS).logits, ours, rtol=0, atol=1e-5)
        Lora.merge(model, model.adapter_config)
        torch.testing.assert_close(model(GLM_IDS).logits, ours, rtol=0, atol=1e-4)


def test_info_counts_lora_on_chatglm_6b(capsys):
    assert main(["info", "--base", "chatglm-6b", "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 28 * 8 * (4096 + 12288) == 3_670_016


def test_attached_lora_follows_the_models_eval_mode(tiny_llama):
    """Dropout inside freshly injected LoRA layers must not be active on an eval-mode model."""
    from mmadapter.adapters import attach_adapter, make_config

    model = attach_adapter(tiny_llama().eval(), make_config("lora", dropout=0.5))
    assert not any(module.training for module in model.modules())
    ids = torch.arange(1, 9).view(1, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
