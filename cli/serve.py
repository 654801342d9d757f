"""`peerd serve MODEL`: serve the blocks of a model that the swarm needs most."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import (
    daemon_config_option,
    network_options,
    node_config,
    run_daemon,
    socket_option,
)
from cli.options import dataclass_options, field_values
from peerd.server.limits import ServerLimits
from peerd.server.options import ServeOptions


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@daemon_config_option
@dataclass_options(ServeOptions)
@socket_option("Local API socket (default: HOME/peerd.sock).")
@dataclass_options(ServerLimits)
@network_options()
def serve(model: Path, **opts: Any) -> None:
    """Serve blocks of MODEL (an HF-format checkpoint directory) to the swarm."""
    from peerd.daemon import Daemon

    options = ServeOptions(
        model_path=model,
        limits=ServerLimits(**field_values(ServerLimits, opts)),
        **field_values(ServeOptions, opts),
    )
    _check_model(model, options.blocks)
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(
                f"{options.device} asked for, but torch sees no CUDA device here"
            )
    daemon = Daemon(
        node_config(opts),
        socket_path=opts["socket"],
        serve=options,
        max_frame=options.limits.max_frame,
    )
    run_daemon(daemon, opts["log_level"])


def _check_model(model: Path, blocks: tuple[int, int] | None) -> None:
    """Refuse an unreadable checkpoint or blocks it lacks now, not with a traceback after joining."""
    from blocks import BlocksError, load_config

    try:
        total = load_config(model).num_blocks
    except BlocksError as exc:
        raise click.BadParameter(str(exc), param_hint="'MODEL'") from None
    if blocks is not None and blocks[1] > total:
        raise click.BadParameter(
            f"{blocks[0]}:{blocks[1]}: {model.name} has {total} blocks (0:{total} serves them all)",
            param_hint="'--blocks'",
        )
