"""LLaMA-Adapter V2: bias/scale tuning, unfrozen norms, gated prompts, a frozen CLIP, disjoint stages.

Gao et al., "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model", arXiv:2304.15010.
The released code differs from the paper (spec llama-adapter.md §3.5, §3.6, §4, §6), so every
difference is configuration and both are presets:

- prompts + tanh gates on decoder layers `first_adapted_layer … N-1` (released: 1 … 31, K = 10),
  computed by `mmadapter.adapters.methods.prompt_attention` exactly as in V1;
- bias / scale on chosen linears of every block (`mmadapter.adapters.methods.bias_scale`), scale on the
  input side (released chat-65B) or output side (paper), optional LoRA on the same linears
  through peft with alpha = r (the released LORA-BIAS layout: no scaling, no dropout);
- all RMSNorm weights trainable (Qwen3's per-head q/k norms too);
- visual fusion: a frozen CLIP (`model.vision_encoder`, never saved) and a trainable projector
  (`model.visual_projector`, saved with the adapter) turn an image into a visual prompt (B, K, D)
  that is added to the prompts of all adapted layers (released) or of the first one only (paper's
  early fusion). Callers compute it with `visual_prompt(model, pixel_values)` and pass it to
  forward / generate as `adapter_visual_prompt=`.
- disjoint training: `is_trainable(name, config, stage)` with stages `caption` and `instruction`;
  which parameter groups each stage trains is configuration (see `PARAMETER_GROUPS`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
from typing import Annotated, Any

import pydantic
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn

from mmadapter.adapters.methods.base import AdapterConfig, AdapterMethod, register_method
from mmadapter.adapters.methods.bias_scale import (
    LINEAR_PATHS,
    SCALE_SIDES,
    add_bias_scale,
    bias_scale_state,
    frozen_linear,
    merge_linear,
    unmerge_linear,
)
from mmadapter.adapters.methods.llama_adapter_v1 import decoder_layers
from mmadapter.adapters.methods.prompt_attention import (
    PROMPT_FAMILIES,
    VISUAL_PROMPT_KWARG,
    add_gated_prompt,
    check_prompt_support,
    use_prompt_attention,
)
from mmadapter.core.config import Bool, Float, Int
from mmadapter.vision.clip_encoder import FrozenCLIPEncoder
from mmadapter.vision.projector import VisualProjectorV1, VisualProjectorV2
from mmadapter.vision.visual_prompt import VisualPrompter

logger = logging.getLogger(__name__)

STAGES = ("caption", "instruction")
#: What a stage can train. `fused_*` are the prompts/gates of layers that receive the visual
#: prompt, `unfused_*` those of the others; `prompts` / `gates` mean both.
PARAMETER_GROUPS = (
    "projector",
    "prompts",
    "gates",
    "fused_prompts",
    "fused_gates",
    "unfused_prompts",
    "unfused_gates",
    "bias",
    "scale",
    "norms",
    "lora",
)
VISUAL_PROJECTORS = ("none", "v1", "v2")
VISUAL_FUSIONS = ("all", "first")
TEXT_ONLY_IMAGES = ("zeros", "none")
IMAGE_CHANNEL_ORDERS = ("rgb", "bgr")
#: Module names under which attach() adds the vision side to the causal LM.
ENCODER_ATTRIBUTE = "vision_encoder"
PROJECTOR_ATTRIBUTE = "visual_projector"
PROMPTER_ATTRIBUTE = "visual_prompter"
#: peft's adapter name for the LoRA layers.
LORA_ADAPTER_NAME = "default"

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".self_attn.q_norm.weight",
    ".self_attn.k_norm.weight",
)
_FINAL_NORM = "model.norm.weight"
_ALL_LINEARS = tuple(LINEAR_PATHS)


def _not_a_string(value: Any, field: str) -> Any:
    """A lone YAML name (`bias_linears: q`) is a string, not a list of one name."""
    if isinstance(value, str):
        raise ValueError(f"llama-adapter-v2: {field} must be a list, got the string {value!r}")
    return value


#: Names of linears or parameter groups; a document's string gets the message above, not the tuple type's.
_Names = Annotated[tuple[str, ...], pydantic.BeforeValidator(lambda value, info: _not_a_string(value, info.field_name))]


@dataclasses.dataclass
class LlamaAdapterV2Config(AdapterConfig):
    """Defaults are the released multimodal BIAS-7B model (spec §3)."""

    method = "llama-adapter-v2"

    prompt_length: Int = 10
    """K: prompt vectors per adapted layer (also the number of visual query tokens); 0 = no prompts."""
    first_adapted_layer: Int = 1
    """Prompts go into decoder layers first_adapted_layer … N-1 (released: 1, i.e. the last 31 of 32)."""
    gate_tanh: Bool = True
    """Apply tanh to the per-head gates, as all official V2 code does."""
    bias_linears: _Names = ("q", "o", "gate", "up", "down")
    """Linears of every block that get a zero-init bias (q k v o gate up down; released 7B: q o gate up down)."""
    scale_linears: _Names = ()
    """Linears of every block that get a one-init scale (released 7B: none; chat-65B: all seven)."""
    scale_side: str = "input"
    """'input': y = W(s⊙x) + b (released chat-65B code); 'output': y = s⊙(Wx + b) (paper eq. 1)."""
    lora_rank: Int = 0
    """r of LoRA on `lora_linears` (0 = none; released LORA-BIAS: 16). No alpha scaling, no dropout."""
    lora_linears: _Names = _ALL_LINEARS
    """Linears that get LoRA when lora_rank > 0 (released: all seven)."""
    visual_projector: str = "v2"
    """'v2': CLIP tokens -> query tokens through ViT blocks (released); 'v1': global CLIP feature
    repeated over the K prompt slots (V1 multimodal); 'none': text only."""
    visual_fusion: str = "all"
    """Which adapted layers add the visual prompt: 'all' (released code) or 'first' (paper's early fusion)."""
    visual_width: Int = 768
    """Width of the V2 projector's ViT blocks (released 768)."""
    visual_depth: Int = 8
    """Number of ViT blocks in the V2 projector (released 8)."""
    visual_heads: Int = 16
    """Attention heads of those blocks (released 16)."""
    visual_mlp_ratio: Float = 4.0
    """MLP width / block width (released 4.0)."""
    clip_model: str = "ViT-L-14-quickgelu"
    """open_clip architecture of the frozen image encoder, CLIP or SigLIP (OpenAI's ViT-L/14 weights need
    QuickGELU); a clip_pretrained folder with open_clip_config.json names its own architecture instead."""
    clip_pretrained: str | None = None
    """Local weights file/folder or open_clip tag for the encoder; machine-specific, so load_adapter
    accepts it as an override. None builds a randomly initialised encoder (tests only)."""
    clip_width: Int | None = None
    """Width of the encoder's tokens, the projector's input (ViT-L/14: 768, SigLIP B/16: 768, SO400M: 1152).
    None: the encoder's; attaching fills it in, so a saved adapter's shapes are known without its tower."""
    image_channel_order: str = "rgb"
    """'bgr' for official checkpoints, which were trained on BGR images read as RGB (spec §3.8)."""
    text_only_image: str = "zeros"
    """Text-only samples: 'zeros' = the visual prompt of an all-zero image (released training);
    'none' = no visual prompt (the prompts alone)."""
    caption_trains: _Names = ("projector", "prompts", "gates")
    """Parameter groups trained on image-caption data (released pretrain phase)."""
    instruction_trains: _Names = ("bias", "norms")
    """Parameter groups trained on instruction data (released finetune phase: biases and norms)."""

    def __post_init__(self) -> None:
        for field in ("bias_linears", "scale_linears", "lora_linears", "caption_trains", "instruction_trains"):
            setattr(self, field, tuple(_not_a_string(getattr(self, field), field)))
        for field in ("bias_linears", "scale_linears", "lora_linears"):
            _check_choices(field, getattr(self, field), _ALL_LINEARS)
        for field in ("caption_trains", "instruction_trains"):
            _check_choices(field, getattr(self, field), PARAMETER_GROUPS)
        for field, choices in (
            ("scale_side", SCALE_SIDES),
            ("visual_projector", VISUAL_PROJECTORS),
            ("visual_fusion", VISUAL_FUSIONS),
            ("text_only_image", TEXT_ONLY_IMAGES),
            ("image_channel_order", IMAGE_CHANNEL_ORDERS),
        ):
            if getattr(self, field) not in choices:
                raise ValueError(f"{self.method}: {field} must be one of {choices}, got {getattr(self, field)!r}")
        for field in ("prompt_length", "first_adapted_layer", "lora_rank"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.method}: {field} must be >= 0, got {getattr(self, field)}")
        if self.visual_projector != "none" and self.prompt_length == 0:
            raise ValueError(f"{self.method}: a visual projector needs prompts (prompt_length >= 1)")
        self._check_everything_trains()

    @property
    def has_prompts(self) -> bool:
        return self.prompt_length > 0

    @property
    def has_vision(self) -> bool:
        return self.visual_projector != "none"

    def stage_groups(self, stage: str | None) -> frozenset[str]:
        """Parameter groups trained in `stage` (None: in any stage), with `prompts`/`gates` expanded."""
        if stage is None:
            groups = {*self.caption_trains, *self.instruction_trains}
        elif stage == "caption":
            groups = set(self.caption_trains)
        elif stage == "instruction":
            groups = set(self.instruction_trains)
        else:
            raise ValueError(f"{self.method}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        for kind in ("prompts", "gates"):
            if kind in groups:
                groups |= {f"fused_{kind}", f"unfused_{kind}"}
        return frozenset(groups)

    def fuses_visual(self, layer: int) -> bool:
        """Whether adapted decoder layer `layer` adds the visual prompt to its prompt."""
        if not self.has_vision or layer < self.first_adapted_layer:
            return False
        return self.visual_fusion == "all" or layer == self.first_adapted_layer

    def _check_everything_trains(self) -> None:
        """Every parameter the config creates must train in some stage, or it would never be saved."""
        groups = self.stage_groups(None)
        needed = {
            "bias": bool(self.bias_linears),
            "scale": bool(self.scale_linears),
            "lora": self.lora_rank > 0,
            "projector": self.has_vision,
            "fused_prompts": self.has_vision,
            "fused_gates": self.has_vision,
            "unfused_prompts": self.has_prompts and (not self.has_vision or self.visual_fusion == "first"),
            "unfused_gates": self.has_prompts and (not self.has_vision or self.visual_fusion == "first"),
        }
        missing = sorted(group for group, exists in needed.items() if exists and group not in groups)
        if missing:
            raise ValueError(
                f"{self.method}: {', '.join(missing)} would never train (add them to caption_trains or "
                "instruction_trains, or remove those parameters)"
            )


def _check_choices(field: str, values: tuple[str, ...], choices: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"llama-adapter-v2: {field} has unknown entries {unknown}; choose from {list(choices)}")


def parameter_group(name: str, config: LlamaAdapterV2Config) -> str | None:
    """The `PARAMETER_GROUPS` entry a parameter belongs to (None: part of the frozen base or encoder)."""
    if name.startswith(PROJECTOR_ATTRIBUTE + "."):
        return "projector"
    if name.startswith(ENCODER_ATTRIBUTE + "."):
        return None
    if name.endswith(".adapter_bias"):
        return "bias"
    if name.endswith(".adapter_scale"):
        return "scale"
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if name.endswith((".adapter_prompt", ".adapter_gate")):
        match = _LAYER_INDEX.search(name)
        fused = match is not None and config.fuses_visual(int(match.group(1)))
        return ("fused_" if fused else "unfused_") + ("prompts" if name.endswith("prompt") else "gates")
    if name.endswith(_NORM_SUFFIXES) or name == _FINAL_NORM:
        return "norms"
    return None


def _missing_linears(model: nn.Module) -> list[str]:
    """The `LINEAR_PATHS` that some decoder block lacks (all of them without transformers' `layers`)."""
    layers = getattr(model.get_decoder(), "layers", None) or ()
    return [path for path in LINEAR_PATHS.values() if not layers or not all(_has(layer, path) for layer in layers)]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_v2_support(model: nn.Module, config: LlamaAdapterV2Config) -> None:
    """Refuse, naming what is missing, a model without the Llama-style blocks V2 adapts."""
    if config.has_prompts:
        check_prompt_support(model, LlamaAdapterV2.name)
    missing = _missing_linears(model)
    if missing:
        raise ValueError(
            f"model_type {model.config.model_type!r}: llama-adapter-v2 needs the linears {', '.join(missing)} in "
            f"every block of `get_decoder().layers`; supported: {', '.join(PROMPT_FAMILIES)}"
        )


def _lora_target_pattern(linears: tuple[str, ...]) -> str:
    """A regex peft matches against full module names: only the decoder's own linears."""
    paths = "|".join(re.escape(LINEAR_PATHS[short]) for short in linears)
    return rf"(.*\.)?layers\.\d+\.({paths})"


def _attach_lora(model: nn.Module, config: LlamaAdapterV2Config) -> None:
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_rank,  # official LoRA has no scaling: alpha / r = 1
        lora_dropout=0.0,
        target_modules=_lora_target_pattern(config.lora_linears),
        bias="none",
    )
    # Create LoRA weights where the model lives (on "meta" for `mmadapter info`: nothing allocated).
    with torch.device(next(model.parameters()).device):
        inject_adapter_in_model(lora, model, adapter_name=LORA_ADAPTER_NAME)
    cast_adapter_dtype(model, LORA_ADAPTER_NAME)  # float32 masters, also where peft made them bf16 (a 4-bit base)


def _attach_vision(model: nn.Module, config: LlamaAdapterV2Config) -> None:
    parameter = next(model.parameters())
    device = parameter.device
    if config.clip_pretrained is None and device.type != "meta":
        logger.warning("llama-adapter-v2: clip_pretrained is not set, so CLIP is randomly initialised (tests only)")
    # Frozen CLIP in the LM's dtype (the official code runs it in fp16 on GPUs); loads nothing on "meta".
    encoder = FrozenCLIPEncoder(config.clip_model, config.clip_pretrained, device=device, dtype=parameter.dtype)
    clip_dim = _projector_input_width(config, encoder, device)
    lm_dim = model.config.hidden_size
    with torch.device(device):  # projector weights are float32 masters, like the other adapter parameters
        if config.visual_projector == "v2":
            projector = VisualProjectorV2(
                clip_dim,
                lm_dim,
                width=config.visual_width,
                query_len=config.prompt_length,
                depth=config.visual_depth,
                num_heads=config.visual_heads,
                mlp_ratio=config.visual_mlp_ratio,
            )
        else:
            projector = VisualProjectorV1(clip_dim, lm_dim)
    model.add_module(ENCODER_ATTRIBUTE, encoder)
    model.add_module(PROJECTOR_ATTRIBUTE, projector)
    prompter = VisualPrompter(
        encoder,
        projector,
        channel_order=config.image_channel_order,
        text_only_image=config.text_only_image,
        repeat_to=config.prompt_length if config.visual_projector == "v1" else None,
    )
    # A plain attribute, not a submodule: the encoder and projector are registered above, under the names
    # their checkpoint keys use; the prompter only refers to them (and deep copies rebind it).
    setattr(model, PROMPTER_ATTRIBUTE, prompter)


def _projector_input_width(config: LlamaAdapterV2Config, encoder: FrozenCLIPEncoder, device: torch.device) -> int:
    """The projector's input width: the tower's token width, which `config.clip_width` records once known.

    A shapes-only build without the tower's weights (meta device, no clip_pretrained: checking a saved
    folder on any machine) stands in the config's architecture for the tower, so the recorded width wins."""
    if config.clip_width is None:
        config.clip_width = encoder.output_dim
    elif config.clip_width != encoder.output_dim and not (device.type == "meta" and config.clip_pretrained is None):
        raise ValueError(
            f"{config.method}: the projector reads tokens of width clip_width={config.clip_width}, but the vision "
            f"tower {encoder.model_name} gives {encoder.output_dim}; point clip_pretrained at the tower the adapter "
            "was trained with"
        )
    return config.clip_width


def _accept_visual_prompt_in_generate(model: nn.Module) -> None:
    """Let `model.generate(..., adapter_visual_prompt=V)` through transformers' kwargs check.

    generate() rejects keyword arguments that neither `prepare_inputs_for_generation` nor `forward`
    names, although it would pass them on to forward (and so to the attention function). Like peft's
    PeftModelForCausalLM, this overrides the method on this one instance (the class is untouched)
    with a signature that names the visual prompt; bound with MethodType, so deep copies rebind.
    """

    def prepare_inputs_for_generation(
        self: nn.Module, *args: Any, adapter_visual_prompt: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
        inputs[VISUAL_PROMPT_KWARG] = adapter_visual_prompt
        return inputs

    model.prepare_inputs_for_generation = types.MethodType(prepare_inputs_for_generation, model)


def adapted_linears(model: nn.Module) -> list[nn.Module]:
    """The seven (possibly peft-wrapped) linear modules of every decoder layer."""
    return [layer.get_submodule(LINEAR_PATHS[short]) for layer in decoder_layers(model) for short in _ALL_LINEARS]


def takes_images(model: nn.Module) -> bool:
    """Whether the model's adapter turns images into a visual prompt (LLaMA-Adapter V2 with a projector)."""
    return config_takes_images(getattr(model, "adapter_config", None))


def config_takes_images(config: AdapterConfig | None) -> bool:
    return isinstance(config, LlamaAdapterV2Config) and config.has_vision


def visual_prompter_of(model: nn.Module) -> VisualPrompter:
    """The model's image → visual prompt pipeline (encoder, projector, channel order, text-only policy)."""
    prompter = getattr(model, PROMPTER_ATTRIBUTE, None)
    if prompter is None:
        raise ValueError("this model takes no images: it needs a llama-adapter-v2 adapter with a visual projector")
    return prompter


def visual_prompt(
    model: nn.Module,
    pixel_values: torch.Tensor | None = None,
    clip_features: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The per-sample visual prompt (B, K, D) to pass to forward/generate as `adapter_visual_prompt=`
    (see `VisualPrompter.__call__`)."""
    return visual_prompter_of(model)(pixel_values, clip_features, image_mask)


@register_method
class LlamaAdapterV2(AdapterMethod):
    name = "llama-adapter-v2"
    config_class = LlamaAdapterV2Config
    stages = STAGES
    presets: dict[str, dict[str, Any]] = {
        # Released BIAS-7B (spec §3): prompts in layers 1..31 + visual prompt in all of them, biases
        # on wq/wo/w1/w2/w3, norms; pretrain (caption) trains projector+prompts+gates, finetune
        # (instruction) trains biases+norms. Same as the defaults.
        "multimodal-7b": {},
        # Released LORA-BIAS-7B: BIAS-7B plus LoRA r=16 on all seven linears. The released code never
        # makes LoRA trainable (spec §3.6); here it trains with the biases in the instruction stage.
        "lora-bias-7b": {"lora_rank": 16, "instruction_trains": ["bias", "norms", "lora"]},
        # The paper (§4.3, §5.1): visual prompt early (layer 0 only), static prompts in the last 31
        # layers, bias + output-side scale on every linear, norms; disjoint parameter sets per data type.
        "paper": {
            "first_adapted_layer": 0,
            "visual_fusion": "first",
            "bias_linears": list(_ALL_LINEARS),
            "scale_linears": list(_ALL_LINEARS),
            "scale_side": "output",
            "text_only_image": "none",
            "caption_trains": ["projector", "fused_prompts", "fused_gates"],
            "instruction_trains": ["unfused_prompts", "unfused_gates", "bias", "scale", "norms"],
        },
        # Released chat-65B (spec §4): no prompts, input-side scale + bias on all seven linears, norms.
        "chat65b": {
            "prompt_length": 0,
            "visual_projector": "none",
            "bias_linears": list(_ALL_LINEARS),
            "scale_linears": list(_ALL_LINEARS),
            "scale_side": "input",
            "caption_trains": [],
            "instruction_trains": ["bias", "scale", "norms"],
        },
        # V1 multimodal (V1 paper §3.3): global CLIP feature projected and added to the prompts of
        # the last 30 of 32 layers; no bias, no norms.
        "v1-multimodal": {
            "first_adapted_layer": 2,
            "visual_projector": "v1",
            "bias_linears": [],
            "caption_trains": ["projector"],
            "instruction_trains": ["prompts", "gates"],
        },
    }

    @classmethod
    def attach(cls, model: nn.Module, config: LlamaAdapterV2Config) -> None:
        check_v2_support(model, config)
        layers = decoder_layers(model)
        if config.has_prompts and config.first_adapted_layer >= len(layers):
            raise ValueError(
                f"llama-adapter-v2: first_adapted_layer={config.first_adapted_layer} but the base model has "
                f"only {len(layers)} layers"
            )
        if config.has_prompts:
            for index in range(config.first_adapted_layer, len(layers)):
                add_gated_prompt(
                    layers[index].self_attn,
                    config.prompt_length,
                    gate_tanh=config.gate_tanh,
                    fuse_visual=config.fuses_visual(index),
                )
        for layer in layers:
            for short in sorted(set(config.bias_linears) | set(config.scale_linears), key=_ALL_LINEARS.index):
                add_bias_scale(
                    layer.get_submodule(LINEAR_PATHS[short]),
                    bias=short in config.bias_linears,
                    scale=short in config.scale_linears,
                    scale_side=config.scale_side,
                )
        if config.lora_rank > 0:
            _attach_lora(model, config)
        if config.has_vision:
            _attach_vision(model, config)
            _accept_visual_prompt_in_generate(model)
        if config.has_prompts:
            use_prompt_attention(model)

    @classmethod
    def is_trainable(cls, name: str, config: LlamaAdapterV2Config, stage: str | None = None) -> bool:
        group = parameter_group(name, config)
        return group is not None and group in config.stage_groups(stage)

    @classmethod
    def merge(cls, model: nn.Module, config: LlamaAdapterV2Config, *, keep_originals: bool = True) -> None:
        """Fold bias/scale and LoRA into the base linears (serving). LoRA on k/v of layers with prompts
        stays unmerged: the official prompt keys/values use the plain wk/wv without LoRA. With
        `keep_originals` (default) the changed weights are copied to CPU memory for an exact unmerge."""
        for layer in decoder_layers(model):
            prompt_layer = getattr(layer.self_attn, "adapter_prompt", None) is not None
            for short in _ALL_LINEARS:
                module = layer.get_submodule(LINEAR_PATHS[short])
                if module is frozen_linear(module) and bias_scale_state(module) is None:
                    continue  # nothing attached to this linear
                merge_lora = not (prompt_layer and short in ("k", "v"))
                merge_linear(module, merge_lora=merge_lora, keep_originals=keep_originals)

    @classmethod
    def unmerge(cls, model: nn.Module, config: LlamaAdapterV2Config) -> None:
        for module in adapted_linears(model):
            unmerge_linear(module)
