"""One loader for every front end: base + adapter folder -> a model that is ready to serve.

`load_served_model` loads the frozen base (preset or folder), attaches the adapter saved in a
folder, folds what can be folded into the weights (V2 bias/scale, LoRA; DESIGN §3 "merge for
inference"), and picks the prompt template the adapter was trained with, so nobody formats
prompts by hand: its `prompt_template`, and for `chat` the Jinja source it recorded (`chat_template`), so
the answer is asked for exactly as training saw it whichever tokenizer folder is loaded. A folder without
a record gets the base family's official template, as before chat templates existed. `ServedModel.from_model` wraps a model already in memory (the embedded demo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmadapter.adapters.backbones.chatglm.chat import CHAT_DEFAULTS
from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.presets import is_preset
from mmadapter.adapters.backbones.quantization import set_cpu_4bit_repacking
from mmadapter.adapters.io.checkpoint import load_adapter, read_adapter_config, recorded_base
from mmadapter.adapters.io.hub import download_adapter
from mmadapter.adapters.methods.base import get_method
from mmadapter.adapters.methods.llama_adapter_v2 import takes_images, visual_prompter_of
from mmadapter.adapters.methods.prompt_attention import use_prompt_attention
from mmadapter.adapters.methods.routing import install_routes, make_shell
from mmadapter.core.quantization import Quantization
from mmadapter.core.templates import Template, official_template, resolve_template
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.sampling import SamplingParams

#: Methods served attached to the base itself rather than routed per row (P-Tuning v2: prefixes in the KV cache).
UNROUTED_METHODS = ("ptuning-v2",)
#: Methods that add LLaMA-Adapter prompts inside attention (the base then needs the prompt-aware kernel).
PROMPT_METHODS = ("llama-adapter-v1", "llama-adapter-v2")
#: Generation defaults of the official demos: LLaMA-Adapter (spec llama-adapter §1.7, §3.9) and
#: ChatGLM-6B's chat()/stream_chat() (spec chatglm-6b-ptuning-v2 §2.8).
DEFAULT_SAMPLING = {
    "llama": SamplingParams(max_new_tokens=256, temperature=0.1, top_p=0.75),
    # chat()'s own defaults; max_length 2048 counts the prompt, so serving caps the answer instead.
    "chatglm": SamplingParams(
        max_new_tokens=512, temperature=CHAT_DEFAULTS["temperature"], top_p=CHAT_DEFAULTS["top_p"]
    ),
}


def adapter_method_name(model: nn.Module) -> str | None:
    config = getattr(model, "adapter_config", None)
    return None if config is None else config.method


def merge_for_serving(model: nn.Module) -> None:
    """Fold the adapter's mergeable parts into the base weights; serving never unmerges, so no copies are kept."""

    config = getattr(model, "adapter_config", None)
    if config is None:
        return
    get_method(config.method).merge(model, config, keep_originals=False)


class UnknownModelError(ValueError):
    """A request named a model id this server does not serve."""


#: The id under which the base model without an adapter is served next to routed adapters.
BASE_MODEL_ID = "base"


@dataclasses.dataclass
class ServedVariant:
    """One model id a client can ask for: an adapter (or the base) with its template and sampling defaults."""

    name: str
    model: nn.Module
    """The model carrying this adapter: a routing shell (`adapters.methods.routing`) or the served model itself."""
    template: Template
    defaults: SamplingParams
    route: str | None = None
    """Its name in the base model's routing; None: the served model as it is (adapter_scale fixed at 1)."""
    engine: GenerationEngine | None = None
    """Its own engine on its shell (a P-Tuning v2 adapter beside others): its requests run one at a time."""

    @property
    def takes_images(self) -> bool:
        return takes_images(self.model)

    def scale_problem(self, scale: float) -> str | None:
        """Why a request's adapter_scale `scale` cannot be honoured for this model id (None: it can)."""
        if scale == 1.0 or self.method is None or self.route is not None:
            return None
        if self.engine is not None:
            return (
                f"the model {self.name!r} is a P-Tuning v2 adapter, whose prefix has no strength to dial, so only "
                "adapter_scale 1 is possible"
            )
        return (
            f"the model {self.name!r} is served merged into the base weights, so only adapter_scale 1 is possible "
            "(the operator serves it with --adapter NAME=PATH, without --merge, to allow other values)"
        )

    @property
    def method(self) -> str | None:
        return adapter_method_name(self.model)


