"""Circuit relay v2: serve as a hop when public, keep reservations when not, dial through relays.

- Every node runs `CircuitV2Protocol` (the STOP side, to accept relayed connections); publicly
  reachable nodes also enable the HOP side with resource limits (`--no-relay` opts out).
- An unreachable node keeps reservations on `min_relays` relays (or as many as exist): it
  re-reserves when a reservation nears expiry or the connection to the relay drops, and its
  `/p2p-circuit` addresses go into its record (py-libp2p's `get_addrs()` never lists them).
- Dialing a `/p2p-circuit` address goes through `CircuitV2Transport.dial()`: the swarm skips
  such addresses. The transport is built without the CLIENT role, which would make every
  dialer take a reservation of its own on the relay it dials through.
- DCUtR (py-libp2p's `DCUtRProtocol`) runs beside it and tries to replace relayed connections
  by direct ones; it works when one side is dialable, real NAT hole punching is untested.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from peerd.config import NodeConfig
from peerd.host import is_loopback, is_relayed

log = logging.getLogger("peerd.relay")

RESERVE_TIMEOUT = 10.0
MAX_ADDRS_PER_RELAY = 3


@dataclass
class Reservation:
    relay: ID
    expires: float  # unix time
    relay_addrs: list[str]  # addresses of the relay, without /p2p/


def relay_limits(config: NodeConfig) -> RelayLimits:
    return RelayLimits(
        duration=config.relay_circuit_seconds,
        data=config.relay_circuit_bytes,
        max_circuit_conns=config.relay_max_circuits_per_peer,
        max_reservations=config.relay_max_reservations,
    )


class RelayManager:
    """The relay roles of one node: hop service, reservations, relayed dials."""

    def __init__(self, host: IHost, config: NodeConfig, *, hop: bool) -> None:
        self.host = host
        self.config = config
        self.hop = hop
        self.protocol = CircuitV2Protocol(host, limits=relay_limits(config), allow_hop=hop)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.reservations: dict[ID, Reservation] = {}
        self.changed = trio.Event()  # set when the set of relay addresses changes

    # ---- addresses ----

    @property
    def relay_addrs(self) -> list[str]:
        """Our `/p2p-circuit` addresses, one per live reservation and relay address."""
        me = self.host.get_id()
        now = time.time()
        out = []
        for res in self.reservations.values():
            if res.expires > now:
                out += [f"{a}/p2p/{res.relay}/p2p-circuit/p2p/{me}" for a in res.relay_addrs]
        return out

    # ---- reservations ----

    async def keep_reservations(
        self,
        candidates: Callable[[], Iterable[ID]],
        *,
        period: float,
        first_done: trio.Event | None = None,
    ) -> None:
        """Hold reservations on `min_relays` relays for as long as we run."""
        while True:
            before = set(self.relay_addrs)
            self._drop_dead()
            await self._refresh_expiring()
            if len(self.reservations) < self.config.min_relays:
                for relay in candidates():
                    if len(self.reservations) >= self.config.min_relays:
                        break
                    if relay in self.reservations or relay == self.host.get_id():
                        continue
                    if await self._supports_hop(relay):
                        await self.reserve(relay)
            if set(self.relay_addrs) != before:
                self.changed.set()
                self.changed = trio.Event()
            if first_done is not None and self.reservations:
                first_done.set()
            await trio.sleep(min(period, 30.0))

    async def reserve(self, relay: ID) -> bool:
        """Ask `relay` for a slot; on success remember it and its addresses."""
        stream = None
        with trio.move_on_after(RESERVE_TIMEOUT):
            try:
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                reply = await read_delimited_msg(stream, HopMessage)
            except Exception as exc:
                log.info("reservation on relay %s failed: %r", _short(relay), exc)
                return False
            finally:
                if stream is not None:
                    await _close(stream)
            status = StatusCode(reply.status) if reply.HasField("status") else StatusCode.OK
            if status != StatusCode.OK or not reply.HasField("reservation"):
                log.info("relay %s refused a reservation (%s)", _short(relay), status.name)
                return False
            addrs = self._relay_addrs(relay, [bytes(a) for a in reply.reservation.addrs])
            if not addrs:
                log.info("relay %s gave no usable address", _short(relay))
                return False
            fresh = relay not in self.reservations
            self.reservations[relay] = Reservation(relay, float(reply.reservation.expire), addrs)
            if fresh:
                log.info("reservation on relay %s (%s)", _short(relay), addrs[0])
            return True
        log.info("reservation on relay %s timed out", _short(relay))
        return False

    def _drop_dead(self) -> None:
        now = time.time()
        for relay, res in list(self.reservations.items()):
            if res.expires <= now or not self.host.get_network().get_connections(relay):
                log.info("lost reservation on relay %s", _short(relay))
                del self.reservations[relay]

    async def _refresh_expiring(self) -> None:
        now = time.time()
        for relay, res in list(self.reservations.items()):
            if res.expires - now < 120.0:
                await self.reserve(relay)

    async def _supports_hop(self, peer: ID) -> bool:
        """Connect to `peer` if needed and wait for identify to list its protocols."""
        try:
            with trio.move_on_after(self.config.dial_timeout):
                if not self.host.get_network().get_connections(peer):
                    await self.host.connect(self.host.get_peerstore().peer_info(peer))
                while not _protocols(self.host, peer):
                    await trio.sleep(0.05)
        except Exception:
            return False
        # a relay reached through another relay would refuse: reservations need a direct link
        direct = [
            c
            for c in self.host.get_network().get_connections(peer)
            if not any(map(is_relayed, _conn_addrs(c)))
        ]
        return bool(direct) and str(HOP_PROTOCOL) in _protocols(self.host, peer)

    def _relay_addrs(self, relay: ID, reported: list[bytes]) -> list[str]:
        """Addresses of `relay`: the one we reach it on first, then those it reports."""
        out: list[str] = []
        for conn in self.host.get_network().get_connections(relay):
            for addr in _conn_addrs(conn):
                out.append(_bare(addr))
        for raw in reported:
            try:
                out.append(_bare(str(multiaddr.Multiaddr(raw))))
            except Exception:
                continue
        out = [a for a in dict.fromkeys(out) if a and not is_relayed(a)]
        if out and not is_loopback(out[0]):
            out = [a for a in out if not is_loopback(a)]
        return out[:MAX_ADDRS_PER_RELAY]

    # ---- dialing ----

    async def dial(self, peer: ID, circuit_addrs: Iterable[str]) -> bool:
        """Connect to `peer` through one of its relays; True once a connection is up."""
        for addr in circuit_addrs:
            with trio.move_on_after(self.config.dial_timeout * 2):
                try:
                    await self.transport.dial(multiaddr.Multiaddr(addr))
                    log.debug("connected to %s through %s", _short(peer), addr)
                    return True
                except Exception as exc:
                    log.debug("relayed dial %s failed: %r", addr, exc)
        return False


def _bare(addr: str) -> str:
    """`addr` without its /p2p/ part."""
    return str(addr).split("/p2p/")[0]


def _conn_addrs(conn: object) -> list[str]:
    try:
        return [str(a) for a in conn.get_transport_addresses()]  # type: ignore[attr-defined]
    except Exception:
        return []


def _protocols(host: IHost, peer: ID) -> list[str]:
    try:
        return list(host.get_peerstore().get_protocols(peer) or [])
    except Exception:
        return []


def _short(peer: ID | str) -> str:
    return str(peer)[-8:]


async def _close(stream: object) -> None:
    try:
        with trio.move_on_after(1.0):
            await stream.close()  # type: ignore[attr-defined]
    except Exception:
        pass
