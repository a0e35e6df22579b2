"""The training loop: loss falls for every method, only selected parameters move, stages stay disjoint,
mixed batches route each kind's loss to its own parameters, a non-finite loss stops with its samples."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.adapters.methods.base import attach_adapter, make_config, trainable_parameters
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompter_of
from mmadapter.core.examples import DataError
from mmadapter.train.data import BadSampleLog, Collator, SupervisedDataset, load_samples
from mmadapter.train.loop import TrainingStopped, train
from mmadapter.train.loss import TokenLoss
from mmadapter.train.recipe import DataSection, DataSource, load_recipe
from mmadapter.train.setup import plain_accelerator
from mmadapter.train.step import BackwardPerKind, ForwardPerKind, accumulate_gradients
from tests.helpers.tiny_recipe import TINY_ADAPTERS
from tests.helpers.train_data import COLOURS, alpaca_rows, write_image, write_json, write_jsonl

#: Learning rates at which each method visibly learns the tiny task in 8 steps.
LEARNING_RATES = {"llama-adapter-v1": 0.3, "llama-adapter-v2": 0.05, "lora": 0.05, "ptuning-v2": 0.2}
#: The stage each method trains in this test (V2: the text-instruction stage).
STAGES = {"llama-adapter-v2": "instruction"}


def tiny_model(method: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_base_model(base_config("tiny-llama"))
    return attach_adapter(model, make_config(method, **TINY_ADAPTERS[method]))


@pytest.mark.parametrize("method", sorted(LEARNING_RATES))
def test_loss_falls_and_only_the_selected_parameters_move(method, make_recipe):
    model = tiny_model(method)
    stage = STAGES.get(method)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recipe = make_recipe(
        method=method,
        train={"lr": LEARNING_RATES[method], "max_steps": 8},
        data_options={"eval_from_train": 16},
        stages=[{"name": "only", "trains": stage}],
    )
    result = train(recipe, model=model)
    summary = result.summary
    first_loss = summary["stages"][0]["history"][0]["loss"]  # measured before any update
    assert summary["final_eval_loss"] < first_loss - 0.1, (first_loss, summary["final_eval_loss"])
    selected = set(trainable_parameters(model, stage))
    for name, param in model.named_parameters():
        if name not in selected:
            assert torch.equal(param, before[name]), f"{name} is not selected but changed"
    assert any(not torch.equal(model.get_parameter(n), before[n]) for n in selected)
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert len(saved) == len(trainable_parameters(model, None))
    assert summary["steps"] == 8 and summary["tokens"] > 0 and summary["parameters"]["trainable_params"] > 0


def test_lora_on_the_embedding_trains_it(make_recipe):
    """peft wraps a LoRA-tuned embedding in a module of its own; the data's token ids are still checked against
    the embedding's rows, and the embedding's LoRA factors train."""
    torch.manual_seed(0)
    model = attach_adapter(
        build_base_model(base_config("tiny-llama")), make_config("lora", r=4, target_modules=["embed_tokens", "q_proj"])
    )
    recipe = make_recipe(method="lora", train={"lr": 0.05, "max_steps": 4})
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items() if "embed_tokens" in n}
    result = train(recipe, model=model)
    assert before and all(not torch.equal(model.get_parameter(n), p) for n, p in before.items())
    assert any("embed_tokens" in key for key in load_file(result.adapter_dir / "adapter_model.safetensors"))


def test_nonfinite_loss_stops_before_the_update_naming_the_sample(make_recipe, tmp_path, tiny_tokenizer):
    rows = alpaca_rows(16)
    rows[5]["instruction"] = "what colour is the bottom shape"  # the only row with "bottom"
    data = [{"format": "alpaca", "path": str(write_json(tmp_path / "poisoned.json", rows))}]
    model = tiny_model("llama-adapter-v1")
    (token,) = tiny_tokenizer.encode(" bottom", add_special_tokens=False)[-1:]
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    with pytest.raises(
        TrainingStopped, match=r"non-finite loss at step \d+ \(epoch 0\); samples: .*poisoned.json\[5\]\."
    ):
        train(make_recipe(data=data, train={"lr": 0.3, "max_steps": 4}), model=model)
    # No update was applied in the failing step, so every trainable value is still finite.
    assert all(torch.isfinite(p).all() for p in trainable_parameters(model).values())
    assert set(before) == set(trainable_parameters(model))


@pytest.fixture
def caption_data(tmp_path):
    """Eight coloured squares with captions, and one image whose header reads but whose pixels are cut short
    (found only when decoded, during training)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(list(COLOURS) * 2):
        write_image(folder / f"{i}.png", colour)
        rows.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    broken = write_image(folder / "broken.png", "red")
    broken.write_bytes(broken.read_bytes()[:50])
    rows.insert(3, {"image": "broken.png", "caption": "a broken square"})
    return write_jsonl(tmp_path / "captions.jsonl", rows), folder


