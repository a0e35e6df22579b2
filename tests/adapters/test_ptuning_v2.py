"""P-Tuning v2: the prefix encoder layout, LLaMA through the transformers cache, training, checkpoints, counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from mmadapter.adapters import (
    attach_adapter,
    load_adapter,
    make_config,
    mark_trainable,
    save_adapter,
)
from mmadapter.adapters.backbones.presets import base_config, build_base_model
from mmadapter.adapters.io.official_ptuning import export_official_ptuning, load_official_ptuning
from mmadapter.adapters.methods.prefix_encoder import PrefixEncoder
from mmadapter.adapters.methods.ptuning_v2 import prefix_encoder_of
from mmadapter.cli.main import main
from tests.helpers.chatglm_reference import PAD, batch_mask_and_positions, reference_logits
from tests.helpers.prefix_table import prefix_key_values

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [0, 0, 61, 200, 4, 33, 19, 250]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
P = 3


def ptuning_llama(tiny_llama, gqa=False, **overrides):
    model = tiny_llama(gqa=gqa)
    return attach_adapter(model, make_config("ptuning-v2", **{"pre_seq_len": P, **overrides}))


def hand_prefix_cache(table: torch.Tensor, layers: int, heads: int, batch: int) -> DynamicCache:
    """The prefix table read by hand, as the base model's key/value cache."""
    return DynamicCache([tuple(key_value) for key_value in prefix_key_values(table, layers, heads, batch)])


def reference_inputs(model, base_model, mask):
    """Explicit P+T mask and unshifted positions (0 at each row's first real token), as official ChatGLM."""
    config = base_model.config
    cache = hand_prefix_cache(
        prefix_encoder_of(model).embedding.weight.detach(),
        config.num_hidden_layers,
        config.num_key_value_heads,
        mask.shape[0],
    )
    full_mask = torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return cache, full_mask, positions


def test_prefix_encoder_follows_the_official_layout_and_names():
    encoder = PrefixEncoder(4, num_layers=3, num_heads=2, head_dim=5, dropout=0.0)
    assert list(encoder.state_dict()) == ["embedding.weight"]
    assert encoder.embedding.weight.shape == (4, 3 * 2 * 2 * 5)
    out = encoder(batch_size=2)
    assert out.shape == (3, 2, 2, 2, 4, 5)  # (layers, key/value, batch, heads, P, head_dim)
    table = encoder.embedding.weight.detach()
    for layer in range(3):
        for kv in range(2):
            chunk = table[:, (2 * layer + kv) * 10 : (2 * layer + kv + 1) * 10].reshape(4, 2, 5)
            assert torch.equal(out[layer, kv, 1], chunk.transpose(0, 1))

    projected = PrefixEncoder(4, 3, 2, 5, prefix_projection=True, hidden_size=8, prefix_hidden_size=6)
    shapes = {k: tuple(v.shape) for k, v in projected.state_dict().items()}
    assert shapes == {
        "embedding.weight": (4, 8),
        "trans.0.weight": (6, 8),
        "trans.0.bias": (6,),
        "trans.2.weight": (60, 6),
        "trans.2.bias": (60,),
    }
    projected.eval()
    hand = projected.trans[2](torch.tanh(projected.trans[0](projected.embedding.weight)))
    torch.testing.assert_close(projected(1)[2, 1, 0], hand[:, 50:60].reshape(4, 2, 5).transpose(0, 1))


