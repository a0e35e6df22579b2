"""Bad files at every command that reads them: one `error:` line naming the file, exit code 2, no traceback.

Adapter folders (a config that lies, a truncated weights file) at chat, serve, eval and push --dry-run;
pickled checkpoints (a hostile one whose unpickling would run a command, a truncated one) at every
`convert` kind that reads them, at a `--base` folder in Hugging Face or Meta layout, and at a
TorchScript CLIP. A hostile file never runs: the command it carries would create a marker file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from mmadapter.adapters.backbones.loading import load_base_model
from mmadapter.adapters.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from mmadapter.adapters.methods.base import attach_adapter, make_config
from mmadapter.cli.main import main

#: A base folder in Hugging Face layout, with a tokenizer.
BASE = Path(__file__).resolve().parents[2] / "assets" / "tiny-llama"
REFUSED = "holds Python objects beyond tensors, and loading them could run code"
DAMAGED = "cannot read weights: the file is truncated or not a PyTorch file"


class Exploit:
    """Unpickling this runs `touch MARKER`, the way a hostile checkpoint runs anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the one error line; asserts there is exactly one, no traceback and no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    assert "Traceback" not in err
    assert not [w for w in caught if "pickle" in str(w.message)]
    return code, errors[0]


@pytest.fixture
def adapter(tmp_path):
    model = load_base_model(BASE)
    attach_adapter(model, make_config("llama-adapter-v1", adapted_layers=2, prompt_length=3))
    return save_adapter(model, tmp_path / "adapter", prompt_template="alpaca")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
    return path


def entry_points(folder: Path, data: Path) -> dict[str, list]:
    return {
        "chat": ["chat", "--base", BASE, "--adapter", folder, "--device", "cpu"],
        "serve": ["serve", "--base", BASE, "--adapter", folder, "--device", "cpu", "--port", "0"],
        "eval": ["eval", folder, "--data", data, "--base", BASE],
        "push --dry-run": ["push", folder, "someone/tiny-adapter", "--dry-run"],
    }


def set_field(section: str, field: str, value):
    return lambda document: {**document, section: {**document[section], field: value}}


BROKEN_CONFIGS = {
    "prompt_length 10**11": (
        set_field("adapter", "prompt_length", 10**11),
        "adapter.prompt_length is 100000000000, but the 4 tensors in adapter_model.safetensors",
    ),
    "prompt_length 1e11": (
        set_field("adapter", "prompt_length", 1e11),
        "adapter.prompt_length: expected int, got 100000000000.0 (float)",
    ),
    "prompt_length 'ten'": (set_field("adapter", "prompt_length", "ten"), "adapter.prompt_length: expected int"),
    "a list": (lambda document: [document], "expected a mapping, got [{"),
    "adapter a string": (lambda document: {**document, "adapter": "llama-adapter-v1"}, "adapter: expected a mapping"),
    "base a string": (lambda document: {**document, "base": "tiny-llama"}, "base: expected a mapping"),
}


@pytest.mark.parametrize("command", ["chat", "serve", "eval", "push --dry-run"])
@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_a_broken_adapter_config_is_one_line_naming_file_and_field(case, command, adapter, data, capsys):
    change, message = BROKEN_CONFIGS[case]
    path = adapter / CONFIG_FILE
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    code, line = run(entry_points(adapter, data)[command], capsys)
    assert code == 2 and line.startswith(f"error: {path}: ") and message in line


@pytest.mark.parametrize("command", ["chat", "serve", "eval", "push --dry-run"])
@pytest.mark.parametrize("kept", [0.0, 0.5], ids=["zero-byte", "truncated"])
def test_a_damaged_adapter_weights_file_is_one_line_saying_what_to_do(kept, command, adapter, data, capsys):
    weights = adapter / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * kept)])
    code, line = run(entry_points(adapter, data)[command], capsys)
    assert code == 2 and line.startswith(f"error: {weights}: not a readable safetensors file")
    assert line.endswith("re-download or re-save it")


