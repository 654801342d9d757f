"""Click options shared by the daemons (`peerd serve`, `peerd join`) and how to run a Node."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.config_file import config_option
from cli.options import dataclass_options, field_values
from peerd.config import NodeConfig

if TYPE_CHECKING:  # heavy imports stay inside the commands
    from peerd.daemon import Daemon
    from peerd.node import NodeInfo

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DAEMON_COMMANDS = ("serve", "join")  # the commands that read `--config` files (their tables)

daemon_config_option = config_option(DAEMON_COMMANDS)


def network_options() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with the host, identity, swarm and relay options (NodeConfig's
    option fields) and --log-level."""

    log_level = click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="INFO",
        show_default=True,
        help="Level of the log lines on stderr.",
    )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        return dataclass_options(NodeConfig)(log_level(fn))

    return decorate


def socket_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--socket: where the daemon's local API listens (Daemon's `socket_path`)."""
    return click.option(
        "--socket",
        "socket",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=help,
    )


def split_addrs(values: tuple[str, ...] | list[str]) -> list[str]:
    """Accept repeated options as well as space- or comma-separated lists."""
    return [a for v in values for a in re.split(r"[\s,]+", v) if a]


def node_config(opts: dict[str, Any]) -> NodeConfig:
    """A NodeConfig from the values of `network_options`; a usage error says what to fix."""
    values = field_values(NodeConfig, opts)
    values["initial_peers"] = initial = split_addrs(values["initial_peers"])
    values["announce_addrs"] = split_addrs(values["announce_addrs"])
    if not initial and not values["new_swarm"]:
        raise click.UsageError(
            "there is no swarm to join. Pass --initial-peers MULTIADDR (any running peer prints "
            "its addresses at start), or --new-swarm to start a new private swarm."
        )
    for addr in initial:
        check_peer_addr(addr)
    try:
        return NodeConfig(**values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def check_peer_addr(text: str) -> None:
    """A usage error unless `text` is a multiaddr ending in /p2p/<peer id>."""
    import multiaddr

    try:
        addr = multiaddr.Multiaddr(text)
        ok = addr.get_peer_id() is not None
    except Exception:
        ok = False
    if not ok:
        raise click.UsageError(
            f"--initial-peers {text!r} is not a peer address: expected a multiaddr ending in "
            "/p2p/<peer id>, such as /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
        )


def banner(info: NodeInfo) -> str:
    """What a daemon prints at start for the person who started it (nothing parses it)."""
    lines = [f"Peer id: {info.peer_id}", "Listening on:"] + [f"  {a}" for a in info.addrs]
    if info.relay_addrs:
        lines += ["Reachable through relays at:"] + [f"  {a}" for a in info.relay_addrs]
    if info.new_swarm:
        lines += [
            "Started a new swarm. Others join it with:",
            f"  peerd join --initial-peers {' '.join(info.joinable)}",
        ]
    mode = "reachable" if info.reachable else "behind NAT/firewall"
    lines.append(f"Ready ({mode}; DHT {'server' if info.reachable else 'client'} mode).")
    return "\n".join(lines)


def run_daemon(daemon: Daemon, log_level: str) -> None:
    """Run `daemon` until SIGINT/SIGTERM, then shut it down gracefully (exit status 0)."""
    import logging
    import signal

    import trio

    from peerd.logging import setup_logging
    from peerd.node import ListenError, NoSwarmError

    setup_logging(log_level)

    async def _main() -> None:
        async with trio.open_nursery() as nursery:

            async def run_then_stop(task_status=trio.TASK_STATUS_IGNORED) -> None:
                try:  # a daemon that stops by itself (a failed move: OFFLINE) ends the process
                    await daemon.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()

            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(run_then_stop)
                click.echo(banner(daemon.node.info()))
                async for signum in signals:
                    logging.getLogger("peerd").info("received %s", signal.Signals(signum).name)
                    await daemon.shutdown()
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(_main)
    except BaseException as exc:  # trio wraps errors of the node's start in exception groups
        inner = exc
        while len(getattr(inner, "exceptions", ())) == 1:
            inner = inner.exceptions[0]  # type: ignore[attr-defined]
        if isinstance(inner, NoSwarmError):
            raise click.UsageError(str(inner)) from None
        if isinstance(inner, (ListenError, ValueError)):
            raise click.ClickException(str(inner)) from None
        raise
