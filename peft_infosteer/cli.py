"""The ``peft-infosteer`` command: ``train``, ``merge``, ``demo`` and ``flux``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``; this module
only wires them together and turns expected errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peft_infosteer.commands.demo", "offline InfoSteer + LoRA fine-tune of the real SmolLM2-135M-Instruct"),
    "train": ("peft_infosteer.commands.train", "TRL SFT with InfoSteer (every SFTConfig/ModelConfig flag works)"),
    "merge": ("peft_infosteer.commands.merge", "merge an InfoSteer adapter into its base model for serving"),
    "flux": ("peft_infosteer.analysis.command", "information-flux report, plots and HTML for one or more models"),
}


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="peft-infosteer",
        description="InfoSteer as a PEFT adapter: train, merge, analyse information flux.",
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"peft-infosteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, add_help=name != "train")
        if name == "train":
            # `train` hands every remaining flag to TRL's own parser (see peft_infosteer.commands.train)
            continue
        importlib.import_module(module).add_arguments(sp)
    if argv and argv[0] == "train":
        return parser, argparse.Namespace(command="train"), list(argv[1:])
    return parser, None, []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-infosteer`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args, rest = _build_parser(argv)
    if args is None:
        args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        if args.command == "train":
            return int(module.run(rest) or 0)
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"peft-infosteer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peft-infosteer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