@dataclasses.dataclass
class ServedModel:
    """A model, its tokenizer and prompt template, and the engine that generates with them.

    `variants` are the model ids served; `name`, `template` and `defaults` are those of the default one.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: Template
    name: str
    """The model id clients send (OpenAI `model` field) and /v1/models lists."""
    defaults: SamplingParams
    engine: GenerationEngine = dataclasses.field(init=False)
    variants: dict[str, ServedVariant] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.engine = GenerationEngine(self.model, self.tokenizer)
        self.variants = {self.name: ServedVariant(self.name, self.model, self.template, self.defaults)}
        if self.takes_images:  # prompts remembered before the adapter's weights were loaded are stale
            visual_prompter_of(self.model).forget()

    def model_ids(self) -> list[str]:
        """The ids clients may send as `model`, the default first."""
        return list(self.variants)

    def variant(self, model_id: str | None) -> ServedVariant:
        """The variant for a request's `model` (None: the default)."""
        if model_id is None:
            model_id = self.name
        if model_id not in self.variants:
            raise UnknownModelError(
                f"the model {model_id!r} does not exist; this server serves {', '.join(map(repr, self.variants))}"
            )
        return self.variants[model_id]

    def update_defaults(self, **changes: Any) -> None:
        """Change the sampling defaults of every variant (the command line's sampling options)."""
        self.defaults = self.defaults.replace(**changes)
        for variant in self.variants.values():
            variant.defaults = variant.defaults.replace(**changes)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str | None = None,
        name: str = "mmadapter",
        defaults: SamplingParams | None = None,
        chat_template: str | None = None,
    ) -> ServedModel:
        """Wrap a model already in memory (eval mode, merged or not) for the chat, API and web front ends.

        `template` is a template name (default: the base family's official one); `chat_template` replaces
        the tokenizer's own Jinja template for `chat` and `auto` (an adapter's recorded one)."""
        model_type = model.config.model_type
        resolved = resolve_template(template or official_template(model_type), tokenizer, model_type, chat_template)
        defaults = defaults or DEFAULT_SAMPLING.get(model_type, SamplingParams())
        # A chat template's end-of-turn token (Llama 3's <|eot_id|> is not its EOS) ends every answer.
        defaults = defaults.replace(
            stop_token_ids=tuple(dict.fromkeys(defaults.stop_token_ids + resolved.stop_token_ids))
        )
        model.eval()
        return cls(model, tokenizer, resolved, name, defaults)

    @property
    def takes_images(self) -> bool:
        """Whether the default model id takes images."""
        return self.variant(None).takes_images

    @property
    def method(self) -> str | None:
        """The default model id's adapter method."""
        return self.variant(None).method


def load_served_model(
    base: str | Path | None,
    adapter: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    quantization: Quantization | None = None,
    name: str | None = None,
    adapter_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    merge: bool = True,
) -> ServedModel:
    """Load BASE (+ the adapter in ADAPTER, a folder or a hub repo id) ready to serve.

    `base` None: the base (and tokenizer) the adapter folder records it trained with. `tokenizer` defaults to
    the base folder (presets have none: pass one). `dtype` defaults to
    bfloat16 on CUDA and float32 on CPU; `device` to CUDA when available. The template defaults
    to the adapter's recorded one (`adapter_template`), then to the base model's official one.
    """

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if base is not None:
        _check_tokenizer_source(base, tokenizer)
    folder = None if adapter is None else download_adapter(adapter, revision)
    if base is None:
        if folder is None:
            raise ValueError("base: give the base model (a folder or a preset); there is no adapter to read it from")
        base, recorded_tokenizer = recorded_base(folder)
        if base is None or not (is_preset(base) or Path(base).exists()):
            raise ValueError(
                f"{adapter}: the adapter records base {base!r}, which is not here; pass the base folder or preset"
            )
        tokenizer = tokenizer or recorded_tokenizer
        _check_tokenizer_source(base, tokenizer)
    # A broken adapter config fails here, before the base loads for minutes.
    document = {} if folder is None else read_adapter_config(folder)
    model = load_base_model(base, dtype=dtype, device=device, quantization=quantization)
    set_cpu_4bit_repacking(model, enabled=True)  # served models never train
    if folder is not None:
        load_adapter(model, folder, **(adapter_overrides or {}))
        model.to(device)
        model.eval()
        if merge:
            merge_for_serving(model)
    source = Path(str(adapter if adapter is not None else base))
    served_name = name or (source.name if source.exists() else str(source))  # folder name, or preset / repo id
    return ServedModel.from_model(
        model,
        load_tokenizer(tokenizer or base),
        template=template or document.get("prompt_template"),
        name=served_name,
        chat_template=document.get("chat_template"),
    )


