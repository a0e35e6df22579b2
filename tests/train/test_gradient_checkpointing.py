"""`train.gradient_checkpointing`: every method on every family gets the gradients of the plain run, and a short
training run with the key set works. Checkpointing replays each decoder layer in the backward pass, so what a
layer reads besides its input must survive the replay: LLaMA-Adapter's prompt keys/values (cached when no
gradient is recorded), V2's visual prompt (a keyword argument), P-Tuning v2's read-only prefix cache, LoRA's
dropout (the replay restores the RNG)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmadapter.adapters import attach_adapter, make_config, mark_trainable
from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.train.loop import train
from mmadapter.train.loss import TokenLoss
from mmadapter.train.setup import set_gradient_checkpointing
from tests.helpers.chatglm_reference import GMASK, SOP
from tests.helpers.llama_v2_setup import EVERYTHING, pixels, tiny_v2_config
from tests.helpers.threads import single_thread  # noqa: F401 (autouse fixture)
from tests.helpers.tiny_chatglm import build_tiny_glm
from tests.helpers.tiny_families import FAMILY_PRESETS, build_tiny_family
from tests.helpers.tiny_llama import IDS, left_padded
from tests.helpers.tiny_recipe import TINY_ADAPTERS

METHODS = ("llama-adapter-v1", "llama-adapter-v2", "lora", "ptuning-v2")
#: ChatGLM-6B takes the methods that do not need q_proj/k_proj/v_proj.
CASES = [(family, method) for family in FAMILY_PRESETS for method in METHODS]
CASES += [("chatglm", "lora"), ("chatglm", "ptuning-v2")]
GLM_IDS = torch.tensor([[5, 11, 12, 13, GMASK, SOP, 21, 22], [5, 31, 32, 33, GMASK, SOP, 41, 42]])
#: Absolute gradient tolerance. The replay recomputes exactly what the plain run kept, so the gradients agree
#: bit for bit, except on ChatGLM: its plain training forward also writes a KV cache (use_cache defaults to true;
#: checkpointing turns it off), whose concatenated keys change the float32 summation order (measured: 2.1e-6 on
#: gradients of magnitude 3; with use_cache=False in the plain run, bit for bit too).
TOLERANCE = {"chatglm": 1e-5}


@pytest.fixture(scope="module")
def bases():
    """Family -> its seeded tiny base (tests take deep copies)."""
    models = {family: build_tiny_family(family) for family in FAMILY_PRESETS}
    models["chatglm"] = build_tiny_glm()
    return models


#: Every trainable part of each method, with dropout on, so the replay must reproduce the random masks.
CONFIGS = {
    "llama-adapter-v1": lambda: make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3),
    "llama-adapter-v2": lambda: tiny_v2_config(**EVERYTHING),
    "lora": lambda: make_config("lora", r=4, dropout=0.1),
    "ptuning-v2": lambda: make_config("ptuning-v2", pre_seq_len=3, prefix_projection=True, prefix_dropout=0.1),
}


def batch(family: str) -> dict[str, torch.Tensor]:
    ids, mask = (GLM_IDS, torch.ones_like(GLM_IDS)) if family == "chatglm" else left_padded(IDS)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels(2)}


def gradients(base, method: str, family: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Trainable parameter -> its gradient after one forward/backward of the training loss."""
    torch.manual_seed(0)  # the same random initialisation (prompts, LoRA A, prefix) in both runs
    model = attach_adapter(copy.deepcopy(base), CONFIGS[method]())
    trainable = mark_trainable(model)  # every stage's parameters at once (V2: caption and instruction)
    inputs = batch(family)
    with torch.no_grad():  # fills the prompt key/value caches, which a replay with autograd must not read
        TokenLoss(model.eval())(**inputs)
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both runs
    TokenLoss(model)(**inputs).sum().backward()
    assert all(p.grad is not None for p in trainable.values()), "a trainable parameter got no gradient"
    return {name: p.grad for name, p in trainable.items()}


@pytest.mark.parametrize(("family", "method"), CASES)
def test_checkpointing_gives_the_gradients_of_the_plain_run(bases, family, method):
    plain = gradients(bases[family], method, family, checkpointing=False)
    replayed = gradients(bases[family], method, family, checkpointing=True)
    assert plain.keys() == replayed.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(replayed[name], grad, rtol=0, atol=TOLERANCE.get(family, 0.0), msg=name)


def test_checkpointing_is_on_only_while_asked_and_needs_no_input_gradients(bases):
    model = attach_adapter(copy.deepcopy(bases["llama3"]), CONFIGS["llama-adapter-v1"]())
    layers = model.get_decoder().layers
    set_gradient_checkpointing(model, True)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not getattr(model, "_require_grads_hooks", None)  # non-reentrant: the embedding output stays frozen
    set_gradient_checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in layers)


def test_a_model_without_checkpointing_support_names_the_key():
    with pytest.raises(ValueError, match=r"^train.gradient_checkpointing: Linear does not .* set it to false"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2), True)


@pytest.mark.parametrize("method", ["llama-adapter-v2", "ptuning-v2"])
def test_a_short_run_with_the_key_set_trains(make_recipe, method):
    stage = "instruction" if method == "llama-adapter-v2" else None
    train_section = {"gradient_checkpointing": True, "max_steps": 4, "lr": 0.05}
    recipe = make_recipe(method=method, train=train_section, stages=[{"name": "only", "trains": stage}])
    torch.manual_seed(0)
    model = attach_adapter(build_base_model(base_config("tiny-llama")), make_config(method, **TINY_ADAPTERS[method]))
    result = train(recipe, model=model)
    assert all(layer.gradient_checkpointing for layer in model.get_decoder().layers)
    history = result.summary["stages"][0]["history"]
    assert result.summary["steps"] == 4
    assert history[-1]["loss"] < history[0]["loss"]
