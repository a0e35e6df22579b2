"""Files written so that readers, and a crash, never see half of one; content hashes of files; and
weight and JSON files read so that a damaged or hostile one is a one-line error naming it, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

#: torch's weights-only unpickler names what it refuses to call as `GLOBAL module.name`.
_REFUSED_CALLABLE = "GLOBAL "
#: Sentences of torch's refusal that tell the user to turn the protection off, or where to read how.
_UNSAFE_ADVICE = re.compile(
    r"In PyTorch 2\.6|Re-running|weights_only` set to `False`|Do it only if|Check the documentation|safe_globals"
)
#: What torch's zip reader says about an archive cut short or not written by torch.save.
_DAMAGED_ARCHIVE = ("PytorchStreamReader", "inline_container", "unexpected EOF")
#: What unpickling a truncated or foreign file raises besides UnpicklingError.
_DAMAGED_PICKLE = (EOFError, KeyError, IndexError, struct.error, zipfile.BadZipFile)


@contextlib.contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """A temporary file in `path`'s folder to write; once written it is synced to disk and renamed to
    `path`, so readers (and a crash) never see half a file. On an error it is removed."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; these are shared like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_replace(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A weights file whose unpickling would call more than tensor constructors, refused before anything ran.

    An UnpicklingError, as torch raises for it, so callers that catch that still do; a ValueError, because
    the file the user gave is at fault. The message names the file and what the unpickler refused."""

    def __init__(self, path: str | Path, detail: str) -> None:
        # torch's message also advises weights_only=False: that advice is dropped, what it refused is kept.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", detail)  # torch emboldens part of it for terminals
        kept = [s for s in re.split(r"(?<=\.)\s+", " ".join(plain.split())) if not _UNSAFE_ADVICE.search(s)]
        super().__init__(
            f"{path}: holds Python objects beyond tensors, and loading them could run code; mmadapter loads "
            "tensors only (weights_only). Convert it where you trust its source, or get a safetensors file"
            + (f" ({' '.join(kept)})" if kept else "")
        )


def _damaged_weights(path: str | Path) -> ValueError:
    return ValueError(
        f"{path}: cannot read weights: the file is truncated or not a PyTorch file; re-download it, "
        "or re-save it with torch.save"
    )


@contextlib.contextmanager
def torch_file_errors(path: str | Path) -> Iterator[None]:
    """Unpickling `path` inside: torch's errors for a refused or damaged file become ValueErrors naming it.

    transformers and TorchScript readers unpickle without saying which file failed, so they run in here too.
    torch's warning about pickle protocols is silenced: the error (or nothing) is all a user needs."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            yield
    except RefusedPickleError:
        raise
    except pickle.UnpicklingError as error:
        if _REFUSED_CALLABLE in str(error):
            raise RefusedPickleError(path, str(error)) from error
        raise _damaged_weights(path) from error
    except _DAMAGED_PICKLE as error:
        raise _damaged_weights(path) from error
    except RuntimeError as error:
        if not any(marker in str(error) for marker in _DAMAGED_ARCHIVE):
            raise
        raise _damaged_weights(path) from error
    except OSError as error:  # torch's zip reader seeking past the end of a cut archive
        if error.errno != errno.EINVAL:
            raise
        raise _damaged_weights(path) from error


def read_json(path: str | Path) -> Any:
    """A JSON document without NaN or Infinity (Python accepts them; no size, rate or id can be one); bad syntax,
    bad UTF-8 or such a constant is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_bytes(), parse_constant=_refuse_constant)
    except ValueError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_torch_file(path: str | Path) -> Any:
    """What `torch.save` wrote to `path`, tensors and plain containers only (weights_only; zip archives
    memory-mapped, so no tensor data is read until used); a refused or damaged file is a ValueError naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: {'a folder, not a weights file' if Path(path).is_dir() else 'file not found'}"
        )
    with torch_file_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or foreign one is a ValueError naming it."""
    with _safetensors_errors(path):
        return load_file(path)


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, which safetensors checks against the file's size:
    no tensor data is read, and a truncated file fails here."""
    with _safetensors_errors(path), safe_open(path, framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


@contextlib.contextmanager
def _safetensors_errors(path: str | Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as error:
        raise ValueError(
            f"{path}: not a readable safetensors file ({error}); it is truncated or damaged: re-download or re-save it"
        ) from error
