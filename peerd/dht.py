"""Swarm records in libp2p's Kademlia DHT: where they live, how they are found, kept fresh.

Key layout (all keys private to peerd by the strict `/peerd/` validator):
- `/peerd/s/<hash of peer id>` (value): the server's signed `ServerRecord`; single writer, because
  the validator binds the key, the signing key and the record's peer id together.
- provider records under `sha256("peerd/model/<model id>/<shard>")`: who serves a model, and
  under `sha256("peerd/servers/<shard>")`: every server of any model (to list the models).
  A server provides the shard its peer id hashes to. Shards exist because a storing peer keeps
  at most 20 providers per key (and dead ones for 48 h): 4 shards hold 80 servers per model.

Providers have no TTL we can set and come back duplicated, so a listing de-duplicates them and
keeps a server only if its record is present, valid and unexpired: a killed server vanishes as
soon as its record expires (two announce periods). py-libp2p's `get_value` and
`find_providers` answer from local caches first without revalidating; `get_record` and
`find_providers` here always ask the network and re-check what comes back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.peer.id import ID
from libp2p.records.pubkey import PublicKeyValidator
from libp2p.records.validator import NamespacedValidator

from peerd.records import (
    NAMESPACE,
    InvalidRecord,
    RecordValidator,
    ServerRecord,
    server_key,
    verify_record,
)

log = logging.getLogger("peerd.dht")

SHARDS = 4
LOOKUP_TIMEOUT = 10.0
QUERY_TIMEOUT = 5.0
MAX_PARALLEL_FETCHES = 16


def shard_of(peer_id: str, shards: int = SHARDS) -> int:
    return hashlib.sha256(peer_id.encode()).digest()[0] % shards


def model_key(model_id: str, shard: int) -> bytes:
    return hashlib.sha256(f"peerd/model/{model_id}/{shard}".encode()).digest()


def servers_key(shard: int) -> bytes:
    return hashlib.sha256(f"peerd/servers/{shard}".encode()).digest()


class SwarmDHT:
    """KadDHT with peerd's validator, plus fresh reads of records and providers."""

    def __init__(self, host: IHost, *, server_mode: bool, protocol_prefix: str = "/peerd") -> None:
        self.host = host
        self.validator = RecordValidator()
        namespaced = NamespacedValidator(
            {NAMESPACE: self.validator, "pk": PublicKeyValidator()}, strict_validation=True
        )
        self.kad = KadDHT(
            host,
            DHTMode.SERVER if server_mode else DHTMode.CLIENT,
            validator=namespaced,
            validator_changed=True,
            protocol_prefix=protocol_prefix,
            strict_validation=True,
            # All peers of a test swarm share 127.0.0.1; the default cap of 2 peers per /24
            # subnet per bucket exempts loopback and private ranges but not public hosting
            # providers, where several servers of one operator share a subnet.
            max_peers_per_subnet=0,
        )
        self._limiter = trio.CapacityLimiter(MAX_PARALLEL_FETCHES)

    @property
    def server_mode(self) -> bool:
        return self.kad.mode == DHTMode.SERVER

    async def set_server_mode(self, server: bool) -> None:
        if server != self.server_mode:
            await self.kad.switch_mode(DHTMode.SERVER if server else DHTMode.CLIENT)
            log.info("DHT switched to %s mode", "server" if server else "client")

    async def add_peers(self, peer_ids: Iterable[ID], *, timeout: float = 5.0) -> int:
        """Add connected peers to the routing table once identify has told us their protocols."""
        added = 0
        with trio.move_on_after(timeout):
            for peer_id in peer_ids:
                while not self._identified(peer_id):
                    await trio.sleep(0.02)
                if await self.kad.add_peer(peer_id):
                    added += 1
        return added

    async def refresh(self) -> None:
        """Look ourselves up so the routing table fills with the peers near us."""
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await self.kad.peer_routing.find_closest_peers_network(self.host.get_id().to_bytes())
        self.prune_client_peers()

    def prune_client_peers(self) -> int:
        """Drop peers that do not serve the DHT (py-libp2p adds every peer that queried us)."""
        removed = 0
        for peer_id in self.kad.routing_table.get_peer_ids():
            if self._identified(peer_id) and str(KAD_PROTOCOL_ID) not in self._protocols(peer_id):
                self.kad.routing_table.remove_peer(peer_id)
                removed += 1
        return removed

    def routing_peers(self) -> list[ID]:
        return self.kad.routing_table.get_peer_ids()

    # ---- records ----

    async def put_record(self, value: bytes, *, timeout: float = LOOKUP_TIMEOUT) -> bool:
        """Store a signed record on the peers closest to its key (and locally)."""
        record = verify_record(value)
        with trio.move_on_after(timeout):
            await self.kad.put_value(server_key(record.peer_id), value)
            return True
        log.warning("storing our record timed out after %.0f s", timeout)
        return False

    async def get_record(
        self, peer_id: str, *, timeout: float = LOOKUP_TIMEOUT
    ) -> ServerRecord | None:
        """The freshest valid record of `peer_id` in the swarm, or None.

        The local copy is taken out before asking the network (else `get_value` would answer
        from it) and put back if the network has nothing better.
        """
        key = server_key(peer_id)
        key_bytes = key.encode()
        local = self.kad.value_store.get(key_bytes)
        if local is not None:
            self.kad.value_store.remove(key_bytes)
        network: bytes | None = None
        try:
            with trio.move_on_after(timeout):
                network = await self.kad.get_value(key)
        finally:
            if local is not None and not self.kad.value_store.has(key_bytes):
                self.kad.value_store.put_record(key_bytes, local)
        candidates = [v for v in (network, local.value if local is not None else None) if v]
        if not candidates:
            return None
        best = candidates[self.validator.select(key, candidates)]
        try:
            return verify_record(best, key=key)
        except InvalidRecord as exc:
            log.debug("record of %s rejected: %s", peer_id, exc)
            return None

    # ---- providers ----

    async def provide(self, model_id: str, peer_id: str) -> None:
        shard = shard_of(peer_id)
        with trio.move_on_after(LOOKUP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for key in (model_key(model_id, shard), servers_key(shard)):
                    nursery.start_soon(self.kad.provider_store.provide, key)

    async def find_providers(self, key: bytes) -> set[str]:
        """Peer ids that provide `key`: our own store plus every peer closest to the key."""
        store = self.kad.provider_store
        found = {str(p.peer_id) for p in store.get_providers(key)}
        with trio.move_on_after(LOOKUP_TIMEOUT):
            closest = await self.kad.peer_routing.find_closest_peers_network(key)

            async def ask(peer: ID) -> None:
                with trio.move_on_after(QUERY_TIMEOUT):
                    # No public single-peer query in 0.8.1; find_providers() returns the local
                    # cache alone as soon as it holds anything.
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                    found.update(str(p.peer_id) for p in providers)

            async with trio.open_nursery() as nursery:
                for peer in closest:
                    if peer != self.host.get_id():
                        nursery.start_soon(ask, peer)
        return found

    async def list_servers(
        self,
        model_id: str | None = None,
        *,
        include_offline: bool = False,
        now: float | None = None,
    ) -> list[ServerRecord]:
        """Every live server of `model_id` (or of any model), from the DHT."""
        keys = [model_key(model_id, s) if model_id else servers_key(s) for s in range(SHARDS)]
        peers: set[str] = set()

        async def collect(key: bytes) -> None:
            peers.update(await self.find_providers(key))

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(collect, key)

        records: list[ServerRecord] = []

        async def fetch(peer_id: str) -> None:
            async with self._limiter:
                record = await self.get_record(peer_id)
            if record is not None:
                records.append(record)

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(fetch, peer_id)
        now = time.time() if now is None else now
        keep = [
            r
            for r in records
            if (model_id is None or r.model_id == model_id)
            and r.expires_at > now
            and (include_offline or r.is_live(now))
        ]
        return sorted(keep, key=lambda r: (r.model_id, r.start, r.end, r.peer_id))

    async def list_models(self) -> list[str]:
        return sorted({r.model_id for r in await self.list_servers()})

    # ---- helpers ----

    def _protocols(self, peer_id: ID) -> list[str]:
        try:
            return list(self.host.get_peerstore().get_protocols(peer_id) or [])
        except Exception:
            return []

    def _identified(self, peer_id: ID) -> bool:
        return bool(self._protocols(peer_id))
