"""Subcommands of the ``peft-infosteer`` command line (see ``peft_infosteer.cli``)."""
