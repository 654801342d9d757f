"""`peerd bench MODEL`: how fast this machine runs blocks of a model (what `serve` announces)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.options import dataclass_options, field_values
from peerd.config import NodeConfig
from peerd.server.options import ServeOptions, parse_blocks

SIZING = ("dtype", "quant", "gpu", "device")


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--blocks", default="0:1", show_default=True, metavar="A:B", help="Blocks to load and time."
)
@dataclass_options(ServeOptions, only=SIZING)
@dataclass_options(NodeConfig, only=["home"])
@click.option("--force", is_flag=True, help="Measure again even if a cached figure exists.")
def bench(model: Path, blocks: str, force: bool, **opts: Any) -> None:
    """Measure inference steps/s and forward tokens/s per block of MODEL on this machine."""
    from blocks import BlocksError, LoadedBlocks, checkpoint_fingerprint, measure_throughput

    try:
        start, end = parse_blocks(blocks)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--blocks") from None
    serve = ServeOptions(model_path=model, **field_values(ServeOptions, opts, only=[*SIZING]))
    dtype, quant, device = serve.dtype, serve.quant, serve.device
    home = field_values(NodeConfig, opts, only=["home"])["home"]
    cache = Path(home).expanduser() / "cache"
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
