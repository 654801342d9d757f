"""The `peerd` command line: one click group, one subcommand per job."""

from __future__ import annotations

import click

from peerd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peerd")
def cli() -> None:
    """peerd: pool GPUs over the Internet to run and fine-tune large language models."""


if __name__ == "__main__":
    cli()
