"""Training recipes: YAML files parsed into typed dataclasses, checked before anything heavy loads.

A recipe names the base model, the adapter method, and one or more training stages (LLaMA-Adapter
V2 trains a caption stage, then a disjoint instruction stage). Top-level `train:` and `data:` are
defaults that every stage inherits; a stage overrides only what it names. Errors name the key:
`train.lr: expected float, got 'abc'`. The resolved form (stages spelled out) is what is saved next
to every checkpoint, and loads back through the same function.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Collection
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mmadapter.core.config import Bool, Float, Int, describe, document_type, json_schema, parse
from mmadapter.core.quantization import Quantization
from mmadapter.core.templates import TemplateName

T = TypeVar("T")
#: Largest train.lr / train.base_lr accepted: fine-tuning rates are below 1 (official: 9e-3 to 2e-2).
MAX_LEARNING_RATE = 10.0


@document_type
@dataclasses.dataclass
class ModelSection:
    base: str
    """A base preset (tiny-llama, llama-7b, …) or a model folder (Hugging Face or Meta layout)."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the base folder."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Storage dtype of the frozen base weights (adapter weights stay float32)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    quantization: Quantization | None = None
    """Store the frozen base's linear layers in 4 or 8 bits (bitsandbytes; `pip install 'mmadapter[quantization]'`),
    e.g. `{bits: 4}`; embeddings, norms and the adapter stay in full precision. None: the base stays in `dtype`."""


@document_type
@dataclasses.dataclass
class AdapterSection:
    method: str
    """llama-adapter-v1, llama-adapter-v2, lora or ptuning-v2."""
    preset: str | None = None
    """A named configuration of the method (e.g. the released model's)."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Method hyperparameters, overriding the preset (checked by the method's config class)."""
    init_from: str | None = None
    """Start from a saved adapter folder instead of the method's initialisation."""


@document_type
@dataclasses.dataclass
class DataSource:
    format: Literal["alpaca", "conversation", "coco-captions", "caption-jsonl", "chatglm"]
    path: str
    images: str | None = None
    """Image folder for relative image paths (default: the data file's folder)."""
    allow_outside_root: Bool = False
    """Let image paths resolve outside the image folder (absolute paths, `..`, symlinks out of it). Off, a
    data file cannot make training read arbitrary files; turn on for data you trust whose images live elsewhere."""
    trains: str | None = None
    """The adapter stage whose parameters this source updates (mixed runs); None: the stage's own."""
    max_samples: Int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Format options, e.g. chatglm: prompt_column, response_column, history_column."""


@document_type
@dataclasses.dataclass
class DataSection:
    train: list[DataSource] = dataclasses.field(default_factory=list)
    eval: list[DataSource] = dataclasses.field(default_factory=list)
    eval_from_train: Int = 0
    """Also evaluate on the first N training examples (the official V1 "val" split is 200)."""
    template: TemplateName = "alpaca"
    """Prompt template: an official one (alpaca, chatglm, chat65b); chat, the base tokenizer's own chat template
    (loss on assistant turns only); or auto, chat where the tokenizer has one, else the base's official one."""
    caption_instruction: str = "Generate caption of this image"
    """Instruction of caption samples, rendered in the template's no-input form (official V2)."""
    max_length: Int = 512
    """Truncate examples to this many tokens (official: max_words)."""
    max_source_length: Int = 64
    """ChatGLM format: prompt tokens kept (official ptuning/train.sh)."""
    max_target_length: Int = 64
    """ChatGLM format: answer tokens kept."""
    group_by_length: Bool = True
    on_bad_sample: Literal["skip", "fail"] = "skip"
    max_bad_fraction: Float = 0.05
    """With skip: stop when more than this fraction of a data file's samples is bad."""
    num_workers: Int = 0
    """DataLoader worker processes: they decode images, and in a streamed stage also tokenize; 0 does it all
    in the training process."""
    streaming: Bool = False
    """Read the training sources while training runs, tokenizing on the fly, instead of all before the first
    step: for data that does not fit in memory. A source's path may then be a folder of shards or a glob
    (*.jsonl, *.json, *.parquet, or WebDataset-style *.tar of image + caption). Needs train.max_steps. See
    "Streaming data" in data-formats.md."""
    shuffle_window: Int = 10000
    """Streaming: usable rows shuffled together (in stream order otherwise); memory holds one window."""
    clip_cache: str | None = None
    """Folder of the CLIP feature cache (V2); None computes CLIP features on the fly."""


