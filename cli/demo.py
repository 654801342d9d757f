"""`peerd demo`: a private swarm on loopback survives a server crash mid-generation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the model and the daemons' homes (default: a temporary directory).",
)
@click.option("--new-tokens", type=click.IntRange(min=2), default=24, show_default=True)
@click.option(
    "--kill-after",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Kill a server after this many generated tokens.",
)
def demo(workdir: Path | None, new_tokens: int, kill_after: int) -> None:
    """Start a bootstrap and three servers of a generated tiny model, generate, kill one, recover."""
    from peerd.demo.run import run_demo

    if kill_after >= new_tokens:
        raise click.UsageError("--kill-after must be smaller than --new-tokens")
    if workdir is not None:
        ok = run_demo(workdir, new_tokens=new_tokens, kill_after=kill_after, echo=click.echo)
    else:
        with tempfile.TemporaryDirectory(prefix="peerd-demo-") as tmp:
            ok = run_demo(Path(tmp), new_tokens=new_tokens, kill_after=kill_after, echo=click.echo)
    if not ok:
        raise SystemExit(1)
