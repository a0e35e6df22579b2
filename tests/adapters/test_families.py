"""Every method on every Llama-style family: Llama 3.1 (RoPE scaling, GQA), Mistral (sliding window), Qwen2 (q/k/v
biases, tied embeddings), Qwen3 (per-head q/k norms, explicit head size), each loaded from a sharded safetensors
folder. Per family and method: exact zero-init, a plain reference forward, training, checkpoints, serving."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from mmadapter.adapters import (
    attach_adapter,
    load_adapter,
    load_base_model,
    make_config,
    mark_trainable,
    optimizer_param_groups,
    save_adapter,
)
from mmadapter.adapters.backbones.presets import MODEL_CLASSES, base_config, build_base_model
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from mmadapter.adapters.methods.ptuning_v2 import prefix_encoder_of
from mmadapter.cli.main import main
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.loader import merge_for_serving
from mmadapter.serve.sampling import SamplingParams
from tests.helpers.llama_reference import hf_llama_logits
from tests.helpers.llama_v2_setup import EVERYTHING, pixels, reference_terms, tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.prefix_table import prefix_key_values
from tests.helpers.tiny_families import FAMILY_PRESETS, build_tiny_family, save_sharded
from tests.helpers.tiny_llama import left_padded

FAMILIES = tuple(FAMILY_PRESETS)
METHODS = ("llama-adapter-v1", "llama-adapter-v2", "lora", "ptuning-v2")
PROMPT_METHODS = ("llama-adapter-v1", "llama-adapter-v2")
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2}
PREFIX = 3


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (two spin-wait for each other on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Family -> a local Hugging Face folder of its seeded tiny model, saved in several safetensors shards."""
    root = tmp_path_factory.mktemp("families")
    return {family: save_sharded(build_tiny_family(family), root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(folders):
    """Family -> its base model as `load_base_model` reads it from the folder (tests take deep copies)."""
    return {family: load_base_model(folder) for family, folder in folders.items()}


def fresh(loaded, family: str, attn: str = "sdpa"):
    model = copy.deepcopy(loaded[family])
    model.set_attn_implementation(attn)
    return model


def method_config(method: str):
    """Small settings that leave an unadapted first layer; V2 with everything: visual prompt, bias, scale, LoRA."""
    if method == "llama-adapter-v1":
        return make_config(method, adapted_layers=2, prompt_length=3)
    if method == "llama-adapter-v2":
        return tiny_v2_config(**EVERYTHING)
    if method == "lora":
        return make_config(method, r=4)  # the family's default targets
    return make_config(method, pre_seq_len=PREFIX)


def adapted(loaded, family: str, method: str, attn: str = "sdpa"):
    return attach_adapter(fresh(loaded, family, attn), method_config(method))


def extra_inputs(model, batch: int = 2) -> dict:
    """The visual prompt a V2 adapter needs with its tokens; nothing for the other methods."""
    if getattr(model, "visual_prompter", None) is None:
        return {}
    return {"adapter_visual_prompt": visual_prompt(model, pixels(batch))}


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, **extra_inputs(model)).logits


def generate(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **extra_inputs(model), **GREEDY)


# --- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sharded_folder_loads_as_the_family_exactly(folders, loaded, family):
    folder = folders[family]
    assert (
        len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    )
    model = loaded[family]
    assert type(model) is MODEL_CLASSES[model.config.model_type]
    ids, mask = left_padded()
    assert torch.equal(logits(model, ids, mask), logits(build_tiny_family(family), ids, mask))


# --- exactness --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["llama-adapter-v1", "llama-adapter-v2", "lora"])
def test_zero_init_gives_the_base_logits_and_generation_bit_for_bit(loaded, family, method):
    base = fresh(loaded, family)
    ids, mask = left_padded()
    model = adapted(loaded, family, method)
    assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))
    assert torch.equal(generate(model, ids, mask), generate(base, ids, mask))


def hand_prefix_cache(model, batch: int) -> DynamicCache:
    """The prefix table read by hand, as the base model's key/value cache (no RoPE, no key norm)."""
    config = model.config
    table = prefix_encoder_of(model).embedding.weight.detach()
    cache = DynamicCache(config=config)  # the family's cache layers (Mistral's keep a sliding window)
    for index, (keys, values) in enumerate(
        prefix_key_values(table, config.num_hidden_layers, config.num_key_value_heads, batch)
    ):
        cache.update(keys, values, index)
    return cache


