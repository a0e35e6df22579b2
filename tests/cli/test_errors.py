"""The command line's error boundary: one line for a user's mistake (exit 2), a log for our bugs (exit 1)."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from mmadapter.cli import info_command
from mmadapter.cli.main import main


def test_a_users_mistake_is_one_line_and_exit_code_2(capsys):
    assert main(["info", "--base", "/no/such/model", "--method", "lora"]) == 2
    *progress, error = capsys.readouterr().err.splitlines()
    assert error.startswith("error: /no/such/model: not a preset")
    assert all(line.startswith("mmadapter: loading") for line in progress)  # the "no silent minute" line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/ckpt"), "/runs/x/ckpt): free some disk space"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "choose another port with --port"),
        (KeyError("stages.0.name: required"), "error: stages.0.name: required"),
        (
            ValueError("no usable samples (skipped 2 bad sample(s):\n  a.json:1: no 'output'\n  a.json:2: not JSON)"),
            "error: no usable samples (skipped 2 bad sample(s): a.json:1: no 'output'; a.json:2: not JSON)\n",
        ),
    ],
)
def test_environment_errors_say_what_to_do(monkeypatch, capsys, error, expected):
    def fail(args):
        raise error

    monkeypatch.setattr(info_command, "run", fail)
    assert main(["info", "--base", "tiny-llama", "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_an_internal_error_is_one_line_pointing_at_a_log_with_the_traceback(monkeypatch, capsys, tmp_path):
    def crash(args):
        raise RuntimeError("something we did not expect")

    monkeypatch.setattr(info_command, "run", crash)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["info", "--base", "tiny-llama", "--method", "lora"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error (RuntimeError: something we did not expect)" in err
    (log,) = (tmp_path / "mmadapter" / "logs").iterdir()
    assert str(log) in err
    text = log.read_text()
    assert text.startswith("mmadapter info --base tiny-llama") and "Traceback" in text and "def crash" not in err


def test_debug_shows_the_traceback_wherever_the_flag_stands(monkeypatch):
    def crash(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(info_command, "run", crash)
    for argv in (
        ["--debug", "info", "--base", "x", "--method", "lora"],
        ["info", "--base", "x", "--method", "lora", "--debug"],
    ):
        with pytest.raises(RuntimeError, match="boom"):
            main(argv)


def test_the_installed_command_prints_no_traceback_for_a_bad_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {base: tiny-llama}\nadapter: [not, a, mapping\n")  # broken YAML
    result = subprocess.run(
        [sys.executable, "-m", "mmadapter.cli.main", "train", str(recipe)], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
