"""Load a frozen base model and its tokenizer from a local folder or a named preset.

Folders in Hugging Face layout load through the backbone's class (never `trust_remote_code`);
folders in Meta's LLaMA layout are converted on the fly. Presets build randomly initialised
models, which is what tests, benchmarks and `mmadapter info` (on the meta device) need.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, LlamaTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mmadapter.adapters.backbones.meta_llama import is_meta_checkpoint, load_meta_checkpoint
from mmadapter.adapters.backbones.presets import BASE_PRESETS, base_config, build_base_model, is_preset, model_class_for
from mmadapter.adapters.backbones.quantization import (
    bitsandbytes_config,
    check_quantization,
    set_cpu_4bit_repacking,
)
from mmadapter.core.files import read_json, torch_file_errors
from mmadapter.core.quantization import Quantization
from mmadapter.core.state_dicts import check_fits

#: model_type -> tokenizer loader for backbones whose tokenizer is not a stock transformers one.
TOKENIZER_LOADERS: dict[str, object] = {}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


#: What a Hugging Face model folder keeps its weights in.
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
#: Files one of which a Hugging Face tokenizer folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_base_config(base: str | Path) -> PretrainedConfig:
    """The config of a preset name or a model folder, without loading any weights."""
    if is_preset(base):
        return base_config(str(base))
    folder = Path(base)
    if is_meta_checkpoint(folder):
        return load_meta_checkpoint(folder)[0]
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{base}: not a preset ({', '.join(sorted(BASE_PRESETS))}) and not a model folder "
            "(expected config.json, or params.json + consolidated.*.pth)"
        )
    model_type = _model_type(config_file)
    cls = model_class_for(PretrainedConfig(model_type=model_type) if model_type else PretrainedConfig())
    return cls.config_class.from_pretrained(folder, local_files_only=True)


def _model_type(config_file: Path) -> str | None:
    document = read_json(config_file)
    if not isinstance(document, dict):
        raise ValueError(f"{config_file}: not a model config (a JSON object); restore the model's config.json")
    return document.get("model_type")


def load_base_model(
    base: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    quantization: Quantization | None = None,
) -> PreTrainedModel:
    """A frozen base model in eval mode from a preset name or a local folder (HF or Meta layout), its linear
    layers quantized when `quantization` is given (the rest stays in `dtype`)."""
    torch_dtype = parse_dtype(dtype)
    if quantization is not None:
        model = _load_quantized(base, torch_dtype, device, attn_implementation, quantization)
    elif is_preset(base):
        model = build_base_model(base_config(str(base)), device=device, dtype=torch_dtype)
    elif is_meta_checkpoint(base):
        config, state = load_meta_checkpoint(base)
        model = build_base_model(config, device="meta")  # no random init of weights about to be replaced
        check_fits(model, state, f"{base}: the consolidated.*.pth weights do not fit its params.json")
        model.load_state_dict(state, strict=True, assign=True)
        rotary = model.model.rotary_emb  # its buffers are computed, not stored: rebuild them off the meta device
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config=config)
        model.to(device=device, dtype=torch_dtype or torch.float32)
    else:
        model = _from_folder(base, torch_dtype, attn_implementation).to(device)
    model.set_attn_implementation(attn_implementation)
    model.requires_grad_(False)
    return model.eval()


def _from_folder(folder: str | Path, dtype: torch.dtype | None, attn_implementation: str, **options) -> PreTrainedModel:
    """A Hugging Face folder through its backbone's class (`options`: more `from_pretrained` arguments)."""
    config = read_base_config(folder)
    if not any(next(Path(folder).glob(pattern), None) for pattern in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{folder}: a config.json but no weights ({', '.join(WEIGHT_FILES)}); copy the model's weight files there"
        )
    with _pickled_weights_errors(Path(folder)), _safetensors_errors(Path(folder)):
        return model_class_for(config).from_pretrained(
            folder,
            dtype=dtype or torch.float32,
            local_files_only=True,
            attn_implementation=attn_implementation,
            **options,
        )


def _load_quantized(
    base: str | Path,
    dtype: torch.dtype | None,
    device: str | torch.device,
    attn_implementation: str,
    quantization: Quantization,
) -> PreTrainedModel:
    """transformers quantizes the linear layers while it loads them, straight onto `device`."""
    check_quantization(quantization, device, "quantization")
    options = {"quantization_config": bitsandbytes_config(quantization), "device_map": {"": torch.device(device)}}
    if is_preset(base):  # random weights (tests, benchmarks), quantized through a folder like real ones
        with tempfile.TemporaryDirectory() as folder:
            build_base_model(base_config(str(base))).save_pretrained(folder)
            model = _from_folder(folder, dtype, attn_implementation, **options)
        model.config.name_or_path = str(base)  # the preset, not the temporary folder
    elif is_meta_checkpoint(base):
        raise ValueError(
            f"{base}: a Meta-layout folder converts to full precision as it loads, so it cannot be quantized on load; "
            f"convert it once (mmadapter convert meta-llama {base} OUT_FOLDER) and quantize the Hugging Face folder"
        )
    else:
        model = _from_folder(base, dtype, attn_implementation, **options)
    set_cpu_4bit_repacking(model, enabled=False)  # a loaded base may train
    return model


def _pickled_weights_errors(folder: Path) -> contextlib.AbstractContextManager:
    """transformers unpickles `.bin` weights (weights_only) but lets torch's errors out, which name no file:
    a refused or damaged one becomes a one-line ValueError naming it. Safetensors, preferred when present,
    need no such care."""
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards or any(folder.glob("*.safetensors")):
        return contextlib.nullcontext()
    return torch_file_errors(shards[0] if len(shards) == 1 else f"{folder}/pytorch_model-*.bin (one of the shards)")


@contextlib.contextmanager
def _safetensors_errors(folder: Path) -> Iterator[None]:
    """transformers lets safetensors' errors out without the file's name: say which folder, and what to do."""
    try:
        yield
    except SafetensorError as error:
        raise ValueError(
            f"{folder}: a safetensors weights file is damaged or incomplete ({error}); copy or download it again"
        ) from error


def load_tokenizer(base: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a model folder (Meta layout: `tokenizer.model` here or one level up)."""
    folder = Path(base)
    if not folder.is_dir():  # else transformers takes it for a hub repo id and fails on its form
        raise FileNotFoundError(f"{folder}: no such tokenizer folder")
    config_file = folder / "config.json"
    model_type = _model_type(config_file) if config_file.is_file() else None
    if model_type in TOKENIZER_LOADERS:
        return TOKENIZER_LOADERS[model_type](folder)
    if is_meta_checkpoint(folder):
        for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
            if candidate.is_file():
                return LlamaTokenizer(vocab_file=str(candidate))
        raise FileNotFoundError(f"{folder}: no tokenizer.model here or in the parent folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder}: no tokenizer here ({', '.join(TOKENIZER_FILES)}); point the tokenizer option "
            "(--tokenizer, model.tokenizer) at the folder that has them"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