def _check_tokenizer_source(base: str | Path, tokenizer: str | Path | None) -> None:
    if is_preset(tokenizer or base):
        raise ValueError(f"base {base!r} is a preset without a tokenizer; pass a tokenizer folder (--tokenizer)")


def adapter_template(
    document: dict[str, Any], tokenizer: Any, model_type: str, override: str | None = None
) -> Template:
    """The template an adapter folder records (`document`: its `read_adapter_config`), or `override` (a
    `--template` name); a folder without a record gets the base family's official template."""
    name = override or document.get("prompt_template") or official_template(model_type)
    return resolve_template(name, tokenizer, model_type, document.get("chat_template"))


def adapter_name(source: str | Path) -> str:
    """A bare `--adapter PATH`'s model id: the folder's name, or the hub repo id."""
    path = Path(str(source))
    return path.name if path.exists() else str(source)


def load_served_models(
    base: str | Path,
    adapters: dict[str, str | Path],
    *,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    quantization: Quantization | None = None,
    adapter_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
) -> ServedModel:
    """BASE once, every adapter in `adapters` (model id -> folder or hub id) routed onto it, and the base
    itself as `base`: rows of one batch may use different adapters, each at its request's adapter_scale.

    Nothing is merged into the shared weights (each adapter's terms act per row). A P-Tuning v2 adapter among
    others is not routed: its prefix lives in each request's KV cache, so it gets its own engine on its shell
    (sharing the base weights) and its requests run one at a time beside the shared batch. The first adapter is
    the default model id. `template` overrides every adapter's saved template.
    """
    if BASE_MODEL_ID in adapters:
        raise ValueError(f"--adapter: the name {BASE_MODEL_ID!r} is the base model's; choose another name")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    _check_tokenizer_source(base, tokenizer)
    tokenizer_source = tokenizer or base
    folders = {name: download_adapter(source, revision) for name, source in adapters.items()}
    # Broken adapter configs fail here, before the base loads for minutes.
    documents = {name: read_adapter_config(folder) for name, folder in folders.items()}
    if len(adapters) == 1 and documents[next(iter(adapters))]["adapter"].get("method") in UNROUTED_METHODS:
        # Its prefix lives in each request's KV cache: served alone, attached to the base itself (no `base` id).
        [(name, folder)] = folders.items()
        return load_served_model(
            base,
            folder,
            tokenizer=tokenizer,
            template=template,
            dtype=dtype,
            device=device,
            name=name,
            adapter_overrides=adapter_overrides,
            quantization=quantization,
        )
    model = load_base_model(base, dtype=dtype, device=device, quantization=quantization)
    set_cpu_4bit_repacking(model, enabled=True)  # served models never train
    shells = {name: make_shell(model) for name in folders}  # all before any routing is installed on the base
    for name, folder in folders.items():
        load_adapter(shells[name], folder, **(adapter_overrides or {}))
        shells[name].to(device).eval()
        if adapter_method_name(shells[name]) in UNROUTED_METHODS:
            continue
        if adapter_method_name(shells[name]) in PROMPT_METHODS:
            use_prompt_attention(model)
        install_routes(model, name, shells[name])
    loaded_tokenizer = load_tokenizer(tokenizer_source)
    model_type = model.config.model_type
    # The `base` id is asked as the default adapter is, so comparing the two compares the same prompt.
    default = documents[next(iter(adapters))] if adapters else {}
    served = ServedModel.from_model(
        model,
        loaded_tokenizer,
        template=template or default.get("prompt_template"),
        name=BASE_MODEL_ID,
        chat_template=default.get("chat_template"),
    )
    variants = {
        name: ServedVariant(
            name,
            shell,
            adapter_template(documents[name], loaded_tokenizer, model_type, override=template),
            served.defaults,
            route=None if adapter_method_name(shell) in UNROUTED_METHODS else name,
            engine=GenerationEngine(shell, loaded_tokenizer)
            if adapter_method_name(shell) in UNROUTED_METHODS
            else None,
        )
        for name, shell in shells.items()
    }
    for variant in variants.values():
        if variant.takes_images:
            visual_prompter_of(variant.model).forget()
    served.variants = {**variants, **served.variants}
    served.name = next(iter(served.variants))
    served.template, served.defaults = served.variants[served.name].template, served.variants[served.name].defaults
    return served
