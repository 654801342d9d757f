"""Click options shared by the daemons (`peerd serve`, `peerd join`) and how to run a Node."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # heavy imports stay inside the commands
    from peerd.config import NodeConfig
    from peerd.daemon import Daemon
    from peerd.node import NodeInfo

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def network_options(
    default_host: str = "0.0.0.0",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with the host, identity, swarm and relay options (NodeConfig)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option(
                "--home",
                type=click.Path(file_okay=False, path_type=Path),
                default=Path("~/.peerd"),
                show_default=True,
                envvar="PEERD_HOME",
                help="Directory for this daemon's state (identity key, ...).",
            ),
            click.option(
                "--identity",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="Identity key file (default: HOME/identity.key, created on first start).",
            ),
            click.option(
                "--host", default=default_host, show_default=True, help="IP address to listen on."
            ),
            click.option(
                "--port",
                type=click.IntRange(0, 65535),
                default=0,
                show_default=True,
                help="TCP port to listen on (0: any free port).",
            ),
            click.option(
                "--announce-addr",
                "announce_addrs",
                multiple=True,
                metavar="MULTIADDR",
                help="Public address to advertise, e.g. /ip4/203.0.113.5/tcp/31337 (repeatable).",
            ),
            click.option(
                "--initial-peers",
                "initial_peers",
                multiple=True,
                metavar="MULTIADDR...",
                envvar="PEERD_INITIAL_PEERS",
                help="Addresses of peers in the swarm, ending in /p2p/<peer id> "
                "(repeatable; several may be separated by spaces or commas).",
            ),
            click.option(
                "--new-swarm",
                is_flag=True,
                help="Start a new private swarm and print the addresses others join it with.",
            ),
            click.option(
                "--announce-period",
                type=click.FloatRange(min=0.1),
                default=30.0,
                show_default=True,
                help="Seconds between announcements; a dead peer's record expires after two.",
            ),
            click.option(
                "--no-relay",
                is_flag=True,
                help="Do not relay traffic for unreachable peers, even when reachable.",
            ),
            click.option(
                "--reachability",
                type=click.Choice(["auto", "public", "private"]),
                default="auto",
                show_default=True,
                help="Skip the dial-back test by saying how we are reachable.",
            ),
            click.option(
                "--log-level",
                type=click.Choice(LOG_LEVELS, case_sensitive=False),
                default="INFO",
                show_default=True,
                help="Level of the log lines on stderr.",
            ),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def split_addrs(values: tuple[str, ...] | list[str]) -> list[str]:
    """Accept repeated options as well as space- or comma-separated lists."""
    return [a for v in values for a in re.split(r"[\s,]+", v) if a]


def node_config(opts: dict[str, Any]) -> NodeConfig:
    """A NodeConfig from the values of `network_options`; a usage error says what to fix."""
    from peerd.config import NodeConfig

    initial = split_addrs(opts["initial_peers"])
    if not initial and not opts["new_swarm"]:
        raise click.UsageError(
            "there is no swarm to join. Pass --initial-peers MULTIADDR (any running peer prints "
            "its addresses at start), or --new-swarm to start a new private swarm."
        )
    for addr in initial:
        check_peer_addr(addr)
    try:
        return NodeConfig(
            home=opts["home"],
            identity=opts["identity"],
            host=opts["host"],
            port=opts["port"],
            announce_addrs=split_addrs(opts["announce_addrs"]),
            initial_peers=initial,
            new_swarm=opts["new_swarm"],
            announce_period=opts["announce_period"],
            relay=not opts["no_relay"],
            reachability=opts["reachability"],
        )
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
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(daemon.run)
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
