"""The model card (README.md) published with an adapter: hub metadata plus what a user needs to load it.

The front matter is built with huggingface_hub's `ModelCardData`, so the hub indexes the adapter
under its base model (`base_model`, tag `base_model:adapter:…`), its method and its library. The
body says what the adapter is, how many parameters it trained, how it was trained (from the
training summary, if one was saved) and how to load it with mmadapter — and with peft when the
folder is also in peft's layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from mmadapter.adapters.io.adapter_folder import PEFT_CONFIG_FILE, AdapterFolder
from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from mmadapter.adapters.methods.llama_adapter_v2 import config_takes_images
from mmadapter.core.chat_templates import CHAT

#: Written by the training loop beside the adapter (mmadapter.train.reporting): recipe and final metrics,
#: and the loss curve.
TRAINING_SUMMARY_FILE = "training_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"

#: method -> (display name, what it trains, reference).
METHODS = {
    "llama-adapter-v1": (
        "LLaMA-Adapter V1",
        "learned prompts in the top layers of a frozen LLaMA, joined to its attention through zero-initialised gates",
        "Zhang et al., 2023, [arXiv:2303.16199](https://arxiv.org/abs/2303.16199)",
    ),
    "llama-adapter-v2": (
        "LLaMA-Adapter V2",
        "prompts and gates, bias and scale terms on the linear layers and unfrozen norms of a frozen LLaMA, "
        "with visual tokens from a frozen CLIP encoder fused into the prompts",
        "Gao et al., 2023, [arXiv:2304.15010](https://arxiv.org/abs/2304.15010)",
    ),
    "lora": (
        "LoRA",
        "low-rank updates of frozen weight matrices",
        "Hu et al., 2021, [arXiv:2106.09685](https://arxiv.org/abs/2106.09685)",
    ),
    "ptuning-v2": (
        "P-Tuning v2",
        "key/value prefixes for every layer of a frozen model (deep prompt tuning)",
        "Liu et al., 2022, [arXiv:2110.07602](https://arxiv.org/abs/2110.07602)",
    ),
}
_REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
_MAX_TRAINING_ROWS = 40
#: Summary fields the card leaves to the JSON file: shown elsewhere in the card, or too long for a table.
_DETAIL_KEYS = frozenset({"adapter", "parameters", "history", "evals", "examples"})


def hub_base_model(folder: AdapterFolder, base_model: str | None = None) -> str | None:
    """The base model's hub id for the card: given explicitly, or recorded when it looks like one.

    A recorded local path or preset name is no hub id, so it is left out of the metadata.
    """
    if base_model:
        return base_model
    name = str(folder.base.get("name_or_path") or "")
    return name if _REPO_ID.fullmatch(name) and not Path(name).exists() else None


def read_training_record(folder: AdapterFolder) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe, results): the config's `training` field (the recipe as run) and the summary file's contents."""
    recipe = folder.document.get("training")
    results: dict[str, Any] = {}
    path = folder.path / TRAINING_SUMMARY_FILE
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error})") from error
        if isinstance(loaded, dict):
            results = loaded
    return (recipe if isinstance(recipe, dict) else {}), results


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested values as dotted rows; lists of records (stages) by their name; long details left to the JSON."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in _DETAIL_KEYS or value is None:
            continue
        if isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                label = item.get("stage") or item.get("name") or index
                rows += _flatten({k: v for k, v in item.items() if v != label}, f"{name}.{label}.")
        elif isinstance(value, float):
            rows.append((name, f"{value:.6g}"))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) <= 80:
                rows.append((name, text))
    return rows


def _training_section(folder: AdapterFolder, files: list[str] | None) -> list[str]:
    recipe, results = read_training_record(folder)
    sections = []
    for title, rows in (("Recipe", _flatten(recipe)), ("Results", _flatten(results))):
        if rows:
            sections += [f"### {title}", _table(rows[:_MAX_TRAINING_ROWS], ("item", "value"))]
            if len(rows) > _MAX_TRAINING_ROWS:
                sections.append(f"({len(rows) - _MAX_TRAINING_ROWS} more rows not shown.)")
    if files and LOSS_CURVE_FILE in files:
        sections.append(f"![loss curve]({LOSS_CURVE_FILE})")
    if results:
        sections.append(f"Everything the run recorded is in `{TRAINING_SUMMARY_FILE}`.")
    return sections or ["No training record was saved with this adapter."]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    return "\n".join(lines)


