"""Continuous batching and per-row adapters: a request's tokens never depend on what else is in the batch."""

from __future__ import annotations

import threading

import pytest
import torch

from mmadapter.adapters import attach_adapter, make_config, save_adapter
from mmadapter.adapters.methods.routing import RowRouting, install_routes, make_shell, routed
from mmadapter.cli.serve_commands import _adapters
from mmadapter.serve.batching import BatchScheduler, GenerationRequest
from mmadapter.serve.chat import ChatTurn, generation_request, prompt_ids
from mmadapter.serve.generate import GenerationEngine
from mmadapter.serve.loader import BASE_MODEL_ID, UnknownModelError, load_served_model, load_served_models
from mmadapter.serve.sampling import SamplingParams
from mmadapter.serve.worker import GenerationWorker, QueueFullError
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_llama import build_tiny_llama

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
PROMPTS = ["the red circle", "what colour is the small square on the left", "hi", "a blue square and a triangle"]
ALL_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
#: The adapters served together: V1 prompts; V2 prompts + output-side bias/scale + norms + LoRA; plain LoRA.
ADAPTERS = {
    "v1": ("llama-adapter-v1", {"adapted_layers": 2, "prompt_length": 3}),
    "v2": (
        "llama-adapter-v2",
        {
            "visual_projector": "none",
            "prompt_length": 3,
            "bias_linears": ALL_LINEARS,
            "scale_linears": ALL_LINEARS,
            "scale_side": "output",
            "lora_rank": 4,
            "instruction_trains": ["prompts", "gates", "bias", "scale", "norms", "lora"],
        },
    ),
    "lora": ("lora", {"r": 4}),
}


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=seed)


def run(engine: GenerationEngine, requests: list[GenerationRequest], join_every: int = 0, chunk: int = 512):
    """Each request's tokens; with `join_every` > 0 one request joins every that many steps."""
    scheduler = BatchScheduler(engine, max_batch=16, prefill_tokens=chunk)
    waiting, sequences, tokens, step = list(requests), [], {}, 0
    while waiting or not scheduler.idle:
        if waiting and (join_every == 0 or step % join_every == 0):
            sequences += [scheduler.add(r) for r in (waiting if join_every == 0 else waiting[:1])]
            waiting = [] if join_every == 0 else waiting[1:]
        for sequence, delta in scheduler.step():
            tokens.setdefault(sequence, []).extend(delta.token_ids)
        step += 1
    return [tokens.get(s, []) for s in sequences]


@pytest.fixture
def engine(v1_model, tiny_tokenizer):
    v1_model.config.max_position_embeddings = 1024
    return GenerationEngine(v1_model, tiny_tokenizer)


def test_batched_equals_alone_token_for_token_greedy_and_seeded(engine):
    """Mixed prompt lengths and mixed settings in one batch; joining one by one with 7-token prefill chunks."""
    ids = [engine.encode(p) for p in PROMPTS]
    params = [GREEDY, sampled(1), sampled(2), GREEDY]
    requests = [GenerationRequest(i, p) for i, p in zip(ids, params, strict=True)]
    alone = [run(engine, [r])[0] for r in requests]
    # The independent reference: the static engine (itself equal to transformers' generate in test_generate.py).
    assert alone == [engine.generate([i], p)[0].token_ids for i, p in zip(ids, params, strict=True)]
    assert run(engine, requests) == alone
    assert run(engine, requests, join_every=3, chunk=7) == alone
    assert all(len(tokens) == 10 for tokens in alone) and alone[1] != alone[2]  # the seeds matter