@pytest.mark.parametrize("family", FAMILIES)
def test_ptuning_equals_the_base_reading_the_prefix_as_its_cache(loaded, family):
    """P-Tuning v2 has no zero-init: its reference is the base model with the prefix as leading cache entries,
    a P+T mask and positions that count real tokens only. Forward and greedy generation, bit for bit."""
    model = adapted(loaded, family, "ptuning-v2").eval()
    with torch.no_grad():  # a larger prefix so it visibly steers generation
        prefix_encoder_of(model).embedding.weight.mul_(3.0)
    base = fresh(loaded, family)
    ids, mask = left_padded()
    full_mask = torch.cat([torch.ones(2, PREFIX, dtype=mask.dtype), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = base(ids, attention_mask=full_mask, past_key_values=hand_prefix_cache(model, 2), position_ids=positions)
        assert torch.equal(model(ids, attention_mask=mask).logits, out.logits)
        tokens = []
        for _ in range(GREEDY["max_new_tokens"]):
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = base(
                tokens[-1], attention_mask=full_mask, past_key_values=out.past_key_values, position_ids=positions
            )
    generated = generate(model, ids, mask)[:, ids.shape[1] :]
    assert torch.equal(generated, torch.cat(tokens, dim=1))
    assert not torch.equal(generated, generate(base, ids, mask)[:, ids.shape[1] :])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_attention_matches_the_plain_reference(loaded, family, method, attn):
    """The reference writes the family out (RoPE scaling, window, biases, q/k norms) and sends the prompts through
    the layer's key/value path without RoPE: Qwen2's k/v biases and Qwen3's k_norm apply to the prompts too. (A key
    bias shifts all prompt scores of a query equally, so on Qwen2 it is the value bias that this can catch.)"""
    model = adapted(loaded, family, method, attn)
    perturb_adapter(model)
    ids, mask = left_padded()
    layers = model.get_decoder().layers
    adapted_layers = [n for n, layer in enumerate(layers) if hasattr(layer.self_attn, "adapter_prompt")]
    adapter = {
        "prompts": {n: layers[n].self_attn.adapter_prompt.detach() for n in adapted_layers},
        "gates": {n: layers[n].self_attn.adapter_gate.detach() for n in adapted_layers},
        "attention_mask": mask,
    }
    inputs = extra_inputs(model)
    if inputs:
        adapter |= {
            "terms": reference_terms(model),
            "visual": inputs["adapter_visual_prompt"],
            "fused_layers": set(adapted_layers),
        }
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() counts them; prompts see absolute positions
    with torch.no_grad():
        actual = model(ids, attention_mask=mask, position_ids=positions, **inputs).logits
        expected = hf_llama_logits(model, ids, **adapter)
    real = mask.bool()
    assert adapted_layers == [1, 2] and (adapter["gates"][1] != 0).all()
    # float32 (sdpa or the family's eager kernel) against the float64 reference: float32 rounding only.
    torch.testing.assert_close(actual[real].double(), expected[real], atol=2e-4, rtol=1e-4)


# --- training, checkpoints, serving -----------------------------------------------------------------------


def loss(model, ids) -> torch.Tensor:
    return model(ids, labels=ids, **extra_inputs(model, ids.shape[0])).loss


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_and_changes_only_the_selected_parameters(loaded, family, method):
    model = adapted(loaded, family, method)
    ids, _ = left_padded()
    selected = mark_trainable(model)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.0), lr=1e-2)
    with torch.no_grad():
        first = loss(model.eval(), ids)
    model.train()
    for _ in range(6):
        loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        last = loss(model.eval(), ids)
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == set(selected) and selected
    assert last < first


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_gives_identical_logits(loaded, family, method, tmp_path):
    model = adapted(loaded, family, method).eval()
    perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    restored = load_adapter(fresh(loaded, family), tmp_path / "adapter").eval()
    ids, mask = left_padded()
    assert torch.equal(logits(restored, ids, mask), logits(model, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_serving_engine_greedy_equals_transformers_generate(loaded, family, method, tiny_tokenizer):
    model = adapted(loaded, family, method).eval()
    perturb_adapter(model)
    ids, mask = left_padded()
    unmerged = logits(model, ids, mask)
    merge_for_serving(model)  # V2 bias/scale and LoRA folded into the weights, as the serving loader does
    torch.testing.assert_close(logits(model, ids, mask), unmerged, atol=1e-5, rtol=1e-5)
    inputs = extra_inputs(model)
    prompts = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask, strict=True)]
    params = SamplingParams(max_new_tokens=GREEDY["max_new_tokens"], temperature=0.0)
    completions = GenerationEngine(model, tiny_tokenizer).generate(prompts, params, model_inputs=inputs)
    expected = generate(model, ids, mask)[:, ids.shape[1] :].tolist()
    for completion, row in zip(completions, expected, strict=True):
        assert completion.token_ids == (row[: row.index(2) + 1] if 2 in row else row)


