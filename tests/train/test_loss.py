"""TokenLoss runs the output head on the supervised positions only; the losses and gradients are those of the
plain computation (every position's logits, then cross-entropy), written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.adapters.methods.base import attach_adapter, make_config, mark_trainable
from mmadapter.train.loss import TokenLoss
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_recipe import TINY_ADAPTERS

METHODS = ("llama-adapter-v1", "lora", "ptuning-v2")


def batch() -> dict[str, torch.Tensor]:
    """Three right-padded rows whose responses start at different positions; one row has no response."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 7:9] = ids[1, 7:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_losses(model, inputs) -> torch.Tensor:
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    targets = inputs["labels"][:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
    return per_token


class NoLogitsToKeep(torch.nn.Module):
    """A model whose forward has no `logits_to_keep`: TokenLoss must compute every position's logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_losses_and_gradients_equal_the_plain_computation(method, wrapped):
    torch.manual_seed(0)
    model = attach_adapter(build_base_model(base_config("tiny-llama")), make_config(method, **TINY_ADAPTERS[method]))
    perturb_adapter(model)
    params = list(mark_trainable(model).values())
    subject = NoLogitsToKeep(model) if wrapped else model
    inputs = batch()

    losses = TokenLoss(subject)(**inputs)
    mine = torch.autograd.grad(losses.sum(), params)
    expected = plain_losses(model, inputs)
    theirs = torch.autograd.grad(expected.sum(), params)

    assert TokenLoss(subject).keeps_logits is not wrapped
    assert losses.shape == (3, 11) and losses.dtype == torch.float32
    assert torch.equal(
        losses[inputs["labels"][:, 1:] == -100], torch.zeros(int((inputs["labels"][:, 1:] == -100).sum()))
    )
    # Same math on fewer rows of the head's matmul: float32 rounding at most.
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6)
    # Backward sums in another order too: float32 rounding relative to each gradient's scale (kernels differ
    # by CPU: AVX512 ones left up to 3.3e-7 on LoRA gradients whose largest elements are 0.4-0.7).
    for got, want in zip(mine, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
