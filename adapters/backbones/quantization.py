"""A 4- or 8-bit frozen base through bitsandbytes (the `quantization` extra).

Only the base's linear layers are quantized, as transformers' bitsandbytes integration does: 4-bit NF4 or FP4
weights dequantized per matmul to a compute dtype (QLoRA), or LLM.int8 (int8 weights, outlier features in
fp16). Embeddings, norms and the output head keep the base dtype, and every adapter parameter is created in
float32 after loading, so what trains is full precision. bitsandbytes 0.50 runs both on CPUs and on CUDA, so the
tests here exercise the same path as a GPU. A quantized linear's weight is packed and cannot take a fold: V2's
bias/scale and LoRA stay unmerged on it (their hooks / peft's branch apply at every forward).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from mmadapter.core.quantization import Quantization

#: What `pip` installs for a quantized base.
INSTALL_HINT = "pip install 'mmadapter[quantization]' (bitsandbytes)"
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bitsandbytes_config(quantization: Quantization) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `quantization`."""
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_compute_dtype=_COMPUTE_DTYPES[quantization.compute_dtype],
        bnb_4bit_use_double_quant=quantization.double_quant,
    )


def set_cpu_4bit_repacking(model: nn.Module, enabled: bool) -> None:
    """Let bitsandbytes repack 4-bit weights for its faster CPU inference kernel, or not.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight at the first forward in eval mode without
    gradients and keeps it packed: every later forward, training ones included, then takes a kernel with no
    backward, so nothing before that linear gets a gradient (LoRA and prompts in early layers silently stop
    training after one evaluation). So a loaded base has it off, and the server, which never trains, turns it on:
    it decodes 2.4x faster (bench/bench_quantized.py: an 8 x 1024 LLaMA in NF4 on 2 cores).
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing is quantized
        return
    allowed = enabled and bool(bnb.functional.has_avx512bf16())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = allowed and _repackable(module)


def _repackable(linear: nn.Module) -> bool:
    """The packed layout tiles output rows by 32 and the scales by whole blocks of an input row; other shapes
    fail bitsandbytes' assertions at the first forward (a 344-wide MLP, as in the demo's tiny LLaMA)."""
    return linear.out_features % 32 == 0 and linear.in_features % linear.weight.quant_state.blocksize == 0


def check_quantization(quantization: Quantization, device: str | torch.device, where: str) -> None:
    """Refuse, naming `where` (the recipe key or command flag), a quantized base that cannot load here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{where}: a {quantization.bits}-bit base needs bitsandbytes; {INSTALL_HINT}")
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(
            f"{where}: bitsandbytes quantizes on cpu or cuda, not {kind}; pick one of those or drop {where}"
        )


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` (or the linear inside a peft LoRA layer) holds bitsandbytes-quantized weights."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing can be quantized before bitsandbytes is imported
        return False
    linear = getattr(module, "base_layer", module)
    return isinstance(linear, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def parameter_count(param: torch.Tensor) -> int:
    """How many values a parameter holds: a 4-bit weight packs two in a byte, and its quantization state
    keeps the real shape."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()