# --- sizes and the command line ---------------------------------------------------------------------------

#: Parameter counts of the released checkpoints (their model cards / safetensors index); the presets' shapes
#: must reproduce them exactly.
PUBLISHED_TOTALS = {
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize(("preset", "total"), sorted(PUBLISHED_TOTALS.items()))
def test_presets_have_the_published_sizes(preset, total):
    model = build_base_model(base_config(preset), device="meta")
    assert sum(p.numel() for p in model.parameters()) == total


def test_info_counts_llama_adapter_on_qwen3_8b_on_the_meta_device(capsys):
    assert main(["info", "--base", "qwen3-8b", "--method", "llama-adapter-v1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 30 * (10 * 4096 + 32)  # K=10 prompts of width 4096 + 32 gates, top 30
    assert report["total_params"] == PUBLISHED_TOTALS["qwen3-8b"] + report["trainable_params"]


def test_info_list_names_the_presets_and_the_methods(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen3-8b", "llama3-70b", "tiny-mistral", "chatglm-6b", "llama-adapter-v2", "chat65b", "adgen"):
        assert name in out


# --- other families ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64, bos_token_id=1, eos_token_id=2)
    return save_sharded(GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            "llama-adapter-v1",
            "model_type 'gpt2': llama-adapter-v1 needs q_proj/k_proj/v_proj attention modules (`self_attn` in every "
            "block of `get_decoder().layers`); supported: llama, mistral, qwen2, qwen3",
        ),
        ("llama-adapter-v2", "model_type 'gpt2': llama-adapter-v2 needs q_proj/k_proj/v_proj attention modules"),
        ("ptuning-v2", "model_type 'gpt2': ptuning-v2 needs a transformers decoder with its blocks in"),
        ("lora", "lora: no default target_modules for model_type 'gpt2'"),
    ],
)
def test_a_family_without_the_llama_layout_loads_and_each_method_says_what_it_lacks(gpt2_folder, method, message):
    model = load_base_model(gpt2_folder)
    with pytest.raises(ValueError) as error:
        attach_adapter(model, make_config(method))
    assert str(error.value).startswith(message)
    assert not hasattr(model, "adapter_config")


def test_llama_adapter_on_an_untested_registry_family_keeps_its_own_eager_kernel():
    """Gemma 2 is not a tested family, but its attention has q/k/v projections and goes through the registry:
    the prompt branch wraps its own eager kernel (which soft-caps scores), so zero-init stays exact."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attn_logit_softcapping=2.0, sliding_window=4,
    )  # fmt: skip
    base = Gemma2ForCausalLM(config).eval().requires_grad_(False)
    base.set_attn_implementation("eager")
    model = attach_adapter(copy.deepcopy(base), make_config("llama-adapter-v1", adapted_layers=1, prompt_length=3))
    ids, mask = left_padded()
    assert torch.equal(logits(model, ids, mask), logits(base, ids, mask))


def test_a_key_norm_over_the_whole_projection_is_refused():
    config = Olmo2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="model_type 'olmo2': llama-adapter-v1 needs a per-head k_norm"):
        attach_adapter(Olmo2ForCausalLM(config), make_config("llama-adapter-v1", adapted_layers=1))


CPU_SDPA = torch.nn.functional.scaled_dot_product_attention


def sdpa_in_the_cuda_layout(*args, **kwargs) -> torch.Tensor:
    """The CPU kernel's values in the memory layout of CUDA's flash and efficient kernels: (B, T, H, d) storage
    behind the (B, H, T, d) shape, which `.view` to another head grouping cannot take (found on an H200)."""
    return CPU_SDPA(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_attention_takes_the_attention_output_in_any_memory_layout(loaded, family, monkeypatch):
    model = adapted(loaded, family, "llama-adapter-v1")
    perturb_adapter(model)
    ids, mask = left_padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_in_the_cuda_layout)
        actual = model(ids, attention_mask=mask).logits
    assert torch.equal(actual, expected)
