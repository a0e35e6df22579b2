"""One reader for an adapter folder: a wrong config or a damaged weights file is a ValueError naming the file
and the field, found before the adapter takes any memory; never a TypeError, an AttributeError or a
terabyte allocation.

Every loader (`load_adapter`: chat, serve, eval, `from_pretrained`; `inspect_adapter_folder`: push) goes
through `read_adapter_config` and the safetensors header, so these cases hold for all of them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmadapter.adapters.io.adapter_folder import inspect_adapter_folder
from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter_config, save_adapter
from mmadapter.adapters.methods.base import AdapterConfig, attach_adapter, config_from_dict, make_config
from tests.helpers.llama_v2_setup import tiny_v2_config
from tests.helpers.perturb import perturb_adapter

#: A config field no loader may take at face value: 10**12 rows of anything is terabytes.
ABSURD = 10**12
#: JSON as a file may hold it: Python's json module also writes NaN and Infinity.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def save(model, folder, config):
    attach_adapter(model, config)
    perturb_adapter(model)
    return save_adapter(model, folder, prompt_template="alpaca")


@pytest.fixture
def v1_folder(tiny_llama, tmp_path):
    return save(tiny_llama(), tmp_path / "adapter", make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3))


@pytest.fixture
def v1_saved(v1_folder):
    """The config as saved, read once: property tests rewrite the file for every example."""
    return json.loads((v1_folder / CONFIG_FILE).read_text())


def edit_config(folder, change) -> None:
    document = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(change(document)))


def replace_at(document, path: tuple[str, ...], value):
    """`document` with the value at key path `path` replaced."""
    if not path:
        return value
    return {**document, path[0]: replace_at(document[path[0]], path[1:], value)}


def loaders(tiny_llama):
    """Both readers of a folder: loading onto a base, and the offline check before a push."""
    return {"load_adapter": lambda folder: load_adapter(tiny_llama(), folder), "inspect": inspect_adapter_folder}


BROKEN_CONFIGS = {
    "top-level list": (lambda d: [1, 2], "expected a mapping, got [1, 2] (list)"),
    "adapter a string": (lambda d: {**d, "adapter": "lora"}, "adapter: expected a mapping, got 'lora'"),
    "base a string": (lambda d: {**d, "base": "llama"}, "base: expected a mapping, got 'llama'"),
    "prompt_length a word": (
        lambda d: replace_at(d, ("adapter", "prompt_length"), "ten"),
        "adapter.prompt_length: expected int, got 'ten'",
    ),
    "prompt_length 1e11": (
        lambda d: replace_at(d, ("adapter", "prompt_length"), 1e11),
        "adapter.prompt_length: expected int, got 100000000000.0 (float)",
    ),
    "prompt_length 10**11": (
        lambda d: replace_at(d, ("adapter", "prompt_length"), 10**11),
        "adapter.prompt_length is 100000000000, but the 4 tensors in adapter_model.safetensors have no dimension",
    ),
    "negative prompt_length": (lambda d: replace_at(d, ("adapter", "prompt_length"), -3), "prompt_length"),
    "unknown method": (
        lambda d: replace_at(d, ("adapter", "method"), "adapter-v9"),
        "adapter.method: unknown adapter method 'adapter-v9'",
    ),
    "method a number": (lambda d: replace_at(d, ("adapter", "method"), 1), "adapter.method: expected a string"),
    "base layers 10**9": (
        lambda d: replace_at(d, ("base", "shape", "num_hidden_layers"), 10**9),
        "num_hidden_layers",  # load_adapter: not this base's; inspect: more than the saved tensors tell
    ),
    "hidden size a word": (
        lambda d: replace_at(d, ("base", "shape", "hidden_size"), "big"),
        "base.shape.hidden_size: expected int, got 'big'",
    ),
    "NaN": (lambda d: replace_at(d, ("adapter", "gate_tanh"), math.nan), "invalid JSON (NaN is not a JSON number)"),
}


@pytest.mark.parametrize("reader", ["load_adapter", "inspect"])
@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_a_broken_config_is_named_by_file_and_field(case, reader, v1_folder, tiny_llama):
    change, message = BROKEN_CONFIGS[case]
    edit_config(v1_folder, change)
    with pytest.raises(ValueError) as raised:
        loaders(tiny_llama)[reader](v1_folder)
    assert str(raised.value).startswith(f"{v1_folder / CONFIG_FILE}: ")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_wrong_size_fails_before_the_base_carries_an_adapter(v1_folder, tiny_llama):
    edit_config(v1_folder, lambda d: replace_at(d, ("adapter", "prompt_length"), 4))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"adapter_prompt has shape \[3, 64\], expected \[4, 64\]"):
        load_adapter(model, v1_folder)
    assert getattr(model, "adapter_config", None) is None


@pytest.fixture
def folders(tiny_llama, tiny_glm, tmp_path):
    """Builders of a saved folder and a fresh base, per method, for the absurd-size cases."""
    v2 = tiny_v2_config(lora_rank=2, instruction_trains=["bias", "norms", "lora"])
    ptuning = make_config("ptuning-v2", pre_seq_len=4, prefix_projection=True, prefix_hidden_size=16)
    return {
        "lora": (lambda: save(tiny_llama(), tmp_path / "lora", make_config("lora", r=4)), tiny_llama),
        "llama-adapter-v2": (lambda: save(tiny_llama(), tmp_path / "v2", v2), tiny_llama),
        "ptuning-v2": (lambda: save(tiny_glm(), tmp_path / "pt", ptuning), tiny_glm),
    }


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ("lora", "r"),
        ("llama-adapter-v2", "lora_rank"),
        ("llama-adapter-v2", "visual_width"),
        ("llama-adapter-v2", "visual_depth"),
        ("llama-adapter-v2", "prompt_length"),
        ("ptuning-v2", "pre_seq_len"),
        ("ptuning-v2", "prefix_hidden_size"),
    ],
)
def test_an_absurd_size_is_named_before_anything_is_allocated(method, field, folders):
    build_folder, build_base = folders[method]
    folder = build_folder()
    edit_config(folder, lambda d: replace_at(d, ("adapter", field), ABSURD))
    model = build_base()
    for read in (lambda f: load_adapter(model, f), inspect_adapter_folder):
        with pytest.raises(ValueError, match=rf"adapter\.{field} is {ABSURD}, but the \d+ tensors in {WEIGHTS_FILE}"):
            read(folder)
    assert getattr(model, "adapter_config", None) is None


@pytest.mark.parametrize("reader", ["load_adapter", "inspect"])
@pytest.mark.parametrize("kept", [0.0, 0.5, 0.99], ids=["zero-byte", "half", "last-byte-missing"])
def test_a_truncated_weights_file_is_named_with_what_to_do(kept, reader, v1_folder, tiny_llama):
    weights = v1_folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable safetensors file .*re-download or re-save it"):
        loaders(tiny_llama)[reader](v1_folder)


def assert_usable(document) -> None:
    """What the loaders rely on once read_adapter_config returns: a config that builds, mappings where
    mappings belong, strings where strings do."""
    assert isinstance(config_from_dict(document["adapter"]), AdapterConfig)
    assert isinstance(document["base"], dict) and isinstance(document["base"].get("shape", {}), dict)
    assert isinstance(document["base"].get("name_or_path", ""), str)
    assert isinstance(document.get("prompt_template") or "", str)
    assert isinstance(document.get("training") or {}, dict)


@PROPERTY
@given(document=JSON_VALUES)
def test_any_json_is_a_config_or_an_error_naming_the_file(document, v1_folder):
    path = v1_folder / CONFIG_FILE
    path.write_text(json.dumps(document))
    try:
        read = read_adapter_config(v1_folder)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert_usable(read)


#: Key paths of a saved V1 config where a wrong value must be named.
KEY_PATHS = [
    ("adapter",),
    ("adapter", "method"),
    ("adapter", "prompt_length"),
    ("adapter", "adapted_layers"),
    ("adapter", "gate_tanh"),
    ("base",),
    ("base", "name_or_path"),
    ("base", "shape"),
    ("base", "shape", "model_type"),
    ("base", "shape", "hidden_size"),
    ("base", "shape", "num_hidden_layers"),
    ("prompt_template",),
    ("training",),
    ("mmadapter_version",),
]


@PROPERTY
@given(path=st.sampled_from(KEY_PATHS), value=JSON_VALUES)
def test_a_wrong_value_anywhere_is_named_by_its_key(path, value, v1_folder, v1_saved):
    (v1_folder / CONFIG_FILE).write_text(json.dumps(replace_at(v1_saved, path, value)))
    try:
        read = read_adapter_config(v1_folder)
    except ValueError as error:
        assert str(error).startswith(f"{v1_folder / CONFIG_FILE}: ")
        assert path[-1] in str(error) or "invalid JSON" in str(error)
    else:
        assert_usable(read)


@PROPERTY
@given(
    field=st.sampled_from(["prompt_length", "adapted_layers"]),
    value=st.integers(min_value=-(2**70), max_value=2**70) | JSON_VALUES,
)
def test_loading_a_wrong_size_loads_or_names_the_file(field, value, v1_folder, v1_saved, tiny_llama):
    """Past the reader too: the header check and the meta-device build fail with the file named, nothing else."""
    (v1_folder / CONFIG_FILE).write_text(json.dumps(replace_at(v1_saved, ("adapter", field), value)))
    model = tiny_llama()
    try:
        load_adapter(model, v1_folder)
    except ValueError as error:
        assert str(error).startswith((f"{v1_folder / CONFIG_FILE}: ", f"{v1_folder / WEIGHTS_FILE}: "))
        assert getattr(model, "adapter_config", None) is None
    else:
        assert value == v1_saved["adapter"][field] and all(not p.is_meta for p in model.parameters())
        assert isinstance(model.get_decoder().layers[-1].self_attn.adapter_prompt, torch.nn.Parameter)


def test_a_base_whose_head_dim_is_not_width_over_heads_is_rebuilt_from_the_recorded_shape(tmp_path):
    """Qwen3 sets head_dim apart from hidden_size / heads: the folder records it, so the offline check (push,
    export, info) rebuilds the right q/k/v widths from the shape alone."""
    from tests.helpers.tiny_families import build_tiny_family

    model = build_tiny_family("qwen3")
    assert model.config.head_dim != model.config.hidden_size // model.config.num_attention_heads
    attach_adapter(model, make_config("lora"))
    save_adapter(model, tmp_path)

    folder = inspect_adapter_folder(tmp_path)

    assert folder.document["base"]["shape"]["head_dim"] == model.config.head_dim
