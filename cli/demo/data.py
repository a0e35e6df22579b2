"""The demo's training files, written in the formats every `mmadapter train` recipe reads.

The demo trains through the same loop as any recipe, so its world becomes ordinary data files:
PNG images, `captions.jsonl` (caption-jsonl: {image, caption}), `vqa.json` (conversation: one
question about one image per row) and `instructions.json` (alpaca: the text-only set). Images
are only rendered for the training split; held-out images are written separately for evaluation.
Single-shape scenes appear several times in the caption and question files (`weighted_scenes`):
only they show a position, so at their natural share (a third) position is learned last and least.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

from mmadapter.cli.demo import world
from mmadapter.core.progress import passing_bar

CAPTIONS_FILE = "captions.jsonl"
VQA_FILE = "vqa.json"
INSTRUCTIONS_FILE = "instructions.json"


@dataclasses.dataclass(frozen=True)
class DemoData:
    folder: Path
    captions: Path
    vqa: Path
    instructions: Path
    train_images: list[Path]
    heldout_images: list[Path]


def image_name(scene: world.Scene) -> str:
    return f"{scene.index:05d}.png"


def write_images(scenes: Sequence[world.Scene], folder: Path, image_size: int, desc: str) -> list[Path]:
    """Render scenes to `folder/NNNNN.png` (skipping files already there from an earlier run)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene in passing_bar(scenes, desc=desc, unit="image"):
        path = folder / image_name(scene)
        if not path.is_file():
            world.render(scene, image_size).save(path)
        paths.append(path)
    return paths


def weighted_scenes(scenes: Sequence[world.Scene], position_repeats: int) -> list[world.Scene]:
    """Each single-shape scene `position_repeats` times, in place: the training files' share of position."""
    return [scene for scene in scenes for _ in range(position_repeats if scene.position else 1)]


def vqa_rows(scenes: Sequence[world.Scene], questions_per_image: int, seed: int) -> list[dict]:
    """Conversation rows: `questions_per_image` different questions (and their answers) per image."""
    rng = random.Random(seed)
    rows = []
    for scene in scenes:
        items = world.questions(scene)
        for attribute, _, answer in rng.sample(items, min(questions_per_image, len(items))):
            question = rng.choice(world.QUESTIONS[attribute])
            rows.append(
                {
                    "image": f"images/{image_name(scene)}",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return rows


def write_demo_data(
    folder: Path,
    train: Sequence[world.Scene],
    heldout: Sequence[world.Scene],
    *,
    image_size: int,
    questions_per_image: int,
    instruction_repeats: int,
    position_repeats: int,
    seed: int,
) -> DemoData:
    """All files the demo's recipe reads, under `folder` (relative image paths, so the folder can move)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images = write_images(train, folder / "images", image_size, "render training images")
    heldout_images = write_images(heldout, folder / "heldout", image_size, "render held-out images")
    weighted = weighted_scenes(train, position_repeats)
    captions = folder / CAPTIONS_FILE
    captions.write_text(
        "".join(json.dumps({"image": f"images/{image_name(s)}", "caption": world.caption(s)}) + "\n" for s in weighted)
    )
    vqa = folder / VQA_FILE
    vqa.write_text(json.dumps(vqa_rows(weighted, questions_per_image, seed), indent=0))
    instructions = folder / INSTRUCTIONS_FILE
    rows = [{"instruction": i, "input": "", "output": r} for i, r in world.instructions()] * instruction_repeats
    instructions.write_text(json.dumps(rows, indent=0))
    return DemoData(folder, captions, vqa, instructions, train_images, heldout_images)
