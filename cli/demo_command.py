"""`mmadapter demo`: the embedded default — a frozen tiny LLaMA learns to see, in minutes on a CPU.

Cheap to import: the demo itself (torch, transformers, open_clip) loads inside `run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmadapter.cli.options import announce_loading, port_number


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train LLaMA-Adapter V2 on a tiny frozen LLaMA + CLIP to describe synthetic images (minutes, CPU)",
        description=(
            "Attach LLaMA-Adapter V2 to the tiny frozen LLaMA and CLIP in assets/, train the caption stage "
            "then the instruction stage on a synthetic world of coloured shapes, and measure on held-out "
            "images how often the trained and the untrained adapter name colour, shape, count, size and "
            "position correctly."
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=Path("mmadapter-demo"), help="output folder (default ./mmadapter-demo)"
    )
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer images and steps) for smoke tests")
    parser.add_argument("--ui", action="store_true", help="afterwards, chat with the result in the web UI (gradio)")
    parser.add_argument("--ui-port", type=port_number, default=7860, help="web UI port (default 7860, on 127.0.0.1)")
    parser.add_argument("--assets", type=Path, help="assets folder (default: the repository's assets/)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: one per idle core, at most 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo's world and training (default 0)")
    parser.add_argument("--json", action="store_true", help="print metrics.json at the end")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    announce_loading("torch, transformers and open_clip")
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.cli.demo.app import DemoOptions, run_demo

    options = DemoOptions(
        output=args.output,
        quick=args.quick,
        assets=args.assets,
        threads=args.threads,
        seed=args.seed,
        ui=args.ui,
        ui_port=args.ui_port,
        print_json=args.json,
    )
    return run_demo(options)
