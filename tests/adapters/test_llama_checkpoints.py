"""LLaMA in Meta's layout, the released V1 adapter file, and `mmadapter info` / `convert`."""

from __future__ import annotations

import json

import pytest
import torch

from mmadapter.adapters import attach_adapter, load_adapter, load_base_model, make_config
from mmadapter.adapters.backbones.loading import load_tokenizer
from mmadapter.adapters.io.official_v1 import convert_official_v1
from mmadapter.cli.main import main as cli

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12], [8, 8, 61, 200, 4, 33, 19, 250]])


def to_meta_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF -> Meta row order (the inverse of the loader's permutation), written independently."""
    out, d = weight.shape[0], weight.shape[0] // num_heads
    return weight.view(num_heads, 2, d // 2, -1).transpose(1, 2).reshape(out, -1)


def write_meta_checkpoint(model, folder, shards: int) -> None:
    """Save `model` as Meta's consolidated.NN.pth model-parallel shards + params.json."""
    cfg = model.config
    folder.mkdir()
    state = {
        "tok_embeddings.weight": (model.model.embed_tokens.weight, 1),
        "norm.weight": (model.model.norm.weight, None),
        "output.weight": (model.lm_head.weight, 0),
    }
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        state |= {
            f"layers.{i}.attention.wq.weight": (to_meta_rows(a.q_proj.weight, cfg.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (to_meta_rows(a.k_proj.weight, cfg.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (a.v_proj.weight, 0),
            f"layers.{i}.attention.wo.weight": (a.o_proj.weight, 1),
            f"layers.{i}.feed_forward.w1.weight": (m.gate_proj.weight, 0),
            f"layers.{i}.feed_forward.w3.weight": (m.up_proj.weight, 0),
            f"layers.{i}.feed_forward.w2.weight": (m.down_proj.weight, 1),
            f"layers.{i}.attention_norm.weight": (layer.input_layernorm.weight, None),
            f"layers.{i}.ffn_norm.weight": (layer.post_attention_layernorm.weight, None),
        }
    for shard in range(shards):
        part = {k: (t if dim is None else t.chunk(shards, dim=dim)[shard]).clone() for k, (t, dim) in state.items()}
        torch.save(part, folder / f"consolidated.{shard:02d}.pth")
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": -1,
        "norm_eps": cfg.rms_norm_eps,
        "multiple_of": 32,
        "ffn_dim_multiplier": cfg.intermediate_size / int(8 * cfg.hidden_size / 3),
    }
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("gqa", [False, True])
def test_meta_layout_loads_with_the_same_logits(tiny_llama, tmp_path, shards, gqa):
    model = tiny_llama(gqa=gqa)
    write_meta_checkpoint(model, tmp_path / "meta", shards)
    loaded = load_base_model(tmp_path / "meta")
    assert loaded.config.intermediate_size == model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_a_meta_folder_missing_a_tensor_is_an_error_naming_it(tiny_llama, tmp_path):
    write_meta_checkpoint(tiny_llama(), tmp_path / "meta", shards=1)
    state = torch.load(tmp_path / "meta/consolidated.00.pth", weights_only=True)
    del state["layers.1.ffn_norm.weight"]
    torch.save(state, tmp_path / "meta/consolidated.00.pth")
    with pytest.raises(ValueError, match=r"weights do not fit its params.json: 1 missing \(e.g. model.layers.1.post"):
        load_base_model(tmp_path / "meta")


def test_convert_meta_llama_writes_a_hf_folder(tiny_llama, tmp_path):
    model = tiny_llama()
    write_meta_checkpoint(model, tmp_path / "meta", shards=2)
    assert cli(["convert", "meta-llama", str(tmp_path / "meta"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    for attn in ("sdpa", "eager"):
        loaded = load_base_model(tmp_path / "hf", attn_implementation=attn)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-6, rtol=1e-6)


def test_hf_folder_loads_in_half_precision(tiny_llama, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf")
    for dtype in (torch.bfloat16, torch.float16):
        model = load_base_model(tmp_path / "hf", dtype=dtype)
        assert model.dtype == dtype and not any(p.requires_grad for p in model.parameters())


def test_a_folder_named_like_a_preset_is_the_folder(tiny_llama, tmp_path, monkeypatch):
    """`./llama-7b` holding downloaded weights must load them, not the preset's random ones (or 7B of them)."""
    saved = tiny_llama()
    saved.save_pretrained(tmp_path / "llama-7b")
    monkeypatch.chdir(tmp_path)
    from mmadapter.adapters.backbones.loading import read_base_config

    assert read_base_config("llama-7b").hidden_size == saved.config.hidden_size != 4096
    loaded = load_base_model("llama-7b")
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values(), strict=True)
    )
    monkeypatch.chdir(tmp_path / "llama-7b")  # elsewhere the name is the preset again
    assert read_base_config("llama-7b").hidden_size == 4096
    (tmp_path / "llama-7b" / "llama-7b").write_text("a file, not a model folder")  # a file does not hide it
    assert read_base_config("llama-7b").hidden_size == 4096


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preset"):
        load_base_model(tmp_path / "nowhere")


def test_a_broken_model_folder_is_an_error_naming_the_file_and_what_to_do(tiny_llama, tmp_path):
    folder = tmp_path / "hf"
    tiny_llama().save_pretrained(folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:100])  # a download cut short
    with pytest.raises(ValueError, match=f"{folder}: a safetensors weights file is damaged or incomplete"):
        load_base_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"a config.json but no weights \(\*.safetensors, pytorch_model\*.bin\)"
    ):
        load_base_model(folder)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json: invalid JSON \(Expecting"):
        load_base_model(folder)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer here"):
        load_tokenizer(tmp_path)


# --- the released V1 file ----------------------------------------------------------------------


def official_v1_state(num_layers, adapted, length, dim, heads, scalar_gates=False):
    """A file in the layout of llama_adapter_len10_layer30_release.pth (spec §1.4)."""
    torch.manual_seed(3)
    state = {"adapter_query.weight": torch.randn(adapted * length, dim)}
    for layer in range(num_layers):
        shape = (1,) if scalar_gates else (1, heads, 1, 1)
        gate = torch.zeros(shape) if layer < num_layers - adapted else 0.3 * torch.randn(shape)
        state[f"layers.{layer}.attention.gate"] = gate
    return state


@pytest.mark.parametrize("scalar_gates", [False, True])
def test_official_v1_import_maps_rows_to_the_top_layers(tiny_llama, tmp_path, scalar_gates):
    model = tiny_llama()
    state = official_v1_state(4, adapted=3, length=2, dim=64, heads=4, scalar_gates=scalar_gates)
    path = tmp_path / "llama_adapter_len2_layer3_release.pth"
    torch.save(state, path)
    assert (
        cli(
            ["convert", "official-v1", str(path), str(tmp_path / "out"), "--base", "tiny-llama", "--prompt-length", "2"]
        )
        == 0
    )
    load_adapter(model, tmp_path / "out")
    # the preset it was converted for is its recorded base (cards name it; chat/serve may leave out --base)
    assert json.loads((tmp_path / "out/mmadapter_config.json").read_text())["base"]["name_or_path"] == "tiny-llama"
    layers = model.model.layers
    assert not hasattr(layers[0].self_attn, "adapter_prompt")
    for i, layer in enumerate((1, 2, 3)):  # prompt rows [2i, 2i+2) belong to block N - L + i
        attn = layers[layer].self_attn
        assert torch.equal(attn.adapter_prompt, state["adapter_query.weight"][2 * i : 2 * i + 2])
        assert torch.equal(attn.adapter_gate, state[f"layers.{layer}.attention.gate"].reshape(-1).expand(4))
    assert model.adapter_config.gate_tanh


def test_official_v1_import_rejects_a_wrong_prompt_length():
    state = official_v1_state(4, adapted=3, length=2, dim=64, heads=4)
    with pytest.raises(ValueError, match="not a multiple of prompt_length=4"):
        convert_official_v1(state, num_heads=4, prompt_length=4)
    with pytest.raises(ValueError, match="not a LLaMA-Adapter V1 file"):
        convert_official_v1({"foo": torch.zeros(1)}, num_heads=4)


# --- mmadapter info ----------------------------------------------------------------------------


def test_info_counts_v1_on_llama_7b_from_the_meta_device(capsys):
    assert cli(["info", "--base", "llama-7b", "--method", "llama-adapter-v1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 300 * 4096 + 30 * 32 == 1_229_760
    assert report["total_params"] == 6_738_415_616 + report["trainable_params"]  # LLaMA-7B has 6.74B weights
    assert report["method"] == "llama-adapter-v1" and report["base"] == "llama-7b"
    assert report["trainable_fraction"] == pytest.approx(report["trainable_params"] / report["total_params"])


def test_info_reports_bad_options_without_a_traceback(capsys):
    assert cli(["info", "--base", "llama-7b", "--method", "llama-adapter-v1", "--stage", "caption"]) == 2
    assert "has no training stage 'caption'" in capsys.readouterr().err
    assert cli(["info", "--base", "llama-7b", "--method", "no-such-method"]) == 2
    assert "unknown adapter method" in capsys.readouterr().err


def test_attach_twice_is_refused(tiny_llama):
    model = attach_adapter(tiny_llama(), make_config("llama-adapter-v1", adapted_layers=1))
    with pytest.raises(ValueError, match="already carries an adapter"):
        attach_adapter(model, make_config("llama-adapter-v1", adapted_layers=1))


def test_info_reads_the_shape_of_a_model_folder(tiny_llama, tmp_path, capsys):
    tiny_llama(gqa=True).save_pretrained(tmp_path / "hf")
    assert (
        cli(
            [
                "info",
                "--base",
                str(tmp_path / "hf"),
                "--method",
                "llama-adapter-v1",
                "--set",
                "adapted_layers=2",
                "--set",
                "prompt_length=5",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 2 * 5 * 64 + 2 * 4  # prompts (L*K*D) + one gate per query head
