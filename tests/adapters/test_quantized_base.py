"""A 4-/8-bit frozen base (bitsandbytes, which runs on CPUs since 0.49): only the base's linear layers are quantized,
every adapter is exact at zero-init against the *quantized* base, V2's bias/scale and LoRA stay unmerged on packed
weights, and adapters move between quantized and full-precision bases."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from mmadapter.adapters import (
    attach_adapter,
    load_adapter,
    load_base_model,
    make_config,
    mark_trainable,
    save_adapter,
    trainable_parameters,
)
from mmadapter.adapters.backbones.quantization import check_quantization, is_quantized_linear
from mmadapter.adapters.methods.bias_scale import bias_scale_state
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from mmadapter.adapters.methods.lora import lora_layers
from mmadapter.adapters.methods.report import parameter_report
from mmadapter.core.quantization import Quantization
from mmadapter.serve.loader import load_served_model, merge_for_serving
from mmadapter.serve.sampling import SamplingParams
from tests.helpers.chatglm_reference import GMASK, SOP
from tests.helpers.llama_v2_setup import EVERYTHING, pixels, tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.threads import single_thread  # noqa: F401 (autouse fixture)
from tests.helpers.tiny_chatglm import build_tiny_glm
from tests.helpers.tiny_families import build_tiny_family, save_sharded
from tests.helpers.tiny_llama import left_padded

pytest.importorskip("bitsandbytes")

BITS = (4, 8)
METHODS = ("llama-adapter-v1", "llama-adapter-v2", "lora")
TINY_LLAMA = Path(__file__).resolve().parents[2] / "assets" / "tiny-llama"  # 128 wide, 344-wide MLPs
GLM_IDS = torch.tensor([[5, 11, 12, 13, GMASK, SOP, 21, 22]])
#: Bits -> bound on |quantized - full| / |full| (Frobenius norms of logits, or of the change an adapter makes).
#: Measured on the tiny Qwen3 (64-wide linears, one NF4 block per row): 0.17 (4-bit), 0.014-0.023 (8-bit).
RELATIVE_ERROR = {4: 0.3, 8: 0.05}
#: Bound on that error between two kernels of one 4-bit model (bf16 matmuls summed in another order).
SAME_QUANTIZED_MODEL = 0.02


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A seeded tiny Qwen3 (per-head q/k norms, GQA) and ChatGLM-6B as Hugging Face folders."""
    root = tmp_path_factory.mktemp("quantized")
    glm = root / "chatglm"
    build_tiny_glm().save_pretrained(glm)
    return {"qwen3": save_sharded(build_tiny_family("qwen3"), root / "qwen3"), "chatglm": glm}


@pytest.fixture(scope="module")
def bases(folders):
    """(family, bits) -> the base loaded quantized; (family, None) -> in float32 (tests take deep copies)."""
    loaded = {}
    for family, folder in folders.items():
        attn = "eager" if family == "chatglm" else "sdpa"
        loaded[family, None] = load_base_model(folder, attn_implementation=attn)
        for bits in BITS:
            loaded[family, bits] = load_base_model(
                folder, quantization=Quantization(bits=bits), attn_implementation=attn
            )
    return loaded


def config_for(method: str):
    if method == "llama-adapter-v2":
        return tiny_v2_config(**EVERYTHING)  # prompts + visual prompt, bias and scale on every linear, LoRA
    if method == "lora":
        return make_config(method, r=4)
    return make_config(method, adapted_layers=2, prompt_length=3)


