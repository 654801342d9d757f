"""`peerd sim ...`: the swarm simulator's scenarios (simnet/), each a table and a PNG plot.

Heavy imports (simnet, matplotlib) stay inside the commands so `peerd --help` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

_OUT = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sim-out"),
    show_default=True,
    help="Folder for the PNG plots.",
)
_SEED = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


@click.group()
def sim() -> None:
    """Simulate a swarm: load balancing, fault tolerance, churn (seeded, deterministic)."""
    import importlib.util

    missing = [m for m in ("simpy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.UsageError(f"peerd sim needs {' and '.join(missing)}: pip install 'peerd[sim]'")


@sim.command()
@_SEED
@_OUT
@click.option(
    "--swarms",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Swarms graded against the exact optimum.",
)
@click.option(
    "--servers",
    type=click.IntRange(min=1, max=14),
    default=10,
    show_default=True,
    help="Servers in each of those swarms (the exact search grows fast past 10).",
)
@click.option(
    "--large-swarms",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="Swarms of 20-100 servers graded against an upper bound on the optimum.",
)
@click.option("--blocks", type=click.IntRange(min=1), default=80, show_default=True)
@click.option(
    "--min-gain", type=click.FloatRange(min=0.0), default=None, help="should_move's threshold."
)
def balance(
    seed: int,
    out: Path,
    swarms: int,
    servers: int,
    large_swarms: int,
    blocks: int,
    min_gain: float | None,
) -> None:
    """Scenario 1: swarm throughput after joins and rebalancing, as a fraction of optimal."""
    from balancing import DEFAULT_MIN_GAIN
    from simnet.balance import report, run_balance

    if swarms + large_swarms == 0:
        raise click.BadParameter("nothing to simulate", param_hint="--swarms/--large-swarms")
    started = time.perf_counter()
    results = run_balance(
        seed=seed,
        exact_swarms=swarms,
        exact_servers=servers,
        large_swarms=large_swarms,
        num_blocks=blocks,
        min_gain=DEFAULT_MIN_GAIN if min_gain is None else min_gain,
    )
    text, path = report(results, out)
    click.echo(text)
    unproved = sum(1 for r in results[:swarms] if not r.exact)
    if unproved:
        click.echo(f"({unproved} small swarms hit the search limit: graded against the bound)")
    click.echo(f"plot: {path}  ({time.perf_counter() - started:.1f} s)")


@sim.command()
@_SEED
@_OUT
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Generations per model, length, failure rate and strategy.",
)
@click.option(
    "--tokens",
    "lengths",
    type=click.IntRange(min=1),
    multiple=True,
    default=(128, 1024),
    show_default=True,
    help="Tokens to generate (repeat for several).",
)
@click.option(
    "--rate",
    "rates",
    type=click.FloatRange(min=0.0, max=1.0),
    multiple=True,
    default=(0.0, 1e-3, 1e-2),
    show_default=True,
    help="Per-step failure probability of each server (repeat for several).",
)
@click.option(
    "--model",
    "models",
    type=click.Choice(["bloom-7b1", "bloom-176b"]),
    multiple=True,
    default=("bloom-7b1", "bloom-176b"),
    show_default=True,
)
def failures(
    seed: int,
    out: Path,
    runs: int,
    lengths: tuple[int, ...],
    rates: tuple[float, ...],
    models: tuple[str, ...],
) -> None:
    """Scenario 2: steps/s of generation with failing servers, three recovery strategies."""
    from simnet.failures import report, run_failures
    from simnet.timing import SHAPES

    started = time.perf_counter()
    rows = run_failures(
        seed=seed,
        shapes=tuple(SHAPES[m] for m in models),
        lengths=lengths,
        rates=rates,
        runs=runs,
    )
    text, path = report(rows, out)
    click.echo(text)
    click.echo(f"plot: {path}  ({time.perf_counter() - started:.1f} s)")


@sim.command()
@_SEED
@_OUT
@click.option("--hours", type=click.FloatRange(min=0.01), default=4.0, show_default=True)
@click.option(
    "--servers",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="Servers at the start; as many join per hour as leave on average.",
)
@click.option(
    "--sessions-per-minute", type=click.FloatRange(min=0.0), default=6.0, show_default=True
)
def churn(seed: int, out: Path, hours: float, servers: int, sessions_per_minute: float) -> None:
    """Scenario 3: swarm throughput and session success under churn, rebalancing off and on."""
    from simnet.churn import ChurnConfig, report, run_churn

    started = time.perf_counter()
    base = ChurnConfig()
    config = ChurnConfig(
        duration_s=hours * 3600.0,
        initial_servers=servers,
        joins_per_hour=servers / (base.mean_lifetime_s / 3600.0),
        sessions_per_minute=sessions_per_minute,
    )
    text, path = report(run_churn(config, seed), out)
    click.echo(text)
    click.echo(f"plot: {path}  ({time.perf_counter() - started:.1f} s)")