def test_a_request_joins_mid_flight_and_leaves_early(engine):
    long, short = (
        GenerationRequest(engine.encode(p), GREEDY.replace(max_new_tokens=n))
        for p, n in [(PROMPTS[1], 12), (PROMPTS[0], 3)]
    )
    scheduler = BatchScheduler(engine)
    first = scheduler.add(long)
    rows, counts = [], []
    for step in range(14):
        if step == 4:
            second = scheduler.add(short)
        scheduler.step()
        rows.append(len(scheduler.running))
        counts.append((first.text.generated, second.text.generated if step >= 4 else 0))
    # Joins at step 4 (prefill -> first token, then a shared decoding step), leaves after step 5 with 3 tokens;
    # the long request gains one token every step throughout.
    assert rows[:7] == [1, 1, 1, 1, 2, 1, 1]
    assert counts[:7] == [(2, 0), (3, 0), (4, 0), (5, 0), (6, 2), (7, 3), (8, 3)]
    assert first.finished and second.finished
    assert [t for t in run(engine, [long])[0]] == first.history[len(long.prompt_ids) :]
    assert run(engine, [short])[0] == second.history[len(short.prompt_ids) :]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.helpers.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_llama()
    base.config.max_position_embeddings = 1024
    base.save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")
    saved = {}
    for name, (method, options) in ADAPTERS.items():
        model = build_tiny_llama()
        attach_adapter(model, make_config(method, **options))
        perturb_adapter(model)
        saved[name] = save_adapter(model, root / name, prompt_template="alpaca")
    return root / "base", saved


@pytest.fixture(scope="module")
def multi(folders):
    base, saved = folders
    return load_served_models(base, saved, device="cpu")


def alone_model(folders, name: str | None):
    """The adapter attached directly to its own base (the one-adapter path, unmerged): the reference."""
    base, saved = folders
    return load_served_model(base, None if name is None else saved[name], device="cpu", merge=False)


@pytest.fixture(scope="module")
def alone(folders):
    """Each reference loaded once (tests that change a reference's weights load their own)."""
    loaded = {}

    def get(name: str | None):
        if name not in loaded:
            loaded[name] = alone_model(folders, name)
        return loaded[name]

    return get


def test_mixed_adapters_in_one_batch_equal_each_adapter_alone(multi, alone):
    assert multi.model_ids() == ["v1", "v2", "lora", BASE_MODEL_ID] and multi.name == "v1"
    engine = multi.engine
    routes = ["v1", "v2", "lora", None, "v2"]
    ids = [engine.encode(p) for p in [*PROMPTS, PROMPTS[0]]]
    params = [GREEDY, sampled(3), GREEDY, GREEDY, GREEDY]
    requests = [GenerationRequest(i, p, r) for i, p, r in zip(ids, params, routes, strict=True)]
    batched = run(engine, requests, join_every=2, chunk=9)
    for request, tokens in zip(requests, batched, strict=True):
        reference = alone(request.route).engine
        assert tokens == reference.generate([request.prompt_ids], request.params)[0].token_ids, request.route

    # Logits of one padded mixed prefill, row by row, against each adapter alone (fp32 rounding).
    width = max(map(len, ids))
    padded = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad(), routed(RowRouting.build(routes, [1.0] * len(routes), torch.device("cpu"))):
        mixed = multi.model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for row, (route, prompt) in enumerate(zip(routes, ids, strict=True)):
        with torch.no_grad():
            expected = alone(route).model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(mixed[row, width - len(prompt) :], expected, atol=1e-5, rtol=1e-5)


def _logits(model, ids, route=None, scale=1.0):
    with torch.no_grad(), routed(None if route is None else RowRouting.build([route], [scale], torch.device("cpu"))):
        return model(torch.tensor([ids])).logits


