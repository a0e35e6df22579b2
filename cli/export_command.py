"""`mmadapter export --base BASE --adapter DIR OUTPUT`: a standalone Hugging Face model where the adapter folds in.

LoRA merges; LLaMA-Adapter V2 without prompts folds its scales, biases and norms. What cannot fold is refused
before the base loads, saying why and what to do instead (`mmadapter.adapters.io.export`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mmadapter.cli.options import announce_loading

_SIZE = re.compile(r"\d+(?:[KMG]i?B)?")


def shard_size(value: str) -> str | int:
    """argparse type of a shard size as transformers reads it: bytes, or a number with KB, MB, GB (or KiB, …)."""
    if not _SIZE.fullmatch(value) or int(re.match(r"\d+", value).group()) == 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: use e.g. 5GB, 500MB or 2GiB")
    return int(value) if value.isdigit() else value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="fold an adapter into its base and write a standalone Hugging Face model (LoRA; V2 without prompts)",
        description="Write OUTPUT: config.json, safetensors shards, tokenizer, generation config and a model card, "
        "loadable with plain transformers (AutoModelForCausalLM.from_pretrained) and by serving engines. LoRA is "
        "merged; LLaMA-Adapter V2 without prompts (e.g. the chat65b preset) folds its scales, biases and norms. "
        "Prompts (V1, V2), prefixes (P-Tuning v2) and V2's visual path cannot fold and are refused.",
    )
    parser.add_argument("output", metavar="OUTPUT", type=Path, help="folder to write (new or empty; see --force)")
    parser.add_argument("--base", required=True, help="base model: a folder (HF or Meta layout) or a preset")
    parser.add_argument("--adapter", required=True, help="adapter folder or hub repo id")
    parser.add_argument("--revision", help="hub revision of --adapter")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the base folder)")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="precision of the saved weights (default: the base checkpoint's; folding is computed in float32)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 2GB (default 5GB)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.set_defaults(run=run)


def _progress(line: str) -> None:
    print(f"mmadapter: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    announce_loading()
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.io.export import check_output, export_model, plan_export
    from mmadapter.adapters.io.hub import download_adapter

    check_output(args.output, force=args.force)  # before the adapter downloads or the base loads
    folder = download_adapter(args.adapter, args.revision)
    plan = plan_export(args.base, folder, adapter_source=args.adapter, dtype=args.dtype)
    result = export_model(
        plan,
        args.output,
        tokenizer=args.tokenizer,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=_progress,
    )
    report = {
        "output": str(args.output),
        "base": args.base,
        "adapter": args.adapter,
        "method": plan.adapter.method,
        "model_type": result.folder.record.model_type,
        "dtype": result.folder.record.dtype,
        "parameters": result.folder.parameters,
        "config_changes": plan.config_changes,
        "folded": plan.folded,
        "files": result.files,
        "bytes": result.size_bytes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"exported {report['parameters']:,} parameters ({report['dtype']}, {len(result.files)} files, "
            f"{report['bytes']:,} bytes) to {args.output}; it loads with "
            f'AutoModelForCausalLM.from_pretrained("{args.output}")'
        )
    return 0
