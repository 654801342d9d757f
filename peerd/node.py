"""`Node`: one peer of the swarm — host, DHT, reachability, relays, announcements — in trio.

The constructor only assembles. `run()` starts everything in its own nursery, in order:
listen → connect to the initial peers → find out whether we are reachable (dial-back) → DHT
(server mode when reachable) → relay (hop when reachable, reservations when not) → announcer
and maintenance → extra services → ready. `shutdown()` announces OFFLINE and stops it all.

    node = Node(NodeConfig(initial_peers=[...]))
    node.set_stream_handler("/peerd/inference/1.0.0", handler)
    node.set_record_provider(lambda: ServerRecord(...))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        servers = await node.list_servers("llama@ab12cd")
        stream = await node.open_stream(servers[0].peer_id, "/peerd/inference/1.0.0")
        ...
        await node.shutdown()
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any, TextIO

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2 import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from peerd.config import NodeConfig
from peerd.dht import SwarmDHT
from peerd.host import (
    ListenError,
    check_port_free,
    is_relayed,
    listen_multiaddr,
    make_host,
    with_peer_id,
)
from peerd.identity import load_or_create_identity, peer_id_of
from peerd.reachability import DialbackService, ask_dialback, read_exactly
from peerd.records import ServerRecord, State, sign_record
from peerd.relay import RelayManager

log = logging.getLogger("peerd.node")

StreamHandler = Callable[[INetStream], Awaitable[None]]
RecordProvider = Callable[[], "ServerRecord | None"]
Service = Callable[["Node"], Awaitable[None]]

RELAY_WAIT = 15.0  # at start, how long an unreachable node waits for its first reservation
SHUTDOWN_ANNOUNCE_TIMEOUT = 3.0


class NoSwarmError(ValueError):
    """Neither --initial-peers nor --new-swarm: the node would be alone."""


class PeerUnreachable(ConnectionError):
    """No direct or relayed connection to a peer could be opened."""


def parse_peer_addr(text: str) -> PeerInfo:
    """A multiaddr that ends in /p2p/<peer id>, with a message a user can act on."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(text))
    except Exception as exc:
        raise ValueError(
            f"bad peer address {text!r}: expected a multiaddr ending in /p2p/<peer id>, such as "
            f"/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... ({exc})"
        ) from None