def test_adapter_scale_zero_is_the_base_and_scales_each_term(multi, folders):
    ids = multi.engine.encode(PROMPTS[1])
    base = _logits(alone_model(folders, None).model, ids)
    for name in ADAPTERS:
        assert torch.equal(_logits(multi.model, ids, name, 0.0), base)
        assert not torch.allclose(_logits(multi.model, ids, name, 0.5), base, atol=1e-3)

    # V1 at 0.5 is the adapter with tanh(gate) halved.
    v1 = alone_model(folders, "v1").model
    with torch.no_grad():
        for module in v1.modules():
            if getattr(module, "adapter_gate", None) is not None:
                module.adapter_gate.copy_(torch.atanh(0.5 * module.adapter_gate.tanh()))
    torch.testing.assert_close(_logits(multi.model, ids, "v1", 0.5), _logits(v1, ids), atol=1e-5, rtol=1e-5)

    # LoRA at 0.3 is the update B·A scaled by 0.3.
    lora = alone_model(folders, "lora").model
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_B." in name:
                param.mul_(0.3)
    torch.testing.assert_close(_logits(multi.model, ids, "lora", 0.3), _logits(lora, ids), atol=1e-5, rtol=1e-5)

    # V2 at 0.25: gates r·tanh(g), biases r·b, scales 1 + r(s - 1), norms w0 + r(w - w0), LoRA r·B·A.
    v2 = alone_model(folders, "v2").model
    plain = alone_model(folders, None).model.state_dict()
    r = 0.25
    with torch.no_grad():
        for name, param in v2.named_parameters():
            if name.endswith("adapter_gate"):
                param.copy_(torch.atanh(r * param.tanh()))
            elif name.endswith("adapter_bias") or ".lora_B." in name:
                param.mul_(r)
            elif name.endswith("adapter_scale"):
                param.copy_(1 + r * (param - 1))
            elif name.endswith("norm.weight"):
                param.copy_(plain[name] + r * (param - plain[name]))
    torch.testing.assert_close(_logits(multi.model, ids, "v2", r), _logits(v2, ids), atol=1e-5, rtol=1e-5)


def test_worker_batches_concurrent_turns_with_the_alone_answers(multi, alone):
    turns = [ChatTurn(p, adapter=a, params=GREEDY) for p, a in zip(PROMPTS, ["v1", "v2", "lora", "base"], strict=True)]
    worker = GenerationWorker(multi, max_queue=0, max_batch=4)
    release, seen_running = threading.Event(), []

    def step_started(*args) -> None:  # on the worker thread: how many rows this step runs
        release.wait(60)
        seen_running.append(worker.running)

    handle = multi.model.register_forward_pre_hook(step_started)
    try:
        jobs = [worker.submit(turn) for turn in turns]
        with pytest.raises(QueueFullError):
            worker.submit(turns[0])  # 4 accepted (the first step is held), 0 may wait
        release.set()
        answers = []
        for job in jobs:
            tokens = []
            for event in job.events():
                tokens += getattr(event, "token_ids", [])
            answers.append(tokens)
    finally:
        release.set()
        handle.remove()
        assert worker.close()
    assert max(seen_running) > 1 and worker.pending == 0
    for turn, job, tokens in zip(turns, jobs, answers, strict=True):
        route = None if turn.adapter == "base" else turn.adapter
        assert tokens == alone(route).engine.generate([job.prompt_ids], GREEDY)[0].token_ids


def test_bad_model_id_and_scale_fail_clearly(multi):
    with pytest.raises(UnknownModelError, match="'nope' does not exist; this server serves 'v1', 'v2', 'lora', 'base'"):
        multi.variant("nope")
    with pytest.raises(ValueError, match="adapter_scale must be between 0 and 1"):
        ChatTurn("hi", adapter_scale=float("nan"))
    worker = GenerationWorker(multi)
    try:
        [event] = [e for e in worker.submit(ChatTurn("hi", adapter="nope")).events()]
        assert isinstance(event.error, UnknownModelError)
    finally:
        worker.close()


def test_adapter_flag_names(tmp_path):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert _adapters([str(folder), f"chat={folder}", "org/repo", str(odd)]) == {
        "my-adapter": str(folder),
        "chat": str(folder),
        "org/repo": "org/repo",
        "a=b": str(odd),
    }
    with pytest.raises(ValueError, match="the name 'my-adapter' is given twice"):
        _adapters([str(folder), f"my-adapter={folder}"])