@document_type
@dataclasses.dataclass
class TrainSection:
    seed: Int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    batch_size: Int = 4
    """Per process (per GPU)."""
    grad_accum: Int = 1
    epochs: Float | None = None
    max_steps: Int | None = None
    """Optimizer steps; overrides epochs when both are set."""
    lr: Float | None = None
    """Absolute learning rate; or set base_lr. When both are set (`--set train.lr=…` on a recipe with base_lr),
    lr is used and the run's schedule line says so."""
    base_lr: Float | None = None
    """Official rule: lr = base_lr * effective batch / 256."""
    min_lr: Float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """cosine: linear warmup then half-cycle cosine to min_lr (official V1/V2); linear: HF Trainer's."""
    warmup_epochs: Float = 0.0
    warmup_steps: Int | None = None
    """Overrides warmup_epochs when set."""
    weight_decay: Float = 0.0
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-8
    grad_clip: Float | None = None
    gradient_checkpointing: Bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: activation
    memory of one layer instead of all, for about one more forward pass of compute. Gradients are unchanged."""
    log_every: Int = 10
    eval_every: Int | None = None
    save_every: Int | None = None
    keep_checkpoints: Int = 2
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    ddp_find_unused_parameters: Bool = False
    """DDP: set true when some trainable parameters get no gradient in a step (DDP's error says so);
    it costs a graph traversal per step. Stages mixing data kinds average gradients without DDP's hooks."""


@document_type
@dataclasses.dataclass
class StageSection:
    name: str
    trains: str | None = None
    """Which of the adapter method's parameter sets this stage trains (V2: caption or instruction, its
    disjoint training stages); None for one-stage methods. Was `stage:` before 0.2 (still read, with a warning)."""
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)


@document_type
@dataclasses.dataclass
class Recipe:
    model: ModelSection
    """The frozen base model."""
    adapter: AdapterSection
    """The adapter method and its hyperparameters."""
    stages: list[StageSection]
    """Training stages, run in order; each inherits the top-level train/data (default: one stage, `train`)."""
    output_dir: str = "runs/mmadapter"
    """Run folder: checkpoints, logs and the final adapter."""
    name: str = "mmadapter"
    """Run name (logs, training summary)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples become lists so the YAML is portable and loads back through `load_recipe`."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_section(cls: type[T], values: dict[str, Any], key: str) -> T:
    """One recipe section (e.g. DataSection) from a mapping, checked like a whole recipe."""
    return parse(cls, values, key)


def recipe_schema() -> dict[str, Any]:
    """The JSON schema of a recipe file as written (`mmadapter train --schema`, for editors): the
    resolved form plus top-level `train:`/`data:` defaults, and `stages` optional."""
    schema = json_schema(Recipe)
    schema["properties"]["train"] = {"$ref": "#/$defs/TrainSection", "description": "Defaults of every stage."}
    schema["properties"]["data"] = {"$ref": "#/$defs/DataSection", "description": "Defaults of every stage."}
    schema["required"].remove("stages")
    return schema


# ---------------------------------------------------------------- merging, overrides, validation


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1e-3, "data.train.0.path": "x.json"}` set into a raw recipe mapping."""
    document = copy.deepcopy(document)
    for dotted, value in overrides.items():
        node: Any = document
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"--set {dotted}: {where}: no list item {part} (list has {len(node)})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ValueError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping or list")
    return document


def _has_parent(node: Any, parts: list[str]) -> bool:
    """Whether the mapping/list path `parts[:-1]` exists in `node`."""
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, dict | list)


