"""The `mmadapter` command line: one console script, one subcommand per job (DESIGN §5).

Each command module exposes `add_commands(subparsers)`; every command prints for people and
takes `--json` where a machine might read its output. Expected failures (bad paths, shapes,
options) end with a one-line `error:` message and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules that add subcommands; each has `add_commands(subparsers)`.
COMMAND_MODULES = (
    "mmadapter.cli.info_command",
    "mmadapter.cli.convert_command",
    "mmadapter.cli.push_command",
    "mmadapter.cli.train_command",
    "mmadapter.cli.serve_commands",
    "mmadapter.cli.demo_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmadapter",
        description="Parameter-efficient, multimodal fine-tuning of LLaMA and ChatGLM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