def test_web_demo_dials_a_routed_adapter(multi, alone):
    """The web demo submits to the batching worker; its "Adapter strength" slider at 0 answers as the base."""
    from mmadapter.serve.web_demo import build_ui

    ui = build_ui(multi, examples_dir=None)
    try:
        assert [i.label for i in ui.additional_inputs][-1] == "Adapter strength"
        replies = {scale: list(ui.fn("what colour", [], 0.0, 0.75, 6, scale))[-1] for scale in (0.0, 1.0)}
    finally:
        ui.close()
    assert replies[0.0] != replies[1.0]
    for scale, reference in ((0.0, alone(None)), (1.0, alone("v1"))):
        turn = ChatTurn("what colour", params=GREEDY.replace(max_new_tokens=6))
        ids = reference.engine.generate([prompt_ids(multi, turn)], turn.params)
        assert replies[scale] == ids[0].text


def test_ptuning_v2_alone_and_beside_other_adapters(folders, tmp_path):
    """Alone: attached to the base, one request at a time. Beside others: its requests run one at a time on
    its own engine while the other adapters keep batching; every answer equals its adapter served alone."""
    base, saved = folders
    model = build_tiny_llama()
    attach_adapter(model, make_config("ptuning-v2", pre_seq_len=4))
    perturb_adapter(model)
    prefix = save_adapter(model, tmp_path / "prefix", prompt_template="alpaca")
    served = load_served_models(base, {"prefix": prefix}, device="cpu")
    assert served.model_ids() == ["prefix"] and not served.engine.batchable
    ids = served.engine.encode(PROMPTS[0])
    reference = load_served_model(base, prefix, device="cpu")
    expected = reference.engine.generate([ids], GREEDY)[0].token_ids
    assert run(served.engine, [GenerationRequest(ids, GREEDY)] * 2) == [expected] * 2

    mixed = load_served_models(base, {"v1": saved["v1"], "prefix": prefix, "lora": saved["lora"]}, device="cpu")
    assert mixed.model_ids() == ["v1", "prefix", "lora", "base"] and mixed.engine.batchable
    asks = [("prefix", GREEDY), ("v1", GREEDY), ("prefix", sampled(3)), ("lora", sampled(4)), ("base", GREEDY)]
    requests = [
        generation_request(mixed, ChatTurn(prompt, adapter=name, params=params), mixed.engine.encode(prompt))
        for (name, params), prompt in zip(asks, [*PROMPTS, PROMPTS[0]], strict=True)
    ]
    scheduler = BatchScheduler(mixed.engine, max_batch=16, prefill_tokens=16)
    sequences = [scheduler.add(request) for request in requests]
    tokens: dict = {}
    steps_with_both = 0
    while not scheduler.idle:
        events = scheduler.step()
        steps_with_both += scheduler.alone is not None and len(scheduler.running) > 1
        for sequence, delta in events:
            tokens.setdefault(sequence, []).extend(delta.token_ids)
    assert steps_with_both > 0  # the prefix request streamed while the others decoded together
    for (name, params), request, sequence in zip(asks, requests, sequences, strict=True):
        alone_served = reference if name == "prefix" else alone_model(folders, None if name == "base" else name)
        assert tokens[sequence] == alone_served.engine.generate([request.prompt_ids], params)[0].token_ids, name
    with pytest.raises(ValueError, match="adapter_scale: the model 'prefix' is a P-Tuning v2 adapter"):
        generation_request(mixed, ChatTurn("hi", adapter="prefix", adapter_scale=0.5), ids)
    worker = GenerationWorker(mixed, max_batch=4)  # what the HTTP server runs: both answered, each as alone
    try:
        jobs = [worker.submit(ChatTurn(PROMPTS[1], adapter=name, params=GREEDY)) for name in ("prefix", "lora")]
        answers = [[t for e in job.events() for t in getattr(e, "token_ids", [])] for job in jobs]
    finally:
        assert worker.close()
    assert answers[0] == reference.engine.generate([jobs[0].prompt_ids], GREEDY)[0].token_ids
    assert answers[1] == alone_model(folders, "lora").engine.generate([jobs[1].prompt_ids], GREEDY)[0].token_ids


