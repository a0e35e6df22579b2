"""Evaluate a trained adapter on a dataset: loss and perplexity per response token, and optionally the
official ChatGLM generation metrics (jieba ROUGE-1/2/L, character BLEU-4; train/metrics.py).

Generation follows the official ptuning evaluation (spec chatglm-6b-ptuning-v2 §5.8): one sample at
a time, sampling with top_p 0.7 and temperature 0.95, at most max_target_length new tokens; so the
scores vary with the seed. `greedy=True` makes them deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.presets import is_preset
from mmadapter.adapters.io.checkpoint import load_adapter, read_adapter_config, recorded_base
from mmadapter.adapters.methods.llama_adapter_v2 import takes_images, visual_prompter_of
from mmadapter.core.encoding import encode_prompt
from mmadapter.core.examples import Example
from mmadapter.core.progress import passing_bar
from mmadapter.core.quantization import Quantization
from mmadapter.core.templates import Template
from mmadapter.train.chatglm_data import ChatGLMRow, build_eval_example, eval_prompt
from mmadapter.train.data import (
    BadSampleLog,
    Collator,
    SupervisedDataset,
    chatglm_data_config,
    data_template,
    load_samples,
)
from mmadapter.train.loss import TokenLoss, evaluate
from mmadapter.train.metrics import corpus_scores
from mmadapter.train.multimodal import image_loader_for, model_inputs
from mmadapter.train.readers import read_examples
from mmadapter.train.recipe import DataSection, DataSource, parse_recipe
from mmadapter.train.setup import has_accelerator_device, pad_token_id
from mmadapter.vision.images import ImageLoadError

#: Official sampling settings of the ChatGLM P-Tuning v2 evaluation.
OFFICIAL_SAMPLING = {"do_sample": True, "top_p": 0.7, "temperature": 0.95}


def saved_recipe(adapter_dir: str | Path):
    """The recipe an mmadapter training run stored in the adapter's config, or None."""
    training = read_adapter_config(adapter_dir).get("training")
    if not isinstance(training, dict) or "stages" not in training:
        return None
    return parse_recipe(training)


class NoUsableSamples(ValueError):
    """Every sample of the evaluation data was unusable (a bad file, or data read in the wrong format)."""


def training_formats(adapter_dir: str | Path) -> list[str]:
    """The data formats the adapter trained on, in recipe order (none known for an adapter from elsewhere)."""
    recipe = saved_recipe(adapter_dir)
    if recipe is None:
        return []
    return list(dict.fromkeys(source.format for stage in recipe.stages for source in stage.data.train))


def load_for_eval(
    adapter_dir: str | Path,
    base: str | None = None,
    tokenizer: str | None = None,
    dtype=None,
    quantization: Quantization | None = None,
    clip_weights: str | None = None,
):
    """(model with the adapter, tokenizer, data settings of the last training stage or defaults); a quantized
    base loads straight onto the device the evaluation runs on. `clip_weights` replaces the saved CLIP path (V2)."""

    document = read_adapter_config(adapter_dir)
    recipe = saved_recipe(adapter_dir)
    saved_base, saved_tokenizer = recorded_base(adapter_dir)
    if base is None and saved_base and not is_preset(saved_base) and not Path(saved_base).exists():
        raise FileNotFoundError(
            f"{adapter_dir}: the adapter was trained on {saved_base}, which is not here (a path relative to the folder "
            "it was trained in?); pass --base PATH"
        )
    base = base or saved_base
    if not base:
        raise ValueError(f"{adapter_dir}: the adapter does not say which base model it needs; pass --base")
    folder = tokenizer or saved_tokenizer or base
    if is_preset(folder):
        raise ValueError(f"base {base!r} is a preset without a tokenizer; pass --tokenizer")
    if is_preset(base) and recipe is not None:  # a preset's random weights: the ones the run trained on
        torch.manual_seed(recipe.stages[0].train.seed)
    device = PartialState(cpu=not has_accelerator_device()).device if quantization is not None else "cpu"
    dtype = dtype or (recipe.model.dtype if recipe else None)
    model = load_base_model(base, dtype=dtype, device=device, quantization=quantization)
    load_adapter(model, adapter_dir, **({"clip_pretrained": clip_weights} if clip_weights else {}))
    data = recipe.stages[-1].data if recipe else DataSection(template=document.get("prompt_template") or "alpaca")
    return model.eval(), load_tokenizer(folder), data


