"""Exporting an adapter as a standalone model (`mmadapter.adapters.io.export`).

What folds is written as a plain transformers model that, loaded in a process that never imports mmadapter,
gives the adapted model's logits (within 2e-5 in float32) and greedy tokens; the folded tensors equal an
independent computation (peft's own merge_and_unload for LoRA, the V2 formulas written out here, and the
bfloat16 rounding done once). What cannot fold is refused before the base loads, each with its reason and
what to do instead. OUTPUT is written atomically and never overwritten unasked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mmadapter.adapters import attach_adapter, load_base_model, make_config, save_adapter
from mmadapter.adapters.io.export import export_model, plan_export
from mmadapter.adapters.io.exported_model import RECORD_FILE, inspect_exported_folder
from tests.helpers.chat_tokenizer import CHATML_TEMPLATE
from tests.helpers.llama_v2_setup import tiny_v2_config
from tests.helpers.perturb import perturb_adapter
from tests.helpers.tiny_families import build_tiny_family
from tests.helpers.tiny_llama import IDS, build_tiny_llama
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer

GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2}
ALL_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
#: name -> (family, method, preset, options): every kind of term that folds, on every family that holds it.
CASES = {
    "lora-llama": ("llama", "lora", None, {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "chat65b-llama": ("llama", "llama-adapter-v2", "chat65b", {}),
    # Output-side scales, biases on two linears only (the others get zero biases), LoRA on the scaled linears.
    "v2-output-lora-llama": (
        "llama",
        "llama-adapter-v2",
        "chat65b",
        {"bias_linears": ["q", "o"], "scale_side": "output", "lora_rank": 2, "lora_linears": ["q", "v"]}
        | {"instruction_trains": ["bias", "scale", "norms", "lora"]},
    ),
    # Qwen2's own q/k/v biases plus the adapter's, and tied embeddings; Qwen3's attention_bias switch.
    "v2-qwen2": ("qwen2", "llama-adapter-v2", "chat65b", {"bias_linears": ["q", "k", "v"]}),
    "v2-qwen3": ("qwen3", "llama-adapter-v2", "chat65b", {"bias_linears": ["q", "k", "v", "o"]}),
    "lora-mistral": ("mistral", "lora", None, {}),
}

#: Runs with every `mmadapter` import refused: plain transformers must load the folders on its own.
PLAIN_TRANSFORMERS = """
import sys
class NoMmadapter:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mmadapter":
            raise ImportError("mmadapter import reached")
sys.meta_path.insert(0, NoMmadapter())
import json, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
ids = torch.tensor(json.loads(sys.argv[1]))
greedy = json.loads(sys.argv[2])
results = {}
for name, folder in json.loads(sys.argv[4]).items():
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        results[name + ".logits"] = model(ids).logits
        results[name + ".tokens"] = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
        results[name + ".dtype"] = torch.zeros(1, dtype=next(model.parameters()).dtype)
save_file(results, sys.argv[3])
"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (two spin-wait for each other on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_base(model, folder: Path) -> Path:
    """A local Hugging Face base folder: weights, config and the tiny tokenizer."""
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    folders = {"llama": save_base(build_tiny_llama(), root / "llama")}
    for family in ("mistral", "qwen2", "qwen3"):
        folders[family] = save_base(build_tiny_family(family), root / family)
    return folders


def trained_adapter(base: Path, folder: Path, method: str, preset: str | None = None, **options):
    """The base with a perturbed (as if trained) adapter, saved to `folder`; the unmerged model is returned."""
    model = load_base_model(base)
    attach_adapter(model, make_config(method, preset, **options))
    perturb_adapter(model)
    save_adapter(model, folder, prompt_template="alpaca")
    return model.eval()


