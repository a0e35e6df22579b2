"""`mmadapter export`: fold an adapter into its base and write a standalone Hugging Face model folder.

What folds, through the same `merge` that serving uses (DESIGN §3 "merge for inference"):

- LoRA: peft's merge, W + (alpha/r)·B·A, then the frozen layers under their own names (what peft's
  `merge_and_unload` gives);
- LLaMA-Adapter V2 without prompts (the `chat65b` preset): scales multiplied into the weights, trained biases
  added to the linears' own biases (switched on by the config's `attention_bias` / `mlp_bias` where the family
  has such a switch; the biases the adapter did not train are zero), tuned norms in place of the base's, and
  LoRA merged as above (`mmadapter.adapters.methods.bias_scale.merge_linear`).

What cannot fold is refused before the base loads, in one line saying why and what to do instead: prompts
with gated attention (V1, V2), P-Tuning v2's prefixes, V2's visual path, ChatGLM-6B (mmadapter's own
implementation, which plain transformers cannot load) and biases the family's architecture has no place for.

The folder is written beside OUTPUT under a hidden name and renamed into place when complete, so OUTPUT is
never half-written; an existing non-empty OUTPUT is replaced only when asked (`force`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer, parse_dtype, read_base_config
from mmadapter.adapters.backbones.presets import build_base_model, is_preset, model_class_for
from mmadapter.adapters.io.adapter_folder import AdapterFolder, inspect_adapter_folder
from mmadapter.adapters.io.checkpoint import CONFIG_FILE, check_base_matches, load_adapter
from mmadapter.adapters.io.exported_model import (
    CARD_FILE,
    RECORD_FILE,
    ExportedFolder,
    ExportRecord,
    build_export_card,
    write_record,
)
from mmadapter.adapters.io.model_card import hub_base_model
from mmadapter.adapters.methods.base import AdapterConfig, get_method, trainable_parameters
from mmadapter.adapters.methods.bias_scale import LINEAR_PATHS
from mmadapter.adapters.methods.llama_adapter_v1 import decoder_layers
from mmadapter.adapters.methods.llama_adapter_v2 import LlamaAdapterV2Config
from mmadapter.adapters.methods.lora import LoraMethodConfig, lora_layers, target_modules_for
from mmadapter.core.chat_templates import CHAT, has_chat_template
from mmadapter.core.files import current_umask

#: transformers' largest shard by default would be 50GB; 5GB shards upload and download in parallel.
DEFAULT_SHARD_SIZE = "5GB"
#: Config switches that give a family's block linears biases (Llama: attention q,k,v,o / MLP gate,up,down).
BIAS_SWITCHES = ("attention_bias", "mlp_bias")
#: Where peft keeps the frozen layer it wraps; the exported model has the layer itself under that name.
_PEFT_WRAPPED = ".base_layer."

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What an export will do, decided offline (no weights read) before the base loads."""

    base: str
    adapter: AdapterFolder
    adapter_source: str
    """The adapter as the user named it (a folder or a hub repo id), for the card and the record."""
    base_config: PretrainedConfig
    config_changes: dict[str, Any]
    """Config fields the exported model sets differently from the base (bias switches)."""
    dtype: torch.dtype
    folded: list[str]
    """What folds where, one sentence each (card, record, the command's report)."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    folder: ExportedFolder
    files: list[str]
    size_bytes: int


def plan_export(
    base: str | Path, adapter: str | Path, *, adapter_source: str | None = None, dtype: str | torch.dtype | None = None
) -> ExportPlan:
    """Check that the adapter in folder `adapter` folds into `base` and decide how; raises naming why not.

    `dtype` defaults to the base checkpoint's own (float32 where it records none)."""
    folder = inspect_adapter_folder(adapter)
    source = adapter_source or str(adapter)
    base_config = read_base_config(base)
    meta_base = build_base_model(copy.deepcopy(base_config), device="meta")
    check_base_matches(folder.base, meta_base, f"{folder.path / CONFIG_FILE}")
    serve = f"mmadapter serve --base {base} --adapter {source}"
    check_foldable(folder.config, base_config, source, serve)
    changes: dict[str, Any] = {}
    if isinstance(folder.config, LlamaAdapterV2Config):
        needed = linears_with_bias(meta_base) | set(folder.config.bias_linears)
        changes = bias_switches(base_config, needed, source, serve)
    chosen = parse_dtype(dtype) or _stored_dtype(base_config)
    return ExportPlan(
        base=str(base),
        adapter=folder,
        adapter_source=source,
        base_config=base_config,
        config_changes=changes,
        dtype=chosen,
        folded=describe_folding(folder.config, meta_base, changes),
    )