class Node:
    """A peer of the swarm; see the module docstring for the life cycle."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        services: Sequence[Service] = (),
        out: TextIO | None = sys.stdout,
    ):
        self.config = config
        self.out = out  # where the addresses asked for at start are printed (None: nowhere)
        self.host: IHost | None = None
        self.dht: SwarmDHT | None = None
        self.relay: RelayManager | None = None
        self.reachable: bool | None = None  # None until the dial-back check has run
        self.ready = trio.Event()
        self._services = list(services)
        self._handlers: dict[str, StreamHandler] = {}
        self._record_provider: RecordProvider | None = None
        self._key_pair: KeyPair | None = None
        self._addr_cache: dict[str, tuple[str, ...]] = {}
        self._last_seq = 0
        self._last_announced: tuple | None = None
        self._wake_announcer = trio.Event()
        self._announcing = trio.CancelScope()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._shutting_down = False

    # ---- identity ----

    @property
    def key_pair(self) -> KeyPair:
        if self._key_pair is None:
            self._key_pair = load_or_create_identity(self.config.identity_path)
        return self._key_pair

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.key_pair)

    # ---- what the server side plugs in ----

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve `protocol_id`; `handler(stream)` runs per inbound stream (peer: stream.muxed_conn.peer_id)."""
        self._handlers[protocol_id] = handler
        if self.host is not None:
            self.host.set_stream_handler(TProtocol(protocol_id), handler)

    def set_record_provider(self, provider: RecordProvider | None) -> None:
        """`provider()` returns the record to announce now (or None: announce nothing).

        The announcer overwrites peer_id, addrs (unless set), using_relay, seq and expires_at.
        """
        self._record_provider = provider
        self._wake_announcer.set()

    def add_service(self, service: Service) -> None:
        """Run `await service(node)` in the node's nursery once it is ready (e.g. a local API)."""
        self._services.append(service)

    # ---- running ----

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        if not cfg.new_swarm and not cfg.initial_peers:
            raise NoSwarmError(
                "no swarm to join: pass --initial-peers MULTIADDR (any running peer prints its "
                "addresses at start) or --new-swarm to start a new private swarm"
            )
        initial = [parse_peer_addr(a) for a in cfg.initial_peers]
        listen = listen_multiaddr(cfg.host, cfg.port)
        check_port_free(cfg.host, cfg.port)
        self.host = make_host(
            self.key_pair, listen=listen, announce=cfg.announce_addrs, dial_timeout=cfg.dial_timeout
        )
        host = self.host
        try:
            async with (
                host.run([listen]),
                trio.open_nursery() as nursery,
                AsyncExitStack() as stack,
            ):
                if not host.get_transport_addrs():
                    raise ListenError(
                        f"cannot listen on {listen}: is the port in use? (choose another with --port)"
                    )
                for protocol_id, handler in self._handlers.items():
                    host.set_stream_handler(TProtocol(protocol_id), handler)
                DialbackService(host).install()
                log.info(
                    "peer %s listening on %s",
                    self.peer_id,
                    ", ".join(map(str, host.get_transport_addrs())),
                )

                connected = await self._connect_initial(initial)
                self.reachable = await self._check_reachability(connected)
                self.dht = SwarmDHT(
                    host, server_mode=self.reachable, protocol_prefix=cfg.dht_protocol_prefix
                )
                await stack.enter_async_context(background_trio_service(self.dht.kad))
                self.relay = RelayManager(host, cfg, hop=self.reachable and cfg.relay)
                await stack.enter_async_context(background_trio_service(self.relay.protocol))
                if cfg.dcutr:
                    await stack.enter_async_context(background_trio_service(DCUtRProtocol(host)))
                await self.dht.add_peers(connected)
                await self.dht.refresh()
                log.info(
                    "joined the swarm: %d peers, DHT %s mode, %s",
                    len(host.get_connected_peers()),
                    "server" if self.reachable else "client",
                    "relay hop" if self.relay.hop else "no relay hop",
                )
                if not self.reachable:
                    await self._start_reservations(nursery)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._maintain)
                for service in self._services:
                    nursery.start_soon(service, self)
                self._print_addresses()
                self.ready.set()
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()
            log.info("stopped")

    async def shutdown(self) -> None:
        """Announce OFFLINE (bounded wait) and stop the node; safe to call more than once."""
        if self._shutting_down:
            with trio.move_on_after(SHUTDOWN_ANNOUNCE_TIMEOUT + 2):
                await self._stopped.wait()
            return
        self._shutting_down = True
        log.info("shutting down")
        if self.ready.is_set():
            self._announcing.cancel()  # no ONLINE announcement may overtake the OFFLINE one
            with trio.move_on_after(SHUTDOWN_ANNOUNCE_TIMEOUT + 1):
                await self.announce(offline=True, timeout=SHUTDOWN_ANNOUNCE_TIMEOUT, lookup=False)
        self._stop.set()
        with trio.move_on_after(SHUTDOWN_ANNOUNCE_TIMEOUT + 2):
            await self._stopped.wait()

    # ---- discovery ----

    async def list_servers(
        self, model_id: str | None = None, *, include_offline: bool = False
    ) -> list[ServerRecord]:
        """Every live server of `model_id` (any model when None), from the DHT."""
        records = await self._dht().list_servers(model_id, include_offline=include_offline)
        for r in records:
            self._addr_cache[r.peer_id] = r.addrs
        return records

    async def list_models(self) -> list[str]:
        return sorted({r.model_id for r in await self.list_servers()})

    async def get_record(self, peer_id: str) -> ServerRecord | None:
        record = await self._dht().get_record(peer_id)
        if record is not None:
            self._addr_cache[peer_id] = record.addrs
        return record

    # ---- streams ----

    async def open_stream(
        self, peer_id: str, protocol_id: str, addrs: Sequence[str] | None = None
    ) -> INetStream:
        """A new stream to `peer_id`, dialing directly or through one of its relays as needed."""
        host = self._host()
        pid = ID.from_base58(peer_id)
        if not host.get_network().get_connections(pid):
            await self._connect(pid, list(addrs or ()))
        try:
            with trio.fail_after(self.config.dial_timeout * 2):
                return await host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise PeerUnreachable(
                f"opening a {protocol_id} stream to {peer_id} timed out"
            ) from None

    async def ping(self, peer_id: str) -> float:
        """Round-trip time of one 32-byte ping to `peer_id`, in seconds (stream setup excluded)."""
        stream = await self.open_stream(peer_id, PING_PROTOCOL)
        try:
            payload = secrets.token_bytes(32)
            with trio.fail_after(10):
                start = trio.current_time()
                await stream.write(payload)
                echo = await read_exactly(stream, 32)
                rtt = trio.current_time() - start
            if echo != payload:
                raise ConnectionError(f"bad ping echo from {peer_id}")
            return rtt
        finally:
            with trio.move_on_after(1):
                await stream.close()

    @property
    def relay_addrs(self) -> list[str]:
        return self.relay.relay_addrs if self.relay is not None else []

    def advertised_addrs(self) -> list[str]:
        """Addresses others should dial: direct ones when reachable, relayed ones when not."""
        host = self._host()
        announced = [with_peer_id(a, self.peer_id) for a in self.config.announce_addrs]
        if self.reachable:
            direct = [str(a) for a in host.get_addrs()]
            return list(dict.fromkeys(announced + direct))
        return list(dict.fromkeys(announced + self.relay_addrs))

    # ---- announcing ----

    def request_announce(self) -> None:
        """Announce the provider's record soon (e.g. after a state change)."""
        self._wake_announcer.set()

    async def announce(
        self, *, offline: bool = False, timeout: float | None = None, lookup: bool = True
    ) -> ServerRecord | None:
        """Sign and store the provider's record now; returns what was announced.

        `lookup=False` stores it on the peers found last time (one message each) instead of
        looking them up again.
        """
        provider = self._record_provider
        if provider is None:
            return None
        try:
            base = provider()
        except Exception:
            log.exception("the record provider failed; not announcing this round")
            return None
        if base is None:
            return None
        now = time.time()
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        ttl = self.config.record_ttl
        record = replace(
            base,
            peer_id=self.peer_id,
            state=State.OFFLINE if offline else base.state,
            addrs=tuple(base.addrs) or tuple(self.advertised_addrs()),
            using_relay=not self.reachable,
            seq=self._last_seq,
            expires_at=now + ttl,
        )
        value = sign_record(record, self.key_pair)
        # bounded by one period: a slow put must not delay the next announcement, or the
        # record (which lives two periods) could expire while we are alive
        if timeout is None:
            timeout = max(self.config.announce_period, 1.0)
        stored = await self._dht().put_record(value, timeout=timeout, lookup=lookup)
        summary = (record.model_id, record.start, record.end, record.state, record.addrs)
        if summary != self._last_announced:
            log.info(
                "announced %s %s blocks [%d:%d) at %d address(es)%s",
                record.state.value,
                record.model_id,
                record.start,
                record.end,
                len(record.addrs),
                "" if stored else " (storing timed out)",
            )
            self._last_announced = summary
        return record

    async def _announce_loop(self) -> None:
        """Announce every period (measured from the start of the previous announcement);
        re-provide when the model changes and every `provide_every` rounds, in the background.
        `shutdown()` cancels this loop before it announces OFFLINE."""
        providing = trio.Lock()

        async def provide(model_id: str) -> None:
            if not providing.locked():
                async with providing:
                    await self._dht().provide(model_id, self.peer_id)

        provided_model: str | None = None
        rounds = 0
        with self._announcing:
            async with trio.open_nursery() as nursery:
                while True:
                    started = trio.current_time()
                    self._wake_announcer = trio.Event()
                    record = await self.announce(lookup=rounds % self.config.provide_every == 0)
                    if record is not None and (
                        record.model_id != provided_model or rounds % self.config.provide_every == 0
                    ):
                        provided_model = record.model_id
                        nursery.start_soon(provide, record.model_id)
                    rounds += 1
                    with trio.move_on_at(started + self.config.announce_period):
                        await self._wake_announcer.wait()

    # ---- start-up steps ----

    async def _connect_initial(self, initial: list[PeerInfo]) -> list[ID]:
        """Connect to the initial peers; keep trying (with a log line) until one answers."""
        if not initial:
            return []
        delay = 1.0
        while True:
            connected = await self._connect_all(initial)
            if connected:
                log.info("connected to %d of %d initial peers", len(connected), len(initial))
                return connected
            log.warning(
                "none of the %d initial peers answered; retrying in %.0f s", len(initial), delay
            )
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _connect_all(self, peers: list[PeerInfo]) -> list[ID]:
        host = self._host()
        ok: list[ID] = []

        async def one(info: PeerInfo) -> None:
            # py-libp2p blocks a peer for 60 s after a failed dial; an initial peer that was
            # still starting must get a real retry, not an instant refusal from that cache.
            host.get_network().unblock_peer(info.peer_id)
            with trio.move_on_after(self.config.dial_timeout):
                try:
                    await host.connect(info)
                    ok.append(info.peer_id)
                except Exception as exc:
                    log.debug("initial peer %s: %r", info.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for info in peers:
                if info.peer_id != host.get_id():
                    nursery.start_soon(one, info)
        return ok

    async def _check_reachability(self, helpers: list[ID]) -> bool:
        mode = self.config.reachability
        if mode != "auto":
            log.info("reachability set to %s", mode)
            return mode == "public"
        if not helpers:
            log.info("first peer of a new swarm: assuming it is reachable")
            return True
        addrs = [str(a).split("/p2p/")[0] for a in self._host().get_addrs()]
        verdict = await ask_dialback(self._host(), helpers, addrs)
        if verdict is None:
            log.info("no peer could test our reachability; acting as unreachable")
            return False
        log.info(
            "reachability: %s", "publicly reachable" if verdict else "not reachable from outside"
        )
        return verdict

    async def _start_reservations(self, nursery: trio.Nursery) -> None:
        first = trio.Event()
        relay = self.relay
        assert relay is not None
        nursery.start_soon(self._watch_relays)
        nursery.start_soon(
            lambda: relay.keep_reservations(
                self._relay_candidates, period=self.config.announce_period, first_done=first
            )
        )
        with trio.move_on_after(RELAY_WAIT):
            await first.wait()
        if not first.is_set():
            log.warning(
                "no relay accepted a reservation yet; others cannot reach us until one does"
            )

    async def _watch_relays(self) -> None:
        """Re-announce as soon as our relayed addresses change."""
        while True:
            assert self.relay is not None
            await self.relay.changed.wait()
            self.request_announce()
            await trio.sleep(0)

    def _relay_candidates(self) -> list[ID]:
        host = self._host()
        initial = [parse_peer_addr(a).peer_id for a in self.config.initial_peers]
        known = (
            initial + host.get_connected_peers() + (self.dht.routing_peers() if self.dht else [])
        )
        return list(dict.fromkeys(known))

    async def _maintain(self) -> None:
        """Every announce period: keep some connection to the swarm, prune the routing table."""
        initial = [parse_peer_addr(a) for a in self.config.initial_peers]
        refresh_every = max(1, int(60 / self.config.announce_period))
        rounds = 0
        while True:
            await trio.sleep(self.config.announce_period)
            rounds += 1
            dht = self._dht()
            dht.prune_client_peers()
            if initial and not self._host().get_connected_peers():
                log.warning("lost every connection; reconnecting to the initial peers")
                await dht.add_peers(await self._connect_all(initial))
            if rounds % refresh_every == 0:
                await dht.refresh()

    # ---- helpers ----

    async def _connect(self, pid: ID, addrs: list[str]) -> None:
        """Dial directly, else through a relay; on failure look the peer's record up afresh
        (it may have restarted on another port or moved to other relays) and try once more."""
        peer_id = str(pid)
        known = addrs + list(self._addr_cache.get(peer_id, ()))
        fresh = False
        if not known and not _peerstore_addrs(self._host(), pid):
            known, fresh = await self._record_addrs(peer_id), True
        while True:
            if await self._try_direct(pid, [a for a in known if not is_relayed(a)]):
                return
            relayed = [a for a in known if is_relayed(a)]
            if relayed and self.relay is not None and await self.relay.dial(pid, relayed):
                return
            if fresh:
                raise PeerUnreachable(
                    f"cannot reach {peer_id}: no direct or relayed address answered"
                )
            known, fresh = await self._record_addrs(peer_id), True

    async def _record_addrs(self, peer_id: str) -> list[str]:
        record = await self.get_record(peer_id)
        return list(record.addrs) if record is not None else []

    async def _try_direct(self, pid: ID, addrs: list[str]) -> bool:
        host = self._host()
        maddrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs]
        if not maddrs and not [a for a in _peerstore_addrs(host, pid) if not is_relayed(a)]:
            return False
        # After a failed dial py-libp2p refuses to dial that peer again for 60 s (a private
        # negative cache); a peer that restarted would look dead for a minute. An explicit
        # open_stream is worth one real attempt.
        negative_cache = getattr(host.get_network(), "_negative_peer_cache", None)
        if negative_cache is not None:
            negative_cache.evict(str(pid))
        if maddrs:
            # the swarm dials one address per transport, in peerstore order: a stale address
            # (the peer restarted on another port) would be the only one tried
            host.get_peerstore().clear_addrs(pid)
        with trio.move_on_after(self.config.dial_timeout):
            try:
                await host.connect(PeerInfo(pid, maddrs))
                return True
            except Exception as exc:
                log.debug("direct dial to %s failed: %r", pid, exc)
        return False

    def _print_addresses(self) -> None:
        if self.out is None:
            return
        host = self._host()
        lines = [f"Peer id: {self.peer_id}"]
        direct = [str(a) for a in host.get_addrs()]
        lines += ["Listening on:"] + [f"  {a}" for a in direct]
        if self.relay_addrs:
            lines += ["Reachable through relays at:"] + [f"  {a}" for a in self.relay_addrs]
        if self.config.new_swarm:
            joinable = " ".join(self.advertised_addrs() or direct)
            lines += [
                "Started a new swarm. Others join it with:",
                f"  peerd join --initial-peers {joinable}",
            ]
        mode = "reachable" if self.reachable else "behind NAT/firewall"
        lines.append(f"Ready ({mode}; DHT {'server' if self.reachable else 'client'} mode).")
        print("\n".join(lines), file=self.out, flush=True)

    def _host(self) -> IHost:
        if self.host is None:
            raise RuntimeError(
                "the node is not running: call `await nursery.start(node.run)` first"
            )
        return self.host

    def _dht(self) -> SwarmDHT:
        if self.dht is None:
            raise RuntimeError("the node is not running yet")
        return self.dht


def _peerstore_addrs(host: IHost, pid: ID) -> list[str]:
    try:
        return [str(a) for a in host.get_peerstore().addrs(pid)]
    except Exception:
        return []
