"""A one-shot peer for tests that must run in another network namespace.

    ip netns exec NS python -m tests.netprobe --initial-peers ADDR --home DIR --target PEER_ID

Joins the swarm with a real Node, lists the target's record, checks whether the target's
subnet is routable from here, reaches the target (directly or through a relay) and pings it,
then prints one JSON object on stdout and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio


async def probe(args: argparse.Namespace) -> dict:
    from peerd.config import NodeConfig
    from peerd.node import Node

    config = NodeConfig(
        home=Path(args.home),
        host=args.host,
        initial_peers=[args.initial_peers],
        announce_period=args.period,
    )
    node = Node(config)
    out: dict = {}
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            out["reachable"] = node.reachable
            record = None
            with trio.move_on_after(args.timeout / 2):
                while record is None:
                    record = await node.get_record(args.target)
                    if record is None:
                        await trio.sleep(0.5)
            out["record"] = (
                None
                if record is None
                else {
                    "addrs": list(record.addrs),
                    "using_relay": record.using_relay,
                    "start": record.start,
                    "end": record.end,
                    "model_id": record.model_id,
                }
            )
            servers = await node.list_servers()
            out["listed"] = [r.peer_id for r in servers]
            if args.direct:
                host, port = args.direct.rsplit(":", 1)
                try:
                    with trio.fail_after(3):
                        stream = await trio.open_tcp_stream(host, int(port))
                        await stream.aclose()
                    out["direct_tcp"] = "connected"
                except (OSError, trio.TooSlowError) as exc:
                    out["direct_tcp"] = f"failed: {exc!r}"
            rtts = [await node.ping(args.target) for _ in range(3)]
            out["rtts"] = rtts
            out["connection_addrs"] = [
                str(a)
                for c in node.host.get_network().get_connections(_id(args.target))
                for a in c.get_transport_addresses()
            ]
            await node.shutdown()
            nursery.cancel_scope.cancel()
    return out


def _id(peer_id: str):
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--direct", help="HOST:PORT to try a plain TCP connection to")
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    from peerd.logging import setup_logging

    setup_logging("INFO")
    print(json.dumps(trio.run(probe, args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
