"""Reaching a peer: directly, else through one of its relays, else with addresses looked up afresh.

py-libp2p refuses to dial a peer for 60 s after a failed dial (a negative cache). A peer that
was still starting, or that restarted on another port, would look dead for a minute, so every
deliberate dial here first calls `allow_redial` — the one place that works around it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from peerd.host import is_relayed
from peerd.reachability import read_exactly
from peerd.relay import RelayManager

log = logging.getLogger("peerd.dialer")

PING_BYTES = 32
PING_TIMEOUT = 10.0

RecordAddrs = Callable[[str], Awaitable[list[str]]]


class PeerUnreachable(ConnectionError):
    """No direct or relayed connection to a peer could be opened."""


def allow_redial(host: IHost, pid: ID) -> None:
    """Forget a failed dial to `pid`, so that the next dial really tries."""
    host.get_network().unblock_peer(pid)


def peerstore_addrs(host: IHost, pid: ID) -> list[str]:
    try:
        return [str(a) for a in host.get_peerstore().addrs(pid)]
    except Exception:  # noqa: BLE001 - an unknown peer has no addresses
        return []


class Dialer:
    """Opens connections and streams to peers; remembers the addresses their records gave."""

    def __init__(
        self,
        host: IHost,
        *,
        dial_timeout: float,
        relay: Callable[[], RelayManager | None],
        record_addrs: RecordAddrs,
    ) -> None:
        self.host = host
        self.dial_timeout = dial_timeout
        self._relay = relay
        self._record_addrs = record_addrs
        self.addr_cache: dict[str, tuple[str, ...]] = {}

    def remember(self, peer_id: str, addrs: Sequence[str]) -> None:
        self.addr_cache[peer_id] = tuple(addrs)

    async def connect_all(self, peers: Sequence[PeerInfo]) -> list[ID]:
        """Dial every peer in parallel (one real try each); the ids that answered."""
        ok: list[ID] = []

        async def one(info: PeerInfo) -> None:
            allow_redial(self.host, info.peer_id)
            with trio.move_on_after(self.dial_timeout):
                try:
                    await self.host.connect(info)
                    ok.append(info.peer_id)
                except Exception as exc:  # noqa: BLE001 - a failed dial is an answer too
                    log.debug("dial %s: %r", info.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for info in peers:
                if info.peer_id != self.host.get_id():
                    nursery.start_soon(one, info)
        return ok

    async def open_stream(
        self, peer_id: str, protocol_id: str, addrs: Sequence[str] | None = None
    ) -> INetStream:
        """A new stream to `peer_id`, dialing directly or through one of its relays as needed."""
        pid = ID.from_base58(peer_id)
        if not self.host.get_network().get_connections(pid):
            await self.connect(pid, list(addrs or ()))
        try:
            with trio.fail_after(self.dial_timeout * 2):
                return await self.host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise PeerUnreachable(
                f"opening a {protocol_id} stream to {peer_id} timed out"
            ) from None

    async def ping(self, peer_id: str) -> float:
        """Round-trip time of one 32-byte ping to `peer_id`, in seconds (stream setup excluded)."""
        stream = await self.open_stream(peer_id, PING_PROTOCOL)
        try:
            payload = secrets.token_bytes(PING_BYTES)
            with trio.fail_after(PING_TIMEOUT):
                start = trio.current_time()
                await stream.write(payload)
                echo = await read_exactly(stream, PING_BYTES)
                rtt = trio.current_time() - start
            if echo != payload:
                raise ConnectionError(f"bad ping echo from {peer_id}")
            return rtt
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def connect(self, pid: ID, addrs: list[str]) -> None:
        """Dial directly, else through a relay; on failure look the peer's record up afresh
        (it may have restarted on another port or moved to other relays) and try once more."""
        peer_id = str(pid)
        known = addrs + list(self.addr_cache.get(peer_id, ()))
        fresh = False
        if not known and not peerstore_addrs(self.host, pid):
            known, fresh = await self._record_addrs(peer_id), True
        while True:
            if await self._try_direct(pid, [a for a in known if not is_relayed(a)]):
                return
            relayed = [a for a in known if is_relayed(a)]
            relay = self._relay()
            if relayed and relay is not None and await relay.dial(pid, relayed):
                return
            if fresh:
                raise PeerUnreachable(
                    f"cannot reach {peer_id}: no direct or relayed address answered"
                )
            known, fresh = await self._record_addrs(peer_id), True

    async def _try_direct(self, pid: ID, addrs: list[str]) -> bool:
        host = self.host
        maddrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs]
        if not maddrs and not [a for a in peerstore_addrs(host, pid) if not is_relayed(a)]:
            return False
        allow_redial(host, pid)
        if maddrs:
            # the swarm dials one address per transport, in peerstore order: a stale address
            # (the peer restarted on another port) would be the only one tried
            host.get_peerstore().clear_addrs(pid)
        with trio.move_on_after(self.dial_timeout):
            try:
                await host.connect(PeerInfo(pid, maddrs))
                return True
            except Exception as exc:  # noqa: BLE001
                log.debug("direct dial to %s failed: %r", pid, exc)
        return False
