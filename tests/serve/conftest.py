"""Fixtures for the serving tests: a tiny LLaMA with a V1 adapter whose gates are open, served."""

from __future__ import annotations

import pytest
import torch

from mmadapter.adapters import attach_adapter, make_config
from mmadapter.serve.http_server import APIServer, ServerSettings
from mmadapter.serve.loader import ServedModel
from mmadapter.serve.sampling import SamplingParams
from tests.helpers.perturb import perturb_adapter
from tests.helpers.served_model import MODEL_NAME


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared CPU two OpenMP threads spin-wait for each
    other and make these tests ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def v1_model(tiny_llama):
    model = tiny_llama()
    attach_adapter(model, make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3))
    perturb_adapter(model)
    return model


@pytest.fixture
def v2_model(tiny_llama):
    """LLaMA-Adapter V2 multimodal on the tiny LLaMA with a tiny random CLIP and V2 projector."""
    model = tiny_llama()
    config = make_config(
        "llama-adapter-v2",
        clip_model="mmadapter-tiny-vit",
        visual_width=32,
        visual_depth=1,
        visual_heads=2,
        prompt_length=4,
    )
    attach_adapter(model, config)
    perturb_adapter(model)
    return model


@pytest.fixture
def served(v1_model, tiny_tokenizer):
    # The byte-level test tokenizer makes Alpaca prompts long; RoPE works at any position, so widen the context.
    v1_model.config.max_position_embeddings = 1024
    defaults = SamplingParams(max_new_tokens=8, temperature=0.0)
    return ServedModel.from_model(v1_model, tiny_tokenizer, name=MODEL_NAME, defaults=defaults)


@pytest.fixture
def served_v2(v2_model, tiny_tokenizer):
    from mmadapter.serve.loader import merge_for_serving

    v2_model.config.max_position_embeddings = 1024
    merge_for_serving(v2_model)
    defaults = SamplingParams(max_new_tokens=8, temperature=0.0)
    return ServedModel.from_model(v2_model, tiny_tokenizer, name="tiny-v2", defaults=defaults)


@pytest.fixture
def start_server(served):
    """Factory: start an API server on a free port with the given settings; stopped after the test."""
    servers = []

    def start(model: ServedModel | None = None, **settings) -> APIServer:
        server = APIServer(model or served, ServerSettings(port=0, **settings))
        server.start_background()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