def loss_and_perplexity(model, tokenizer, sources: list[DataSource], data: DataSection, batch_size: int) -> dict:
    """Mean loss per response token of `model` on `sources`, and its perplexity."""

    bad = BadSampleLog("skip", max_fraction=1.0)
    samples = load_samples(sources, tokenizer, data, [None], None, bad)
    if not samples:
        raise NoUsableSamples(f"no usable samples ({bad.summary(limit=3)})")
    loader, unreadable = image_loader_for(model, data.clip_cache, samples, show_progress=True, train=False)
    skip = {s.source for s in unreadable}
    dataset = SupervisedDataset([s for s in samples if s.source not in skip], loader)
    processes = PartialState(cpu=not has_accelerator_device())  # evaluating needs no Accelerator
    collate = Collator(pad_token_id=pad_token_id(tokenizer))
    result = evaluate(processes, TokenLoss(model).to(processes.device), dataset, collate, batch_size)
    for sample in unreadable:
        bad.add(sample)
    return {
        **result,
        "samples": len(dataset),
        "bad_samples": len(bad.samples),
        "bad_summary": bad.summary(limit=3, done="left out"),
    }


def _prompt_and_reference(
    example: Example, tokenizer, data: DataSection, source: DataSource, template: Template
) -> tuple[list[int], str]:
    if source.format == "chatglm":
        config = chatglm_data_config(data, source)
        (*history, (query, response)) = example.turns
        row = ChatGLMRow(query, response, tuple(history), example.source)
        features = build_eval_example(tokenizer, eval_prompt(row, config), response, config)
        return features["input_ids"], tokenizer.decode(features["labels"], skip_special_tokens=True).strip()
    prompt = encode_prompt(example, tokenizer, template, caption_instruction=data.caption_instruction)
    return prompt, example.turns[-1][1].strip()


@torch.no_grad()
def generation_scores(
    model,
    tokenizer,
    sources: list[DataSource],
    data: DataSection,
    *,
    max_new_tokens: int | None = None,
    greedy: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate an answer for every sample and score it with the official ROUGE / BLEU-4. An adapter that takes
    images sees each sample's image (eval transform), and text-only samples as its training showed them; for
    any other adapter, image samples are left out."""

    torch.manual_seed(seed)
    predictions, references, unreadable = [], [], 0
    device = next(model.parameters()).device
    sampling = {"do_sample": False} if greedy else OFFICIAL_SAMPLING
    template = data_template(data, tokenizer)
    # A chat template's end-of-turn token ends an answer too (Llama 3's <|eot_id|> is not its EOS).
    stops = {"eos_token_id": [tokenizer.eos_token_id, *template.stop_token_ids]} if template.stop_token_ids else {}
    load_pixels = visual_prompter_of(model).pixel_loader(train=False) if takes_images(model) else None
    for source in sources:
        examples = [
            e
            for e in read_examples(
                source.format,
                source.path,
                source.images,
                source.options,
                limit,
                allow_outside_root=source.allow_outside_root,
            )
        ]
        for example in passing_bar(examples, desc=f"generating {Path(source.path).name}"):
            if not isinstance(example, Example) or (example.image is not None and load_pixels is None):
                continue
            prompt, reference = _prompt_and_reference(example, tokenizer, data, source, template)
            ids = torch.tensor([prompt], device=device)
            try:
                pixels = {} if example.image is None else load_pixels(example.image)
            except ImageLoadError:  # left out, as the loss pass leaves it out (and reports it)
                unreadable += 1
                continue
            image = {name: value[None].to(device) for name, value in pixels.items()}
            output = model.generate(
                **model_inputs(model, ids, torch.ones_like(ids), image),
                max_new_tokens=max_new_tokens or data.max_target_length,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
                **stops,
            )
            predictions.append(tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip())
            references.append(reference)
    if not predictions:
        raise ValueError("no samples to generate answers for (image samples need an adapter that takes images)")
    scores = corpus_scores(predictions, references)
    return {**scores, "generated": len(predictions), "unreadable_images": unreadable, "sampling": sampling}
