"""`mmadapter export` and `mmadapter push` of an exported folder, through the command line.

The command speaks before importing torch, reports each step, refuses in one `error:` line (exit 2) before
loading anything when the adapter cannot fold or OUTPUT would be overwritten, and an exported folder is
published as a model repository (its files, not strays; a card for the standalone model) that loads back
from the hub with plain transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForCausalLM

from mmadapter.adapters.io.exported_model import RECORD_FILE
from mmadapter.cli.main import main
from tests.adapters import test_hub
from tests.adapters.test_export import one_torch_thread, save_base, trained_adapter  # noqa: F401 (fixture)
from tests.cli.test_startup import PROGRAM as TORCH_BLOCKED
from tests.helpers.tiny_llama import IDS, build_tiny_llama

#: The hub tests' fake hub on 127.0.0.1 and their isolation from this machine's hub settings.
hub, hub_env = test_hub.hub, test_hub.hub_env
REPO, BASE_ID = "yourname/tiny-llama-lora-merged", test_hub.BASE_ID


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(build_tiny_llama(), tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    trained_adapter(base, folder, "lora")
    return folder


def export(base, adapter, output, *extra: str) -> int:
    return main(["export", "--base", str(base), "--adapter", str(adapter), str(output), *extra])


def test_export_reports_each_step_and_what_it_wrote(base, lora, tmp_path, capfd):
    assert export(base, lora, tmp_path / "out", "--json", "--dtype", "fp32") == 0
    out, err = capfd.readouterr()
    report = json.loads(out)
    assert report["method"] == "lora" and report["dtype"] == "float32" and report["model_type"] == "llama"
    assert report["files"] == sorted(path.name for path in (tmp_path / "out").iterdir())
    assert report["bytes"] == sum((tmp_path / "out" / name).stat().st_size for name in report["files"])
    steps = [line for line in err.splitlines() if line.startswith("mmadapter: ")]
    assert steps[0].startswith("mmadapter: loading torch and transformers")
    assert [step.split()[1] for step in steps[1:]] == ["loading", "attaching", "folding:", "writing"]
    assert "folding: LoRA (r=8, alpha=32) merged into the weights of q_proj, v_proj" in err


def test_export_speaks_before_importing_torch(tmp_path):
    argv = ["export", "--base", "base", "--adapter", "adapter", "out", "--debug"]
    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *argv], cwd=tmp_path, capture_output=True, text=True)
    assert "torch import reached" in result.stderr, result.stderr  # it did go on to import torch
    assert result.stderr.splitlines()[0].startswith("mmadapter: loading torch and transformers")


def test_a_refusal_is_one_error_line_before_anything_loads(base, tmp_path, capfd):
    trained_adapter(base, tmp_path / "v1", "llama-adapter-v1", adapted_layers=2, prompt_length=3)
    assert export(base, tmp_path / "v1", tmp_path / "out") == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot export a llama-adapter-v1 adapter" in errors[0]
    assert f"Serve it with `mmadapter serve --base {base} --adapter {tmp_path / 'v1'}`" in errors[0]
    assert "loading the base" not in err and not (tmp_path / "out").exists()


def test_an_output_in_use_is_refused_unless_forced(base, lora, tmp_path, capfd):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export(base, lora, tmp_path / "out") == 2
    err = capfd.readouterr().err
    assert "exists and is not empty; choose a new folder, or pass --force to replace it" in err
    assert "loading the base" not in err and (tmp_path / "out" / "keep.txt").is_file()
    assert export(base, lora, tmp_path / "out", "--force") == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / RECORD_FILE).is_file()


def test_a_bad_shard_size_is_a_usage_error(base, lora, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export(base, lora, tmp_path / "out", "--max-shard-size", "lots")
    assert exit_info.value.code == 2 and "'lots' is not a size: use e.g. 5GB" in capsys.readouterr().err


def test_push_publishes_an_exported_model_that_loads_back_from_the_hub(hub, base, lora, tmp_path, capsys):
    assert export(base, lora, tmp_path / "out", "--max-shard-size", "200KB") == 0
    (tmp_path / "out" / "notes.txt").write_text("not part of the model")
    capsys.readouterr()

    assert main(["push", str(tmp_path / "out"), REPO, "--base-model", BASE_ID, "--license", "apache-2.0"]) == 0
    assert REPO in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    files = hub.files(REPO)
    assert set(files) == {".gitattributes", *record["files"]}  # the record's files, not the stray notes
    assert len([name for name in files if name.endswith(".safetensors")]) > 1
    assert all(files[name] == (tmp_path / "out" / name).read_bytes() for name in record["files"] if name != "README.md")
    assert hub.commits(REPO)[-1].message == "Upload model exported from a lora adapter (mmadapter)"
    card = ModelCard(files["README.md"].decode())
    metadata = card.data.to_dict()
    assert metadata["base_model"] == BASE_ID and metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0" and {"mmadapter", "lora"} <= set(metadata["tags"])
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card.text

    downloaded = AutoModelForCausalLM.from_pretrained(
        snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url)
    )
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(downloaded(IDS).logits, local(IDS).logits)


def test_push_dry_run_names_what_an_exported_folder_is(hub, base, lora, tmp_path, capsys):
    assert export(base, lora, tmp_path / "out") == 0
    capsys.readouterr()
    assert main(["push", str(tmp_path / "out"), REPO, "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["what"] == "model exported from a lora adapter" and "model.safetensors" in report["files"]
    assert hub.requests == []


def test_push_refuses_a_damaged_export_before_any_request(hub, base, lora, tmp_path, capsys):
    assert export(base, lora, tmp_path / "out") == 0
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    capsys.readouterr()
    assert main(["push", str(tmp_path / "out"), REPO]) == 2
    assert "model.safetensors" in capsys.readouterr().err and hub.requests == []
