"""A damaged checkpoint costs a resume only the steps since the one before it, and a failed save leaves
nothing half-written: `--resume` checks checkpoints against their manifests, newest first, says which it
skips and why, and continues from the newest intact one, ending with the adapter a resume from that one
by hand gives; a full disk while checkpointing ends in one line, the previous checkpoint intact."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmadapter.train.checkpointing as checkpointing
from mmadapter.adapters.io.checkpoint import WEIGHTS_FILE
from mmadapter.cli.main import main
from mmadapter.train.checkpointing import (
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    RECIPE_FILE,
    STATE_FILE,
    checkpoint_problem,
)
from tests.helpers.tiny_recipe import tiny_recipe

pytestmark = pytest.mark.slow  # every test here starts from a trained run

#: Checkpoints after steps 1, 2 and 3 (the last step saves the adapter instead); the newest two are kept.
STEPS = {"max_steps": 4, "save_every": 1, "keep_checkpoints": 2}
NEWEST, OLDER = "ckpt-0000003", "ckpt-0000002"


@pytest.fixture(scope="module")
def pristine(tokenizer_dir, tmp_path_factory) -> Path:
    """A finished run with checkpoints after steps 2 and 3, its final adapter removed."""
    folder = tmp_path_factory.mktemp("pristine")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(folder, tokenizer_dir, train=STEPS, parsed=False)))
    assert main(["train", str(recipe)]) == 0
    run = folder / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [OLDER, NEWEST, "latest"]
    shutil.rmtree(run / "adapter")
    return run


@pytest.fixture(scope="module")
def by_hand(pristine, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final adapter of a resume from the older checkpoint, named by hand."""
    run = copy_run(pristine, tmp_path_factory.mktemp("by_hand"))
    assert main(["train", "--resume", str(run / "checkpoints" / OLDER)]) == 0
    return load_file(run / "adapter" / WEIGHTS_FILE)


def copy_run(run: Path, folder: Path) -> Path:
    return Path(shutil.copytree(run, folder / "run"))


def truncate(path: Path, fraction: float) -> tuple[int, int]:
    """Keep the first `fraction` of a file; its (old, new) size."""
    data = path.read_bytes()
    kept = int(len(data) * fraction)
    path.write_bytes(data[:kept])
    return len(data), kept


def assert_same_adapter(run: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = load_file(run / "adapter" / WEIGHTS_FILE)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


@pytest.mark.parametrize(
    "name, fraction",
    [
        (WEIGHTS_FILE, 0.5),
        (OPTIMIZER_FILE, 0.5),
        ("rng_state_0.pt", 0.5),
        (RECIPE_FILE, 0.0),  # the recipe a resume without RECIPE reads
        (STATE_FILE, 0.5),
    ],
)
def test_resume_skips_a_truncated_newest_checkpoint(pristine, by_hand, tmp_path, capsys, name, fraction):
    run = copy_run(pristine, tmp_path)
    size, kept = truncate(run / "checkpoints" / NEWEST / name, fraction)

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"note: skipped {NEWEST}: {name} is {kept:,} bytes, the manifest says {size:,}\n" in out
    assert f"resuming from {run / 'checkpoints' / OLDER} (stage 1, step 2)" in out
    assert_same_adapter(run, by_hand)


def test_a_checkpoint_without_manifest_is_skipped_when_a_file_does_not_load(pristine, by_hand, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    for checkpoint in (run / "checkpoints").glob("ckpt-*"):  # as written before manifests
        (checkpoint / MANIFEST_FILE).unlink()
    truncate(run / "checkpoints" / NEWEST / OPTIMIZER_FILE, 0.5)

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"note: skipped {NEWEST}: {OPTIMIZER_FILE} does not load (" in out
    assert_same_adapter(run, by_hand)


def test_an_intact_checkpoint_without_manifest_is_used_and_half_written_ones_are_removed(pristine, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    for checkpoint in (run / "checkpoints").glob("ckpt-*"):
        (checkpoint / MANIFEST_FILE).unlink()
    partial = run / "checkpoints" / ".ckpt-0000004.tmp"  # a run killed while saving
    partial.mkdir()
    (partial / WEIGHTS_FILE).write_bytes(b"half")

    assert main(["train", "--resume", str(run)]) == 0  # resumes at step 3; the last step saves no checkpoint
    out = capsys.readouterr().out
    assert "skipped" not in out and f"resuming from {run / 'checkpoints' / NEWEST} (stage 1, step 3)" in out
    assert "note: removed .ckpt-0000004.tmp, a checkpoint left half-written" in out
    assert not partial.exists() and (run / "adapter" / WEIGHTS_FILE).is_file()


def test_a_damaged_checkpoint_named_by_hand_is_an_error_naming_the_file(pristine, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    checkpoint = run / "checkpoints" / NEWEST
    size, kept = truncate(checkpoint / STATE_FILE, 0.5)

    assert main(["train", "--resume", str(checkpoint)]) == 2
    assert capsys.readouterr().err == (
        f"error: {checkpoint}: damaged checkpoint: {STATE_FILE} is {kept:,} bytes, the manifest says {size:,}; "
        "resume from the run folder instead to continue from its newest intact checkpoint\n"
    )
    (checkpoint / MANIFEST_FILE).unlink()  # as written before manifests: the JSON error, with the file's name
    assert main(["train", "--resume", str(checkpoint)]) == 2
    assert f"damaged checkpoint: {STATE_FILE} does not load (" in capsys.readouterr().err  # the JSON error


def test_a_changed_file_of_the_same_size_and_no_intact_checkpoint_at_all(pristine, tmp_path, capsys):
    run = copy_run(pristine, tmp_path)
    changed = run / "checkpoints" / NEWEST / OPTIMIZER_FILE
    data = bytearray(changed.read_bytes())
    data[-10] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert checkpoint_problem(changed.parent) == f"{OPTIMIZER_FILE} differs from the manifest (sha256)"

    size, kept = truncate(run / "checkpoints" / OLDER / OPTIMIZER_FILE, 0.5)
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}: no intact checkpoint to resume from ({NEWEST}: {OPTIMIZER_FILE} differs from the manifest "
        f"(sha256); {OLDER}: {OPTIMIZER_FILE} is {kept:,} bytes, the manifest says {size:,}); "
        "start again with another output_dir\n"
    )


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint(make_recipe, tmp_path, monkeypatch, capsys):
    write = checkpointing.atomic_write_bytes

    def disk_fills_up(path: Path, data: bytes) -> None:
        if path.parent.name == ".ckpt-0000002.tmp" and path.name == OPTIMIZER_FILE:  # the adapter is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(checkpointing, "atomic_write_bytes", disk_fills_up)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train=STEPS, parsed=False)))

    assert main(["train", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: No space left on device ({tmp_path}/run/checkpoints/.ckpt-0000002.tmp/{OPTIMIZER_FILE}): "
        "free some disk space (or point the output elsewhere) and run again"
    ]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt-0000001", "latest"]
    assert (checkpoints / "latest").read_text() == "ckpt-0000001\n"
    assert (checkpoints / "ckpt-0000001" / MANIFEST_FILE).is_file()
    assert checkpoint_problem(checkpoints / "ckpt-0000001") is None