def run(model) -> torch.Tensor:
    with torch.no_grad():
        if model.config.model_type == "chatglm":
            return model(GLM_IDS).logits
        ids, mask = left_padded()
        extra = (
            {}
            if getattr(model, "visual_prompter", None) is None
            else {"adapter_visual_prompt": visual_prompt(model, pixels())}
        )
        return model(ids, attention_mask=mask, **extra).logits


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("bits", BITS)
def test_only_the_linear_layers_are_quantized(bases, bits):
    model = attach_adapter(copy.deepcopy(bases["qwen3", bits]), config_for("llama-adapter-v2"))
    attention = model.model.layers[0].self_attn
    assert is_quantized_linear(attention.q_proj) and is_quantized_linear(model.model.layers[1].mlp.down_proj)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and not is_quantized_linear(model.lm_head)
    assert attention.k_norm.weight.dtype == model.model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainable_parameters(model).values())
    full, quantized = run(bases["qwen3", None]), run(bases["qwen3", bits])
    assert 0 < relative_error(quantized, full) < RELATIVE_ERROR[bits]  # quantized, and still the same model
    full_report = parameter_report(attach_adapter(copy.deepcopy(bases["qwen3", None]), config_for("llama-adapter-v2")))
    assert parameter_report(model) == full_report  # counts values, not the bytes of packed 4-bit weights


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("family", "method"), [("qwen3", m) for m in METHODS] + [("chatglm", "lora")])
def test_zero_init_is_exact_against_the_quantized_base(bases, family, method, bits):
    base = bases[family, bits]
    adapted = attach_adapter(copy.deepcopy(base), config_for(method))
    assert torch.equal(run(adapted), run(base))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["llama-adapter-v2", "lora"])
def test_bias_scale_and_lora_stay_unmerged_on_quantized_linears(bases, method, bits):
    model = attach_adapter(copy.deepcopy(bases["qwen3", bits]), config_for(method))
    perturb_adapter(model)
    packed = {n: b.clone() for n, b in model.state_dict().items() if ".weight" in n and "proj" in n and "lora" not in n}
    before = run(model)
    merge_for_serving(model)
    assert torch.equal(run(model), before)
    assert all(torch.equal(model.state_dict()[n], b) for n, b in packed.items())  # no weight was rewritten
    assert not any(layer.merged for layer in lora_layers(model))
    states = [bias_scale_state(m) for m in model.modules() if bias_scale_state(m) is not None]
    assert all(not state.merged for state in states) and (method == "lora" or states)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", METHODS)
def test_adapters_move_between_quantized_and_full_precision_bases(bases, method, bits, tmp_path):
    for source, target in ((bits, None), (None, bits)):
        model = attach_adapter(copy.deepcopy(bases["qwen3", source]), config_for(method))
        perturb_adapter(model)
        folder = save_adapter(model, tmp_path / f"from-{source}")
        loaded = load_adapter(copy.deepcopy(bases["qwen3", target]), folder)
        for name, param in trainable_parameters(model).items():
            assert torch.equal(trainable_parameters(loaded)[name], param), name
        # The adapter changes both bases' logits alike, up to the base's own quantization error.
        full, quantized = (loaded, model) if target is None else (model, loaded)
        shift = run(full) - run(bases["qwen3", None])
        assert relative_error(run(quantized) - run(bases["qwen3", bits]), shift) < RELATIVE_ERROR[bits]