def hostile_zip(path: Path, marker: Path) -> Path:
    """What `torch.save` writes for a state dict holding an object that runs a command when unpickled."""
    torch.save({"adapter_query.weight": Exploit(marker)}, path)
    return path


def hostile_legacy(path: Path, marker: Path) -> Path:
    """The same as a plain pickle, as torch.save wrote before its zip format."""
    path.write_bytes(pickle.dumps({"adapter_query.weight": Exploit(marker)}, protocol=2))
    return path


def truncated(path: Path, marker: Path) -> Path:
    torch.save({"adapter_query.weight": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def zero_byte(path: Path, marker: Path) -> Path:
    path.write_bytes(b"")
    return path


#: File maker -> what the error says about the file.
BAD_PICKLES = {"hostile": (hostile_zip, REFUSED), "hostile-legacy": (hostile_legacy, REFUSED)}
BAD_PICKLES |= {"truncated": (truncated, DAMAGED), "zero-byte": (zero_byte, DAMAGED)}


@pytest.mark.parametrize("kind", ["official-v1", "official-v2", "official-ptuning"])
@pytest.mark.parametrize("case", sorted(BAD_PICKLES))
def test_convert_refuses_a_bad_checkpoint_in_one_line(case, kind, tmp_path, capsys):
    make, message = BAD_PICKLES[case]
    marker = tmp_path / "ran"
    source = make(tmp_path / "checkpoint.pth", marker)
    code, line = run(["convert", kind, source, tmp_path / "out", "--base", "tiny-llama"], capsys)
    assert code == 2 and line.startswith("error: ") and f"{source}: {message}" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def meta_layout(folder: Path, make, marker: Path) -> Path:
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    return make(folder / "consolidated.00.pth", marker)


def hf_layout(folder: Path, make, marker: Path) -> Path:
    folder.mkdir()
    shutil.copy(BASE / "config.json", folder)
    return make(folder / "pytorch_model.bin", marker)


@pytest.mark.parametrize("layout", [meta_layout, hf_layout], ids=["consolidated.00.pth", "pytorch_model.bin"])
@pytest.mark.parametrize("case", sorted(BAD_PICKLES))
def test_a_base_folder_with_bad_weights_is_one_line(case, layout, tmp_path, capsys):
    make, message = BAD_PICKLES[case]
    marker = tmp_path / "ran"
    weights = layout(tmp_path / "base", make, marker)
    code, line = run(["chat", "--base", tmp_path / "base", "--tokenizer", BASE, "--device", "cpu"], capsys)
    assert code == 2 and f"{weights}: {message}" in line
    assert not marker.exists()


def test_convert_meta_llama_refuses_a_hostile_shard(tmp_path, capsys):
    marker = tmp_path / "ran"
    shard = meta_layout(tmp_path / "meta", hostile_zip, marker)
    code, line = run(["convert", "meta-llama", tmp_path / "meta", tmp_path / "out"], capsys)
    assert code == 2 and f"{shard}: {REFUSED}" in line and not marker.exists()


def hostile_torchscript(path: Path, marker: Path) -> Path:
    """A TorchScript-shaped archive (OpenAI's CLIP release format) whose data.pkl runs a command."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/constants.pkl", pickle.dumps(()))
        archive.writestr("archive/data.pkl", pickle.dumps(Exploit(marker), protocol=2))
    return path


def truncated_torchscript(path: Path, marker: Path) -> Path:
    hostile_torchscript(path, marker)
    path.write_bytes(path.read_bytes()[:-30])  # the zip's directory is cut off
    return path


@pytest.mark.parametrize(
    ("make", "message"), [(hostile_torchscript, REFUSED), (truncated_torchscript, DAMAGED)], ids=["hostile", "cut"]
)
def test_convert_clip_tower_refuses_a_bad_torchscript_archive(make, message, tmp_path, capsys):
    marker = tmp_path / "ran"
    archive = make(tmp_path / "ViT-L-14.pt", marker)
    code, line = run(["convert", "clip-tower", archive, tmp_path / "out", "--clip-model", "ViT-L-14"], capsys)
    assert code == 2 and f"{archive}: {message}" in line and not marker.exists()
