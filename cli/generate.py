"""`peerd generate --model M "prompt"`: stream a continuation through the local daemon."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--model",
    required=True,
    help="Checkpoint directory of the model (the daemon loads its head and tokenizer).",
)
@click.argument("prompt")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="New tokens at most (default: the checkpoint's generation_config.json, else 20).",
)
@click.option(
    "--do-sample/--greedy",
    default=None,
    help="Sample, or decode greedily (default: the checkpoint's generation_config.json, else greedy).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=None,
    help="Sampling temperature; without --do-sample/--greedy, > 0 samples and 0 is greedy.",
)
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="0: no top-k cut.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option(
    "--min-p",
    type=click.FloatRange(min=0, max=1),
    default=None,
    help="Drop tokens less likely than this times the most likely one (when sampling).",
)
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option(
    "--stop",
    multiple=True,
    help="Stop when the text contains this; the output ends before it (repeatable).",
)
@click.option(
    "--num-beams",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Beam search over this many hypotheses (the best one is printed at the end).",
)
@click.option("--seed", type=int, default=None)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Daemon socket (default: $PEERD_SOCKET or ~/.peerd/peerd.sock).",
)
def generate(model: str, prompt: str, socket_path: Path | None, **opts) -> None:
    """Generate text after PROMPT with the swarm, printing tokens as they arrive."""
    from peerd.client import DaemonClient, PeerdError

    model_path = Path(model).expanduser()
    if model_path.exists():
        model = str(model_path.resolve())
    try:
        for piece in DaemonClient(socket_path).generate(
            model, prompt, stream=True, stop=opts.pop("stop"), **opts
        ):
            click.echo(piece, nl=False)
    except PeerdError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo()
