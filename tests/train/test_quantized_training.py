"""`model.quantization` in recipes: the loss falls on a 4-/8-bit tiny base (with gradient checkpointing too), only
the adapter trains, and a bad value or a missing backend names the key."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mmadapter.adapters.backbones.quantization import is_quantized_linear
from mmadapter.adapters.methods.base import trainable_parameters
from mmadapter.cli.main import main
from mmadapter.train.loop import train
from mmadapter.train.setup import build_model
from tests.helpers.threads import single_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(
    ("bits", "method", "trains", "lr", "checkpointing"),
    [
        (4, "llama-adapter-v2", "instruction", 0.05, True),
        (8, "lora", None, 0.05, False),
        (4, "llama-adapter-v1", None, 0.3, False),
    ],
)
def test_the_loss_falls_on_a_quantized_base(make_recipe, tokenizer_dir, bits, method, trains, lr, checkpointing):
    recipe = make_recipe(
        method=method,
        model={"base": "tiny-llama", "tokenizer": str(tokenizer_dir), "quantization": {"bits": bits}},
        train={"max_steps": 8, "lr": lr, "gradient_checkpointing": checkpointing},
        stages=[{"name": "only", "trains": trains}],
    )
    model, tokenizer = build_model(recipe, None, None)
    assert is_quantized_linear(model.model.layers[0].self_attn.q_proj)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable_parameters(model)}
    history = train(recipe, model=model, tokenizer=tokenizer).summary["stages"][0]["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_wrong_bit_width_names_the_key(make_recipe):
    with pytest.raises(ValueError, match=r"model.quantization.bits: expected one of 4, 8, got 3"):
        make_recipe(model={"base": "tiny-llama", "quantization": {"bits": 3}})


def test_without_bitsandbytes_training_names_the_recipe_key(make_recipe, tokenizer_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    recipe = make_recipe(model={"base": "tiny-llama", "tokenizer": str(tokenizer_dir), "quantization": {"bits": 4}})
    with pytest.raises(ValueError, match=r"^model.quantization: a 4-bit base needs bitsandbytes"):
        build_model(recipe, None, None)


def test_eval_quantize_loads_a_full_precision_adapter_on_a_quantized_base(make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 4, "lr": 0.3}, data_options={"eval_from_train": 8})
    result = train(recipe)
    data = recipe.stages[0].data.train[0].path
    full = result.summary["final_eval_loss"]
    losses = {}
    for bits in (4, 8):
        capsys.readouterr()
        assert (
            main(["eval", str(result.adapter_dir), "--data", data, "--limit", "8", "--quantize", str(bits), "--json"])
            == 0
        )
        losses[bits] = json.loads(capsys.readouterr().out)["eval_loss"]
    # The same adapter on a quantized base: close to the full-precision loss, closer with more bits.
    assert abs(losses[8] - full) < abs(losses[4] - full) < 0.05 * full
    assert losses[8] != full


def test_a_bad_quantize_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "runs/x/adapter", "--data", "d.json", "--quantize", "3"])
    assert stopped.value.code == 2 and "--quantize: invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err