def check_foldable(config: AdapterConfig, base_config: PretrainedConfig, adapter: str, serve: str) -> None:
    """Refuse, in one line saying why and what to do instead, an adapter whose math a plain model cannot hold."""
    model_type = base_config.model_type
    if config.method == "llama-adapter-v1":
        raise ValueError(
            f"{adapter}: cannot export a llama-adapter-v1 adapter: its {config.prompt_length} learned prompt "
            f"tokens join the attention of the top {config.adapted_layers} layers through zero-initialised gates, "
            f"which a plain {model_type} model does not have, so they cannot fold into its weights. Serve it with "
            f"`{serve}`, or train a LoRA (adapter.method: lora), which exports"
        )
    if config.method == "ptuning-v2":
        raise ValueError(
            f"{adapter}: cannot export a ptuning-v2 adapter: its prefixes are {config.pre_seq_len} extra "
            f"key/value vectors in every layer's attention, which a plain {model_type} model has no place for, so "
            f"they cannot fold into its weights. Serve it with `{serve}`, or train a LoRA (adapter.method: lora), "
            "which exports"
        )
    if isinstance(config, LlamaAdapterV2Config) and config.has_vision:
        raise ValueError(
            f"{adapter}: cannot export this llama-adapter-v2 adapter: its visual path (a frozen CLIP encoder and a "
            f"trained {config.visual_projector} projector turning each image into prompt tokens for gated "
            f"attention) has no counterpart in a text-only {model_type} model. Serve it with `{serve}`, which "
            "takes images"
        )
    if isinstance(config, LlamaAdapterV2Config) and config.has_prompts:
        raise ValueError(
            f"{adapter}: cannot export this llama-adapter-v2 adapter: its {config.prompt_length} learned prompt "
            f"tokens per layer join attention through zero-initialised gates, which a plain {model_type} model "
            f"does not have. Serve it with `{serve}`, or train without prompts (prompt_length: 0, as the chat65b "
            "preset does) or a LoRA, which export"
        )
    if config.method not in ("lora", "llama-adapter-v2"):
        raise ValueError(f"{adapter}: {config.method} adapters cannot be exported; serve it with `{serve}`")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{adapter}: cannot export onto model_type {model_type!r}: plain transformers has no model class for "
            "it (ChatGLM-6B runs on mmadapter's own implementation; its hub code needs trust_remote_code and "
            f"predates transformers 5). Serve it with `{serve}`"
        )


def linears_with_bias(model: nn.Module) -> set[str]:
    """Short names (q, k, …, down) of the block linears that hold a bias in `model` (judged by its first block)."""
    first = decoder_layers(model)[0]
    return {short for short, path in LINEAR_PATHS.items() if first.get_submodule(path).bias is not None}


