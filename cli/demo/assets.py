"""Build the embedded demo's assets: a tokenizer, a tiny LLaMA and a tiny CLIP vision tower.

    python -m mmadapter.cli.demo.assets [--output assets] [--seed 0]

Everything comes from the synthetic world of `mmadapter.cli.demo.world` and fixed seeds, so
anyone can rebuild the files (bit-for-bit on the same machine and library versions; float
rounding may differ elsewhere):

- `tiny-llama/`: a byte-level BPE tokenizer trained with `tokenizers` (LLaMA's <unk>=0, <s>=1,
  </s>=2, plus <pad>) and a small `LlamaForCausalLM` pretrained briefly, as a plain language model,
  on world text in the Alpaca template: captions, visual questions with their answers, and the
  text-only instructions. It never sees an image, so it knows the words but answers visual
  questions at chance; teaching it to see is the adapter's job.
- `tiny-clip/`: an open_clip ViT vision tower, briefly pretrained as a classifier of the world's
  attributes (colour, shape, count, size, position) on images drawn from a different seed than
  the demo's (a stand-in for CLIP's web-scale pretraining: without it, a random tower encodes
  colour but hardly shape). Stored by `FrozenCLIPEncoder.save` (open_clip config + safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmadapter.cli.demo import world
from mmadapter.core.files import file_sha256
from mmadapter.core.templates import get_template
from mmadapter.vision.clip_encoder import FrozenCLIPEncoder

#: Where the demo looks for its assets: `assets/` at the repository root (editable install).
ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
LANGUAGE_MODEL_DIR = "tiny-llama"
VISION_TOWER_DIR = "tiny-clip"
MANIFEST_FILE = "demo_assets.json"

#: Seeds of the worlds the assets are pretrained on; the demo itself uses another (`demo_command`).
TEXT_WORLD_SEED = 1001
VISION_WORLD_SEED = 1002
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

LANGUAGE_MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 344,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
#: open_clip architecture of the vision tower: vision/'s tiny registered config (64 px, patch 8,
#: 2 layers of width 64, 65 output tokens of width 64).
VISION_TOWER = "mmadapter-tiny-vit-64"


def text_examples(seed: int, count: int) -> Iterator[tuple[str, str]]:
    """(instruction, response) pairs of world text: the base model's whole pretraining diet.

    Captions and answers are image-blind (no image is given, so they are guesses from the right
    vocabulary), plus the text-only instruction set. The base learns the words and the formats;
    seeing which word fits an image is left to the adapter.
    """
    rng = random.Random(seed)
    instructions = world.instructions()
    for index in range(count):
        scene = world.make_scene(seed, index)
        roll = rng.random()
        if roll < 0.3:
            yield world.CAPTION_INSTRUCTION, world.caption(scene)
        elif roll < 0.85:
            _, question, answer = rng.choice(world.questions(scene))
            yield question, answer
        else:
            yield rng.choice(instructions)


def render_text(instruction: str, response: str) -> str:
    """The exact text the training loop builds for a sample (Alpaca template, reply right after it)."""

    return get_template("alpaca").render(instruction) + response


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(seed: int, vocab_size: int):
    """Byte-level BPE on world text: any string encodes, and the world's words are single tokens."""

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [render_text(i, r) for i, r in text_examples(seed, 4000)]
    corpus += [render_text(i, r) for i, r in world.instructions()]
    tokenizer.train_from_iterator(corpus, trainer)
    # Like LLaMA's tokenizer, `tokenizer(text)` starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=LANGUAGE_MODEL["max_position_embeddings"],
    )


# ---------------------------------------------------------------- language model


