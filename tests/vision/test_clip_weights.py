"""Weight files are read without running code from them, including TorchScript archives."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import pytest
import torch

from mmadapter.vision import read_state_dict
from mmadapter.vision.weights import find_weights_file, is_torchscript_archive


class _Exploit:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_tensors_match_torch_jit(tmp_path, reference_clip):
    archive = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(reference_clip(seed=2)).save(str(archive))
        expected = torch.jit.load(str(archive)).state_dict()
    assert is_torchscript_archive(archive)
    tensors = read_state_dict(archive)
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[key], expected[key]) for key in expected)


def test_a_hostile_archive_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    archive = tmp_path / "ViT-L-14.pt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("archive/constants.pkl", pickle.dumps(()))
        zipped.writestr("archive/data.pkl", pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os)\.system"):
        read_state_dict(archive)
    assert not marker.exists()


def test_plain_torch_save_files_are_not_taken_for_torchscript(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert not is_torchscript_archive(path) and torch.equal(read_state_dict(path)["w"], torch.ones(2))
    torch.save({"w": [1, 2]}, path)
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        read_state_dict(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="plain.pt: cannot read weights"):
        read_state_dict(path)


def test_find_weights_file_in_a_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    assert find_weights_file(tmp_path).name == "a.bin"
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="expected one weights file.*a.bin, b.pth"):
        find_weights_file(tmp_path)
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert find_weights_file(tmp_path).name == "open_clip_model.safetensors"