def _for_every_stage(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`train.*` / `data.*` overrides also go into every stage that spells the key out (as a resolved
    recipe does), so `--set train.lr=…` means every stage; `stages.1.train.lr` targets one."""
    expanded = dict(overrides)
    stages = document.get("stages")
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] in ("train", "data") and isinstance(stages, list):
            targets = [i for i, stage in enumerate(stages) if _has_parent(stage, parts)]
            for i in targets:
                expanded.setdefault(f"stages.{i}.{key}", value)
            if targets and not _has_parent(document, parts):
                del expanded[key]  # no top-level defaults to put it in (a resolved recipe)
    return expanded


def _renamed_stage_key(stage: dict[str, Any], index: int) -> dict[str, Any]:
    """Recipes before 0.2 said `stage:` for what is now `trains:` (a stage's `stage` read as a recipe stage)."""
    if "stage" not in stage:
        return stage
    if "trains" in stage:
        raise ValueError(f"stages.{index}: give `trains` only (`stage` is its old name)")
    warnings.warn(
        f"stages.{index}.stage is deprecated: call it `trains` (which parameter set the stage trains)",
        DeprecationWarning,
        stacklevel=2,
    )
    stage = dict(stage)
    stage["trains"] = stage.pop("stage")
    return stage


def _resolve_stages(document: dict[str, Any]) -> dict[str, Any]:
    """Spell out every stage: defaults from top-level train/data, then the stage's own overrides."""
    document = dict(document)
    defaults = {"train": document.pop("train", {}) or {}, "data": document.pop("data", {}) or {}}
    # Check the defaults as written, so errors name the key the user wrote (train.lr, not stages.0.train.lr).
    parse(TrainSection, defaults["train"], "train")
    parse(DataSection, defaults["data"], "data")
    stages = document.get("stages")
    if stages is None:
        stages = [{"name": "train"}]
    if not isinstance(stages, list) or not stages:
        raise ValueError("stages: expected a non-empty list of stages")
    resolved = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ValueError(f"stages.{i}: expected a mapping, got {describe(stage)}")
        resolved.append(_deep_merge(defaults, _renamed_stage_key(stage, i)))
    document["stages"] = resolved
    return document


def _validate(recipe: Recipe, implicit_stage: bool) -> None:
    """Checks across fields, each naming the key to fix."""
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages: stage names must be unique, got {names}")
    # One Accelerator serves the whole run, so these cannot change between stages.
    for field in ("mixed_precision", "log_with", "ddp_find_unused_parameters"):
        values = {getattr(s.train, field) for s in recipe.stages}
        if len(values) > 1:
            raise ValueError(f"train.{field}: must be the same in every stage, got {sorted(map(str, values))}")
    for i, stage in enumerate(recipe.stages):
        key = "" if implicit_stage else f"stages.{i}."
        train, data = stage.train, stage.data
        if not data.train:
            raise ValueError(f"{key}data.train: no training data (a list of {{format, path}} sources)")
        if data.streaming:
            _check_streaming(key, train, data)
        sources = [("train", j, s) for j, s in enumerate(data.train) if not data.streaming]
        for split, j, source in sources + [("eval", j, s) for j, s in enumerate(data.eval)]:
            if source.path.endswith(".tar"):
                raise ValueError(
                    f"{key}data.{split}.{j}.path: {source.path} is a tar shard, which is read only as streamed "
                    "training data (data.streaming: true); give evaluation data as a JSON/JSONL file"
                )
        if data.num_workers < 0:
            raise ValueError(
                f"{key}data.num_workers: must be 0 (read in the training process) or more, got {data.num_workers}"
            )
        if train.epochs is None and train.max_steps is None:
            raise ValueError(f"{key}train: set epochs or max_steps")
        if train.lr is None and train.base_lr is None:
            raise ValueError(f"{key}train: set lr (absolute) or base_lr (scaled by effective batch / 256)")
        for field in ("lr", "base_lr", "epochs"):
            value = getattr(train, field)
            if value is not None and value <= 0:
                raise ValueError(f"{key}train.{field}: must be positive, got {value}")
        for field in ("lr", "base_lr"):  # far past any fine-tuning rate, and AdamW's step overflows float32 there
            value = getattr(train, field)
            if value is not None and value > MAX_LEARNING_RATE:
                raise ValueError(
                    f"{key}train.{field}: {value:g} is not a learning rate (at most {MAX_LEARNING_RATE:g})"
                )
        for field in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(train, field) < 1:
                raise ValueError(f"{key}train.{field}: must be at least 1, got {getattr(train, field)}")
        for field in ("eval_every", "save_every", "max_steps"):
            value = getattr(train, field)
            if value is not None and value < 1:
                raise ValueError(f"{key}train.{field}: must be at least 1 (or null), got {value}")
        if not 0.0 <= data.max_bad_fraction <= 1.0:
            raise ValueError(f"{key}data.max_bad_fraction: must be in [0, 1], got {data.max_bad_fraction}")
        if data.max_length < 2:
            raise ValueError(f"{key}data.max_length: must be at least 2, got {data.max_length}")


def _check_streaming(key: str, train: TrainSection, data: DataSection) -> None:
    """A streamed stage has no length up front: what needs one is refused, naming the key."""
    streamed = "a streamed stage (data.streaming: true) has no length up front"
    if train.max_steps is None:
        raise ValueError(f"{key}train.max_steps: {streamed}; set train.max_steps (epochs cannot be counted)")
    if train.warmup_steps is None and train.warmup_epochs:
        raise ValueError(f"{key}train.warmup_epochs: {streamed}; set train.warmup_steps instead")
    if data.eval_from_train:
        raise ValueError(f"{key}data.eval_from_train: {streamed}; give evaluation files in data.eval instead")
    if data.clip_cache is not None:
        raise ValueError(f"{key}data.clip_cache: the CLIP feature cache needs every image up front; set it to null")
    if data.shuffle_window < 1:
        raise ValueError(f"{key}data.shuffle_window: must be at least 1, got {data.shuffle_window}")


def _check_top_level_keys(document: dict[str, Any]) -> None:
    """Unknown top-level keys, listing the ones a recipe file may have: the resolved recipe's fields and the
    stage defaults `train`/`data` (which parsing the Recipe alone would not name)."""
    known = [*(field.name for field in dataclasses.fields(Recipe)), "train", "data"]
    unknown = [key for key in document if key not in known]
    if unknown:
        raise ValueError("; ".join(f"{key}: unknown key {key!r} (known: {', '.join(known)})" for key in unknown))


def parse_recipe(document: dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """A typed, validated recipe from a raw mapping plus dotted overrides."""
    if not isinstance(document, dict):
        raise ValueError(f"a recipe must be a mapping at the top level, got {describe(document)}")
    document = apply_overrides(document, _for_every_stage(document, overrides or {}))
    _check_top_level_keys(document)
    recipe = parse(Recipe, _resolve_stages(document))
    _validate(recipe, implicit_stage="stages" not in document)
    return recipe


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with the package (train/recipes/*.yaml), by file stem."""
    folder = resources.files("mmadapter.train") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a built-in recipe (`llama-adapter-v1-alpaca`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    stem = path.name.removesuffix(".yaml")
    if stem in builtin and not path.parent.parts:
        return builtin[stem]
    raise FileNotFoundError(f"{name_or_path}: no such recipe file; built-in recipes: {', '.join(sorted(builtin))}")


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe (a path or a built-in name), apply `--set` overrides, check everything."""
    path = find_recipe(name_or_path)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({_yaml_problem(error)})") from error
    try:
        return parse_recipe(document or {}, overrides)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found and where, by line and column of the file (its own text names a "<unicode string>")."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return str(error)
    context = getattr(error, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}" + (f" ({context})" if context else "")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


def absolute_if_local(path: str | None) -> str | None:
    """`path` made absolute if it names something here; anything else (a hub id, a tag, None) as written."""
    if path and not os.path.isabs(path) and os.path.exists(path):
        return os.path.abspath(path)
    return path


def with_absolute_paths(recipe: Recipe, keep: Collection[str] = ()) -> Recipe:
    """A copy whose local paths are absolute, so what a run saves (its recipe.yaml, the adapter's training record)
    still finds the base, tokenizer, CLIP weights, starting adapter and data when eval, chat, serve or --resume
    run in another folder. Names in `keep` (base presets) stay as written, and so does the output folder."""
    recipe = copy.deepcopy(recipe)
    if recipe.model.base not in keep:
        recipe.model.base = absolute_if_local(recipe.model.base)
    recipe.model.tokenizer = absolute_if_local(recipe.model.tokenizer)
    recipe.adapter = absolute_adapter_paths(recipe.adapter)
    for stage in recipe.stages:
        for source in [*stage.data.train, *stage.data.eval]:
            source.path = absolute_if_local(source.path)
            source.images = absolute_if_local(source.images)
    return recipe


def absolute_adapter_paths(adapter: AdapterSection) -> AdapterSection:
    """The adapter section with its starting adapter and CLIP weights (V2) absolute where local."""
    options = dict(adapter.options)
    if isinstance(options.get("clip_pretrained"), str):
        options["clip_pretrained"] = absolute_if_local(options["clip_pretrained"])
    return dataclasses.replace(adapter, init_from=absolute_if_local(adapter.init_from), options=options)
