"""`peerd join`: a client-only peer (serves no blocks), also from behind NAT or a firewall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import network_options, node_config, run_node


@click.command()
@network_options(default_host="0.0.0.0")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Local API socket for scripts on this machine (default: HOME/peerd.sock).",
)
@click.option(
    "--max-frame-mib",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Largest message read from the local socket or a peer (bigger requests are cut).",
)
@click.option(
    "--test-record",
    hidden=True,
    metavar="MODEL_ID:START:END",
    help="Announce a fake server record (tests and demos only).",
)
def join(
    test_record: str | None, socket_path: Path | None, max_frame_mib: int, **opts: Any
) -> None:
    """Join a swarm as a client-only peer, or start one with --new-swarm.

    The daemon connects outward to --initial-peers, relays for others when it is reachable,
    and takes relay reservations when it is not. Scripts on this machine use the swarm
    through its local socket (peerd generate, peerd status, the peerd.client library).
    """
    config = node_config(opts)  # bad options fail fast, before the heavy imports
    from peerd.daemon import Daemon

    daemon = Daemon(config, socket_path=socket_path, max_frame=max_frame_mib * 2**20)
    node = daemon.node
    if test_record:
        node.set_record_provider(_fake_record_provider(node, test_record))
    run_node(node, opts["log_level"])


def _fake_record_provider(node: Any, spec: str) -> Any:
    from peerd.records import ServerRecord, State

    try:
        model_id, start, end = spec.rsplit(":", 2)
        start_i, end_i = int(start), int(end)
    except ValueError:
        raise click.BadParameter(
            "expected MODEL_ID:START:END", param_hint="--test-record"
        ) from None

    def provide() -> ServerRecord:
        return ServerRecord(
            model_id=model_id, peer_id=node.peer_id, start=start_i, end=end_i, state=State.ONLINE
        )

    return provide
