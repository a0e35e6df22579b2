"""The adapter methods: LLaMA-Adapter V1 and V2, LoRA, P-Tuning v2, and the contract they share.

Importing this package registers every built-in method (see `register_method`), so `get_method`
finds them by name.
"""

from mmadapter.adapters.methods import (  # noqa: F401  (each module registers its method)
    llama_adapter_v1,
    llama_adapter_v2,
    lora,
    ptuning_v2,
)
