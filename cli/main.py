"""The `mmadapter` command line: one console script, one subcommand per job (DESIGN §5).

Each command module exposes `add_commands(subparsers)`; every command prints for people and
takes `--json` where a machine might read its output. Every error passes one boundary
(`mmadapter.cli.errors`): a user's mistake is a one-line `error:` and exit code 2, an internal
error one line naming a log file with the traceback and exit code 1; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from mmadapter.cli import errors

#: Modules that add subcommands; each has `add_commands(subparsers)`.
COMMAND_MODULES = (
    "mmadapter.cli.info_command",
    "mmadapter.cli.convert_command",
    "mmadapter.cli.push_command",
    "mmadapter.cli.export_command",
    "mmadapter.cli.train_command",
    "mmadapter.cli.serve_commands",
    "mmadapter.cli.demo_command",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistyped option gets the one error line and a pointer to --help, not the whole usage
    (`mmadapter serve`'s is 25 lines, which buries the line that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmadapter",
        description="Parameter-efficient, multimodal fine-tuning of Llama, Mistral, Qwen and ChatGLM.",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    for command in subparsers.choices.values():  # `mmadapter train … --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one boundary: see mmadapter.cli.errors
        if args.debug:
            raise
        return errors.report(error, argv)


if __name__ == "__main__":
    sys.exit(main())