@pytest.fixture(scope="module")
def exports(bases, tmp_path_factory) -> dict[str, dict]:
    """Every case exported in float32, with the adapted (unmerged) model's logits and greedy tokens."""
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for name, (family, method, preset, options) in CASES.items():
        adapted = trained_adapter(bases[family], root / f"{name}-adapter", method, preset, **options)
        plan = plan_export(bases[family], root / f"{name}-adapter", dtype="fp32")
        export_model(plan, root / name)
        with torch.no_grad():
            logits = adapted(IDS).logits
            tokens = adapted.generate(IDS, attention_mask=torch.ones_like(IDS), **GREEDY)
        results[name] = {"folder": root / name, "adapter": root / f"{name}-adapter", "plan": plan}
        results[name] |= {"logits": logits, "tokens": tokens, "base": bases[family]}
    return results


@pytest.mark.slow
def test_exports_load_in_plain_transformers_and_equal_the_adapted_model(exports, tmp_path):
    folders = {name: str(case["folder"]) for name, case in exports.items()}
    out = tmp_path / "plain.safetensors"
    arguments = [json.dumps(IDS.tolist()), json.dumps(GREEDY), str(out), json.dumps(folders)]
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, *arguments], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = load_file(out)
    for name, case in exports.items():
        assert plain[f"{name}.dtype"].dtype == torch.float32
        difference = (plain[f"{name}.logits"] - case["logits"]).abs().max().item()
        assert difference < 2e-5, f"{name}: logits differ by {difference}"
        assert torch.equal(plain[f"{name}.tokens"], case["tokens"]), name


def test_the_adapters_change_the_model(exports):
    """Otherwise the export tests would compare a base with itself."""
    for name, case in exports.items():
        base = load_base_model(case["base"])
        with torch.no_grad():
            assert (base(IDS).logits - case["logits"]).abs().max() > 0.05, name


def test_lora_export_equals_peft_merge_and_unload(exports):
    case = exports["lora-llama"]
    merged = PeftModel.from_pretrained(load_base_model(case["base"]), case["adapter"]).merge_and_unload()
    exported = load_file(case["folder"] / "model.safetensors")
    expected = merged.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[key], expected[key]) for key in expected)


