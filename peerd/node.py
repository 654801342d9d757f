"""`Node`: one peer of the swarm — host, DHT, reachability, relays, announcements — in trio.

The constructor only assembles. `run()` starts everything in its own nursery, in order:
listen → connect to the initial peers (`membership`) → find out whether we are reachable
(dial-back) → DHT (server mode when reachable) → relay (hop when reachable, reservations when
not) → announcer and maintenance → extra services → ready: `task_status.started(NodeInfo)`.
`shutdown()` announces OFFLINE and stops it all.

    node = Node(NodeConfig(initial_peers=[...]))
    node.set_stream_handler("/peerd/inference/1.0.0", handler)
    node.set_record_provider(lambda: ServerRecord(...))
    async with trio.open_nursery() as nursery:
        info = await nursery.start(node.run)          # NodeInfo: peer id, addresses, ...
        servers = await node.list_servers("llama@ab12cd")
        stream = await node.open_stream(servers[0].peer_id, "/peerd/inference/1.0.0")
        ...
        await node.shutdown()
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.relay.circuit_v2 import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from peerd.announcer import Announcer, RecordProvider
from peerd.config import NodeConfig
from peerd.dht import SwarmDHT
from peerd.dialer import Dialer, PeerUnreachable
from peerd.host import ListenError, check_port_free, listen_multiaddr, make_host, with_peer_id
from peerd.identity import load_or_create_identity, peer_id_of
from peerd.membership import Membership, parse_peer_addr
from peerd.reachability import DialbackService
from peerd.records import ServerRecord
from peerd.relay import RelayManager

__all__ = ["ListenError", "Node", "NodeInfo", "NoSwarmError", "PeerUnreachable", "parse_peer_addr"]

log = logging.getLogger("peerd.node")

StreamHandler = Callable[[INetStream], Awaitable[None]]
Service = Callable[["Node"], Awaitable[None]]

SHUTDOWN_ANNOUNCE_TIMEOUT = 3.0


class NoSwarmError(ValueError):
    """Neither --initial-peers nor --new-swarm: the node would be alone."""


@dataclass(frozen=True)
class NodeInfo:
    """What a started node reports: who it is and where others reach it."""

    peer_id: str
    addrs: list[str]  # direct listen addresses, with /p2p/<peer id>
    relay_addrs: list[str] = field(default_factory=list)
    reachable: bool = True
    new_swarm: bool = False
    joinable: list[str] = field(default_factory=list)  # what others pass as --initial-peers


class Node:
    """A peer of the swarm; see the module docstring for the life cycle."""

    def __init__(self, config: NodeConfig, *, services: Sequence[Service] = ()):
        self.config = config
        self.host: IHost | None = None
        self.dht: SwarmDHT | None = None
        self.relay: RelayManager | None = None
        self.dialer: Dialer | None = None
        self.announcer: Announcer | None = None
        self.reachable: bool | None = None  # None until the dial-back check has run
        self.ready = trio.Event()
        self.on_addrs_change: Callable[[], None] = lambda: None  # our relayed addresses changed
        self._services = list(services)
        self._handlers: dict[str, StreamHandler] = {}
        self._provider: RecordProvider | None = None
        self._key_pair: KeyPair | None = None
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
        self._provider = provider
        if self.announcer is not None:
            self.announcer.set_provider(provider)

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
        listen = listen_multiaddr(cfg.host, cfg.port)
        check_port_free(cfg.host, cfg.port)
        self.host = host = make_host(
            self.key_pair, listen=listen, announce=cfg.announce_addrs, dial_timeout=cfg.dial_timeout
        )
        self.dialer = Dialer(
            host,
            dial_timeout=cfg.dial_timeout,
            relay=lambda: self.relay,
            record_addrs=self._record_addrs,
        )
        membership = Membership(host, cfg, self.dialer)
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

                connected = await membership.connect_initial()
                self.reachable = await membership.check_reachability(connected)
                self.dht = dht = SwarmDHT(
                    host, server_mode=self.reachable, protocol_prefix=cfg.dht_protocol_prefix
                )
                await stack.enter_async_context(background_trio_service(dht.kad))
                self.relay = RelayManager(host, cfg, hop=self.reachable and cfg.relay)
                await stack.enter_async_context(background_trio_service(self.relay.protocol))
                if cfg.dcutr:
                    await stack.enter_async_context(background_trio_service(DCUtRProtocol(host)))
                await dht.add_peers(connected)
                await dht.refresh()
                log.info(
                    "joined the swarm: %d peers, DHT %s mode, %s",
                    len(host.get_connected_peers()),
                    "server" if self.reachable else "client",
                    "relay hop" if self.relay.hop else "no relay hop",
                )
                self.announcer = Announcer(
                    cfg,
                    self.key_pair,
                    self.peer_id,
                    dht,
                    addrs=self.advertised_addrs,
                    reachable=lambda: bool(self.reachable),
                )
                self.announcer.set_provider(self._provider)
                if not self.reachable:
                    await membership.start_reservations(
                        nursery, self.relay, dht, self._addrs_changed
                    )
                nursery.start_soon(self.announcer.run)
                nursery.start_soon(membership.maintain, dht)
                for service in self._services:
                    nursery.start_soon(service, self)
                self.ready.set()
                task_status.started(self.info())
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()
            log.info("stopped")

    def info(self) -> NodeInfo:
        host = self._host()
        direct = [str(a) for a in host.get_addrs()]
        return NodeInfo(
            peer_id=self.peer_id,
            addrs=direct,
            relay_addrs=self.relay_addrs,
            reachable=bool(self.reachable),
            new_swarm=self.config.new_swarm,
            joinable=self.advertised_addrs() or direct,
        )

    async def shutdown(self) -> None:
        """Announce OFFLINE (bounded wait) and stop the node; safe to call more than once."""
        if self._shutting_down:
            with trio.move_on_after(SHUTDOWN_ANNOUNCE_TIMEOUT + 2):
                await self._stopped.wait()
            return
        self._shutting_down = True
        log.info("shutting down")
        if self.ready.is_set() and self.announcer is not None:
            self.announcer.stop_periodic()  # no ONLINE announcement may overtake the OFFLINE one
            with trio.move_on_after(SHUTDOWN_ANNOUNCE_TIMEOUT + 1):
                await self.announcer.announce(
                    offline=True, timeout=SHUTDOWN_ANNOUNCE_TIMEOUT, lookup=False
                )
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
            self._dialer().remember(r.peer_id, r.addrs)
        return records

    async def list_models(self) -> list[str]:
        return sorted({r.model_id for r in await self.list_servers()})

    async def get_record(self, peer_id: str) -> ServerRecord | None:
        record = await self._dht().get_record(peer_id)
        if record is not None:
            self._dialer().remember(peer_id, record.addrs)
        return record

    async def _record_addrs(self, peer_id: str) -> list[str]:
        record = await self.get_record(peer_id)
        return list(record.addrs) if record is not None else []

    # ---- streams ----

    async def open_stream(
        self, peer_id: str, protocol_id: str, addrs: Sequence[str] | None = None
    ) -> INetStream:
        """A new stream to `peer_id`, dialing directly or through one of its relays as needed."""
        return await self._dialer().open_stream(peer_id, protocol_id, addrs)

    async def ping(self, peer_id: str) -> float:
        """Round-trip time of one small ping to `peer_id`, in seconds (stream setup excluded)."""
        return await self._dialer().ping(peer_id)

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

    def _addrs_changed(self) -> None:
        self.request_announce()
        self.on_addrs_change()

    def request_announce(self) -> None:
        """Announce the provider's record soon (e.g. after a state change)."""
        if self.announcer is not None:
            self.announcer.wake()

    async def announce(
        self, *, offline: bool = False, timeout: float | None = None, lookup: bool = True
    ) -> ServerRecord | None:
        """Sign and store the provider's record now; returns what was announced."""
        if self.announcer is None:
            raise RuntimeError("the node is not running yet")
        return await self.announcer.announce(offline=offline, timeout=timeout, lookup=lookup)

    # ---- helpers ----

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

    def _dialer(self) -> Dialer:
        if self.dialer is None:
            raise RuntimeError("the node is not running yet")
        return self.dialer
