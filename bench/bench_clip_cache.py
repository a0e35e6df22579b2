"""CLIP feature cache: caption-stage epoch time with and without it, through the real training loop.

The caption stage of LLaMA-Adapter V2 runs a frozen CLIP on every image of every epoch unless the
features are cached (`data.clip_cache`, `mmadapter.vision.feature_cache`). This runs one caption
epoch of the shared loop (`mmadapter.train.loop.train`) on the demo's tiny LLaMA and synthetic images,
once loading pixels (decode, random crop, CLIP forward every step) and once from a warm cache, for
two CLIP towers: the demo's tiny one (64 px) and a ViT-B/32-shaped one at 224 px (random weights; the
shape of a real CLIP). Target: >= 3x faster epochs with the cache. Building the cache is a one-time
cost, reported separately.

Timing: one thread, this process's CPU time between the first and the last optimizer step (logged
through the loop's `on_log`), so other processes on a shared machine do not skew it.

    python bench/bench_clip_cache.py [--quick] [--out bench/results/clip_cache.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from benchlib import RESULTS, Table, write_results

#: name -> (open_clip architecture, weights: None = random, or the demo's assets folder)
TOWERS = {
    "demo tiny tower (64 px, 2x64)": ("mmadapter-tiny-vit-64", "assets"),
    "ViT-B/32 shape (224 px, 12x768)": ("ViT-B-32", None),
}


def write_captions(folder: Path, count: int) -> Path:
    from mmadapter.cli.demo import world
    from mmadapter.cli.demo.data import image_name, write_images

    scenes = [world.make_scene(0, i) for i in range(count)]
    write_images(scenes, folder / "images", 64, "render images")
    path = folder / "captions.jsonl"
    rows = [json.dumps({"image": f"images/{image_name(s)}", "caption": world.caption(s)}) for s in scenes]
    path.write_text("\n".join(rows) + "\n")
    return path


def caption_recipe(captions: Path, output: Path, clip_model: str, clip_weights: str | None, cache: Path | None):
    from mmadapter.cli.demo.assets import ASSETS_DIR, LANGUAGE_MODEL_DIR
    from mmadapter.train.recipe import parse_recipe

    options = {"prompt_length": 4, "clip_model": clip_model, "visual_width": 64, "visual_depth": 1, "visual_heads": 2}
    if clip_weights is not None:
        options["clip_pretrained"] = clip_weights
    return parse_recipe(
        {
            "name": "clip-cache-bench",
            "output_dir": str(output),
            "model": {"base": str(ASSETS_DIR / LANGUAGE_MODEL_DIR)},
            "adapter": {"method": "llama-adapter-v2", "options": options},
            "train": {"seed": 0, "batch_size": 16, "epochs": 1, "lr": 1e-3, "log_every": 1, "log_with": "none"},
            "data": {
                "template": "alpaca",
                "clip_cache": None if cache is None else str(cache),
                "group_by_length": False,
            },
            "stages": [
                {
                    "name": "caption",
                    "stage": "caption",
                    "data": {"train": [{"format": "caption-jsonl", "path": str(captions)}]},
                }
            ],
        }
    )


def epoch_cpu_seconds(recipe) -> tuple[float, int]:
    """CPU seconds from the end of the first optimizer step to the end of the last, and the steps between."""
    from mmadapter.train.loop import train

    marks: list[float] = []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the loop's report
        train(recipe, on_log=lambda record: marks.append(time.process_time()))
    return marks[-1] - marks[0], len(marks) - 1


def build_cache(recipe, captions: Path, cache: Path) -> float:
    """CPU seconds to fill the cache for every image (the one-time cost)."""
    from mmadapter.adapters import attach_adapter, make_config
    from mmadapter.adapters.backbones.loading import load_base_model
    from mmadapter.train.multimodal import warm_feature_cache

    model = load_base_model(recipe.model.base)
    attach_adapter(model, make_config(recipe.adapter.method, **recipe.adapter.options))
    images = sorted((captions.parent / "images").glob("*.png"))
    start = time.process_time()
    warm_feature_cache(model, cache, images, show_progress=False)  # as the training loop fills it
    return time.process_time() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (96 instead of 256)")
    parser.add_argument("--out", type=Path, default=RESULTS / "clip_cache.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from mmadapter.cli.demo.assets import ASSETS_DIR, VISION_TOWER_DIR

    count = 96 if args.quick else 256
    rows = {}
    table = Table(["CLIP tower", "epoch without cache", "epoch with cache", "speed-up", "one-time cache build"])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        captions = write_captions(root / "data", count)
        for name, (architecture, weights) in TOWERS.items():
            weights = str(ASSETS_DIR / VISION_TOWER_DIR) if weights == "assets" else None
            cache = root / f"cache-{architecture}"
            cached = caption_recipe(captions, root / f"run-cached-{architecture}", architecture, weights, cache)
            build = build_cache(cached, captions, cache)
            with_cache, steps = epoch_cpu_seconds(cached)
            plain = caption_recipe(captions, root / f"run-plain-{architecture}", architecture, weights, None)
            without_cache, _ = epoch_cpu_seconds(plain)
            rows[name] = {
                "images": count,
                "steps_timed": steps,
                "epoch_cpu_s_without_cache": without_cache,
                "epoch_cpu_s_with_cache": with_cache,
                "speedup": without_cache / with_cache,
                "cache_build_cpu_s": build,
            }
            table.add(
                name,
                f"{without_cache:.2f} s",
                f"{with_cache:.2f} s",
                f"{without_cache / with_cache:.1f}×",
                f"{build:.2f} s",
            )
    table.print()
    results = {
        "benchmark": "clip_cache",
        "date": date.today().isoformat(),
        "timing": "CPU time of this process, 1 thread, steps 2..N of one caption epoch (batch 16)",
        "rows": rows,
    }
    write_results(results, args.out, {"epoch": table})
    return results


if __name__ == "__main__":
    main()
