"""The one way tests move adapter weights off their initial values.

A freshly attached adapter is a no-op (gates, biases and LoRA B start at zero, scales at one), so a test that
compares an adapted model with a reference, a merged or a reloaded copy would otherwise compare the base with itself.
"""

from __future__ import annotations

import torch

from mmadapter.adapters import trainable_parameters

#: Standard deviation of the noise added to each kind of adapter parameter, by name ending; prompts, LoRA A,
#: prefixes and the visual projector start random already and keep their values.
SPREAD = {
    "adapter_gate": 0.8,
    "adapter_bias": 0.1,
    "adapter_scale": 0.2,
    "layernorm.weight": 0.2,
    "model.norm.weight": 0.2,
    "lora_B.default.weight": 0.1,
}


def perturb_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    """Add seeded normal noise to every parameter the adapter trains (any stage), as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainable_parameters(model).items():
            std = next((std for ending, std in SPREAD.items() if name.endswith(ending)), None)
            if std is not None:
                param.add_(std * torch.randn(param.shape, generator=generator))
