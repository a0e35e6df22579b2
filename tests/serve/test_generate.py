"""The generation engine against plain computations: greedy tokens, seeds, stops, caching."""

from __future__ import annotations

import pytest
import torch

from mmadapter.serve.generate import GenerationEngine, PromptTooLongError
from mmadapter.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
EOS = 2


def greedy_without_cache(model, ids: list[int], steps: int) -> list[int]:
    """The reference: re-run the whole sequence every step and take the argmax; stop at EOS."""
    sequence, generated = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence])).logits[0, -1]
            token = int(logits.argmax())
            generated.append(token)
            sequence.append(token)
            if token == EOS:
                break
    return generated


def test_stream_and_generate_equal_the_greedy_tokens(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    ids = engine.encode("what shape is there")
    expected = greedy_without_cache(v1_model, ids, GREEDY.max_new_tokens)

    deltas = list(engine.stream([ids], GREEDY))
    [completion] = engine.generate([ids], GREEDY)

    streamed = [token for delta in deltas for token in delta.token_ids]
    assert streamed == expected
    assert completion.token_ids == expected
    assert (
        "".join(d.text for d in deltas) == completion.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    )
    assert deltas[-1].finish_reason == completion.finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert completion.prompt_tokens == len(ids) and ids[0] == tiny_tokenizer.bos_token_id


@pytest.mark.parametrize("gqa", [False, True])
def test_padded_batch_equals_transformers_generate(tiny_llama, tiny_tokenizer, gqa):
    model = tiny_llama(gqa=gqa)
    engine = GenerationEngine(model, tiny_tokenizer)
    prompts = ["the red circle", "what colour is the small square on the left"]
    encoded = [engine.encode(p) for p in prompts]
    completions = engine.generate(prompts, GREEDY)

    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    reference = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=GREEDY.max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=EOS,
    )[:, width:].tolist()
    for completion, row in zip(completions, reference, strict=True):
        expected = row[: row.index(EOS) + 1] if EOS in row else row
        assert completion.token_ids == expected


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    state = torch.get_rng_state()
    first = engine.generate(["the blue"], params)[0].token_ids
    again = engine.generate(["the blue"], params)[0].token_ids
    other = engine.generate(["the blue"], params.replace(seed=8))[0].token_ids
    assert torch.equal(state, torch.get_rng_state())
    assert first == again
    assert first != other


def test_top_k_one_is_greedy_and_top_p_restricts_the_draw(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    greedy = engine.generate(["one two"], GREEDY)[0].token_ids
    top1 = engine.generate(["one two"], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=0))
    assert top1[0].token_ids == greedy
    # A tiny nucleus keeps only the most likely token too.
    nucleus = engine.generate(["one two"], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3))
    assert nucleus[0].token_ids == greedy


def test_repetition_penalty_matches_transformers(v1_model, tiny_tokenizer):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    engine = GenerationEngine(v1_model, tiny_tokenizer)
    ids = engine.encode("red red red")
    penalised = engine.generate([ids], SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=1.5))
    sequence, expected = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(6):
            scores = RepetitionPenaltyLogitsProcessor(1.5)(sequence, v1_model(sequence).logits[:, -1])
            token = int(scores.argmax())
            expected.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if token == EOS:
                break
    assert penalised[0].token_ids == expected


def test_stop_string_cuts_the_text_and_is_never_streamed(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    long = SamplingParams(max_new_tokens=24, temperature=0.0)
    full = engine.generate(["the"], long)[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full.index(stop)
    deltas = list(engine.stream(["the"], long.replace(stop=(stop,))))
    text = "".join(d.text for d in deltas)
    assert text == full[:cut]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)


def test_stop_token_ends_the_answer(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    tokens = engine.generate(["the"], GREEDY)[0].token_ids
    stop_token = tokens[2]
    stopped = engine.generate(["the"], GREEDY.replace(stop_token_ids=(stop_token,)))[0]
    assert stopped.token_ids == tokens[: tokens.index(stop_token) + 1]
    assert stopped.finish_reason == "stop"


def test_budget_and_context_limits(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    context = v1_model.config.max_position_embeddings
    near_full = [1] + [5] * (context - 4)
    completion = engine.generate([near_full], SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=()))[0]
    assert completion.completion_tokens <= 3
    if completion.token_ids[-1] != EOS:
        assert completion.finish_reason == "length"
    with pytest.raises(PromptTooLongError, match=f"context is {context} tokens"):
        engine.generate([[1] * context], GREEDY)


def test_prompt_keys_and_values_are_computed_once_per_generation(v1_model, tiny_tokenizer):
    """Every forward projects the new tokens through k_proj; the prompt is projected once, not per token."""
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    adapted = v1_model.model.layers[-1].self_attn
    calls = []
    handle = adapted.k_proj.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    forwards = []
    model_handle = v1_model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        engine.generate(["the red"], SamplingParams(max_new_tokens=10, temperature=0.0))
    finally:
        handle.remove()
        model_handle.remove()
    assert len(forwards) >= 2
    assert len(calls) == len(forwards) + 1  # one call per forward + the prompt once (not once per forward)


def test_generation_does_not_leave_inference_mode_on(v1_model, tiny_tokenizer):
    engine = GenerationEngine(v1_model, tiny_tokenizer)
    for _ in engine.stream(["the"], GREEDY):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("padded", [False, True])
def test_ptuning_prefix_generation_equals_transformers_generate(tiny_llama, tiny_tokenizer, padded):
    """A deep prefix enters through the KV cache; the engine's fresh cache per request gets it once."""
    from mmadapter.adapters import attach_adapter, make_config

    model = tiny_llama()
    attach_adapter(model, make_config("ptuning-v2", pre_seq_len=4, prefix_dropout=0.0))
    with torch.no_grad():
        for param in model.model.prefix_encoder.parameters():
            param.normal_()
    engine = GenerationEngine(model, tiny_tokenizer)
    prompts = ["the red circle", "what colour is the small square"] if padded else ["the red circle"]
    encoded = [engine.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    reference = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=EOS
    )
    for completion, row in zip(
        engine.generate(encoded, GREEDY.replace(max_new_tokens=10)), reference[:, width:].tolist(), strict=True
    ):
        assert completion.token_ids == (row[: row.index(EOS) + 1] if EOS in row else row)
    without_prefix = GenerationEngine(tiny_llama(), tiny_tokenizer).generate(encoded, GREEDY.replace(max_new_tokens=10))
    assert [c.token_ids for c in without_prefix] != [
        c.token_ids for c in engine.generate(encoded, GREEDY.replace(max_new_tokens=10))
    ]


def test_visual_prompt_is_computed_once_per_request(served_v2):
    from PIL import Image

    from mmadapter.serve.chat import ChatTurn, stream_turn

    calls = {"clip": 0, "projector": 0, "forward": 0}

    def count(name):
        def hook(*args):
            calls[name] += 1

        return hook

    handles = [
        served_v2.model.vision_encoder.register_forward_hook(count("clip")),
        served_v2.model.visual_projector.register_forward_hook(count("projector")),
        served_v2.model.register_forward_hook(count("forward")),
    ]
    try:
        turn = ChatTurn("what is it", (), Image.new("RGB", (20, 20), "red"), GREEDY)
        list(stream_turn(served_v2, turn))
        assert calls["forward"] >= 2 and calls["clip"] == calls["projector"] == 1
        for _ in range(2):  # text only: the adapter's text-only visual prompt, computed once for the model
            list(stream_turn(served_v2, ChatTurn("hi", (), None, GREEDY)))
        assert calls["clip"] == calls["projector"] == 2
    finally:
        for handle in handles:
            handle.remove()
