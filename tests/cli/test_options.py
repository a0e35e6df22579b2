"""Flags checked before any model loads: ports, devices, and a port already in use."""

from __future__ import annotations

import socket

import pytest
import torch

from mmadapter.cli.main import main


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_outside_0_to_65535_is_refused_by_the_parser(capsys, port):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--base", "tiny-llama", "--port", port])
    assert exit_info.value.code == 2
    assert "argument --port:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--base", "tiny-llama", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "argument --device: cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_a_port_in_use_is_named_before_the_model_loads(capsys, monkeypatch):
    from mmadapter.serve import loader

    monkeypatch.setattr(loader, "load_served_model", lambda *a, **k: pytest.fail("loaded a model first"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--base", "tiny-llama", "--port", str(port)]) == 2
    assert (
        capsys.readouterr().err == f"error: --port {port}: 127.0.0.1:{port} is in use; pick another port with --port\n"
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--base", "tiny-llama", "--temperature", "-2"], "argument --temperature: '-2' is not a temperature"),
        (["chat", "--base", "tiny-llama", "--top-p", "0"], "argument --top-p: '0' is not a probability above 0"),
        (["serve", "--base", "tiny-llama", "--top-k", "-1"], "argument --top-k: '-1' is not a whole number (0 or"),
        (["serve", "--base", "tiny-llama", "--max-new-tokens", "-5"], "argument --max-new-tokens: '-5' is not a whole"),
        (["serve", "--base", "tiny-llama", "--max-batch", "0"], "argument --max-batch: '0' is not a whole number"),
        (["eval", "adapter", "--data", "d.json", "--batch-size", "0"], "argument --batch-size: '0' is not a whole"),
        (["eval", "adapter", "--data", "d.json", "--limit", "-1"], "argument --limit: '-1' is not a whole number"),
        (["export", "--base", "b", "--adapter", "a", "out", "--max-shard-size", "0"], "--max-shard-size: '0' is not a"),
        (["convert", "official-v1", "v1.pth", "out", "--prompt-length", "0"], "--prompt-length: '0' is not a whole"),
    ],
)
def test_a_bad_number_is_refused_by_the_parser_naming_the_flag_in_two_lines(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert says in error
    assert error.splitlines()[-1] == f"(see 'mmadapter {argv[0]} --help')" and len(error.splitlines()) == 2


def test_eval_generation_flags_without_generate_are_refused(capsys):
    assert main(["eval", "adapter", "--data", "d.json", "--greedy"]) == 2
    assert "--greedy and --max-new-tokens set how --generate writes answers; add --generate" in capsys.readouterr().err


def test_chat_without_base_or_adapter_asks_for_the_base(capsys):
    assert main(["chat"]) == 2
    assert "error: --base: give the base model (a folder or a preset)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--base", "tiny-llama", "--merge"], "--merge applies to an --adapter, and none is given"),
        (["chat", "--base", "tiny-llama", "--revision", "v1"], "--revision applies to an --adapter, and none is given"),
        (["serve", "--base", "tiny-llama", "--name", ""], "--name '': a model id is letters, digits"),
    ],
)
def test_flags_that_would_do_nothing_are_refused_before_loading(capsys, argv, says):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"error: {says}" in error and "mmadapter: loading" not in error


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "recipe.yaml", "--list"], "--list prints and exits, so it takes no RECIPE or --resume"),
        (["train", "--list", "--schema"], "--schema and --list: give one of them"),
    ],
)
def test_train_listing_flags_are_not_mixed_with_a_run(capsys, argv, says):
    assert main(argv) == 2
    assert f"error: {says}" in capsys.readouterr().err
