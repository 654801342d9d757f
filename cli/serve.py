"""`peerd serve MODEL`: serve the blocks of a model that the swarm needs most."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import network_options, node_config, run_daemon


def _parse_blocks(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        start, end = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter("expected A:B, e.g. 0:8 for blocks 0..7") from None
    if not 0 <= start < end:
        raise click.BadParameter(f"{value}: need 0 <= A < B")
    return start, end


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model-name", default=None, help="Name in the model id (default: the directory's name)."
)
@click.option(
    "--blocks", callback=_parse_blocks, metavar="A:B", help="Serve exactly blocks A..B-1."
)
@click.option(
    "--num-blocks",
    type=click.IntRange(min=1),
    help="Serve this many blocks, where the swarm needs them.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).",
)
@click.option(
    "--quant",
    type=click.Choice(["none", "int8", "nf4"]),
    default="none",
    show_default=True,
    help="Weight quantization (bitsandbytes LLM.int8 or NF4).",
)
@click.option(
    "--gpu", type=click.IntRange(min=0), default=None, help="CUDA device index to serve on."
)
@click.option("--device", default=None, help="torch device (e.g. cpu, cuda:1); --gpu N is cuda:N.")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Local API socket (default: HOME/peerd.sock).",
)
@click.option(
    "--cache-tokens",
    type=click.IntRange(min=0),
    default=16384,
    show_default=True,
    help="KV-cache budget in tokens over all sessions.",
)
@click.option(
    "--cache-mib",
    type=click.IntRange(min=0),
    default=None,
    help="KV-cache budget in MiB (the smaller budget wins).",
)
@click.option("--max-sessions", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--max-tokens-per-request", type=click.IntRange(min=1), default=8192, show_default=True
)
@click.option(
    "--max-frame-mib",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Largest message accepted from a peer.",
)
@click.option(
    "--step-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds a request may wait for the compute device before 'busy'.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds before an idle inference session is closed.",
)
@click.option(
    "--rebalance-period",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds between checks whether other blocks need us more (0: never).",
)
@network_options(default_host="0.0.0.0")
def serve(model: Path, **opts: Any) -> None:
    """Serve blocks of MODEL (an HF-format checkpoint directory) to the swarm."""
    from peerd.daemon import Daemon
    from peerd.server.limits import ServerLimits
    from peerd.server.service import ServeOptions

    _check_model(model, opts["blocks"])
    device = opts["device"] or (f"cuda:{opts['gpu']}" if opts["gpu"] is not None else "cpu")
    dtype = opts["dtype"] or ("float32" if device == "cpu" else "bfloat16")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"{device} asked for, but torch sees no CUDA device here")
    limits = ServerLimits(
        cache_tokens=opts["cache_tokens"],
        cache_bytes=opts["cache_mib"] * 2**20 if opts["cache_mib"] is not None else None,
        max_sessions=opts["max_sessions"],
        max_tokens_per_request=opts["max_tokens_per_request"],
        max_frame=opts["max_frame_mib"] * 2**20,
        step_timeout=opts["step_timeout"],
        idle_timeout=opts["idle_timeout"],
    )
    serve_options = ServeOptions(
        model_path=model,
        model_name=opts["model_name"],
        blocks=opts["blocks"],
        num_blocks=opts["num_blocks"],
        dtype=dtype,
        quant=opts["quant"],
        device=device,
        limits=limits,
        rebalance_period=opts["rebalance_period"],
    )
    daemon = Daemon(
        node_config(opts),
        socket_path=opts["socket_path"],
        serve=serve_options,
        max_frame=limits.max_frame,
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