def card_metadata(folder: AdapterFolder, *, base_model: str | None = None, license: str | None = None) -> ModelCardData:
    base = hub_base_model(folder, base_model)
    tags = ["mmadapter", folder.method]
    if folder.has_peft_layout:
        tags.append("peft")
    if base:
        tags.append(f"base_model:adapter:{base}")
    return ModelCardData(
        base_model=base,
        library_name="mmadapter",
        license=license or folder.document.get("license"),
        pipeline_tag="image-text-to-text" if config_takes_images(folder.config) else "text-generation",
        tags=tags,
    )


def _usage(folder: AdapterFolder, reference: str, base: str | None) -> str:
    base_path = f"path/to/{base.split('/')[-1]}" if base else "path/to/base-model"
    # The frozen image encoder's weights are not part of the adapter; each machine names its own copy.
    clip = ', clip_pretrained="path/to/clip-weights"' if config_takes_images(folder.config) else ""
    lines = [
        "```python",
        "from mmadapter.adapters import load_base_model",
        "from mmadapter.adapters.io.hub import from_pretrained",
        "",
        f'base = load_base_model("{base_path}")  # a local copy of the base model (HF or Meta layout)',
        f'model = from_pretrained(base, "{reference}"{clip})',
        "```",
    ]
    template = folder.prompt_template
    if template == CHAT:
        recorded = "recorded in `mmadapter_config.json` (`chat_template`)" if folder.chat_template else "of its base"
        lines += ["", f"Prompts use the tokenizer chat template {recorded}, through `apply_chat_template`."]
    elif template:
        lines += [
            "",
            f"Prompts use the `{template}` template (`mmadapter.core.templates.get_template({template!r})`).",
        ]
    if folder.has_peft_layout:
        if folder.base.get("shape", {}).get("model_type") == "llama":
            base_lines = [
                "from transformers import AutoModelForCausalLM",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base or base_path}")',
            ]
        else:  # e.g. ChatGLM-6B, whose hub code predates transformers 5: mmadapter's own implementation
            base_lines = [
                "from mmadapter.adapters import load_base_model",
                "",
                f'base = load_base_model("{base_path}")',
            ]
        lines += [
            "",
            "The folder is also in peft's layout, so peft loads it directly:",
            "",
            "```python",
            "from peft import PeftModel",
            *base_lines,
            f'model = PeftModel.from_pretrained(base, "{reference}")',
            "```",
        ]
    return "\n".join(lines)


def _files(extra_files: list[str]) -> str:
    described = {
        WEIGHTS_FILE: "the adapter's tensors (nothing of the base model)",
        CONFIG_FILE: "method, hyperparameters, base model identity and shape, prompt template",
        PEFT_CONFIG_FILE: "peft's config for the same tensors",
        TRAINING_SUMMARY_FILE: "recipe and final metrics of the training run",
        LOSS_CURVE_FILE: "training and evaluation loss curve",
        "README.md": "this model card",
    }
    return "\n".join(f"- `{name}`" + (f": {described[name]}" if name in described else "") for name in extra_files)


def build_model_card(
    folder: AdapterFolder,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    license: str | None = None,
    files: list[str] | None = None,
) -> ModelCard:
    """The README.md for `folder`, loading snippets pointing at `repo_id` (or the folder itself)."""
    metadata = card_metadata(folder, base_model=base_model, license=license)
    base_id = metadata.base_model
    title, what, reference_paper = METHODS.get(folder.method, (folder.method, "", ""))
    shape = folder.base.get("shape", {})
    layers = shape.get("num_hidden_layers") or shape.get("num_layers")
    base_name = base_id or folder.base.get("name_or_path") or f"an unnamed {shape.get('model_type', '')} model"
    base_text = f"`{base_name}` ({shape.get('model_type')}, {layers} layers, hidden size {shape.get('hidden_size')})"
    fraction = 100 * folder.adapter_parameters / folder.base_parameters if folder.base_parameters else 0.0
    reference = repo_id or str(folder.path)
    sections = [
        f"# {reference.rstrip('/').split('/')[-1]}",
        f"A **{title}** adapter for {base_text}, shared with mmadapter."
        + (f" {title} trains {what} ({reference_paper})." if what else ""),
        f"This repository holds only the adapter: **{folder.adapter_parameters:,} trained parameters** "
        f"({fraction:.4f}% of the base model's {folder.base_parameters:,}). Load the base model separately.",
        "## Use it",
        _usage(folder, reference, base_id),
        "## Adapter",
        _table(
            [("method", folder.method), *((k, v) for k, v in folder.config.to_dict().items() if k != "method")],
            ("setting", "value"),
        ),
        "## Base model",
        _table(
            [("name", base_name), ("revision", folder.base.get("revision") or "not recorded"), *shape.items()],
            ("field", "value"),
        ),
        "## Training",
        *_training_section(folder, files),
    ]
    if files:
        sections += ["## Files", _files(files)]
    body = "\n\n".join(sections) + "\n"
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
