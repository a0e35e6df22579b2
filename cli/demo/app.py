"""The embedded demo: LLaMA-Adapter V2 teaches a frozen tiny LLaMA to see, on a CPU, in minutes.

What `mmadapter demo` does, in order (each step prints what it found):
1. loads the tiny frozen LLaMA, its tokenizer and the tiny frozen CLIP tower from assets/;
2. renders the synthetic world (`demo_world`) into training files (`demo_data`), split by image;
3. attaches LLaMA-Adapter V2, prints the parameter report of both stages, and checks that the
   untrained adapter leaves the base model's logits bit-for-bit unchanged (zero-init);
4. scores the untrained adapter on held-out images (`demo_eval`);
5. trains the caption stage, then the instruction stage, with the shared training loop
   (`mmadapter.train.loop`, recipe `train/recipes/demo-shapes.yaml`, CLIP feature cache on);
6. scores the trained adapter on the same held-out images and prints example conversations;
7. writes metrics.json, the model card, a chart and example images, and says how to chat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from mmadapter.adapters import attach_adapter, make_config
from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.methods.base import trainable_parameters
from mmadapter.adapters.methods.llama_adapter_v2 import parameter_group, visual_prompter_of
from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.adapters.methods.report import parameter_report
from mmadapter.cli.demo import evaluation as demo_eval
from mmadapter.cli.demo import world
from mmadapter.cli.demo.assets import ASSETS_DIR, LANGUAGE_MODEL_DIR, VISION_TOWER_DIR
from mmadapter.cli.demo.data import write_demo_data
from mmadapter.cli.demo.report import plot_accuracy, results_document, write_model_card
from mmadapter.cli.demo.world import ATTRIBUTES
from mmadapter.core.templates import get_template
from mmadapter.serve.loader import ServedModel, merge_for_serving
from mmadapter.serve.web_demo import launch_ui as launch
from mmadapter.train.loop import train
from mmadapter.train.recipe import load_recipe

#: Built-in recipe the demo trains with (train/recipes/); the demo fills in paths and sizes.
RECIPE = "demo-shapes"
#: Seed of the demo's world: different from the worlds the assets were pretrained on.
WORLD_SEED_OFFSET = 7
TEMPLATE = "alpaca"
#: Example conversations printed at the end (and offered in the web UI).
NUM_EXAMPLES = 4
#: The run's accuracy and time tables, in the layout of bench/results/ (the committed demo.json is one).
RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """How big a run is: images, questions and optimizer steps of each stage."""

    train_images: int
    heldout_images: int
    questions_per_image: int
    caption_steps: int
    instruction_steps: int


SCALES = {
    "full": DemoScale(
        train_images=1500, heldout_images=400, questions_per_image=3, caption_steps=1250, instruction_steps=800
    ),
    "quick": DemoScale(
        train_images=600, heldout_images=60, questions_per_image=3, caption_steps=220, instruction_steps=110
    ),
}
#: Threads the demo picks at most by itself (`default_threads`), and how idle a core must be to count
#: (0.2: a core that other processes use less than a fifth of the time).
MAX_DEFAULT_THREADS = 4
IDLE_SLACK = 0.2
#: Copies of the text-only instruction set in the instruction stage (about a tenth of its samples).
INSTRUCTION_REPEATS = 24
#: Copies of each single-shape scene in the caption and question files: only they show a position, and
#: at their natural third of the images the caption stage leaves position half learned (docs/demo.md).
POSITION_REPEATS = 3


@dataclasses.dataclass
class DemoOptions:
    output: Path = Path("mmadapter-demo")
    quick: bool = False
    assets: Path | None = None
    threads: int | None = None
    seed: int = 0
    ui: bool = False
    ui_port: int = 7860
    print_json: bool = False
    scale: DemoScale | None = None
    """Overrides the full/quick scale (tests)."""


class Clock:
    """Wall and CPU seconds since the command started (imports included, via the process start time)."""

    def __init__(self) -> None:
        self.wall_start = time.time() - _process_age()
        self.cpu_start = 0.0
        self.marks: list[tuple[str, float, float]] = [("start-up", 0.0, 0.0)]
        """(what, wall, cpu) when each of the demo's steps began."""

    def mark(self, what: str) -> None:
        self.marks.append((what, self.wall(), self.cpu()))

    def steps(self) -> dict[str, dict[str, float]]:
        """Wall and CPU seconds of each step so far (start-up: imports and process start)."""
        ends = [*self.marks[1:], ("", self.wall(), self.cpu())]
        return {
            what: {"wall_seconds": round(end[1] - wall, 1), "cpu_seconds": round(end[2] - cpu, 1)}
            for (what, wall, cpu), end in zip(self.marks, ends, strict=True)
        }

    def wall(self) -> float:
        return time.time() - self.wall_start

    def cpu(self) -> float:
        return time.process_time() - self.cpu_start


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), so start-up time counts; 0 elsewhere."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start)
    except (OSError, ValueError, IndexError):
        return 0.0


