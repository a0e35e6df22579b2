"""Hub sharing against a hub-compatible server on 127.0.0.1, driven by the real huggingface_hub client.

What is checked: the server receives the exact adapter bytes and a model card with the right
metadata in one commit; loading by repo id gives identical logits and works again from the cache
offline; broken folders fail before any request; the token is used but never printed or logged;
pickled weights are never loaded from the hub; official checkpoints convert and push; peft loads a
LoRA folder downloaded from the hub.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load as load_safetensors

from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from mmadapter.adapters.io.hub import download_adapter, from_pretrained, plan_push, push_to_hub, save_pretrained
from mmadapter.adapters.io.model_card import LOSS_CURVE_FILE, TRAINING_SUMMARY_FILE
from mmadapter.adapters.methods.base import adapter_state_dict, attach_adapter, make_config, trainable_parameters
from mmadapter.cli.main import main
from tests.helpers.fake_hub import FakeHub

TOKEN = "hf_mmadapterTestSECRET0123456789abcdef"
REPO = "yourname/tiny-llama-adapter-v1"
BASE_ID = "yourname/tiny-llama-base"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Isolate huggingface_hub from this machine: cache in tmp, no stored token, online, no telemetry."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub(hub_env, monkeypatch):
    """A fake hub that wants TOKEN for writes; the client finds it through HF_ENDPOINT and HF_TOKEN."""
    with FakeHub(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def adapted(tiny_llama, method: str = "llama-adapter-v1", seed: int = 1, **options):
    """A tiny LLaMA with an adapter whose weights are all random, so it changes the logits."""
    model = tiny_llama()
    options = options or {"adapted_layers": 2, "prompt_length": 3}
    attach_adapter(model, make_config(method, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 42, 99, 7, 200, 3, 64]])
    with torch.no_grad():
        return model(ids).logits


def resolved_files(hub: FakeHub) -> set[str]:
    """Files the client downloaded (GET on /resolve/)."""
    return {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}


def test_push_sends_exact_bytes_and_a_model_card_in_one_commit(hub, tiny_llama, tmp_path):
    model = adapted(tiny_llama)
    folder = save_pretrained(
        model, tmp_path / "adapter", prompt_template="alpaca", base_model=BASE_ID, license="apache-2.0"
    )
    (folder / "optimizer.pt").write_bytes(b"not for publishing")
    (folder / "data.json").write_text("[]")

    info = push_to_hub(folder, REPO)

    files = hub.files(REPO)
    assert set(files) == {".gitattributes", WEIGHTS_FILE, CONFIG_FILE, "README.md"}
    assert files[WEIGHTS_FILE] == (folder / WEIGHTS_FILE).read_bytes()
    assert files[CONFIG_FILE] == (folder / CONFIG_FILE).read_bytes()
    received = load_safetensors(files[WEIGHTS_FILE])
    expected = adapter_state_dict(model)
    assert received.keys() == expected.keys() and all(torch.equal(received[k], expected[k]) for k in expected)

    card = ModelCard(files["README.md"].decode())
    metadata = card.data.to_dict()
    assert metadata["base_model"] == BASE_ID
    assert metadata["library_name"] == "mmadapter"
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"mmadapter", "llama-adapter-v1", f"base_model:adapter:{BASE_ID}"} <= set(metadata["tags"])
    trained = sum(t.numel() for t in expected.values())
    assert f"**{trained:,} trained parameters**" in card.text
    assert f'from_pretrained(base, "{REPO}")' in card.text
    assert "`alpaca` template" in card.text

    commits = hub.commits(REPO)
    assert len(commits) == 2 and commits[-1].oid == info.oid  # the repo's initial commit, then ours
    assert commits[-1].message == "Upload llama-adapter-v1 adapter (mmadapter)"
    paths = [r.path for r in hub.requests]
    assert paths == [
        f"/api/models/{REPO}",  # does it exist?
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_from_pretrained_by_repo_id_gives_identical_logits_and_works_offline(hub, tiny_llama, monkeypatch):
    model = adapted(tiny_llama)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_llama()))  # the adapter really changes the output
    push_to_hub(model, REPO, base_model=BASE_ID)  # straight from the model object

    assert torch.equal(logits(from_pretrained(tiny_llama(), REPO)), expected)
    assert resolved_files(hub) == {WEIGHTS_FILE, CONFIG_FILE}  # the card is not downloaded

    hub.stop()
    sent = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(logits(from_pretrained(tiny_llama(), REPO)), expected)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # Not marked offline, but the hub is gone: huggingface_hub falls back to the cached snapshot.
    assert torch.equal(logits(from_pretrained(tiny_llama(), REPO)), expected)
    assert len(hub.requests) == sent
    # A base given by name (a preset here) is loaded first; the adapter's tensors are the pushed ones.
    named = from_pretrained("tiny-llama", REPO)
    assert all(torch.equal(named.get_parameter(k), v) for k, v in adapter_state_dict(model).items())


def test_branch_and_private_repo(hub, tiny_llama, tmp_path, monkeypatch):
    model = adapted(tiny_llama)
    folder = save_pretrained(model, tmp_path / "adapter")
    push_to_hub(folder, REPO, private=True, revision="v1", commit_message="first version")

    assert hub.repos[REPO].private
    assert WEIGHTS_FILE not in hub.files(REPO, "main") and WEIGHTS_FILE in hub.files(REPO, "v1")
    assert hub.commits(REPO)[-1].message == "first version"
    assert torch.equal(logits(from_pretrained(tiny_llama(), REPO, revision="v1")), logits(model))
    with pytest.raises(FileNotFoundError, match="no revision 'v2'"):
        from_pretrained(tiny_llama(), REPO, revision="v2")

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(FileNotFoundError, match="private"):
        from_pretrained(tiny_llama(), REPO, revision="v1", cache_dir=tmp_path / "empty-cache")
    with pytest.raises(FileNotFoundError, match="offline mode"):
        from_pretrained(tiny_llama(), REPO, cache_dir=tmp_path / "empty-cache", local_files_only=True)


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.text = io.StringIO()

    def emit(self, record):
        self.text.write(self.format(record) + "\n")


@pytest.fixture
def all_logs():
    """Every log record of every library at DEBUG, formatted, while the test runs."""
    handler = _LogCapture()
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("httpx2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield handler.text
    logging.getLogger().removeHandler(handler)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def test_cli_push_uses_the_token_but_never_shows_it(hub, tiny_llama, tmp_path, capfd, all_logs, monkeypatch):
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter")

    assert main(["push", str(folder), REPO, "--json", "--commit-message", "from the CLI"]) == 0
    out, err = capfd.readouterr()
    report = json.loads(out)
    assert report["commit_url"].startswith(hub.url) and report["files"][-1] == "README.md"
    assert hub.commits(REPO)[-1].message == "from the CLI"
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)  # it was used

    wrong = "hf_wrongTokenSECRET987654321"
    monkeypatch.setenv("OTHER_TOKEN", wrong)
    assert main(["push", str(folder), REPO, "--token-env", "OTHER_TOKEN"]) == 2  # the hub answers 401
    failed_out, failed_err = capfd.readouterr()
    assert f"error: push to {REPO}" in failed_err and "401" in failed_err
    assert main(["push", str(folder), REPO, "--token-env", "UNSET_TOKEN_VARIABLE"]) == 2
    unset_out, unset_err = capfd.readouterr()
    assert "UNSET_TOKEN_VARIABLE" in unset_err

    logs = all_logs.getvalue()
    assert "/api/repos/create (authenticated: True)" in logs  # the client's debug log saw the pushes
    for secret in (TOKEN, wrong):
        for text in (out, err, failed_out, failed_err, unset_out, unset_err, logs):
            assert secret not in text


def test_cli_endpoint_option_and_dry_run(hub, tiny_llama, tmp_path, capsys, monkeypatch):
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: --endpoint must win

    assert main(["push", str(folder), REPO, "--dry-run", "--base-model", BASE_ID]) == 0
    shown = capsys.readouterr().out
    assert "would upload 3 files" in shown and f"base_model: {BASE_ID}" in shown
    assert hub.requests == []

    assert main(["push", str(folder), REPO, "--endpoint", hub.url]) == 0
    assert REPO in capsys.readouterr().out and WEIGHTS_FILE in hub.files(REPO)


def _edit_config(folder, change):
    document = json.loads((folder / CONFIG_FILE).read_text())
    change(document)
    (folder / CONFIG_FILE).write_text(json.dumps(document))


BROKEN_FOLDERS = {
    "empty": (lambda f: [p.unlink() for p in f.iterdir()], "empty"),
    "no config": (lambda f: (f / CONFIG_FILE).unlink(), CONFIG_FILE),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), f"no {WEIGHTS_FILE}"),
    "pickled weights": (lambda f: (f / WEIGHTS_FILE).rename(f / "adapter_model.bin"), r"adapter_model\.bin"),
    "corrupt weights": (lambda f: (f / WEIGHTS_FILE).write_bytes(b"\0" * 16), "safetensors"),
    "invalid json": (lambda f: (f / CONFIG_FILE).write_text("{"), "invalid JSON"),
    "unknown field": (lambda f: _edit_config(f, lambda d: d["adapter"].update(rank=3)), "unknown.*rank"),
    "more layers than saved": (lambda f: _edit_config(f, lambda d: d["adapter"].update(adapted_layers=3)), "missing"),
    "other prompt length": (lambda f: _edit_config(f, lambda d: d["adapter"].update(prompt_length=4)), "shape"),
    "claims another base": (
        lambda f: _edit_config(f, lambda d: d["base"].update(name_or_path="llama-7b")),
        "names base 'llama-7b'.*hidden_size",
    ),
    "base shape edited": (
        lambda f: _edit_config(f, lambda d: d["base"]["shape"].update(hidden_size=128)),
        "hidden_size",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_broken_folders_fail_before_any_request(case, hub, tiny_llama, tmp_path):
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter")
    (folder / "README.md").unlink()
    breaks, message = BROKEN_FOLDERS[case]
    breaks(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        push_to_hub(folder, REPO)
    assert hub.requests == []


def test_cli_refuses_empty_folder_and_missing_token(hub, tiny_llama, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), REPO]) == 2
    assert "empty" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter")
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_to_hub(folder, REPO)
    assert hub.requests == []


def test_pickled_weights_on_the_hub_are_never_loaded(hub, tiny_llama, tmp_path):
    model = adapted(tiny_llama)
    folder = save_pretrained(model, tmp_path / "adapter")
    pickled = io.BytesIO()
    torch.save(adapter_state_dict(model), pickled)
    hub.seed(
        "yourname/old-adapter",
        {CONFIG_FILE: (folder / CONFIG_FILE).read_bytes(), "adapter_model.bin": pickled.getvalue()},
    )

    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin.*safetensors only"):
        from_pretrained(tiny_llama(), "yourname/old-adapter")
    assert "adapter_model.bin" not in resolved_files(hub)


def test_card_reports_the_training_record_and_uploads_it(hub_env, tiny_llama, tmp_path):
    recipe = {"name": "v1-alpaca", "stages": [{"name": "instruction", "train": {"lr": 0.009, "epochs": 5}}]}
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter", training=recipe)
    summary = {  # the shape mmadapter.train writes: totals, then each stage with its long history
        "recipe": "v1-alpaca",
        "final_loss": 1.2345,
        "adapter": {"method": "llama-adapter-v1"},
        "stages": [{"stage": "instruction", "best_eval_loss": 1.5, "history": [{"step": 1, "loss": 2.0}] * 50}],
    }
    (folder / TRAINING_SUMMARY_FILE).write_text(json.dumps(summary))
    (folder / LOSS_CURVE_FILE).write_bytes(b"\x89PNG fake")

    plan = plan_push(folder, REPO)

    assert plan.files == [WEIGHTS_FILE, CONFIG_FILE, TRAINING_SUMMARY_FILE, LOSS_CURVE_FILE]
    text = plan.card.text
    for row in (
        "| stages.instruction.train.lr | 0.009 |",  # recipe
        "| final_loss | 1.2345 |",  # results
        "| stages.instruction.best_eval_loss | 1.5 |",
    ):
        assert row in text
    assert "history" not in text and "| adapter.method" not in text  # left to the JSON file
    assert f"![loss curve]({LOSS_CURVE_FILE})" in text


def test_training_loop_file_names_match():
    from mmadapter.train.reporting import CURVE_FILE, SUMMARY_FILE

    assert (SUMMARY_FILE, CURVE_FILE) == (TRAINING_SUMMARY_FILE, LOSS_CURVE_FILE)


def test_official_v1_checkpoint_converts_then_pushes(hub, tiny_llama, tmp_path, capsys):
    """The released V1 layout (adapter_query + per-layer gates), written for the tiny base, end to end."""
    generator = torch.Generator().manual_seed(3)
    official = {"adapter_query.weight": torch.randn(2 * 3, 64, generator=generator)}
    official.update({f"layers.{i}.attention.gate": torch.randn(1, 4, 1, 1, generator=generator) for i in range(4)})
    torch.save(official, tmp_path / "release.pth")
    converted = tmp_path / "converted"
    convert = ["convert", "official-v1", str(tmp_path / "release.pth"), str(converted), "--base", "tiny-llama"]
    assert main([*convert, "--prompt-length", "3"]) == 0
    assert main(["push", str(converted), REPO, "--base-model", BASE_ID, "--license", "gpl-3.0"]) == 0

    model = from_pretrained(tiny_llama(), REPO)
    layers = model.model.layers
    assert torch.equal(layers[2].self_attn.adapter_prompt, official["adapter_query.weight"][:3])
    assert torch.equal(layers[3].self_attn.adapter_prompt, official["adapter_query.weight"][3:])
    assert torch.equal(layers[3].self_attn.adapter_gate, official["layers.3.attention.gate"].reshape(4))
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert card.data.base_model == BASE_ID and card.data.license == "gpl-3.0"


def test_lora_from_the_hub_loads_in_peft(hub, tiny_llama, tmp_path):
    from peft import PeftModel

    model = adapted(tiny_llama, "lora", r=4, target_modules=["q_proj", "v_proj"])
    expected = logits(model)
    folder = save_pretrained(model, tmp_path / "adapter", base_model=BASE_ID)
    push_to_hub(folder, "yourname/tiny-llama-lora")

    downloaded = download_adapter("yourname/tiny-llama-lora")
    assert json.loads((downloaded / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(downloaded)).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-6)
    assert torch.equal(logits(from_pretrained(tiny_llama(), "yourname/tiny-llama-lora")), expected)

    card = ModelCard(hub.files("yourname/tiny-llama-lora")["README.md"].decode())
    assert {"lora", "peft", "mmadapter"} <= set(card.data.tags) and card.data.library_name == "mmadapter"
    assert 'PeftModel.from_pretrained(base, "yourname/tiny-llama-lora")' in card.text


def test_ptuning_v2_round_trip_through_the_hub(hub, tiny_llama, tmp_path):
    model = adapted(tiny_llama, "ptuning-v2", pre_seq_len=4, prefix_dropout=0.0)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_llama()))
    push_to_hub(model, "yourname/tiny-llama-ptuning")
    assert torch.equal(logits(from_pretrained(tiny_llama(), "yourname/tiny-llama-ptuning")), expected)


def test_include_adds_files_but_never_pickles(hub_env, tiny_llama, tmp_path):
    folder = save_pretrained(adapted(tiny_llama), tmp_path / "adapter")
    (folder / "recipe.yaml").write_text("lr: 0.009\n")
    (folder / "optimizer.pt").write_bytes(b"pickle")

    assert plan_push(folder, REPO, include=["*.yaml"]).files == [WEIGHTS_FILE, CONFIG_FILE, "recipe.yaml"]
    with pytest.raises(ValueError, match=r"pickled files \['optimizer\.pt'\]"):
        plan_push(folder, REPO, include=["*.pt"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        plan_push(folder, REPO, include=["*.png"])
    own_card = tmp_path / "card.md"
    own_card.write_text("---\nlicense: mit\n---\n\n# My adapter\n")
    assert str(plan_push(folder, REPO, model_card=own_card).card) == own_card.read_text()


def test_multimodal_v2_through_the_hub(hub, tiny_llama):
    """A V2 adapter with its visual projector: image-text-to-text card, identical logits for an image."""
    from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt

    tiny_v2 = {"prompt_length": 4, "first_adapted_layer": 2, "clip_model": "mmadapter-tiny-vit", "visual_width": 32}
    model = adapted(tiny_llama, "llama-adapter-v2", **tiny_v2, visual_depth=1, visual_heads=2)
    size = model.vision_encoder.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 17, 42, 99]])
    with torch.no_grad():
        expected = model(ids, adapter_visual_prompt=visual_prompt(model, pixels)).logits
    push_to_hub(model, "yourname/tiny-llama-adapter-v2", base_model=BASE_ID)

    card = ModelCard(hub.files("yourname/tiny-llama-adapter-v2")["README.md"].decode())
    assert card.data.pipeline_tag == "image-text-to-text" and "llama-adapter-v2" in card.data.tags
    loaded = from_pretrained(tiny_llama(), "yourname/tiny-llama-adapter-v2")
    with torch.no_grad():
        assert torch.equal(loaded(ids, adapter_visual_prompt=visual_prompt(loaded, pixels)).logits, expected)


def test_official_ptuning_checkpoint_converts_then_pushes(hub, tmp_path):
    """ChatGLM's official P-Tuning v2 `pytorch_model.bin` (prefix encoder only), converted, pushed, loaded."""
    from mmadapter.adapters.backbones.presets import base_config, build_base_model
    from mmadapter.adapters.methods.ptuning_v2 import prefix_encoder_of

    config = base_config("tiny-chatglm")
    embedding = torch.randn(4, config.num_layers * 2 * config.hidden_size, generator=torch.Generator().manual_seed(5))
    (tmp_path / "official").mkdir()
    torch.save({"transformer.prefix_encoder.embedding.weight": embedding}, tmp_path / "official" / "pytorch_model.bin")
    converted = tmp_path / "converted"
    assert (
        main(["convert", "official-ptuning", str(tmp_path / "official"), str(converted), "--base", "tiny-chatglm"]) == 0
    )
    assert main(["push", str(converted), "yourname/tiny-chatglm-ptuning", "--base-model", "THUDM/chatglm-6b"]) == 0

    model = from_pretrained(build_base_model(config), "yourname/tiny-chatglm-ptuning")
    assert torch.equal(prefix_encoder_of(model).embedding.weight, embedding)
    card = ModelCard(hub.files("yourname/tiny-chatglm-ptuning")["README.md"].decode())
    assert card.data.base_model == "THUDM/chatglm-6b" and "ptuning-v2" in card.data.tags
    assert "`chatglm` template" in card.text


def test_a_mistyped_folder_that_looks_like_a_repo_id_says_so_first(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^runs/lora-adaptr: no such adapter folder, and not in the local hub"):
        download_adapter("runs/lora-adaptr", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"^org/adapter: not in the local hub cache"):  # no org/ here
        download_adapter("org/adapter", cache_dir=tmp_path / "cache", local_files_only=True)
