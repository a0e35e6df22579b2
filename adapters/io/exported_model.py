"""A model folder written by `mmadapter export`: its record, its check before publishing, and its model card.

An exported folder is a plain Hugging Face model (config.json, safetensors shards, tokenizer, generation
config) plus `mmadapter_export.json`, which records where it came from (base, adapter, method, what was
folded) and every file that belongs to it. The record is what lets `mmadapter push` publish an exported
folder as a model repository: the listed files only (never a stray file dropped in later), after checking
offline that the shards are whole and hold exactly the tensors the config's architecture has.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from mmadapter.adapters.backbones.loading import read_base_config
from mmadapter.adapters.backbones.presets import build_base_model
from mmadapter.adapters.io.checkpoint import PICKLE_SUFFIXES
from mmadapter.adapters.io.model_card import METHODS
from mmadapter.core.chat_templates import CHAT
from mmadapter.core.config import document_type, parse
from mmadapter.core.files import read_safetensors_shapes
from mmadapter.core.templates import TEMPLATES

RECORD_FILE = "mmadapter_export.json"
CARD_FILE = "README.md"
#: transformers' index of a sharded checkpoint (tensor name -> shard file).
INDEX_FILE = "model.safetensors.index.json"


@document_type
@dataclasses.dataclass
class ExportRecord:
    """mmadapter_export.json: the provenance of an exported model and the files it consists of."""

    base: str
    """The base model as given to `mmadapter export` (a folder or a preset)."""
    adapter: str
    """The adapter as given (a folder or a hub repo id)."""
    method: str
    """The adapter's method (lora, llama-adapter-v2)."""
    adapter_config: dict[str, Any]
    """The adapter's hyperparameters, as in its mmadapter_config.json."""
    model_type: str
    """The exported architecture (llama, mistral, qwen2, qwen3)."""
    dtype: str
    """Precision of the saved weights (float32, bfloat16, float16)."""
    folded: list[str]
    """What was folded into the weights and the config, one sentence each."""
    files: list[str]
    """Every file of the folder, this record and the card included."""
    base_model: str | None = None
    """The base's hub id, when the adapter recorded one (model card metadata)."""
    prompt_template: str | None = None
    """The template the adapter was trained with; prompts for the exported model need it too."""
    tokenizer_chat_template: bool = False
    """Whether the saved tokenizer has a Jinja chat template (for `chat`: the one the adapter was trained on)."""
    license: str | None = None
    mmadapter_version: str | None = None


def write_record(folder: Path, record: ExportRecord) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class ExportedFolder:
    """A checked exported folder (what `inspect_exported_folder` returns)."""

    path: Path
    record: ExportRecord
    parameters: int
    """Parameters of the exported model (tied matrices counted once)."""

    @property
    def method(self) -> str:
        return self.record.method

    @property
    def publishable_files(self) -> list[str]:
        """What a push uploads besides the card it builds: the recorded files."""
        return [name for name in self.record.files if name != CARD_FILE]


def is_exported_folder(directory: str | Path) -> bool:
    return (Path(directory) / RECORD_FILE).is_file()


def read_record(directory: str | Path) -> ExportRecord:
    path = Path(directory) / RECORD_FILE
    try:
        return parse(ExportRecord, json.loads(path.read_bytes()))
    except ValueError as error:  # invalid JSON or a field of the wrong type
        raise ValueError(f"{path}: {error}; export the model again") from error