def test_lora_routes_on_chatglm(tiny_glm):
    """ChatGLM-6B (its own modeling code, one request at a time) takes routed LoRA rows too."""
    base, direct = tiny_glm(seed=0, attn="eager"), tiny_glm(seed=0, attn="eager")
    attach_adapter(direct, make_config("lora", r=4))
    perturb_adapter(direct)
    shell = make_shell(base)
    attach_adapter(shell, make_config("lora", r=4))
    shell.load_state_dict({k: v for k, v in direct.state_dict().items() if ".lora_" in k}, strict=False)
    assert install_routes(base, "lora", shell) == [
        f"transformer.layers.{i}.attention.query_key_value" for i in range(3)
    ]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected, plain = direct(ids).logits, base(ids).logits
        with routed(RowRouting.build(["lora"], [1.0], torch.device("cpu"))):
            torch.testing.assert_close(base(ids).logits, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_a_long_prompt_prefills_in_chunks_while_streams_keep_flowing(engine):
    scheduler = BatchScheduler(engine, prefill_tokens=8)
    running = scheduler.add(GenerationRequest(engine.encode(PROMPTS[2]), GREEDY.replace(max_new_tokens=30)))
    scheduler.step()
    long = scheduler.add(GenerationRequest(engine.encode(PROMPTS[1] * 2), GREEDY))
    chunks = -(-len(long.request.prompt_ids) // 8)
    before = running.text.generated
    for step in range(chunks):
        scheduler.step()
        assert running.text.generated == before + step + 1  # one token per step during the long prefill
        assert long.text.generated == (0 if step < chunks - 1 else 2)  # first token after its last chunk
    assert chunks >= 5


def test_pictures_per_row_with_a_routed_multimodal_adapter(folders, tmp_path):
    """Rows of a V2 multimodal adapter carry their own picture (or none) next to a text adapter's rows."""
    from PIL import Image

    from mmadapter.serve.chat import visual_prompt_for

    base, saved = folders
    model = build_tiny_llama()
    vision = {"clip_model": "mmadapter-tiny-vit", "visual_width": 32, "visual_depth": 1, "visual_heads": 2}
    attach_adapter(model, make_config("llama-adapter-v2", prompt_length=3, **vision))
    perturb_adapter(model)
    with torch.no_grad():  # wide-open gates, so the picture matters
        for name, param in model.named_parameters():
            if name.endswith("adapter_gate"):
                param.fill_(3.0)
    folder = save_adapter(model, tmp_path / "vis", prompt_template="alpaca")
    served = load_served_models(base, {"vis": folder, "v1": saved["v1"]}, device="cpu")
    alone = load_served_model(base, folder, device="cpu", merge=False)
    generator = torch.Generator().manual_seed(0)
    pictures = [
        Image.fromarray(torch.randint(0, 255, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(2)
    ]
    ids = served.engine.encode(PROMPTS[0])
    prompts = [visual_prompt_for(served.variant("vis"), picture) for picture in [*pictures, None]]
    requests = [GenerationRequest(ids, GREEDY, "vis", visual_prompt=prompt) for prompt in prompts]
    batched = run(served.engine, [*requests, GenerationRequest(ids, GREEDY, "v1")])
    expected = []  # (tokens, logits) of the adapter alone with each picture
    for picture in [*pictures, None]:
        prompt = visual_prompt_for(alone.variant(None), picture)
        inputs = {} if prompt is None else {"adapter_visual_prompt": prompt}
        with torch.no_grad():
            logits = alone.model(torch.tensor([ids]), **inputs).logits[0]
        expected.append((alone.engine.generate([ids], GREEDY, inputs)[0].token_ids, logits))
    assert batched[:3] == [tokens for tokens, _ in expected]
    # Logits of the three rows in one routed forward, each against the adapter alone with its own picture.
    routing = RowRouting.build(["vis", "vis", "vis", "v1"], [1.0] * 4, torch.device("cpu"), [*prompts, None])
    with torch.no_grad(), routed(routing):
        logits = served.model(torch.tensor([ids] * 4)).logits
    for row, (_, reference) in enumerate(expected):
        torch.testing.assert_close(logits[row], reference, atol=1e-5, rtol=1e-5)
    assert (expected[0][1] - expected[1][1]).abs().max() > 1e-3  # the two pictures do change the logits
