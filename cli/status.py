"""`peerd status`: the swarm as the local daemon sees it — models, coverage, servers."""

from __future__ import annotations

from pathlib import Path

import click


def coverage_bar(counts: list[int]) -> str:
    """One character per block: '.' for a gap, else how many servers cover it (9+ as '+')."""
    return "".join("." if n == 0 else (str(n) if n < 10 else "+") for n in counts)


def format_status(models: dict) -> str:
    if not models:
        return "No servers in the swarm yet."
    lines: list[str] = []
    for model_id in sorted(models):
        info = models[model_id]
        gaps = info.get("gaps", [])
        gap_text = ", ".join(f"{a}..{b - 1}" for a, b in gaps) if gaps else "none"
        lines.append(f"Model {model_id}  ({info['num_blocks']} blocks)")
        lines.append(f"  coverage  {coverage_bar(info['coverage'])}")
        lines.append(f"  gaps      {gap_text}")
        lines.append(
            f"  {'peer':<16} {'blocks':>9} {'state':<8} {'steps/s/blk':>11} {'fwd tok/s':>10} {'cache free':>10} {'quant':<5} relay"
        )
        for s in sorted(info["servers"], key=lambda s: (s["start"], s["end"], s["peer_id"])):
            lines.append(
                f"  …{s['peer_id'][-15:]:<15} {s['start']:>4}:{s['end']:<4} {s['state']:<8} "
                f"{s['inference_throughput']:>11.1f} {s['forward_throughput']:>10.0f} "
                f"{s['free_cache_tokens']:>10,} {s['quant']:<5} {'yes' if s['using_relay'] else 'no'}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


@click.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Daemon socket (default: $PEERD_SOCKET or ~/.peerd/peerd.sock).",
)
def status(socket_path: Path | None) -> None:
    """Print the models in the swarm, their block coverage and their servers."""
    from peerd.client import DaemonClient, PeerdError

    try:
        models = DaemonClient(socket_path).models()
    except PeerdError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_status(models))
