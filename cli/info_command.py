"""`mmadapter info`: total and trainable parameters of a method on a base, without weights."""

from __future__ import annotations

import argparse
import json

from mmadapter.cli.options import announce_loading, parse_assignments


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="count total and trainable parameters (built on the meta device: no weights, no memory)",
        description="Build BASE with METHOD attached on the meta device and report its parameters.",
    )
    parser.add_argument(
        "--base", required=True, help="a preset (llama-7b, chatglm-6b, tiny-llama, …) or a model folder"
    )
    parser.add_argument("--method", required=True, help="llama-adapter-v1, llama-adapter-v2, lora or ptuning-v2")
    parser.add_argument("--preset", help="a named configuration of the method (e.g. a released model's)")
    parser.add_argument("--stage", help="training stage for methods that have stages (caption, instruction)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    announce_loading()
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.backbones.loading import read_base_config
    from mmadapter.adapters.backbones.presets import build_base_model
    from mmadapter.adapters.methods.base import attach_adapter, make_config
    from mmadapter.adapters.methods.report import format_report, parameter_report

    config = make_config(args.method, args.preset, **parse_assignments(args.set))
    model = build_base_model(read_base_config(args.base), device="meta")
    attach_adapter(model, config)
    report = {"base": str(args.base), "preset": args.preset, **parameter_report(model, args.stage)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"base        {args.base}")
        print(format_report(report))
    return 0
