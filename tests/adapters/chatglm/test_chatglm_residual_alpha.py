"""ChatGLM-6B's residual scale is sqrt(2·28) at every depth, as in the official code.

The official `modeling_chatglm.py` declares `GLMBlock(..., num_layers=28)` and `ChatGLMModel.get_layer`
never passes the model's depth, so a 3-layer model still scales its residual by sqrt(56), not sqrt(6).
"""

from __future__ import annotations

import math

import torch

from mmadapter.adapters.backbones.presets import base_config
from tests.helpers.chatglm_reference import GMASK, PAD, SOP, batch_mask_and_positions, reference_logits

ROWS = [[5, 11, 12, 13, 14, GMASK, SOP, 21, 22, 23], [5, 31, 32, GMASK, SOP, 41, 42]]
OFFICIAL_ALPHA = math.sqrt(2 * 28)  # GLMBlock's default num_layers=28, whatever the depth
DEPTH_ALPHA = math.sqrt(2 * 3)  # what sqrt(2·num_layers) would give the 3-layer tiny model


def test_config_keeps_the_official_28_whatever_the_depth():
    config = base_config("tiny-chatglm")
    assert (config.num_layers, config.residual_alpha_layers) == (3, 28)
    assert base_config("chatglm-6b").residual_alpha_layers == 28


def test_three_layer_model_uses_sqrt_56_not_sqrt_6(tiny_glm):
    model = tiny_glm()
    ids, blocked, positions = batch_mask_and_positions(ROWS, PAD)
    ids = torch.tensor(ids)
    logits = model(ids, attention_mask=(ids != PAD).long()).logits

    def reference(alpha: float) -> torch.Tensor:
        return reference_logits(model.state_dict(), 3, 4, ids, blocked, positions, alpha=alpha)

    real = ids != PAD
    torch.testing.assert_close(logits[real], reference(OFFICIAL_ALPHA)[real], atol=2e-5, rtol=0)
    # The depth-derived scale gives clearly other logits, so the comparison above can tell the two apart.
    assert (logits[real] - reference(DEPTH_ALPHA)[real]).abs().max() > 1e-2
