"""`mmadapter push DIR REPO_ID`: publish an adapter folder, or a model folder written by `mmadapter export`, to
the Hugging Face hub with a model card.

The folder is checked offline before anything is sent; the token comes from huggingface_hub's usual
places (HF_TOKEN, `hf auth login`) or from the environment variable named by `--token-env`, never
from the command line (where shell history and process lists would keep it), and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an adapter folder or an exported model to the Hugging Face hub (one commit, with a model card)",
        description="Check DIR offline, then upload its adapter files (or, for a folder written by `mmadapter "
        "export`, the model's files) and a generated README.md to REPO_ID in one commit. The repo is created if it "
        "does not exist.",
    )
    parser.add_argument(
        "directory",
        metavar="DIR",
        type=Path,
        help="adapter folder (adapter_model.safetensors + mmadapter_config.json), or an `mmadapter export` folder",
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="hub repository, e.g. yourname/llama-7b-adapter-v1-alpaca")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument(
        "--revision", metavar="BRANCH", help="branch to commit to (created from main if missing; default main)"
    )
    parser.add_argument(
        "--commit-message", metavar="MSG", help="commit message (default: 'Upload METHOD adapter (mmadapter)')"
    )
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="read the access token from this environment variable (default: HF_TOKEN or the `hf auth login` cache)",
    )
    parser.add_argument(
        "--endpoint", metavar="URL", help="hub URL for self-hosted hubs (default: $HF_ENDPOINT or huggingface.co)"
    )
    parser.add_argument(
        "--base-model", metavar="HUB_ID", help="hub id of the base model for the card, e.g. huggyllama/llama-7b"
    )
    parser.add_argument("--license", metavar="ID", help="license id for the card, e.g. apache-2.0 or other")
    parser.add_argument(
        "--model-card", metavar="FILE", type=Path, help="publish this README.md instead of the generated card"
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload top-level files of DIR matching PATTERN (e.g. '*.png'); pickles are refused",
    )
    parser.add_argument("--dry-run", action="store_true", help="check the folder and show what would be sent")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.set_defaults(run=run)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_env is None:
        return None
    token = os.environ.get(args.token_env)
    if not token:
        raise ValueError(f"--token-env {args.token_env}: that environment variable is not set")
    return token


def run(args: argparse.Namespace) -> int:
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    import httpx2

    from mmadapter.adapters.io.hub import plan_push, resolve_endpoint, send_push

    if args.model_card is not None and not args.model_card.is_file():
        raise FileNotFoundError(f"--model-card {args.model_card}: no such file; give the README.md to publish")
    options = {"base_model": args.base_model, "license": args.license, "model_card": args.model_card}
    plan = plan_push(args.directory, args.repo_id, include=args.include, **options)
    report = {
        "repo_id": args.repo_id,
        "revision": args.revision or "main",
        "endpoint": resolve_endpoint(args.endpoint),
        "method": plan.folder.method,
        "what": plan.description,
        "files": [*plan.files, "README.md"],
        "bytes": plan.size_bytes,
    }
    if args.dry_run:
        if args.json:
            print(json.dumps({**report, "model_card": str(plan.card)}, indent=2))
        else:
            print(
                f"would upload {len(report['files'])} files ({report['bytes']:,} bytes) to {args.repo_id}: "
                f"{', '.join(report['files'])}\n\n{plan.card}"
            )
        return 0
    try:
        info = send_push(
            plan,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=_token(args),
            endpoint=args.endpoint,
        )
    except httpx2.HTTPError as error:
        raise ValueError(f"push to {args.repo_id} on {report['endpoint']} failed: {error}") from error
    report.update(commit_url=info.commit_url, commit_oid=info.oid)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"pushed {len(report['files'])} files ({report['bytes']:,} bytes) to {args.repo_id}: {info.commit_url}")
    return 0