def find_assets(explicit: Path | None) -> Path:
    folder = Path(explicit) if explicit is not None else ASSETS_DIR
    missing = [name for name in (LANGUAGE_MODEL_DIR, VISION_TOWER_DIR) if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: demo assets {', '.join(missing)} not found; run from a clone installed with "
            "`pip install -e .`, pass --assets DIR, or rebuild them with `python -m mmadapter.cli.demo.assets`"
        )
    return folder


def default_threads() -> int:
    """One thread per core that is idle when the demo starts, at most four.

    A thread whose core is busy with another process makes every parallel region of every step wait
    for it (steps up to 15x slower on the 2-core VM, docs/demo.md), so busy cores are left alone; and
    the tiny model's matrices gain little beyond four threads. Measured over a fifth of a second.
    """
    usage = psutil.cpu_percent(interval=0.2, percpu=True)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(len(usage))
    idle = sum(100.0 - usage[core] for core in cores if core < len(usage)) / 100.0
    return max(1, min(MAX_DEFAULT_THREADS, math.floor(idle + IDLE_SLACK)))


def say(message: str = "") -> None:
    tqdm.write(message)


def heading(clock: Clock, number: int, text: str) -> None:
    clock.mark(f"{number}. {text}")
    say(f"\n[{number}/7] {text}  (t = {clock.wall():.0f} s)")


def build_recipe(paths: dict[str, Path], scale: DemoScale, assets: Path, output: Path, seed: int):
    """The demo recipe with this run's files, steps and seed filled in."""

    overrides = {
        "output_dir": str(output),
        "model.base": str(assets / LANGUAGE_MODEL_DIR),
        "adapter.options.clip_pretrained": str(assets / VISION_TOWER_DIR),
        "data.clip_cache": str(output / "clip-cache"),
        "train.seed": seed,
        "stages.0.train.max_steps": scale.caption_steps,
        "stages.0.data.train.0.path": str(paths["captions"]),
        "stages.1.train.max_steps": scale.instruction_steps,
        "stages.1.data.train.0.path": str(paths["vqa"]),
        "stages.1.data.train.1.path": str(paths["instructions"]),
        "stages.1.data.train.2.path": str(paths["captions"]),
    }
    return load_recipe(RECIPE, overrides)


def stage_summary(model) -> str:
    """The parameter report of both stages, by V2 parameter group (the loop prints every tensor later)."""

    config = model.adapter_config
    lines = []
    for stage in ("caption", "instruction"):
        report = parameter_report(model, stage)
        groups = Counter()
        for name, param in trainable_parameters(model, stage).items():
            groups[parameter_group(name, config).removeprefix("fused_").removeprefix("unfused_")] += param.numel()
        parts = ", ".join(f"{group} {count:,}" for group, count in groups.items())
        lines.append(
            f"{stage + ' stage':<18} trains {report['trainable_params']:>7,} of {report['total_params']:,} parameters "
            f"({100 * report['trainable_fraction']:.2f}%): {parts}"
        )
    adapter = sum(p.numel() for p in trainable_parameters(model, None).values())
    frozen = sum(p.numel() for p in model.parameters()) - adapter
    lines.append(f"{'frozen':<18} {frozen:>14,} (tiny LLaMA + tiny CLIP tower); saved adapter: all trained groups")
    return "\n".join(lines)


def reference_logits(model, tokenizer, prompts: list[str]):
    """Logits of the model on `prompts` (left-padded batch)."""

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return batch, model(**batch).logits


def check_zero_init(model, batch, expected, clip_features) -> float:
    """Max |difference| between the adapted model (untrained, real images) and the base; must be 0."""

    with torch.no_grad():
        prompt = visual_prompter_of(model)(clip_features=clip_features)
        logits = model(**batch, **{VISUAL_PROMPT_KWARG: prompt}).logits
    return float((logits - expected).abs().max())


def evaluate(model, tokenizer, scenes, features, desc: str) -> tuple[dict[str, Any], list[str]]:
    probes = demo_eval.make_probes(scenes)
    texts = demo_eval.generate(model, tokenizer, probes, features, template=TEMPLATE, desc=desc)
    return demo_eval.score(probes, texts, scenes), texts