def test_the_ptuning_prefix_trains_on_a_quantized_chatglm(bases):
    model = attach_adapter(copy.deepcopy(bases["chatglm", 4]), make_config("ptuning-v2", pre_seq_len=3))
    (table,) = mark_trainable(model).values()
    model.train()
    model(GLM_IDS, labels=GLM_IDS).loss.backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_training_after_an_evaluation_gets_the_same_gradients(bases):
    """bitsandbytes repacks a 4-bit weight for a kernel without a backward at an eval forward on AVX512-BF16
    CPUs; the loader turns that off, or LoRA before the first repacked linear gets no gradient after it."""
    model = attach_adapter(copy.deepcopy(bases["qwen3", 4]), config_for("lora"))
    mark_trainable(model)
    perturb_adapter(model)
    never_evaluated = copy.deepcopy(model)
    model.eval()
    run(model)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    ids, _ = left_padded()
    grads = []
    for trained in (never_evaluated, model):
        trained.train()
        torch.manual_seed(0)  # the same dropout masks
        trained(ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in trainable_parameters(trained).items()})
    assert all(g is not None for g in grads[1].values())
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def test_served_4bit_bases_may_take_the_cpu_inference_kernel():
    """Serving never trains, so bitsandbytes may repack 4-bit weights for its AVX512-BF16 kernel (2.4x the
    decoding speed where the CPU has one), on the linears whose shapes its layout takes (the demo's tiny LLaMA
    has 344-wide MLPs, which it does not); the logits stay the quantized model's."""
    import bitsandbytes

    served = load_served_model(TINY_LLAMA, device="cpu", quantization=Quantization(bits=4))
    cpu_kernel = bool(bitsandbytes.functional.has_avx512bf16())
    repacking = {
        name.rsplit(".", 1)[-1]: m.support_avx512bf16_for_cpu
        for name, m in served.model.named_modules()
        if isinstance(m, bitsandbytes.nn.Linear4bit)
    }
    takes_the_layout = {"q_proj", "k_proj", "v_proj", "o_proj"}  # 128 x 128; gate/up: 344 rows, down: 344 columns
    every_linear = takes_the_layout | {"gate_proj", "up_proj", "down_proj"}
    assert repacking == {name: cpu_kernel and name in takes_the_layout for name in every_linear}
    not_repacked = load_base_model(TINY_LLAMA, quantization=Quantization(bits=4))
    assert relative_error(run(served.model), run(not_repacked)) < SAME_QUANTIZED_MODEL
    [completion] = served.engine.generate([[1, 5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert completion.completion_tokens == 3


def test_without_bitsandbytes_the_error_names_the_key_and_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"^--quantize: a 4-bit base needs bitsandbytes; pip install 'mmadapter\[quantization\]'"
    ):
        check_quantization(Quantization(bits=4), "cpu", "--quantize")


def test_devices_other_than_cpu_and_cuda_are_refused():
    with pytest.raises(ValueError, match=r"^model.quantization: bitsandbytes quantizes on cpu or cuda, not mps"):
        check_quantization(Quantization(bits=8), "mps", "model.quantization")


def test_a_meta_layout_folder_is_refused_with_the_conversion_to_run(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mmadapter convert meta-llama .* quantize the Hugging Face folder"):
        load_base_model(tmp_path, quantization=Quantization(bits=4))


def zero_init_then_training(folder, device: str, bits: int) -> list[float]:
    """V2 with everything on a quantized base on `device`: exact at zero-init, then five AdamW steps' losses."""
    base = load_base_model(folder, device=device, quantization=Quantization(bits=bits))
    assert is_quantized_linear(base.model.layers[0].self_attn.q_proj)
    model = attach_adapter(copy.deepcopy(base), config_for("llama-adapter-v2"))
    ids, mask = (t.to(device) for t in left_padded())
    with torch.no_grad():
        adapted = model(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(model, pixels().to(device)))
        assert torch.equal(adapted.logits, base(ids, attention_mask=mask).logits)
    optimizer = torch.optim.AdamW(list(mark_trainable(model).values()), lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        prompt = visual_prompt(model, pixels().to(device))
        loss = model(ids, attention_mask=mask, labels=ids, adapter_visual_prompt=prompt).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_on_the_cpu_zero_init_is_exact_and_the_adapter_trains(folders):
    losses = zero_init_then_training(folders["qwen3"], "cpu", 4)
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_on_cuda_zero_init_is_exact_and_the_adapter_trains(folders, bits):
    losses = zero_init_then_training(folders["qwen3"], "cuda", bits)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bits", BITS)
def test_serving_a_quantized_base_keeps_v2_unmerged_and_greedy_equals_generate(tmp_path, tiny_tokenizer, bits):
    text_v2 = {**EVERYTHING, "visual_projector": "none", "caption_trains": ["prompts", "gates"]}
    trained = attach_adapter(load_base_model("tiny-llama"), make_config("llama-adapter-v2", **text_v2))
    perturb_adapter(trained)
    folder = save_adapter(trained, tmp_path / "v2")
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    served = load_served_model(
        "tiny-llama", folder, tokenizer=tmp_path / "tokenizer", device="cpu", quantization=Quantization(bits=bits)
    )
    model = served.model
    assert is_quantized_linear(model.model.layers[0].self_attn.q_proj)
    assert not any(state.merged for state in map(bias_scale_state, model.modules()) if state is not None)
    assert not any(layer.merged for layer in lora_layers(model))
    ids, mask = left_padded()
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    prompts = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask, strict=True)]
    completions = served.engine.generate(prompts, params)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for completion, row in zip(completions, expected[:, ids.shape[1] :].tolist(), strict=True):
        assert completion.token_ids == (row[: row.index(2) + 1] if 2 in row else row)
