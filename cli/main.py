"""The `peerd` command line: one click group, one subcommand per job."""

from __future__ import annotations

import importlib

import click

from peerd import __version__

# Subcommands live in their own modules (cli/<name>.py, each defining a click command or group
# named like the module); a missing module just leaves its command out.
_SUBCOMMANDS = ("serve", "join", "generate", "status", "sim", "bench", "demo")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peerd")
def cli() -> None:
    """peerd: pool GPUs over the Internet to run and fine-tune large language models."""


for _name in _SUBCOMMANDS:
    try:
        _module = importlib.import_module(f"cli.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"cli.{_name}":
            raise
        continue
    cli.add_command(getattr(_module, _name))


if __name__ == "__main__":
    cli()