def format_accuracy_table(untrained: dict[str, Any], trained: dict[str, Any]) -> str:
    lines = [f"{'held-out accuracy':<24}{'untrained':>10}{'trained':>10}"]
    for kind, label in (("caption", "in captions"), ("answer", "in answers")):
        for attribute in ATTRIBUTES:
            if attribute in trained[kind]:
                before, after = untrained[kind][attribute], trained[kind][attribute]
                lines.append(f"  {attribute + ' ' + label:<22}{before:>10.1%}{after:>10.1%}")
    return "\n".join(lines)


def run_demo(options: DemoOptions) -> int:
    clock = Clock()

    threads = options.threads or default_threads()
    torch.set_num_threads(threads)
    clock.cpu_start = 0.0  # CPU time of the whole process, imports included
    scale = options.scale or SCALES["quick" if options.quick else "full"]
    output = Path(options.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    assets = find_assets(options.assets)
    chosen = "" if options.threads else ": the idle cores, --threads N to change"
    say(
        f"mmadapter demo: LLaMA-Adapter V2 on a frozen tiny LLaMA + CLIP ({'quick' if options.quick else 'full'} run, "
        f"{threads} thread{'s' if threads > 1 else ''}{chosen}) -> {output}"
    )

    # 1. frozen models
    heading(clock, 1, "loading the frozen tiny LLaMA, its tokenizer and the tiny CLIP tower")

    tokenizer = load_tokenizer(assets / LANGUAGE_MODEL_DIR)
    model = load_base_model(assets / LANGUAGE_MODEL_DIR)
    say(f"base: {assets / LANGUAGE_MODEL_DIR} ({sum(p.numel() for p in model.parameters()):,} parameters, frozen)")

    # 2. the world
    heading(clock, 2, "rendering the synthetic world (split by image)")

    world_seed = options.seed + WORLD_SEED_OFFSET
    train_scenes, heldout_scenes = world.split_scenes(world_seed, scale.train_images, scale.heldout_images)
    data = write_demo_data(
        output / "data",
        train_scenes,
        heldout_scenes,
        image_size=64,
        questions_per_image=scale.questions_per_image,
        instruction_repeats=INSTRUCTION_REPEATS,
        position_repeats=POSITION_REPEATS,
        seed=world_seed,
    )
    say(
        f"{len(train_scenes)} training images, {len(heldout_scenes)} held-out images (never trained on); "
        f"{len(world.instructions())} text-only instructions; files in {data.folder}"
    )

    # 3. the adapter
    heading(clock, 3, "attaching LLaMA-Adapter V2")

    recipe = build_recipe(
        {"captions": data.captions, "vqa": data.vqa, "instructions": data.instructions},
        scale,
        assets,
        output,
        options.seed,
    )
    check_prompts = [world.CAPTION_INSTRUCTION, *[q for _, q, _ in world.questions(heldout_scenes[0])]]

    render = get_template(TEMPLATE).render
    batch, base_logits = reference_logits(model, tokenizer, [render(p) for p in check_prompts])
    torch.manual_seed(options.seed)
    attach_adapter(model, make_config(recipe.adapter.method, recipe.adapter.preset, **recipe.adapter.options))
    say(stage_summary(model))
    cache = visual_prompter_of(model).feature_cache(recipe.stages[0].data.clip_cache)
    heldout_features = cache.get_or_compute(data.heldout_images).float()
    difference = check_zero_init(model, batch, base_logits, heldout_features[:1].expand(len(check_prompts), -1, -1))
    if difference != 0.0:
        raise RuntimeError(f"zero-init check failed: the untrained adapter changed the logits by {difference:g}")
    say(
        "zero-init check: with real images, the untrained adapter's logits equal the base model's exactly (max |Δ| = 0)"
    )

    # 4. before training
    heading(clock, 4, "scoring the untrained adapter on held-out images")
    untrained, _ = evaluate(model, tokenizer, heldout_scenes, heldout_features, "untrained")

    # 5. training
    heading(clock, 5, "training: caption stage, then instruction stage (shared training loop)")

    train_started = clock.wall()
    result = train(recipe, model=model, tokenizer=tokenizer)
    train_seconds = clock.wall() - train_started

    # 6. after training
    heading(clock, 6, "scoring the trained adapter on the same held-out images")
    model.eval()
    trained, texts = evaluate(model, tokenizer, heldout_scenes, heldout_features, "trained")
    say(format_accuracy_table(untrained, trained))
    examples = example_conversations(heldout_scenes, data.heldout_images, texts)
    say("\nexample conversations (held-out images):")
    for example in examples:
        say(f"  image {example['image']}  (truth: {example['truth']})")
        for question, answer in example["turns"]:
            say(f"    Q: {question}\n    A: {answer}")

    # 7. outputs
    heading(clock, 7, "writing results")
    examples_dir = write_examples(output / "examples", examples)
    metrics = {
        "untrained": untrained,
        "trained": trained,
        "scale": dataclasses.asdict(scale),
        "zero_init_max_abs_difference": difference,
        "wall_time_seconds": None,
        "cpu_time_seconds": None,
        "training_seconds": round(train_seconds, 1),
        "threads": threads,
        "adapter": str(result.adapter_dir),
        "examples": examples,
    }

    plot_accuracy(untrained, trained, output / "accuracy.png")
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(result.adapter_dir / "loss_curve.png", output / "loss_curves.png")
    metrics["wall_time_seconds"] = round(clock.wall(), 1)
    metrics["cpu_time_seconds"] = round(clock.cpu(), 1)
    metrics["steps"] = clock.steps()
    metrics["stages"] = [
        {key: stage[key] for key in ("stage", "steps", "wall_time_seconds") if key in stage}
        for stage in result.summary.get("stages", [])
    ]
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    command = "mmadapter demo" + (" --quick" if options.quick else "") + (" (custom scale)" if options.scale else "")
    (output / RESULTS_FILE).write_text(json.dumps(results_document(metrics, command), indent=1) + "\n")
    write_model_card(output, metrics, assets, result.summary)
    say(
        f"metrics: {output / 'metrics.json'}; loss curves: {output / 'loss_curves.png'}; model card: "
        f"{output / 'README.md'}"
    )
    say(f"\ndone in {metrics['wall_time_seconds']:.0f} s wall ({metrics['cpu_time_seconds']:.0f} s CPU)")
    for what, seconds in metrics["steps"].items():
        say(f"  {what:<72}{seconds['wall_seconds']:>7.0f} s wall {seconds['cpu_seconds']:>6.0f} s CPU")
    say(chat_instructions(assets, result.adapter_dir, examples_dir))
    if options.print_json:
        print(json.dumps(metrics, indent=2))
    if options.ui:
        launch_ui(model, tokenizer, examples_dir, options.ui_port)
    return 0


def example_conversations(scenes, images: list[Path], texts: list[str]) -> list[dict[str, Any]]:
    """The first NUM_EXAMPLES held-out images with the trained model's caption and answers."""

    probes = demo_eval.make_probes(scenes)
    examples: dict[int, dict[str, Any]] = {}
    for probe, text in zip(probes, texts, strict=True):
        if probe.image >= NUM_EXAMPLES:
            break
        entry = examples.setdefault(
            probe.image,
            {"image": str(images[probe.image]), "truth": world.caption(scenes[probe.image]), "turns": []},
        )
        entry["turns"].append((probe.instruction, text))
    return list(examples.values())


def write_examples(folder: Path, examples: list[dict[str, Any]]) -> Path:
    """Copies of the example images and `examples.txt` (file<TAB>question), the web UI's example format."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for example in examples:
        name = f"heldout_{Path(example['image']).name}"
        shutil.copyfile(example["image"], folder / name)
        for question, _ in example["turns"][:2]:
            lines.append(f"{name}\t{question}")
    (folder / "examples.txt").write_text("\n".join(lines) + "\n")
    return folder


def chat_instructions(assets: Path, adapter_dir: Path, examples_dir: Path) -> str:
    base = assets / LANGUAGE_MODEL_DIR
    image = next(iter(sorted(examples_dir.glob("*.png"))), None)
    return "\n".join(
        [
            "chat with it:",
            f"  mmadapter chat --base {base} --adapter {adapter_dir}" + (f" --image {image}" if image else ""),
            f"  mmadapter serve --base {base} --adapter {adapter_dir} --ui    # web UI on http://127.0.0.1:7860",
            "or run the demo again with --ui to open the web UI right away.",
        ]
    )


def launch_ui(model, tokenizer, examples_dir: Path, port: int) -> None:
    merge_for_serving(model)
    served = ServedModel.from_model(model, tokenizer, template=TEMPLATE, name="mmadapter-demo")
    say(f"web UI on http://127.0.0.1:{port} (Ctrl+C to stop)")
    launch(served, port=port, examples_dir=examples_dir)
