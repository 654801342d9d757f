"""Being in the swarm: initial peers (retried until one answers), our reachability verdict,
relay reservations when we are unreachable, and staying connected afterwards."""

from __future__ import annotations

import logging
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from peerd.config import NodeConfig
from peerd.dht import SwarmDHT
from peerd.dialer import Dialer
from peerd.reachability import ask_dialback
from peerd.relay import RelayManager

log = logging.getLogger("peerd.membership")

RELAY_WAIT = 15.0  # at start, how long an unreachable node waits for its first reservation
MAX_RETRY_DELAY = 30.0
DHT_REFRESH_SECONDS = 60.0


def parse_peer_addr(text: str) -> PeerInfo:
    """A multiaddr that ends in /p2p/<peer id>, with a message a user can act on."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(text))
    except Exception as exc:
        raise ValueError(
            f"bad peer address {text!r}: expected a multiaddr ending in /p2p/<peer id>, such as "
            f"/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... ({exc})"
        ) from None


class Membership:
    """The start-up steps and the maintenance loop of a node's place in the swarm."""

    def __init__(self, host: IHost, config: NodeConfig, dialer: Dialer) -> None:
        self.host = host
        self.config = config
        self.dialer = dialer
        self.initial = [parse_peer_addr(a) for a in config.initial_peers]

    async def connect_initial(self) -> list[ID]:
        """Connect to the initial peers; keep trying (with a log line) until one answers."""
        if not self.initial:
            return []
        delay = 1.0
        while True:
            connected = await self.dialer.connect_all(self.initial)
            if connected:
                log.info("connected to %d of %d initial peers", len(connected), len(self.initial))
                return connected
            log.warning(
                "none of the %d initial peers answered; retrying in %.0f s",
                len(self.initial),
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def check_reachability(self, helpers: list[ID]) -> bool:
        mode = self.config.reachability
        if mode != "auto":
            log.info("reachability set to %s", mode)
            return mode == "public"
        if not helpers:
            log.info("first peer of a new swarm: assuming it is reachable")
            return True
        addrs = [str(a).split("/p2p/")[0] for a in self.host.get_addrs()]
        verdict = await ask_dialback(self.host, helpers, addrs)
        if verdict is None:
            log.info("no peer could test our reachability; acting as unreachable")
            return False
        log.info(
            "reachability: %s", "publicly reachable" if verdict else "not reachable from outside"
        )
        return verdict

    async def start_reservations(
        self,
        nursery: trio.Nursery,
        relay: RelayManager,
        dht: SwarmDHT,
        on_change: Callable[[], None],
    ) -> None:
        """Keep reservations on relays (in `nursery`); wait a while for the first one."""
        first = trio.Event()

        def candidates() -> list[ID]:
            known = [i.peer_id for i in self.initial]
            known += self.host.get_connected_peers() + dht.routing_peers()
            return list(dict.fromkeys(known))

        async def watch() -> None:  # re-announce as soon as our relayed addresses change
            while True:
                await relay.changed.wait()
                on_change()
                await trio.sleep(0)

        nursery.start_soon(watch)
        nursery.start_soon(
            lambda: relay.keep_reservations(
                candidates, period=self.config.announce_period, first_done=first
            )
        )
        with trio.move_on_after(RELAY_WAIT):
            await first.wait()
        if not first.is_set():
            log.warning(
                "no relay accepted a reservation yet; others cannot reach us until one does"
            )

    async def maintain(self, dht: SwarmDHT) -> None:
        """Every announce period: keep some connection to the swarm, prune the routing table."""
        period = self.config.announce_period
        refresh_every = max(1, int(DHT_REFRESH_SECONDS / period))
        rounds = 0
        while True:
            await trio.sleep(period)
            rounds += 1
            dht.prune_client_peers()
            if self.initial and not self.host.get_connected_peers():
                log.warning("lost every connection; reconnecting to the initial peers")
                await dht.add_peers(await self.dialer.connect_all(self.initial))
            if rounds % refresh_every == 0:
                await dht.refresh()
