"""Import of the released V2 multimodal layout (BIAS-7B / LORA-BIAS-7B style), checked against the official math.

The test writes a tiny Meta-layout LLaMA, a tiny CLIP and an official-layout adapter file, converts
with `mmadapter convert official-v2`, and compares the imported model's logits with a plain
float64 computation of the official forward on the Meta-layout tensors (interleaved RoPE, biases
on wq/wo/w1/w2/w3, LoRA without scaling, prompt + visual prompt in every adapted layer, tanh gates,
separate softmax).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmadapter.adapters import load_adapter, load_base_model
from mmadapter.adapters.io.official_v2 import load_official_v2
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from mmadapter.cli.main import main
from mmadapter.vision import FrozenCLIPEncoder
from tests.helpers.llama_reference import Terms, clip_tokens, llama_logits, official_projector

DIM, LAYERS, HEADS, FFN, VOCAB = 64, 4, 4, 192, 256
K, ADAPTED, WIDTH, BLOCKS, RANK = 3, 3, 32, 2, 4
FIRST = LAYERS - ADAPTED
VISUAL_HEADS = 16  # the official code hard-codes 16 heads; the converter's default


def random_tensors(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, scale=0.3, offset=0.0):
    return {key: offset + scale * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def write_meta_llama(folder, generator):
    shapes = {"tok_embeddings.weight": (VOCAB, DIM), "norm.weight": (DIM,), "output.weight": (VOCAB, DIM)}
    for n in range(LAYERS):
        for name in ("wq", "wk", "wv", "wo"):
            shapes[f"layers.{n}.attention.{name}.weight"] = (DIM, DIM)
        shapes |= {
            f"layers.{n}.feed_forward.w1.weight": (FFN, DIM),
            f"layers.{n}.feed_forward.w3.weight": (FFN, DIM),
            f"layers.{n}.feed_forward.w2.weight": (DIM, FFN),
            f"layers.{n}.attention_norm.weight": (DIM,),
            f"layers.{n}.ffn_norm.weight": (DIM,),
        }
    weights = random_tensors(shapes, generator)
    folder.mkdir()
    torch.save(weights, folder / "consolidated.00.pth")
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "multiple_of": 32, "norm_eps": 1e-6, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    return weights


def official_state(generator, lora: bool) -> dict[str, torch.Tensor]:
    """The keys `extract_adapter_from_checkpoint.py` writes for BIAS-7B (+ LORA-BIAS), tiny shapes."""
    shapes = {
        "clip_proj.weight": (WIDTH, 32),
        "clip_proj.bias": (WIDTH,),
        "visual_query.weight": (K, WIDTH),
        "visual_proj.weight": (DIM, WIDTH),
        "visual_proj.bias": (DIM,),
        "adapter_query.weight": (K * ADAPTED, DIM),
    }
    for i in range(BLOCKS):
        p = f"visual_blocks.{i}."
        shapes |= {
            p + "attn.qkv.weight": (3 * WIDTH, WIDTH),
            p + "attn.qkv.bias": (3 * WIDTH,),
            p + "attn.proj.weight": (WIDTH, WIDTH),
            p + "attn.proj.bias": (WIDTH,),
            p + "mlp.fc1.weight": (4 * WIDTH, WIDTH),
            p + "mlp.fc1.bias": (4 * WIDTH,),
            p + "mlp.fc2.weight": (WIDTH, 4 * WIDTH),
            p + "mlp.fc2.bias": (WIDTH,),
        }
    for n in range(LAYERS):
        p = f"llama.layers.{n}."
        shapes |= {
            p + "attention.gate": (1, HEADS, 1, 1),
            p + "attention.wq.bias": (DIM,),
            p + "attention.wo.bias": (DIM,),
            p + "feed_forward.w1.bias": (FFN,),
            p + "feed_forward.w3.bias": (FFN,),
            p + "feed_forward.w2.bias": (DIM,),
        }
        if lora:
            for name in ("wq", "wk", "wv", "wo"):
                shapes |= {
                    p + f"attention.lora_{name}_l1.weight": (RANK, DIM),
                    p + f"attention.lora_{name}_l2.weight": (DIM, RANK),
                }
            shapes |= {
                p + "feed_forward.lora_w1_l1.weight": (RANK, DIM),
                p + "feed_forward.lora_w1_l2.weight": (FFN, RANK),
                p + "feed_forward.lora_w3_l1.weight": (RANK, DIM),
                p + "feed_forward.lora_w3_l2.weight": (FFN, RANK),
                p + "feed_forward.lora_w2_l1.weight": (RANK, FFN),
                p + "feed_forward.lora_w2_l2.weight": (DIM, RANK),
            }
    state = random_tensors(shapes, generator)
    state["adapter_query.weight"] *= 3  # N(0, 1)-like prompts
    state["llama.layers.0.attention.gate"].zero_()  # layer 0 has a gate but no prompt: never trained
    norms = {f"llama.layers.{n}.{k}.weight": (DIM,) for n in range(LAYERS) for k in ("attention_norm", "ffn_norm")}
    state |= random_tensors({**norms, "llama.norm.weight": (DIM,)}, generator, scale=0.1, offset=1.0)
    state |= random_tensors(
        {
            f"{k}.{s}": (n,)
            for k, n in (("clip_proj_norm", WIDTH), ("visual_proj_norm", DIM))
            for s in ("weight", "bias")
        },
        generator,
        scale=0.1,
    )
    for i in range(BLOCKS):
        for norm in ("norm1", "norm2"):
            state |= random_tensors({f"visual_blocks.{i}.{norm}.weight": (WIDTH,)}, generator, scale=0.1, offset=1.0)
            state |= random_tensors({f"visual_blocks.{i}.{norm}.bias": (WIDTH,)}, generator, scale=0.1)
    if lora:
        new_gates = {f"llama.layers.{n}.attention.new_gate": (1, 1, 1, 1) for n in range(LAYERS)}
        state |= random_tensors(new_gates, generator, scale=0.2, offset=1.0)
    return state


def official_reference(meta, state, images, ids, visual_tower, lora: bool):
    """The official forward (spec §3.2-§3.4) on Meta-layout tensors."""
    meta_names = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}
    terms = Terms()
    for n in range(LAYERS):
        for name in ("wq", "wo", "w1", "w3", "w2"):
            terms.bias[(n, name)] = state[f"llama.layers.{n}.{meta_names.get(name, 'feed_forward')}.{name}.bias"]
            if lora:
                p = f"llama.layers.{n}.{meta_names.get(name, 'feed_forward')}.lora_{name}_l"
                terms.lora[(n, name)] = (state[p + "1.weight"], state[p + "2.weight"])
        if lora:
            for name in ("wk", "wv"):
                p = f"llama.layers.{n}.attention.lora_{name}_l"
                terms.lora[(n, name)] = (state[p + "1.weight"], state[p + "2.weight"])
    weights = dict(meta)
    for key, value in state.items():
        if key.startswith("llama.") and key.endswith("norm.weight"):
            weights[key.removeprefix("llama.")] = value
    prompts = state["adapter_query.weight"]
    gates = {}
    for n in range(FIRST, LAYERS):
        gate = state[f"llama.layers.{n}.attention.gate"].reshape(-1).double().tanh()
        if lora:
            gate = gate * state[f"llama.layers.{n}.attention.new_gate"].reshape(())
        gates[n] = gate
    visual = official_projector(state, clip_tokens(visual_tower, images), num_heads=VISUAL_HEADS)
    return llama_logits(
        weights,
        ids,
        n_heads=HEADS,
        layout="interleaved",
        terms=terms,
        prompts={n: prompts[(n - FIRST) * K : (n - FIRST + 1) * K] for n in range(FIRST, LAYERS)},
        gates=gates,
        gate_tanh=False,
        visual=visual,
        fused_layers=set(range(FIRST, LAYERS)),
    )


@pytest.mark.parametrize("lora", [False, True], ids=["BIAS-7B", "LORA-BIAS-7B"])
def test_official_v2_import_matches_the_official_forward(tmp_path, lora):
    generator = torch.Generator().manual_seed(11)
    meta = write_meta_llama(tmp_path / "llama", generator)
    clip_dir = FrozenCLIPEncoder("mmadapter-tiny-vit", seed=5).save(tmp_path / "clip")
    state = official_state(generator, lora)
    torch.save({"model": state, "config": {"w_bias": True, "w_lora": lora, "lora_rank": RANK}}, tmp_path / "v2.pth")

    argv = [
        "convert",
        "official-v2",
        str(tmp_path / "v2.pth"),
        str(tmp_path / "out"),
        "--base",
        str(tmp_path / "llama"),
    ]
    assert main([*argv, "--clip-model", "mmadapter-tiny-vit", "--clip-pretrained", str(clip_dir)]) == 0
    model = load_adapter(load_base_model(tmp_path / "llama"), tmp_path / "out")
    config = model.adapter_config
    assert (config.first_adapted_layer, config.prompt_length, config.lora_rank) == (FIRST, K, RANK if lora else 0)
    assert config.bias_linears == ("q", "o", "gate", "up", "down") and config.image_channel_order == "bgr"
    assert config.gate_tanh is not lora  # LoRA files' new_gate is folded into raw gates

    ids = torch.tensor([[1, 17, 42, 9, 100, 3], [1, 8, 61, 200, 4, 33]])
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        logits = model(ids, adapter_visual_prompt=visual_prompt(model, images)).logits
    tower = copy.deepcopy(model.vision_encoder.visual).double()
    reference = official_reference(meta, state, images, ids, tower, lora)
    torch.testing.assert_close(logits.double(), reference, atol=2e-4, rtol=1e-4)  # float32 vs float64

    python = load_official_v2(
        load_base_model(tmp_path / "llama"),
        tmp_path / "v2.pth",
        clip_model="mmadapter-tiny-vit",
        clip_pretrained=str(clip_dir),
    )
    with torch.no_grad():
        assert torch.equal(python(ids, adapter_visual_prompt=visual_prompt(python, images)).logits, logits)


def test_official_v2_import_names_what_is_wrong(tmp_path, capsys):
    torch.save({"model": {"visual_query.weight": torch.zeros(3, 8)}}, tmp_path / "bad.pth")
    assert (
        main(["convert", "official-v2", str(tmp_path / "bad.pth"), str(tmp_path / "out"), "--base", "tiny-llama"]) == 2
    )
    assert "no 'adapter_query.weight'" in capsys.readouterr().err