def test_v2_staged_recipe_trains_each_stage_disjointly(caption_data, tmp_path, tokenizer_dir):
    captions, images = caption_data
    alpaca = write_json(tmp_path / "alpaca.json", alpaca_rows(8))
    overrides = {
        "model.tokenizer": str(tokenizer_dir),
        "output_dir": str(tmp_path / "run"),
        "train.log_with": "none",
        "data.max_bad_fraction": 0.2,
        "stages.0.train.max_steps": 3,  # 9 captions in batches of 4: one full epoch, the broken image included
        "stages.0.data.train.0.path": str(captions),
        "stages.0.data.train.0.images": str(images),
        "stages.1.data.train.0.path": str(alpaca),
    }
    recipe = load_recipe("tiny-llama-adapter-v2-staged", overrides)
    model = tiny_model("llama-adapter-v2")
    initial = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    caption_keys, instruction_keys = (
        set(trainable_parameters(model, "caption")),
        set(trainable_parameters(model, "instruction")),
    )
    assert caption_keys and instruction_keys and not caption_keys & instruction_keys
    result = train(recipe, model=model)

    after_caption = load_file(tmp_path / "run/stages/caption/adapter_model.safetensors")
    after_instruction = load_file(tmp_path / "run/stages/instruction/adapter_model.safetensors")
    assert set(after_caption) == set(after_instruction) == caption_keys | instruction_keys

    def changed(old, new):
        return {k for k in new if not torch.equal(old[k], new[k])}

    assert changed(initial, after_caption) <= caption_keys
    assert {k for k in caption_keys if k.endswith("adapter_gate") or "visual_query" in k} <= changed(
        initial, after_caption
    )
    assert changed(after_caption, after_instruction) <= instruction_keys
    assert {k for k in instruction_keys if k.endswith("adapter_bias")} <= changed(after_caption, after_instruction)
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(final[k], after_instruction[k]) for k in final)

    caption_stage = result.summary["stages"][0]
    assert caption_stage["bad_samples"]["masked_during_training"] == 1
    assert any("broken.png" in line for line in caption_stage["bad_samples"]["examples"])
    summary = json.loads((tmp_path / "run/stages/caption/training_summary.json").read_text())
    assert summary["stage"] == "caption" and summary["parameters"]["stage"] == "caption"


def test_a_later_stage_that_cannot_start_keeps_the_earlier_ones_for_resume(
    caption_data, tmp_path, tokenizer_dir, capsys
):
    """Stage 2's data fails only when stage 2 sets up: stage 1's training is checkpointed at the boundary (even
    without train.save_every) and the error says how to continue; --resume with the fixed data completes."""
    from mmadapter.cli.main import main

    captions, images = caption_data
    run = tmp_path / "run"
    overrides = {
        "model.tokenizer": str(tokenizer_dir),
        "output_dir": str(run),
        "train.log_with": "none",
        "data.max_bad_fraction": 0.2,
        "stages.0.train.max_steps": 2,
        "stages.1.train.max_steps": 2,
        "stages.0.data.train.0.path": str(captions),
        "stages.0.data.train.0.images": str(images),
        "stages.1.data.train.0.path": str(captions),  # captions where instructions belong: every row is bad
    }
    flags = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "tiny-llama-adapter-v2-staged", *flags]) == 2
    error = capsys.readouterr().err
    assert "stages before 'instruction' are trained and kept" in error and f"--resume {run}" in error
    assert (run / "stages/caption/adapter_model.safetensors").is_file() and not (run / "adapter").exists()
    alpaca = write_json(tmp_path / "alpaca.json", alpaca_rows(8))
    assert main(["train", "--resume", str(run), "--set", f"stages.1.data.train.0.path={alpaca}"]) == 0
    assert (run / "adapter/adapter_model.safetensors").is_file()
    summary = json.loads((run / "adapter/training_summary.json").read_text())
    assert [stage["steps"] for stage in summary["stages"]] == [2, 2]