def inspect_exported_folder(directory: str | Path) -> ExportedFolder:
    """Check an exported folder offline (headers only, the model built on the meta device); raises naming the file."""
    path = Path(directory)
    record = read_record(path)
    missing = [name for name in record.files if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {', '.join(missing)} listed in {RECORD_FILE} but missing; export again")
    pickles = [name for name in record.files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{path / RECORD_FILE}: lists pickled files {pickles}; an export holds safetensors only")
    shards = [name for name in record.files if name.endswith(".safetensors")]
    if not shards:
        raise ValueError(f"{path / RECORD_FILE}: lists no .safetensors weights; export the model again")
    saved: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for shard in shards:
        for key, shape in read_safetensors_shapes(path / shard).items():  # a truncated shard fails here
            saved[key], where[key] = shape, shard
    model = build_base_model(read_base_config(path), device="meta")
    _check_tensors(path, saved, _parameter_groups(model))
    if (path / INDEX_FILE).is_file():
        _check_index(path, where)
    parameters = sum(p.numel() for p in model.parameters())
    return ExportedFolder(path=path, record=record, parameters=parameters)


def _parameter_groups(model: Any) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Saved-name candidates per tensor: tied matrices (embeddings and LM head) are one tensor with two names,
    of which a checkpoint holds one."""
    names: dict[int, list[str]] = defaultdict(list)
    shapes: dict[int, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
        shapes[id(param)] = tuple(param.shape)
    groups = {found[0]: (found, shapes[key]) for key, found in names.items()}
    parameter_names = {name for found in names.values() for name in found}
    for name, tensor in model.state_dict().items():  # persistent buffers
        if name not in parameter_names:
            groups[name] = ([name], tuple(tensor.shape))
    return groups


def _check_tensors(
    path: Path, saved: dict[str, tuple[int, ...]], groups: dict[str, tuple[list[str], tuple[int, ...]]]
) -> None:
    known = {name for names, _ in groups.values() for name in names}
    unexpected = sorted(set(saved) - known)
    missing = [first for first, (names, _) in groups.items() if not any(name in saved for name in names)]
    wrong = [
        f"{name} has shape {list(saved[name])}, config.json says {list(shape)}"
        for names, shape in groups.values()
        for name in names
        if name in saved and saved[name] != shape
    ]
    problems = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
    if problems or wrong:
        raise ValueError(
            f"{path}: the weights do not match the architecture in config.json: {'; '.join(problems + wrong[:5])}; "
            "export the model again"
        )


def _check_index(path: Path, where: dict[str, str]) -> None:
    try:
        weight_map = json.loads((path / INDEX_FILE).read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path / INDEX_FILE}: not a safetensors index ({error}); export the model again") from error
    wrong = sorted(key for key in set(weight_map) | set(where) if weight_map.get(key) != where.get(key))
    if wrong:
        raise ValueError(
            f"{path / INDEX_FILE}: {len(wrong)} tensors are not where the index says (e.g. {', '.join(wrong[:3])}); "
            "export the model again"
        )


def build_export_card(
    folder: ExportedFolder, repo_id: str | None = None, *, base_model: str | None = None, license: str | None = None
) -> ModelCard:
    """README.md of an exported model: hub metadata (a transformers model of its base), what was folded, how to
    load it with plain transformers, and the prompt format it was trained with."""
    record = folder.record
    base = base_model or record.base_model
    metadata = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=license or record.license,
        pipeline_tag="text-generation",
        tags=["mmadapter", record.method, "merged-adapter"],
    )
    title = METHODS.get(record.method, (record.method,))[0]
    reference = repo_id or str(folder.path)
    sections = [
        f"# {reference.rstrip('/').split('/')[-1]}",
        f"A standalone `{record.model_type}` model: the base `{base or record.base}` with the **{title}** adapter "
        f"`{record.adapter}` folded into its weights by `mmadapter export` ({folder.parameters:,} parameters, "
        f"{record.dtype}). It loads with plain transformers: no mmadapter, no peft, no remote code.",
        "## Use it",
        "\n".join(
            [
                "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'model = AutoModelForCausalLM.from_pretrained("{reference}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{reference}")',
                "```",
            ]
        ),
        _prompt_section(record.prompt_template, record.tokenizer_chat_template),
        "## What was folded",
        "\n".join(f"- {line}" for line in record.folded),
        "## Adapter",
        "\n".join(f"- `{key}`: `{json.dumps(value)}`" for key, value in record.adapter_config.items()),
        "## Files",
        "\n".join(f"- `{name}`" for name in record.files),
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _prompt_section(template: str | None, tokenizer_chat_template: bool) -> str:
    if template == CHAT:
        return (
            "The adapter was trained on the tokenizer's own chat template, which the saved tokenizer carries: "
            "format conversations with `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, "
            "or use a serving engine's chat endpoint."
        )
    if template not in TEMPLATES:
        return "The adapter was saved without a known prompt template: prompt the model as its training data did."
    chosen = TEMPLATES[template]
    lines = [
        f"The adapter was trained with mmadapter's `{template}` prompt template; the model expects prompts in "
        "that form (the text below, `{instruction}` replaced by the request), ending where its answer begins:",
        "",
        "```text",
        chosen.render("{instruction}"),
        "```",
    ]
    if chosen.stop:
        lines += ["", f"Stop generating at the end-of-sequence token or at {', '.join(map(repr, chosen.stop))}."]
    if tokenizer_chat_template:
        lines += [
            "",
            "The tokenizer's chat template comes from the base model and is not the format the adapter was trained "
            "on: send prompts in the form above (a completions endpoint), not as chat messages.",
        ]
    return "\n".join(lines)
