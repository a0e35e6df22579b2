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
import logging
import math
import sys

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from mmadapter.core.quantization import Quantization

#: What `pip` installs for a quantized base.
INSTALL_HINT = "pip install 'mmadapter[quantization]' (bitsandbytes)"
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Int8CastNotice(logging.Filter):
    """LLM.int8 computes in fp16 by design, and bitsandbytes logs so at every matmul whose input is not fp16
    (every one on a bf16 or fp32 base): the notice is kept out of the log, other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_casts() -> None:
    """Install the filter once (bitsandbytes' matmul module logs under its own name)."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in log.filters):
        log.addFilter(_Int8CastNotice())


def bitsandbytes_config(quantization: Quantization) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `quantization`."""
    if quantization.bits == 8:
        quiet_int8_casts()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_compute_dtype=_COMPUTE_DTYPES[quantization.compute_dtype],
        bnb_4bit_use_double_quant=quantization.double_quant,
    )


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
