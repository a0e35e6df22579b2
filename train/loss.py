"""The training loss (model forward + per-token next-token loss) and the eval loss over a dataset."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import reduce
from torch import nn

from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.train.batching import eval_batches, process_batches
from mmadapter.train.data import Collator, SupervisedDataset
from mmadapter.train.multimodal import model_inputs

#: What the loss module takes from a collated batch (the rest is bookkeeping: sources, kinds, bad).
TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "clip_features", "image_mask")


class TokenLoss(nn.Module):
    """Model forward + per-token next-token loss, in one module so DDP/FSDP see a single forward.

    Positions whose label is IGNORE_INDEX (prompt, padding) come out exactly 0. The output head runs only
    on the positions some row of the batch is supervised at (transformers' `logits_to_keep` with indices):
    prompts are most of a sequence, and a 128k vocabulary's logits over all of them would be the largest
    tensor of the step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.keeps_logits = takes_logits_to_keep(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **images):
        inputs = model_inputs(self.model, input_ids, attention_mask, images)
        shifted = labels[:, 1:]
        if not self.keeps_logits:
            logits = self.model(**inputs).logits[:, :-1]
            return token_losses(logits, shifted)
        # The logits at position t predict label t + 1.
        columns = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        logits = self.model(**inputs, logits_to_keep=columns).logits
        losses = torch.zeros(shifted.shape, dtype=torch.float32, device=logits.device)
        return losses.index_copy(1, columns, token_losses(logits, shifted[:, columns]))

    # FSDP2 (accelerate's fsdp2_prepare_model) shards the embeddings and the head as groups of their own.
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token losses in float32; exactly 0 where the target is IGNORE_INDEX."""
    losses = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view_as(targets)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward (under peft's wrapper, the base model's) takes `logits_to_keep`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def batch_tensors(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The loss module's inputs of a collated batch, on `device`."""
    return {name: batch[name].to(device) for name in TENSOR_KEYS if name in batch}


@torch.no_grad()
def evaluate(
    processes: Accelerator | PartialState,
    loss_module: nn.Module,
    dataset: SupervisedDataset,
    collate: Collator,
    batch_size: int,
) -> dict[str, float]:
    """Mean loss per response token over `dataset` (shared out over processes), and its perplexity.

    `processes` only says who this process is and where it computes: a PartialState does, so
    evaluating needs no Accelerator (and none of its mixed-precision state).
    """
    loss_module.eval()
    batches, padding = eval_batches(dataset.lengths(), batch_size, processes.num_processes)
    mine = process_batches(list(zip(batches, padding, strict=True)), processes.process_index, processes.num_processes)
    totals = torch.zeros(2, device=processes.device)
    for indices, is_padding in mine:
        batch = collate([dataset[i] for i in indices])
        if is_padding:  # keeps forward counts equal on every process; contributes nothing
            batch["labels"].fill_(IGNORE_INDEX)
        losses = loss_module(**batch_tensors(batch, processes.device))
        valid = batch["labels"][:, 1:].to(processes.device) != IGNORE_INDEX
        totals += torch.stack([losses.sum(), valid.sum().float()])
    if processes.num_processes > 1:
        totals = reduce(totals, "sum")
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[1])}
