"""The ``peft-infosteer`` command: ``train``, ``merge``, ``demo`` and ``flux``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``; this module
only wires them together and turns expected errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .assets import MissingAssetError

__all__ = ["main"]

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("peft_infosteer.commands.demo", "offline InfoSteer + LoRA fine-tune of the real SmolLM2-135M-Instruct"),
    "train": ("peft_infosteer.commands.train", "TRL SFT with InfoSteer (every SFTConfig/ModelConfig flag works)"),
    "merge": ("peft_infosteer.commands.merge", "merge an InfoSteer adapter into its base model for serving"),
    "flux": ("peft_infosteer.commands.flux", "information-flux report, plots and HTML for one or more models"),
}


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-infosteer",
        description="InfoSteer as a PEFT adapter: train, merge, analyse information flux.",
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"peft-infosteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            # import only the chosen subcommand: the others pull in heavy dependencies for nothing
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-infosteer`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] | argparse.Namespace
    if argv and argv[0] == "train":
        # every flag after `train` belongs to TRL's own parser (see peft_infosteer.commands.train)
        command, module, rest = "train", importlib.import_module(SUBCOMMANDS["train"][0]), argv[1:]
    else:
        args = _build_parser(argv).parse_args(argv)
        command, module, rest = args.command, importlib.import_module(SUBCOMMANDS[args.command][0]), args
    try:
        return int(module.run(rest) or 0)
    except (FileNotFoundError, ValueError, MissingAssetError) as exc:
        print(f"peft-infosteer {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peft-infosteer {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