def language_model_config(tokenizer):
    return LlamaConfig(
        **{**LANGUAGE_MODEL, "vocab_size": len(tokenizer)},
        num_key_value_heads=LANGUAGE_MODEL["num_attention_heads"],
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _lm_batch(tokenizer, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on every real token (plain language modelling), EOS after each reply."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer.encode(render_text(*example), add_special_tokens=False)]
        + [tokenizer.eos_token_id]
        for example in examples
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row)
        mask[n, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_language_model(tokenizer, *, seed: int, steps: int, batch_size: int, lr: float):
    """A tiny LLaMA trained from scratch on world text; returns it in eval mode with its final loss."""

    torch.manual_seed(seed)
    model = LlamaForCausalLM(language_model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    examples = text_examples(seed, steps * batch_size)
    model.train()
    loss = float("nan")
    with tqdm(range(steps), desc="pretrain tiny LLaMA", unit="step") as bar:
        for _ in bar:
            batch = _lm_batch(tokenizer, [next(examples) for _ in range(batch_size)])
            output = model(**batch)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss = output.loss.item()
            bar.set_postfix(loss=f"{loss:.3f}")
    return model.eval(), loss


# ---------------------------------------------------------------- vision tower


#: Classification targets of the vision pretraining: attribute -> its values (None = "several shapes").
_VISION_TARGETS: dict[str, tuple[Any, ...]] = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "count": (1, 2, 3),
    "size": world.SIZES,
    "position": (*world.POSITIONS, None),
}


def _vision_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    values = {name: [getattr(s, name) for s in scenes] for name in _VISION_TARGETS}
    return {name: torch.tensor([_VISION_TARGETS[name].index(v) for v in vs]) for name, vs in values.items()}


def scene_pixels(encoder, scenes: list[world.Scene], image_size: int) -> torch.Tensor:
    """CLIP-preprocessed pixels (N, 3, S, S) of rendered scenes, with the encoder's eval transform."""
    transform = encoder.transform()
    return torch.stack([transform(world.render(scene, image_size)) for scene in scenes])


def pretrain_vision_tower(*, seed: int, steps: int, batch_size: int, lr: float, num_images: int):
    """A FrozenCLIPEncoder whose tower was trained to classify the world's attributes from its pooled token."""

    encoder = FrozenCLIPEncoder(VISION_TOWER, None, seed=seed)
    visual = encoder.visual
    image_size = encoder.image_size[0]
    scenes = [world.make_scene(VISION_WORLD_SEED, i) for i in range(num_images)]
    pixels = scene_pixels(encoder, scenes, image_size)
    labels = _vision_labels(scenes)
    torch.manual_seed(seed)
    heads = nn.ModuleDict({name: nn.Linear(encoder.output_dim, len(v)) for name, v in _VISION_TARGETS.items()})
    params = [*visual.parameters(), *heads.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    rng = np.random.default_rng(seed)
    visual.train()
    accuracy: dict[str, float] = {}
    with tqdm(range(steps), desc="pretrain tiny CLIP tower", unit="step") as bar:
        for _ in bar:
            index = torch.from_numpy(rng.integers(0, num_images, batch_size))
            pooled = visual(pixels[index])
            logits = {name: head(pooled) for name, head in heads.items()}
            loss = sum(nn.functional.cross_entropy(logits[n], labels[n][index]) for n in heads)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            accuracy = {n: float((logits[n].argmax(-1) == labels[n][index]).float().mean()) for n in heads}
            bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{accuracy['shape']:.2f}")
    visual.eval()
    visual.requires_grad_(False)
    return encoder, accuracy


# ---------------------------------------------------------------- the command


PARTS = ("language-model", "vision-tower")


def build_language_model(output: Path, *, seed: int, steps: int, batch_size: int, lr: float) -> dict[str, Any]:
    """Tokenizer + pretrained tiny LLaMA in `output/tiny-llama`; returns its manifest entry."""
    tokenizer = train_tokenizer(TEXT_WORLD_SEED, LANGUAGE_MODEL["vocab_size"])
    model, loss = pretrain_language_model(tokenizer, seed=seed, steps=steps, batch_size=batch_size, lr=lr)
    folder = output / LANGUAGE_MODEL_DIR
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "folder": LANGUAGE_MODEL_DIR,
        "config": LANGUAGE_MODEL,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretraining": {
            "world_seed": TEXT_WORLD_SEED,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
        },
        "final_loss": round(loss, 4),
    }


def build_vision_tower(
    output: Path, *, seed: int, steps: int, batch_size: int, lr: float, num_images: int
) -> dict[str, Any]:
    """The pretrained tiny CLIP tower in `output/tiny-clip`; returns its manifest entry."""
    encoder, accuracy = pretrain_vision_tower(
        seed=seed, steps=steps, batch_size=batch_size, lr=lr, num_images=num_images
    )
    encoder.save(output / VISION_TOWER_DIR)
    return {
        "folder": VISION_TOWER_DIR,
        "architecture": VISION_TOWER,
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "pretraining": {
            "world_seed": VISION_WORLD_SEED,
            "images": num_images,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "objective": "attribute classification on the pooled token",
        },
        "final_batch_accuracy": {k: round(v, 3) for k, v in accuracy.items()},
    }


def build_assets(
    output: Path,
    *,
    parts: tuple[str, ...] = PARTS,
    seed: int = 0,
    lm_steps: int = 400,
    vision_steps: int = 3000,
) -> dict[str, Any]:
    """Build (or rebuild) the demo assets under `output`; parts not rebuilt keep their files and
    manifest entries. Returns the manifest it writes."""

    # One thread: these matrices are too small to gain from more, and single-threaded reductions
    # make the files the same whatever the machine's core count.
    torch.set_num_threads(1)
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    started = time.time()
    if "language-model" in parts:
        manifest["language_model"] = build_language_model(output, seed=seed, steps=lm_steps, batch_size=64, lr=3e-3)
    if "vision-tower" in parts:
        manifest["vision_tower"] = build_vision_tower(
            output, seed=seed, steps=vision_steps, batch_size=64, lr=3e-3, num_images=4000
        )
    missing = [
        name
        for name, key in (("language-model", "language_model"), ("vision-tower", "vision_tower"))
        if key not in manifest
    ]
    if missing:
        raise FileNotFoundError(f"{output}: no {', '.join(missing)} yet; build it too (--only is for rebuilding)")
    folders = [output / LANGUAGE_MODEL_DIR, output / VISION_TOWER_DIR]
    files = sorted(p for folder in folders for p in folder.iterdir() if p.is_file())
    manifest.update(
        built_with="python -m mmadapter.cli.demo.assets",
        seconds=round(time.time() - started, 1),
        files={str(p.relative_to(output)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    )
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmadapter.cli.demo.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ASSETS_DIR, help=f"assets folder (default {ASSETS_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")
    parser.add_argument("--lm-steps", type=int, default=400, help="language-model pretraining steps (400)")
    parser.add_argument("--vision-steps", type=int, default=3000, help="vision-tower pretraining steps (3000)")
    parser.add_argument("--only", choices=PARTS, help="rebuild one part and keep the other's files")
    args = parser.parse_args(argv)
    parts = (args.only,) if args.only else PARTS
    manifest = build_assets(
        args.output, parts=parts, seed=args.seed, lm_steps=args.lm_steps, vision_steps=args.vision_steps
    )
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files ({total / 1e6:.1f} MB) to {args.output} in {manifest['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