@pytest.mark.parametrize("route", [BackwardPerKind, ForwardPerKind])
def test_mixed_batch_routes_each_kinds_loss_to_its_own_parameters(route, caption_data, tmp_path, tiny_tokenizer):
    """One forward over caption and instruction samples (FSDP2's route: one per kind); each parameter set
    gets exactly the gradient of its own samples' loss (computed here separately, plainly)."""
    captions, images = caption_data
    model = tiny_model("llama-adapter-v2")
    kinds = ["caption", "instruction"]
    sources = [
        DataSource(format="caption-jsonl", path=str(captions), images=str(images), trains="caption", max_samples=3),
        DataSource(format="alpaca", path=str(write_json(tmp_path / "a.json", alpaca_rows(3))), trains="instruction"),
    ]
    samples = load_samples(
        sources, tiny_tokenizer, DataSection(template="chatglm"), kinds, None, BadSampleLog(), show_progress=False
    )
    dataset = SupervisedDataset(samples, visual_prompter_of(model).pixel_loader())
    torch.manual_seed(0)
    batch = Collator(pad_token_id=0)([dataset[i] for i in range(len(dataset))])
    params = {kind: list(trainable_parameters(model, kind).values()) for kind in kinds}
    for kind_params in params.values():
        for p in kind_params:
            p.requires_grad_(True)

    accelerator = plain_accelerator()
    loss_module = TokenLoss(model)
    accumulate_gradients(accelerator, loss_module, [batch], route(params))
    got = {kind: [p.grad.clone() for p in params[kind]] for kind in kinds}

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_mask")}
    losses = loss_module(**inputs)
    valid = batch["labels"][:, 1:] != -100
    for k, kind in enumerate(kinds):
        mine = valid & (batch["kinds"][:, None] == k)
        loss = losses[mine].sum() / mine.sum()
        expected = torch.autograd.grad(loss, params[kind], retain_graph=True, allow_unused=True)
        for g, e in zip(got[kind], expected, strict=True):
            torch.testing.assert_close(g, e if e is not None else torch.zeros_like(g), rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got["caption"]) and any(g.abs().sum() > 0 for g in got["instruction"])


def test_clip_feature_cache_feeds_training_and_reports_unreadable_images_up_front(caption_data, make_recipe, tmp_path):
    captions, images = caption_data
    cache = tmp_path / "clip-cache"
    recipe = make_recipe(
        data=[{"format": "caption-jsonl", "path": str(captions), "images": str(images)}],
        method="llama-adapter-v2",
        train={"max_steps": 2},
        data_options={"clip_cache": str(cache), "max_bad_fraction": 0.2},
        stages=[{"name": "caption", "trains": "caption"}],
    )
    summary = train(recipe).summary["stages"][0]
    assert summary["bad_samples"]["skipped"] == 1 and summary["bad_samples"]["masked_during_training"] == 0
    assert "broken.png" in summary["bad_samples"]["examples"][0]
    (index,) = cache.glob("*/index.json")
    assert len(json.loads(index.read_text())["shards"]) >= 1  # 8 distinct images cached
    assert all(h["loss"] > 0 for h in summary["history"])


@pytest.mark.parametrize(
    ("policy", "fraction", "error", "message"),
    [
        ("fail", 0.5, DataError, r"captions.jsonl:4: .*broken.png: corrupt or truncated image .*on_bad_sample=fail"),
        ("skip", 0.05, TrainingStopped, r"1 of 9 samples had unreadable images, more than data.max_bad_fraction"),
    ],
)
def test_unreadable_image_during_training_follows_the_policy(
    caption_data, make_recipe, policy, fraction, error, message
):
    captions, images = caption_data
    recipe = make_recipe(
        data=[{"format": "caption-jsonl", "path": str(captions), "images": str(images)}],
        method="llama-adapter-v2",
        train={"max_steps": 3},
        data_options={"on_bad_sample": policy, "max_bad_fraction": fraction},
        stages=[{"name": "caption", "trains": "caption"}],
    )
    with pytest.raises(error, match=message):
        train(recipe)
