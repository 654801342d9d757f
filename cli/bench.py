"""`peerd bench MODEL`: how fast this machine runs blocks of a model (what `serve` announces)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--blocks", default="0:1", show_default=True, metavar="A:B", help="Blocks to load and time."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--quant", type=click.Choice(["none", "int8", "nf4"]), default="none", show_default=True
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("~/.peerd"),
    show_default=True,
    envvar="PEERD_HOME",
    help="Where the measurement is cached.",
)
@click.option("--force", is_flag=True, help="Measure again even if a cached figure exists.")
def bench(
    model: Path, blocks: str, dtype: str, quant: str, device: str, home: Path, force: bool
) -> None:
    """Measure inference steps/s and forward tokens/s per block of MODEL on this machine."""
    from blocks import BlocksError, LoadedBlocks, checkpoint_fingerprint, measure_throughput

    try:
        start, end = (int(x) for x in blocks.split(":"))
    except ValueError:
        raise click.BadParameter("expected A:B", param_hint="--blocks") from None
    cache = home.expanduser() / "cache"
    try:
        span = LoadedBlocks.load(model, start, end, dtype=dtype, quant=quant, device=device)
        key = f"{model.resolve().name}@{checkpoint_fingerprint(model, cache)}"
        figures = measure_throughput(span, cache, key, force=force)
    except BlocksError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{key}, blocks {start}:{end}, {dtype}, quant {quant}, {device}"
        f"{' (cached)' if figures['cached'] else ''}"
    )
    click.echo(
        f"  inference: {figures['block_inference_steps_per_s']:.1f} steps/s per block "
        f"({figures['inference_steps_per_s']:.1f} through {end - start} blocks)"
    )
    click.echo(
        f"  forward:   {figures['block_forward_tokens_per_s']:.0f} tokens/s per block "
        f"({figures['forward_tokens_per_s']:.0f} through {end - start} blocks)"
    )
