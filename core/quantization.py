"""What a quantized frozen base is, as recipes (`model.quantization`) and commands (`--quantize`) say it.

Only the schema lives here, so that reading a recipe needs no torch; loading is
`mmadapter.adapters.backbones.quantization`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mmadapter.core.config import Bool, document_type


@document_type
@dataclasses.dataclass
class Quantization:
    """How the frozen base's linear layers are stored (recipes: `model.quantization`, commands: `--quantize`)."""

    bits: Literal[4, 8]
    """4: NF4/FP4 weights dequantized per matmul (QLoRA); 8: LLM.int8 (int8 weights, outliers in fp16)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit only: NormalFloat4 (for normally distributed weights, QLoRA's choice) or plain FP4."""
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """4-bit only: dtype of the dequantized weights and of the matmul."""
    double_quant: Bool = True
    """4-bit only: quantize the per-block scales too (about 0.4 bits per weight less)."""

    def __post_init__(self) -> None:
        if self.bits == 8:  # LLM.int8 has none of these: a value set for it would silently do nothing
            defaults = {field.name: field.default for field in dataclasses.fields(self)}
            changed = [
                name
                for name in ("quant_type", "compute_dtype", "double_quant")
                if getattr(self, name) != defaults[name]
            ]
            if changed:
                raise ValueError(f"model.quantization.{changed[0]} applies to bits: 4 only; leave it out with bits: 8")