def _folded_reference(
    base: dict, adapter: dict, layer: int, short: str, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one linear by the formulas, in float64: input side W·diag(s), b; output side diag(s)·W,
    s ⊙ b; plus B·A where LoRA (alpha = r) adapts it. A linear without a trained bias has bias zero."""
    path = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    path |= {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    prefix = f"model.layers.{layer}.{path[short]}"
    weight = base[f"{prefix}.weight"].double()
    scale = adapter[f"{prefix}.adapter_scale"].double()
    bias = adapter.get(f"{prefix}.adapter_bias", torch.zeros(weight.shape[0])).double()
    if side == "input":
        weight = weight * scale[None, :]
    else:
        weight, bias = scale[:, None] * weight, scale * bias
    lora = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
    if lora[0] in adapter:
        weight = weight + adapter[lora[1]].double() @ adapter[lora[0]].double()
    return weight, bias


@pytest.mark.parametrize(("name", "side"), [("chat65b-llama", "input"), ("v2-output-lora-llama", "output")])
def test_v2_export_holds_the_folded_terms_as_the_formulas_say(exports, name, side):
    case = exports[name]
    base = load_file(case["base"] / "model.safetensors")
    adapter = {
        key.replace(".base_layer.", "."): tensor
        for key, tensor in load_file(case["adapter"] / "adapter_model.safetensors").items()
    }
    exported = load_file(case["folder"] / "model.safetensors")
    for layer in range(4):
        for short in ALL_LINEARS:
            weight, bias = _folded_reference(base, adapter, layer, short, side)
            name_prefix = f"model.layers.{layer}.{'self_attn' if short in 'qkvo' else 'mlp'}.{short}_proj"
            torch.testing.assert_close(exported[f"{name_prefix}.weight"].double(), weight, rtol=0, atol=1e-6)
            if f"{name_prefix}.bias" in exported:  # the config's switch for this linear is on
                torch.testing.assert_close(exported[f"{name_prefix}.bias"].double(), bias, rtol=0, atol=1e-6)
            else:
                assert short in ("gate", "up", "down") and not bias.any()
        norm = f"model.layers.{layer}.input_layernorm.weight"
        assert torch.equal(exported[norm], adapter[norm]) and not torch.equal(exported[norm], base[norm])
    config = json.loads((case["folder"] / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is (name == "chat65b-llama")


def test_bias_switches_follow_each_family(exports):
    assert exports["chat65b-llama"]["plan"].config_changes == {"attention_bias": True, "mlp_bias": True}
    assert exports["v2-qwen2"]["plan"].config_changes == {}  # Qwen2's q/k/v always have biases
    assert exports["v2-qwen3"]["plan"].config_changes == {"attention_bias": True}
    qwen2 = json.loads((exports["v2-qwen2"]["folder"] / "config.json").read_text())
    assert qwen2["model_type"] == "qwen2" and qwen2["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(exports["v2-qwen2"]["folder"] / "model.safetensors")


def test_the_folder_holds_a_card_a_record_and_the_tokenizer(exports):
    case = exports["chat65b-llama"]
    folder = inspect_exported_folder(case["folder"])
    record = folder.record
    assert record.method == "llama-adapter-v2" and record.dtype == "float32" and record.prompt_template == "alpaca"
    assert sorted(path.name for path in case["folder"].iterdir()) == record.files
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", RECORD_FILE} <= set(record.files)
    card = (case["folder"] / "README.md").read_text()
    assert f"adapter `{case['adapter']}`" in card and f"the base `{case['base']}`" in card
    assert "library_name: transformers" in card and "### Instruction:\n{instruction}\n\n### Response:" in card
    assert "attention_bias=true, mlp_bias=true" in card and "Stop generating at the end-of-sequence token or at" in card


def test_bf16_export_rounds_once_after_folding_in_float32(bases, tmp_path):
    trained_adapter(bases["llama"], tmp_path / "adapter", "llama-adapter-v2", "chat65b")
    export_model(plan_export(bases["llama"], tmp_path / "adapter", dtype="bf16"), tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(bases["llama"] / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q = "model.layers.1.self_attn.q_proj"
    assert {tensor.dtype for tensor in exported.values()} == {torch.bfloat16}
    expected = (base[f"{q}.weight"].bfloat16().float() * adapter[f"{q}.adapter_scale"]).bfloat16()
    assert torch.equal(exported[f"{q}.weight"], expected)
    assert torch.equal(exported[f"{q}.bias"], adapter[f"{q}.adapter_bias"].bfloat16())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_chat_template_adapter_exports_the_template_it_was_trained_on(bases, tmp_path):
    model = load_base_model(bases["llama"])
    attach_adapter(model, make_config("lora"))
    save_adapter(model, tmp_path / "adapter", prompt_template="chat", chat_template=CHATML_TEMPLATE)
    export_model(plan_export(bases["llama"], tmp_path / "adapter"), tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == CHATML_TEMPLATE
    assert inspect_exported_folder(tmp_path / "out").record.tokenizer_chat_template
    assert (
        "tokenizer.apply_chat_template(messages, add_generation_prompt=True)"
        in (tmp_path / "out/README.md").read_text()
    )


# ----------------------------------------------------------------------------------------- what cannot fold


REFUSALS = {
    "v1": (
        "llama",
        "llama-adapter-v1",
        {"adapted_layers": 2, "prompt_length": 3},
        ["cannot export a llama-adapter-v1 adapter", "zero-initialised gates", "Serve it with `mmadapter serve"]
        + ["train a LoRA (adapter.method: lora)"],
    ),
    "v2-prompts": (
        "llama",
        "llama-adapter-v2",
        {"visual_projector": "none", "prompt_length": 3},
        ["its 3 learned prompt tokens per layer", "train without prompts (prompt_length: 0"],
    ),
    "ptuning-v2": (
        "llama",
        "ptuning-v2",
        {"pre_seq_len": 4},
        ["cannot export a ptuning-v2 adapter: its prefixes are 4 extra key/value vectors", "train a LoRA"],
    ),
    "mistral-biases": (
        "mistral",
        "llama-adapter-v2",
        {"preset": "chat65b"},
        ["trains biases on q, k, v, o, gate, up, down, but a mistral model has no bias there"]
        + ["can hold biases on none of them", "whose bias_linears the family can hold"],
    ),
    "qwen2-biases": (
        "qwen2",
        "llama-adapter-v2",
        {"preset": "chat65b"},
        ["trains biases on o, gate, up, down, but a qwen2 model", "can hold biases on q, k, v)"],
    ),
    "qwen3-mlp-biases": (
        "qwen3",
        "llama-adapter-v2",
        {"preset": "chat65b"},
        ["trains biases on gate, up, down, but a qwen3 model", "can hold biases on q, k, v, o)"],
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_what_cannot_fold_is_refused_with_why_and_what_to_do(case, bases, tmp_path):
    family, method, options, fragments = REFUSALS[case]
    folder = tmp_path / "adapter"
    trained_adapter(bases[family], folder, method, **options)
    with pytest.raises(ValueError) as refusal:
        plan_export(bases[family], folder)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(f"{folder}: cannot export")
    assert f"mmadapter serve --base {bases[family]} --adapter {folder}" in message
    for fragment in fragments:
        assert fragment in message


def test_the_visual_path_is_refused(tmp_path):
    model = build_tiny_llama()
    attach_adapter(model, tiny_v2_config())
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"its visual path \(a frozen CLIP encoder and a trained v2 projector") as r:
        plan_export("tiny-llama", tmp_path / "adapter")
    assert "has no counterpart in a text-only llama model" in str(r.value) and "which takes images" in str(r.value)


def test_chatglm_is_refused(tiny_glm, tmp_path):
    model = tiny_glm()
    attach_adapter(model, make_config("lora", "chatglm-qkv"))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="cannot export onto model_type 'chatglm': plain transformers has no model"):
        plan_export("tiny-chatglm", tmp_path / "adapter")


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft's; this is the case
def test_lora_on_tied_embeddings_is_refused_and_nothing_is_written(bases, tmp_path):
    trained_adapter(bases["qwen2"], tmp_path / "adapter", "lora", target_modules=["embed_tokens", "q_proj"])
    plan = plan_export(bases["qwen2"], tmp_path / "adapter")
    with pytest.raises(
        ValueError, match=r"LoRA adapts model.embed_tokens.weight, which this qwen2 model ties to lm_head.weight \(tie"
    ):
        export_model(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- OUTPUT


@pytest.fixture
def lora_plan(bases, tmp_path):
    trained_adapter(bases["llama"], tmp_path / "adapter", "lora")
    return plan_export(bases["llama"], tmp_path / "adapter")


def test_output_is_never_overwritten_unasked(lora_plan, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; choose a new folder, or pass --force"):
        export_model(lora_plan, output)
    assert (output / "notes.txt").read_text() == "mine"
    export_model(lora_plan, output, force=True)
    assert not (output / "notes.txt").exists() and (output / RECORD_FILE).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "out"]  # nothing left beside it
    with pytest.raises(ValueError, match="holds .* which the export reads; choose another OUTPUT"):
        export_model(lora_plan, lora_plan.adapter.path, force=True)


def test_an_empty_output_folder_is_used_and_shards_are_indexed(lora_plan, tmp_path):
    (tmp_path / "out").mkdir()
    result = export_model(lora_plan, tmp_path / "out", max_shard_size="100KB")
    shards = [name for name in result.files if name.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in result.files
    assert inspect_exported_folder(tmp_path / "out").parameters == result.folder.parameters


def test_a_failed_write_leaves_nothing_behind(lora_plan, tmp_path, monkeypatch):
    from mmadapter.adapters.io import export

    class FullDisk:
        def save_pretrained(self, folder):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "load_tokenizer", lambda source: FullDisk())
    with pytest.raises(OSError, match="No space left"):
        export_model(lora_plan, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_a_damaged_export_is_caught_by_its_check(lora_plan, tmp_path):
    export_model(lora_plan, tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:2]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \[2, 64\], config.json says \[64, 64\]"):
        inspect_exported_folder(tmp_path / "out")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        inspect_exported_folder(tmp_path / "out")
