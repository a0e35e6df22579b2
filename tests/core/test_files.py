"""Atomic writes: whole files or none, with the permissions the user's umask gives any new file."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from mmadapter.core.files import atomic_save_tensors, atomic_write_bytes, file_sha256


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == mode
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails while writing
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_file_sha256_is_the_hash_of_the_bytes(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"mmadapter" * 1000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"mmadapter" * 1000).hexdigest()


def test_a_weights_path_that_is_not_a_file_is_named_as_such(tmp_path):
    from mmadapter.core.files import read_torch_file

    with pytest.raises(FileNotFoundError, match=r"missing.pth: file not found"):
        read_torch_file(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r": a folder, not a weights file"):
        read_torch_file(tmp_path)
