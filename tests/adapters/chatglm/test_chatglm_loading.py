"""Loading ChatGLM-6B folders: the official sharded .bin layout, safetensors, safety, and refusing ChatGLM2/3."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch

from mmadapter.adapters import load_base_model, load_tokenizer
from mmadapter.adapters.backbones.chatglm import ChatGLMForConditionalGeneration
from mmadapter.adapters.backbones.loading import read_base_config
from tests.helpers.chatglm_reference import GMASK, SOP

PROMPT = torch.tensor([[5, 11, 12, 13, GMASK, SOP, 21]])


def official_config(model) -> dict:
    """config.json as released: remote-code auto_map, cosmetic architectures, fp16, old transformers."""
    values = model.config.to_dict()
    values.update(
        architectures=["ChatGLMModel"],
        auto_map={
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        torch_dtype="float16",
        transformers_version="4.23.1",
    )
    for key in ("dtype", "pre_seq_len", "prefix_projection", "quantization_bit", "initializer_range"):
        values.pop(key, None)
    return values


def write_official_folder(model, folder: Path, lm_head: torch.Tensor | None = None, shards: int = 3) -> Path:
    """`pytorch_model-0000N-of-0000K.bin` shards (torch.save of plain dicts) + index with a stale total_size,
    embedding in the first shard, `lm_head.weight` alone in the last, per-layer `rotary_emb.inv_freq` kept."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.num_layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.rand(8).half()
    keys = list(state)
    groups = [keys[: len(keys) // 2], keys[len(keys) // 2 :]][: shards - 1]
    groups.append(["lm_head.weight"])
    state["lm_head.weight"] = (model.lm_head.weight if lm_head is None else lm_head).detach().clone()
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"pytorch_model-{number:05d}-of-{len(groups):05d}.bin"
        torch.save({k: state[k] for k in group}, folder / name)
        weight_map |= dict.fromkeys(group, name)
    index = {"metadata": {"total_size": 13744473856}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(official_config(model)))
    return folder


def test_official_sharded_bin_folder_loads_with_the_released_keys(tiny_glm, tmp_path, recwarn):
    source = tiny_glm()
    folder = write_official_folder(source, tmp_path / "chatglm-6b")
    model = load_base_model(folder, attn_implementation="eager")
    assert isinstance(model, ChatGLMForConditionalGeneration)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.testing.assert_close(model(PROMPT).logits, source(PROMPT).logits)
    assert not [w for w in recwarn if "lm_head" in str(w.message)]
    half = load_base_model(folder, dtype="fp16")
    assert half.transformer.layers[0].attention.dense.weight.dtype == torch.float16
    # The remote-code auto_map is dropped and never saved back.
    assert not hasattr(model.config, "auto_map")


def test_transformers_auto_classes_use_mmadapter_without_remote_code(tiny_glm, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = write_official_folder(tiny_glm(), tmp_path / "chatglm-6b")
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "ChatGLMConfig"
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), ChatGLMForConditionalGeneration)


def test_a_differing_lm_head_in_the_file_is_replaced_by_the_tied_embedding(tiny_glm, tmp_path):
    source = tiny_glm()
    other = torch.randn_like(source.lm_head.weight)
    folder = write_official_folder(source, tmp_path / "chatglm-6b", lm_head=other)
    with pytest.warns(UserWarning, match="embedding is used for both"):
        model = load_base_model(folder)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, source.transformer.word_embeddings.weight)


def test_safetensors_round_trip(tiny_glm, tmp_path):
    source = tiny_glm()
    source.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and "auto_map" not in saved
    model = load_base_model(tmp_path / "saved", attn_implementation="eager")
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    torch.testing.assert_close(model(PROMPT).logits, source(PROMPT).logits, atol=0, rtol=0)


def test_bin_shards_are_loaded_with_weights_only(tiny_glm, tmp_path):
    folder = write_official_folder(tiny_glm(), tmp_path / "chatglm-6b")
    shard = folder / "pytorch_model-00001-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    state["transformer.not_a_tensor"] = argparse.Namespace(run="arbitrary code")
    torch.save(state, shard)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_base_model(folder)


CHATGLM2_CONFIG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "padded_vocab_size": 65024,
    "rmsnorm": True,
    "seq_length": 32768,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
}


def test_chatglm2_folder_is_refused_naming_the_differences(tmp_path):
    folder = tmp_path / "chatglm2-6b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CHATGLM2_CONFIG))
    (folder / "tokenizer.model").write_bytes(b"")
    for load in (read_base_config, load_base_model, load_tokenizer):
        with pytest.raises(ValueError) as error:
            load(folder)
        message = str(error.value)
        assert str(folder / "config.json") in message
        assert "ChatGLM2/ChatGLM3" in message and "not ChatGLM-6B (v1)" in message
        assert "multi_query_attention=True" in message and "padded_vocab_size=65024" in message


def test_quantized_v1_folder_and_missing_ice_text_are_refused(tiny_glm, tmp_path):
    folder = write_official_folder(tiny_glm(), tmp_path / "int4")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(ValueError, match="quantization_bit=4"):
        load_base_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no ice_text.model"):
        load_tokenizer(folder)
