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
soon as its record expires (two announce periods).

Reads walk the DHT themselves (`_walk`): py-libp2p's `get_value` and `find_providers` answer
from local caches first without revalidating (and `get_value` caches what it found for 24 h),
and `get_value` runs a full FIND_NODE lookup before asking for the value. The walk starts from
the closest peers in our routing table and follows the closer peers each GET_VALUE or
GET_PROVIDERS answer names, so it asks the network every time, in about half the messages.
It uses the two single-peer queries of py-libp2p 0.8.1, which are private
(`_get_from_peer`, `_get_providers_from_peer_with_closers`): this module is the place to
adapt if they move.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
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
        self._closest: dict[bytes, list[ID]] = {}  # record key -> peers of the last lookup

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

    async def put_record(
        self, value: bytes, *, timeout: float = LOOKUP_TIMEOUT, lookup: bool = True
    ) -> bool:
        """Store a signed record locally and on the peers closest to its key.

        With `lookup`, a network lookup finds those peers (and is remembered); without, the
        peers of the last lookup and the closest ones in our routing table are used, which
        costs one message per peer: re-announcements and the OFFLINE one at shutdown.
        True if every store was answered within `timeout`.
        """
        record = verify_record(value)
        key_bytes = server_key(record.peer_id).encode()
        self.kad.value_store.put(key_bytes, value)
        me = self.host.get_id()
        stored: list[ID] = []
        with trio.move_on_after(timeout):
            peers = list(self._closest.get(key_bytes, ()))
            peers += self.kad.routing_table.find_local_closest_peers(key_bytes, BUCKET_SIZE)
            if lookup or not peers:
                found = await self.kad.peer_routing.find_closest_peers_network(key_bytes)
                self._closest[key_bytes] = found
                peers += found
            limiter = trio.CapacityLimiter(ALPHA)

            async def store(peer: ID) -> None:
                async with limiter:
                    with trio.move_on_after(QUERY_TIMEOUT):
                        if await self.kad.value_store._store_at_peer(peer, key_bytes, value):
                            stored.append(peer)

            async with trio.open_nursery() as nursery:
                for peer in dict.fromkeys(peers):
                    if peer != me:
                        nursery.start_soon(store, peer)
            log.debug("record seq %d stored on %d peers", record.seq, len(stored))
            return True
        log.warning(
            "storing our record timed out after %.0f s (%d peers have it)", timeout, len(stored)
        )
        return False

    async def get_record(
        self, peer_id: str, *, timeout: float = LOOKUP_TIMEOUT
    ) -> ServerRecord | None:
        """The freshest valid record of `peer_id` in the swarm (our copy included), or None."""
        key = server_key(peer_id)
        key_bytes = key.encode()
        values: list[bytes] = []
        local = self.kad.value_store.get(key_bytes)
        if local is not None:
            values.append(local.value)

        async def ask(peer: ID) -> list[ID]:
            record, closer = await self.kad.value_store._get_from_peer(
                peer, key_bytes, return_record=True, return_closer_peers=True
            )
            if record is not None and record.value:
                values.append(record.value)
            return closer

        await self._walk(key_bytes, ask, timeout=timeout)
        if not values:
            return None
        best = values[self.validator.select(key, values)]
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
        """Peer ids that provide `key`: our own store plus what the peers closest to it hold."""
        store = self.kad.provider_store
        found = {str(p.peer_id) for p in store.get_providers(key)}

        async def ask(peer: ID) -> list[ID]:
            providers, closer = await store._get_providers_from_peer_with_closers(peer, key)
            found.update(str(p.peer_id) for p in providers)
            return closer

        await self._walk(key, ask)
        return found

    async def _walk(
        self,
        key: bytes,
        ask: Callable[[ID], Awaitable[list[ID]]],
        *,
        timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        """Ask the closest peers to `key` we know, then the closer ones they name, until the
        BUCKET_SIZE closest known have all been asked (ALPHA at a time)."""
        me = self.host.get_id()
        candidates = [
            p for p in self.kad.routing_table.find_local_closest_peers(key, BUCKET_SIZE) if p != me
        ]
        if len(candidates) < BUCKET_SIZE:
            kad = str(KAD_PROTOCOL_ID)
            connected = [p for p in self.host.get_connected_peers() if kad in self._protocols(p)]
            candidates = list(dict.fromkeys(candidates + connected))
        asked: set[ID] = set()
        with trio.move_on_after(timeout):
            while True:
                candidates = sort_peer_ids_by_distance(key, candidates)[:BUCKET_SIZE]
                batch = [p for p in candidates if p not in asked][:ALPHA]
                if not batch:
                    return
                learned: list[ID] = []

                async def one(peer: ID, learned: list[ID] = learned) -> None:
                    with trio.move_on_after(QUERY_TIMEOUT):
                        try:
                            learned.extend(await ask(peer))
                        except Exception as exc:
                            log.debug("DHT query to %s failed: %r", peer, exc)

                async with trio.open_nursery() as nursery:
                    for peer in batch:
                        asked.add(peer)
                        nursery.start_soon(one, peer)
                candidates = list(dict.fromkeys(candidates + [p for p in learned if p != me]))

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