def bias_switches(base_config: PretrainedConfig, needed: set[str], adapter: str, serve: str) -> dict[str, Any]:
    """The config switches that give every linear in `needed` a bias, found by building the family's model with
    each switch on (on the meta device): the architecture itself says where it can hold biases."""
    have = linears_with_bias(build_base_model(copy.deepcopy(base_config), device="meta"))
    changes: dict[str, Any] = {}
    for switch in BIAS_SWITCHES:
        if needed <= have:
            break
        probe = copy.deepcopy(base_config)
        setattr(probe, switch, True)
        gained = linears_with_bias(build_base_model(probe, device="meta")) - have
        if gained & needed:
            changes[switch] = True
            have |= gained
    missing = needed - have
    if missing:
        order = list(LINEAR_PATHS)
        names = ", ".join(sorted(missing, key=order.index))
        possible = ", ".join(sorted(have, key=order.index)) or "none of them"
        raise ValueError(
            f"{adapter}: cannot export: the adapter trains biases on {names}, but a {base_config.model_type} model "
            f"has no bias there (its architecture can hold biases on {possible}). Serve it with `{serve}`, or train "
            "a LoRA or a llama-adapter-v2 whose bias_linears the family can hold"
        )
    return changes


def describe_folding(config: AdapterConfig, meta_base: nn.Module, changes: dict[str, Any]) -> list[str]:
    """One sentence per kind of term that folds, for the card, the record and the command's report."""
    if isinstance(config, LoraMethodConfig):
        targets = ", ".join(target_modules_for(meta_base, config))
        return [f"LoRA (r={config.r}, alpha={config.alpha:g}) merged into the weights of {targets}: W + alpha/r·B·A"]
    lines = []
    if config.scale_linears:
        lines.append(
            f"{config.scale_side}-side scales of {', '.join(config.scale_linears)} multiplied into the weights"
        )
    if config.bias_linears:
        switches = ", ".join(f"{key}=true" for key in changes) or "none needed"
        lines.append(
            f"trained biases of {', '.join(config.bias_linears)} added to the linears' own biases "
            f"(config: {switches}; biases the adapter did not train are zero)"
        )
    if "norms" in config.stage_groups(None):
        lines.append("trained RMSNorm weights in place of the base's")
    if config.lora_rank:
        lines.append(f"LoRA (r={config.lora_rank}) on {', '.join(config.lora_linears)} merged into the weights")
    return lines


def _stored_dtype(config: PretrainedConfig) -> torch.dtype:
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def check_output(output: Path, *, force: bool, keep: tuple[str | Path, ...] = ()) -> None:
    """Refuse an OUTPUT that would overwrite something: a file, a non-empty folder (unless `force`), or a folder
    holding one of `keep` (the base and the adapter)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a folder; choose another OUTPUT")
    target = output.resolve()
    for path in keep:
        source = Path(path).resolve()
        if Path(path).exists() and (source == target or target in source.parents):
            raise ValueError(f"{output}: holds {path}, which the export reads; choose another OUTPUT")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ValueError(f"{output}: exists and is not empty; choose a new folder, or pass --force to replace it")


def export_model(
    plan: ExportPlan,
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: Progress = lambda line: None,
) -> ExportResult:
    """Load the base, attach and fold the adapter, and write the standalone model folder to `output`."""
    output = Path(output)
    check_output(output, force=force, keep=(plan.base, plan.adapter.path, *([tokenizer] if tokenizer else [])))
    tokenizer_source = tokenizer or plan.base
    if is_preset(tokenizer_source):
        raise ValueError(f"base {plan.base!r} is a preset without a tokenizer; pass a tokenizer folder (--tokenizer)")
    tokenizer_object = load_tokenizer(tokenizer_source)
    document = plan.adapter.document
    if document.get("prompt_template") == CHAT and document.get("chat_template"):
        tokenizer_object.chat_template = document["chat_template"]  # the one it was trained on, for chat endpoints
    dtype_name = str(plan.dtype).removeprefix("torch.")
    progress(f"loading the base {plan.base} ({dtype_name})")
    model = load_base_model(plan.base, dtype=plan.dtype)
    progress(f"attaching the {plan.adapter.method} adapter {plan.adapter_source}")
    load_adapter(model, plan.adapter.path)
    config = plan.adapter.config
    if isinstance(config, LoraMethodConfig):
        _check_untied(model, plan)
    progress("folding: " + "; ".join(plan.folded))
    get_method(config.method).merge(model, config, keep_originals=False)
    exported = _standalone_model(model, plan)
    with staged_folder(output) as staging:
        progress(f"writing {output} (shards of at most {max_shard_size})")
        exported.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer_object.save_pretrained(staging)
        files = sorted(path.name for path in staging.iterdir() if path.is_file())
        record = _record(plan, sorted({*files, RECORD_FILE, CARD_FILE}), has_chat_template(tokenizer_object))
        write_record(staging, record)
        folder = ExportedFolder(output, record, sum(p.numel() for p in exported.parameters()))
        (staging / CARD_FILE).write_text(str(build_export_card(folder)))
    return ExportResult(
        folder=folder, files=record.files, size_bytes=sum((output / name).stat().st_size for name in record.files)
    )


def _check_untied(model: PreTrainedModel, plan: ExportPlan) -> None:
    """LoRA on a matrix the model ties to another (embeddings and LM head) would change both when merged."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name.replace(_PEFT_WRAPPED, "."))
    for layer in lora_layers(model):
        shared = names[id(layer.get_base_layer().weight)]
        if len(shared) > 1:
            serve = f"mmadapter serve --base {plan.base} --adapter {plan.adapter_source}"
            raise ValueError(
                f"{plan.adapter_source}: cannot export: LoRA adapts {shared[0]}, which this "
                f"{model.config.model_type} model ties to {shared[1]} (tie_word_embeddings), so merging would change "
                f"both. Serve it with `{serve}`, or train a LoRA whose target_modules leave out tied matrices"
            )