def test_prefix_dropout_is_active_only_in_training():
    encoder = PrefixEncoder(4, 2, 2, 8, dropout=0.5)
    dropped = encoder.train()(64)
    assert 0.3 < (dropped == 0).float().mean() < 0.7
    assert not torch.equal(dropped[:, :, 0], dropped[:, :, 1])  # each sample has its own mask
    assert (encoder.eval()(2) != 0).all()


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_output_equals_a_hand_built_prefix_cache(tiny_llama, gqa, attn):
    model = ptuning_llama(tiny_llama, gqa=gqa)
    model.set_attn_implementation(attn)
    base = tiny_llama(gqa=gqa, attn=attn)
    cache, full_mask, positions = reference_inputs(model, base, MASK)
    reference = base(IDS, attention_mask=full_mask, past_key_values=cache, position_ids=positions).logits
    ours = model(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # The trap the hook avoids: a mask of the tokens only is accepted silently and is wrong.
    cache, _, _ = reference_inputs(model, base, MASK)
    trap = base(IDS, attention_mask=MASK, past_key_values=cache, position_ids=positions).logits
    assert not torch.allclose(trap, reference, atol=1e-3)
    # A mask that already covers prefix + tokens is taken as it is.
    torch.testing.assert_close(model(IDS, attention_mask=full_mask).logits, reference, rtol=0, atol=1e-5)


def test_llama_cached_decoding_continues_from_the_returned_cache(tiny_llama):
    model = ptuning_llama(tiny_llama)
    full = model(IDS, attention_mask=MASK, use_cache=False).logits
    first = model(IDS[:, :5], attention_mask=MASK[:, :5], use_cache=True)
    rest = model(IDS[:, 5:], attention_mask=MASK, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, rtol=0, atol=1e-5)


def hand_greedy(base, cache, mask, positions, ids, steps):
    logits, tokens = [], []
    out = base(ids, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True)
    for _ in range(steps):
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = base(token, attention_mask=mask, past_key_values=out.past_key_values, position_ids=positions)
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


@pytest.mark.parametrize("padded", [False, True])
def test_llama_generate_equals_a_hand_greedy_loop(tiny_llama, padded):
    model = ptuning_llama(tiny_llama)
    with torch.no_grad():  # a larger prefix so it visibly steers generation
        prefix_encoder_of(model).embedding.weight.mul_(3.0)
    base = tiny_llama()
    mask = MASK if padded else torch.ones_like(MASK)
    steps = 6
    result = model.generate(
        IDS,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cache, full_mask, positions = reference_inputs(model, base, mask)
    tokens, logits = hand_greedy(base, cache, full_mask, positions, IDS, steps)
    assert torch.equal(result.sequences[:, IDS.shape[1] :], tokens)
    torch.testing.assert_close(torch.stack(result.logits, dim=1), logits, rtol=0, atol=1e-4)
    # Each call starts from a fresh prefix cache: generating again gives the same tokens.
    again = model.generate(IDS, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert torch.equal(again, result.sequences)
    plain = tiny_llama().generate(IDS, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, result.sequences)


def test_only_the_prefix_encoder_trains(tiny_llama):
    model = ptuning_llama(tiny_llama, prefix_projection=True, prefix_hidden_size=16)
    selected = mark_trainable(model)
    assert set(selected) == {
        "model.prefix_encoder.embedding.weight",
        "model.prefix_encoder.trans.0.weight",
        "model.prefix_encoder.trans.0.bias",
        "model.prefix_encoder.trans.2.weight",
        "model.prefix_encoder.trans.2.bias",
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(selected.values(), lr=1e-2)
    model.train()
    for _ in range(3):
        model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(selected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_llama_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama, reentrant):
    def loss_and_grad(checkpointing: bool):
        model = ptuning_llama(tiny_llama, prefix_dropout=0.0)
        (weight,) = mark_trainable(model).values()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        loss = model(IDS, attention_mask=MASK, labels=IDS).loss
        loss.backward()
        return loss.detach(), weight.grad

    plain_loss, plain_grad = loss_and_grad(False)
    loss, grad = loss_and_grad(True)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=1e-7)
    assert plain_grad.abs().sum() > 0


def test_a_cache_while_training_with_checkpointing_is_refused(tiny_llama):
    model = ptuning_llama(tiny_llama)
    mark_trainable(model)
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(IDS, past_key_values=DynamicCache(), use_cache=True)


def test_a_mask_of_the_wrong_length_is_a_clear_error(tiny_llama):
    model = ptuning_llama(tiny_llama)
    with pytest.raises(ValueError, match="attention_mask has 5 columns"):
        model(IDS, attention_mask=MASK[:, :5])


def test_save_load_round_trip(tiny_llama, tmp_path):
    model = ptuning_llama(tiny_llama, prefix_projection=True)
    expected = model(IDS, attention_mask=MASK).logits
    save_adapter(model, tmp_path / "pt")
    saved = json.loads((tmp_path / "pt" / "mmadapter_config.json").read_text())["adapter"]
    assert saved == {
        "method": "ptuning-v2",
        "pre_seq_len": P,
        "prefix_projection": True,
        "prefix_hidden_size": None,
        "prefix_dropout": 0.1,
    }
    reloaded = load_adapter(tiny_llama(), tmp_path / "pt")
    assert torch.equal(reloaded(IDS, attention_mask=MASK).logits, expected)


@pytest.mark.parametrize("projection", [False, True])
def test_official_checkpoint_round_trip(tiny_llama, tmp_path, projection):
    model = ptuning_llama(tiny_llama, prefix_projection=projection)
    export_official_ptuning(model, tmp_path / "official")
    state = torch.load(tmp_path / "official" / "pytorch_model.bin", weights_only=True)
    expected_keys = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        expected_keys |= {f"transformer.prefix_encoder.trans.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(state) == expected_keys
    assert all(t.dtype == torch.float32 for t in state.values())

    # CLI: official -> mmadapter folder -> official again, bit-for-bit.
    assert (
        main(
            ["convert", "official-ptuning", str(tmp_path / "official"), str(tmp_path / "ours"), "--base", "tiny-llama"]
        )
        == 0
    )
    assert main(["convert", "to-official-ptuning", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    loaded = load_adapter(tiny_llama(), tmp_path / "ours")
    official = load_official_ptuning(tiny_llama(), tmp_path / "official", pre_seq_len=P)
    expected = model(IDS, attention_mask=MASK).logits
    assert torch.equal(loaded(IDS, attention_mask=MASK).logits, expected)
    assert torch.equal(official(IDS, attention_mask=MASK).logits, expected)


def test_official_checkpoint_with_another_pre_seq_len_is_a_clear_error(tiny_llama, tmp_path):
    export_official_ptuning(ptuning_llama(tiny_llama), tmp_path)
    with pytest.raises(ValueError, match=r"requested pre_seq_len=8 but the checkpoint was trained with pre_seq_len=3"):
        load_official_ptuning(tiny_llama(), tmp_path, pre_seq_len=8)
    with pytest.raises(ValueError, match="prefix_projection"):
        load_official_ptuning(tiny_llama(), tmp_path / "pytorch_model.bin", prefix_projection=True)
    with pytest.raises(ValueError, match=r"the prefix is 512 wide, but this base \(llama\) needs 32 layers"):
        load_official_ptuning(build_base_model(base_config("llama-7b"), device="meta"), tmp_path)
    torch.save({"lm_head.weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="no transformer.prefix_encoder"):
        load_official_ptuning(tiny_llama(), tmp_path / "other.bin")


def test_info_counts_on_llama_7b(capsys):
    assert main(["info", "--base", "llama-7b", "--method", "ptuning-v2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 128 * 32 * 2 * 4096
    assert main(["info", "--base", "llama-7b", "--method", "ptuning-v2", "--preset", "adgen-projection", "--json"]) == 0
    width = 32 * 2 * 4096
    expected = 128 * 4096 + (4096 * 4096 + 4096) + (width * 4096 + width)
    assert json.loads(capsys.readouterr().out)["trainable_params"] == expected


# ---------------------------------------------------------------------------------------------------
# ChatGLM-6B: the backbone calls `transformer.prefix_encoder` itself (mask and positions as official).

GLM_IDS = torch.tensor([[5, 100, 200, 130001, 130004, 300, 301, 302], [5, 101, 102, 103, 104, 130001, 130004, 400]])


@pytest.fixture(scope="module")
def chatglm_base():
    torch.manual_seed(0)
    return build_base_model(base_config("tiny-chatglm")).requires_grad_(False)


def ptuning_chatglm(base, **overrides):
    torch.manual_seed(1)  # the same random prefix in every model built here
    return attach_adapter(copy.deepcopy(base), make_config("ptuning-v2", **{"pre_seq_len": P, **overrides}))


def chatglm_reference_logits(model, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The plain ChatGLM-6B reference on unpadded rows, the prefix table (§5.2-5.3) read by hand."""
    config = model.config
    layers, heads = config.num_layers, config.num_attention_heads
    _, blocked, positions = batch_mask_and_positions([row.tolist() for row in ids], PAD)
    prefix = prefix_key_values(table.detach(), layers, heads, len(ids))
    return reference_logits(model.state_dict(), layers, heads, ids, blocked, positions, prefix=prefix)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chatglm_output_equals_hand_concatenated_prefix(chatglm_base, attn):
    model = ptuning_chatglm(chatglm_base)
    model.set_attn_implementation(attn)
    assert [n for n, _ in model.named_parameters() if "prefix" in n] == ["transformer.prefix_encoder.embedding.weight"]
    with torch.no_grad():
        ours = model(GLM_IDS).logits
        reference = chatglm_reference_logits(model, GLM_IDS, prefix_encoder_of(model).embedding.weight)
        plain = chatglm_base(GLM_IDS).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_chatglm_generate_with_prefix_equals_a_hand_greedy_loop(chatglm_base):
    model = ptuning_chatglm(chatglm_base)
    steps = 4
    with torch.no_grad():
        result = model.generate(
            GLM_IDS, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        ids, logits = GLM_IDS, []
        for _ in range(steps):  # recompute everything each step: no cache involved
            logits.append(model(ids, use_cache=False).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
        plain = chatglm_base(GLM_IDS).logits[:, -1]
    assert torch.equal(result.sequences, ids)
    torch.testing.assert_close(torch.stack(result.logits, dim=1), torch.stack(logits, dim=1), rtol=0, atol=1e-4)
    assert not torch.allclose(result.logits[0], plain, atol=1e-3)


def test_chatglm_only_the_prefix_trains_also_with_gradient_checkpointing(chatglm_base):
    def train(checkpointing: bool):
        model = ptuning_chatglm(chatglm_base, prefix_dropout=0.0)
        selected = mark_trainable(model)
        assert list(selected) == ["transformer.prefix_encoder.embedding.weight"]
        if checkpointing:
            model.activation_checkpointing_enable()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(selected.values(), lr=1e-2)
        model.train()
        losses = []
        for _ in range(2):
            loss = model(GLM_IDS, labels=GLM_IDS).loss
            loss.backward()
            losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set(selected)
        return torch.stack(losses), selected["transformer.prefix_encoder.embedding.weight"].detach()

    plain_losses, plain_weight = train(False)
    losses, weight = train(True)
    torch.testing.assert_close(losses, plain_losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(weight, plain_weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
def test_chatglm_official_checkpoint_folder_converts_both_ways(chatglm_base, tmp_path, projection):
    trained = ptuning_chatglm(chatglm_base, prefix_projection=projection)
    official = tmp_path / "checkpoint-3000"
    official.mkdir()
    # An official folder: the whole model's config.json (with pre_seq_len) and only the prefix in the .bin.
    config = {**chatglm_base.config.to_dict(), "pre_seq_len": P, "prefix_projection": projection}
    (official / "config.json").write_text(json.dumps(config))
    state = {f"transformer.prefix_encoder.{k}": v.clone() for k, v in prefix_encoder_of(trained).state_dict().items()}
    torch.save(state, official / "pytorch_model.bin")

    assert main(["convert", "official-ptuning", str(official), str(tmp_path / "ours")]) == 0
    assert main(["convert", "to-official-ptuning", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    with torch.no_grad():
        expected = trained(GLM_IDS).logits
        loaded = load_adapter(copy.deepcopy(chatglm_base), tmp_path / "ours")
        assert torch.equal(loaded(GLM_IDS).logits, expected)
        # The official README's inference recipe: base + checkpoint + pre_seq_len.
        readme = load_official_ptuning(copy.deepcopy(chatglm_base), official, pre_seq_len=P)
        assert torch.equal(readme(GLM_IDS).logits, expected)


def test_an_explicit_base_wins_over_the_checkpoints_config(chatglm_base, tmp_path, capsys):
    """A user who names the base means it: the folder's config.json (here of a wider model) is not used then."""
    trained = ptuning_chatglm(chatglm_base, prefix_projection=False)
    official = tmp_path / "checkpoint"
    official.mkdir()
    wider = {**chatglm_base.config.to_dict(), "hidden_size": 2 * chatglm_base.config.hidden_size}
    (official / "config.json").write_text(json.dumps({**wider, "pre_seq_len": P}))
    state = {f"transformer.prefix_encoder.{k}": v.clone() for k, v in prefix_encoder_of(trained).state_dict().items()}
    torch.save(state, official / "pytorch_model.bin")

    assert main(["convert", "official-ptuning", str(official), str(tmp_path / "ours"), "--base", "tiny-chatglm"]) == 0
    assert "(base tiny-chatglm)" in capsys.readouterr().out
    with torch.no_grad():
        loaded = load_adapter(copy.deepcopy(chatglm_base), tmp_path / "ours")
        assert torch.equal(loaded(GLM_IDS).logits, trained(GLM_IDS).logits)
    # Without --base the config.json is the base, and its width does not fit the prefix: one clear line.
    assert main(["convert", "official-ptuning", str(official), str(tmp_path / "other")]) == 2
    assert "trained for another base model" in capsys.readouterr().err


def test_info_counts_on_chatglm_6b(capsys):
    assert main(["info", "--base", "chatglm-6b", "--method", "ptuning-v2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 128 * 28 * 2 * 4096 == 29_360_128
    assert (
        main(["info", "--base", "chatglm-6b", "--method", "ptuning-v2", "--preset", "adgen-projection", "--json"]) == 0
    )
    # spec §5.1: 128·4096 + (4096·4096 + 4096) + (229376·4096 + 229376)
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 957_059_072
