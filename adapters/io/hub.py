"""Share adapters through the Hugging Face hub (or a self-hosted one): save, push, load by repo id.

`save_pretrained` / `from_pretrained` are thin layers over `save_adapter` / `load_adapter` that
add what a shared adapter needs (the base model's hub identity, a license, a model card) and accept
a hub repo id. `push_to_hub` checks the folder offline first (`inspect_adapter_folder`), then makes
ONE commit with the adapter files and a generated model card through huggingface_hub:
`create_repo` + `create_commit` (the call `upload_folder` makes), with an explicit file list so no
stray file of a training folder (optimizer states, data, logs) is ever published. A folder written by
`mmadapter export` is published the same way as a model repository: the files its record lists, checked
by `inspect_exported_folder`, with a card for the standalone model.

Downloads go through the hub cache (`snapshot_download`, adapter files only), so a loaded adapter
loads again offline (`HF_HUB_OFFLINE=1`). Only safetensors are loaded: `.bin`/`.pth` files are never
unpickled from a download; official checkpoints are converted first with `mmadapter convert`,
which reads them with `torch.load(weights_only=True)`.

The token comes from huggingface_hub's usual places (`HF_TOKEN`, `hf auth login`) or is passed in;
it goes to the client only and is never printed. The endpoint (argument, else `HF_ENDPOINT`) is read
at call time, not frozen at import as huggingface_hub's own constant is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token, validate_repo_id
from torch import nn

from mmadapter.adapters.backbones.loading import load_base_model
from mmadapter.adapters.io.adapter_folder import PEFT_CONFIG_FILE, AdapterFolder, inspect_adapter_folder
from mmadapter.adapters.io.checkpoint import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    atomic_write_bytes,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from mmadapter.adapters.io.exported_model import (
    ExportedFolder,
    build_export_card,
    inspect_exported_folder,
    is_exported_folder,
)
from mmadapter.adapters.io.model_card import LOSS_CURVE_FILE, TRAINING_SUMMARY_FILE, build_model_card

CARD_FILE = "README.md"
#: What a download fetches: the files that load an adapter with mmadapter or with peft.
DOWNLOAD_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, PEFT_CONFIG_FILE]
#: Files of an adapter folder that a push publishes when present (besides weights, config and card).
OPTIONAL_FILES = (PEFT_CONFIG_FILE, TRAINING_SUMMARY_FILE, LOSS_CURVE_FILE)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else `HF_ENDPOINT` as set now, else huggingface_hub's default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (huggingface_hub reads it only at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def _client(endpoint: str | None, token: str | None) -> HfApi:
    return HfApi(
        endpoint=resolve_endpoint(endpoint), token=token, library_name="mmadapter", library_version=version("mmadapter")
    )


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    prompt_template: str | None = None,
    training: dict[str, Any] | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    license: str | None = None,
) -> Path:
    """`save_adapter` plus what sharing needs: base hub id and revision, license, and a model card.

    `base_model` names the base (e.g. its hub id) when the loaded model only knows a local path.
    """
    directory = save_adapter(model, directory, prompt_template=prompt_template, training=training)
    document = read_adapter_config(directory)
    if base_model:
        document["base"]["name_or_path"] = base_model
    if base_revision:
        document["base"]["revision"] = base_revision
    if license:
        document["license"] = license
    if base_model or base_revision or license:
        atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
    peft_config = directory / PEFT_CONFIG_FILE
    if peft_config.is_file() and (base_model or base_revision):
        # peft's loaders (AutoPeftModel) fetch the base by these fields, so they get the same identity.
        values = json.loads(peft_config.read_text())
        values["base_model_name_or_path"] = document["base"]["name_or_path"]
        values["revision"] = document["base"].get("revision", values.get("revision"))
        atomic_write_bytes(peft_config, (json.dumps(values, indent=2, sort_keys=True) + "\n").encode())
    folder = inspect_adapter_folder(directory)
    card = build_model_card(folder, files=[*publishable_files(folder), CARD_FILE])
    atomic_write_bytes(directory / CARD_FILE, str(card).encode())
    return directory


def publishable_files(folder: AdapterFolder | ExportedFolder, include: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The folder's files a push uploads: the adapter's own (an exported model's: those its record lists), plus
    top-level files matching `include`."""
    if isinstance(folder, ExportedFolder):
        names = folder.publishable_files
    else:
        names = [WEIGHTS_FILE, CONFIG_FILE, *(n for n in OPTIONAL_FILES if (folder.path / n).is_file())]
    for pattern in include:
        matched = sorted(p.name for p in folder.path.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern))
        if not matched:
            raise FileNotFoundError(f"{folder.path}: no file matches --include {pattern!r}")
        pickles = [name for name in matched if name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(f"{folder.path}: refusing to publish pickled files {pickles}; share safetensors only")
        names += [name for name in matched if name not in names and name != CARD_FILE]
    return names


@dataclasses.dataclass(frozen=True)
class PushPlan:
    """Everything a push will send, decided before any network call."""

    folder: AdapterFolder | ExportedFolder
    repo_id: str
    files: list[str]
    card: ModelCard

    @property
    def description(self) -> str:
        """What is published, in words (the default commit message says it)."""
        if isinstance(self.folder, ExportedFolder):
            return f"model exported from a {self.folder.method} adapter"
        return f"{self.folder.method} adapter"

    @property
    def size_bytes(self) -> int:
        return sum((self.folder.path / name).stat().st_size for name in self.files) + len(str(self.card).encode())


def plan_push(
    directory: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    model_card: str | Path | None = None,
    include: tuple[str, ...] | list[str] = (),
) -> PushPlan:
    """Validate the folder (an adapter folder, or a model folder written by `mmadapter export`) and the repo id,
    and build the card: fails here, offline, or not at all."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from error
    exported = is_exported_folder(directory)
    folder = inspect_exported_folder(directory) if exported else inspect_adapter_folder(directory)
    files = publishable_files(folder, include)
    if model_card is not None:
        card = ModelCard(Path(model_card).read_text())
    elif exported:
        card = build_export_card(folder, repo_id, base_model=base_model, license=license)
    else:
        card = build_model_card(folder, repo_id, base_model=base_model, license=license, files=[*files, CARD_FILE])
    return PushPlan(folder=folder, repo_id=repo_id, files=files, card=card)


def push_to_hub(
    dir_or_model: str | Path | nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    model_card: str | Path | None = None,
    include: tuple[str, ...] | list[str] = (),
    prompt_template: str | None = None,
    training: dict[str, Any] | None = None,
) -> CommitInfo:
    """Publish an adapter folder (or an adapted model) to `repo_id` in one commit with a model card.

    The repo is created if missing (`private` applies then); `revision` names a branch, created
    from main if missing. Validation and the token check happen before any network call.
    """
    with contextlib.ExitStack() as cleanup:
        folder = dir_or_model
        if isinstance(dir_or_model, nn.Module):  # save it to a temporary folder, then publish that
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mmadapter-push-"))
            save_pretrained(
                dir_or_model,
                folder,
                prompt_template=prompt_template,
                training=training,
                base_model=base_model,
                license=license,
            )
        plan = plan_push(
            folder, repo_id, base_model=base_model, license=license, model_card=model_card, include=include
        )
        return send_push(
            plan, private=private, revision=revision, commit_message=commit_message, token=token, endpoint=endpoint
        )


def send_push(
    plan: PushPlan,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Send a checked `PushPlan`: create the repo (and branch) if missing, then one commit."""
    if token is None and get_token() is None:
        raise ValueError(
            "no Hugging Face token: set HF_TOKEN, run `hf auth login`, or name the environment variable that holds "
            "it (mmadapter push --token-env NAME; push_to_hub(token=…) in Python)"
        )
    api = _client(endpoint, token)
    # Ask first: create_repo(exist_ok=True) with a token that may write but not create (fine-grained) falls
    # back to a code path that cannot parse a self-hosted endpoint's URL in huggingface_hub 2.4.
    if not api.repo_exists(plan.repo_id):
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
    if revision not in (None, constants.DEFAULT_REVISION):
        api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.folder.path / name) for name in plan.files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(plan.card).encode()))
    return api.create_commit(
        plan.repo_id,
        operations,
        commit_message=commit_message or f"Upload {plan.description} (mmadapter)",
        revision=revision,
    )