def _standalone_model(model: PreTrainedModel, plan: ExportPlan) -> PreTrainedModel:
    """The family's own model class with the folded tensors (no copies): the merged base layers under their
    own names, biases the new config switches on but nothing trained as zeros, and the adapter's own
    parameters gone. Every tensor of the merged model is accounted for, or this raises."""
    config = copy.deepcopy(model.config)
    for key, value in plan.config_changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        exported = model_class_for(config)(config)
    source = {name.replace(_PEFT_WRAPPED, "."): tensor for name, tensor in model.state_dict().items()}
    folded_away = {name.replace(_PEFT_WRAPPED, ".") for name in trainable_parameters(model)}
    tensors = {}
    for name, expected in exported.state_dict().items():
        if name in source:
            tensors[name] = source[name].to(plan.dtype)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(expected.shape, dtype=plan.dtype)
        else:
            raise RuntimeError(f"export: the merged model has no tensor for {name}")
    lost = sorted(set(source) - set(tensors) - folded_away)
    if lost:
        raise RuntimeError(f"export: tensors of the adapted model that would not be exported: {lost[:5]}")
    exported.load_state_dict(tensors, strict=True, assign=True)
    exported.tie_weights()
    exported.generation_config = copy.deepcopy(model.generation_config)
    return exported.eval()


def _record(plan: ExportPlan, files: list[str], chat_template: bool) -> ExportRecord:
    document = plan.adapter.document
    return ExportRecord(
        base=plan.base,
        adapter=plan.adapter_source,
        method=plan.adapter.method,
        adapter_config=plan.adapter.config.to_dict(),
        model_type=plan.base_config.model_type,
        dtype=str(plan.dtype).removeprefix("torch."),
        folded=plan.folded,
        files=files,
        base_model=hub_base_model(plan.adapter),
        prompt_template=document.get("prompt_template"),
        tokenizer_chat_template=chat_template,
        license=document.get("license"),
        mmadapter_version=version("mmadapter"),
    )


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A hidden folder beside `output` to write into; once everything is written it is synced to disk and renamed
    to `output` (an existing one is moved aside first and removed after). On an error it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.export-"))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes folders private; this one is shared like any other
    try:
        yield staging
        _sync(staging)
        _replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sync(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def _replace_folder(staging: Path, output: Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    if not any(output.iterdir()):
        output.rmdir()
        staging.rename(output)
        return
    old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.replaced-"))
    output.rename(old / output.name)
    staging.rename(output)
    shutil.rmtree(old)
