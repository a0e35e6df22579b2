"""`mmadapter info`: total and trainable parameters of a method on a base, without weights; `--list` names the
base presets, the methods and each method's presets (the names the other options take)."""

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
    parser.add_argument("--base", help="a preset (llama3-8b, qwen3-8b, chatglm-6b, …; see --list) or a model folder")
    parser.add_argument("--method", help="llama-adapter-v1, llama-adapter-v2, lora or ptuning-v2")
    parser.add_argument("--preset", help="a named configuration of the method (e.g. a released model's)")
    parser.add_argument("--stage", help="training stage for methods that have stages (caption, instruction)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    parser.add_argument("--list", action="store_true", help="list the base presets, methods and method presets")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.list and not (args.base and args.method):
        raise ValueError("info needs --base and --method (or --list to see the names they take)")
    announce_loading()
    if args.list:
        return print_names(args.json)
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


def names() -> dict[str, dict[str, object]]:
    """Base presets (with their model_type and size) and methods (with their presets and stages)."""
    from mmadapter.adapters.backbones.presets import BASE_PRESETS
    from mmadapter.adapters.methods.base import available_methods, get_method

    bases = {name: _shape(make()) for name, make in BASE_PRESETS.items()}
    methods = {
        name: {"presets": sorted(get_method(name).presets), "stages": list(get_method(name).stages)}
        for name in available_methods()
    }
    return {"bases": bases, "methods": methods}


def _shape(config) -> dict[str, object]:
    """What tells presets apart at a glance (ChatGLM names its layer count `num_layers`)."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    return {"model_type": config.model_type, "layers": layers, "hidden_size": config.hidden_size}


def print_names(as_json: bool) -> int:
    listing = names()
    if as_json:
        print(json.dumps(listing, indent=2))
        return 0
    print("base presets (--base; or a model folder):")
    for name, shape in listing["bases"].items():
        print(f"  {name:<15} {shape['model_type']:<8} {shape['layers']:>3} layers, hidden {shape['hidden_size']}")
    print("methods (--method) and their presets (--preset):")
    for name, method in listing["methods"].items():
        stages = f"  stages: {', '.join(method['stages'])}" if method["stages"] else ""
        print(f"  {name:<17} {', '.join(method['presets']) or '-'}{stages}")
    return 0