def _missing_weights_message(source: str, folder: Path, remote_files: list[str]) -> str:
    pickles = sorted(
        {p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)}
        | {name for name in remote_files if name.endswith(PICKLE_SUFFIXES)}
    )
    found = f" (it holds {', '.join(pickles)})" if pickles else ""
    return (
        f"{source}: no {WEIGHTS_FILE}{found}. mmadapter loads adapter weights from safetensors only and never "
        "unpickles downloaded files; convert official .pth/.bin checkpoints with `mmadapter convert` "
        "(it reads them with torch.load(weights_only=True)) and share the converted folder"
    )


def _check_adapter_files(source: str, folder: Path, remote_files: list[str]) -> None:
    if not (folder / CONFIG_FILE).is_file():
        peft_hint = (
            "; it is a peft adapter: load it with peft's PeftModel.from_pretrained"
            if (folder / PEFT_CONFIG_FILE).is_file() or PEFT_CONFIG_FILE in remote_files
            else ""
        )
        raise FileNotFoundError(f"{source}: no {CONFIG_FILE}, so this is no mmadapter adapter{peft_hint}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(_missing_weights_message(source, folder, remote_files))


def download_adapter(
    dir_or_repo_id: str | Path,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local adapter folder for a folder path or a hub repo id (downloaded into the hub cache).

    Only the adapter's files are fetched. Offline (`local_files_only` or `HF_HUB_OFFLINE=1`) the
    cached snapshot is used; a hub that cannot be reached also falls back to the cache. An existing
    local folder wins over a repo id of the same name.
    """
    local = Path(dir_or_repo_id)
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"{local}: a revision applies to hub repos, not to a local folder")
        _check_adapter_files(str(local), local, [])
        return local
    repo_id = str(dir_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise FileNotFoundError(f"{repo_id}: no such adapter folder, and not a hub repo id ({error})") from error
    hub = resolve_endpoint(endpoint)
    offline = local_files_only or is_offline()
    # "runs/lora-adapterr" is a repo id in form; when runs/ is here it is far more likely a mistyped folder
    folder_hint = "no such adapter folder, and " if local.parent != Path(".") and local.parent.is_dir() else ""
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=DOWNLOAD_PATTERNS,
                endpoint=hub,
                token=token,
                cache_dir=cache_dir,
                local_files_only=offline,
                library_name="mmadapter",
                library_version=version("mmadapter"),
            )
        )
    except RevisionNotFoundError as error:
        raise FileNotFoundError(f"{repo_id}: no revision {revision!r} on {hub}") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo_id}: {folder_hint}no such repo on {hub} (if it is private, log in with `hf auth login` or set "
            "HF_TOKEN)"
        ) from error
    except LocalEntryNotFoundError as error:
        reason = "offline mode is on" if offline else f"{hub} cannot be reached"
        raise FileNotFoundError(f"{repo_id}: {folder_hint}not in the local hub cache and {reason}") from error
    remote_files: list[str] = []
    if not (snapshot / WEIGHTS_FILE).is_file() and not offline:
        remote_files = _client(hub, token).list_repo_files(repo_id, revision=revision)
    _check_adapter_files(f"{repo_id} ({hub})", snapshot, remote_files)
    return snapshot


def from_pretrained(
    base_model: nn.Module | str | Path,
    dir_or_repo_id: str | Path,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Attach and load an adapter from a folder or a hub repo id onto a fresh base model.

    `base_model` is a loaded model or anything `load_base_model` takes (preset or local folder);
    `overrides` replace machine-specific config fields (see `load_adapter`).
    """
    folder = download_adapter(
        dir_or_repo_id,
        revision,
        endpoint=endpoint,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    if not isinstance(base_model, nn.Module):
        base_model = load_base_model(base_model)
    return load_adapter(base_model, folder, **overrides)  # attach_adapter keeps the base's train/eval mode
