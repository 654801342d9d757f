"""Announcing our server record: sequence numbers, expiry, the period, and OFFLINE at the end.

Policy: a record lives `record_ttl` (two announce periods), so a killed server disappears
within about that; every announcement carries a sequence number larger than any before it
(microseconds since the epoch, or the last one plus one), so a late ONLINE can never
overtake the OFFLINE sent at shutdown (the loop is also cancelled before OFFLINE is sent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import trio
from libp2p.crypto.keys import KeyPair

from peerd.config import NodeConfig
from peerd.dht import SwarmDHT
from peerd.records import ServerRecord, State, sign_record

log = logging.getLogger("peerd.announcer")

RecordProvider = Callable[[], "ServerRecord | None"]


class Announcer:
    """Signs and stores the provider's record now (`announce`) and every period (`run`)."""

    def __init__(
        self,
        config: NodeConfig,
        key_pair: KeyPair,
        peer_id: str,
        dht: SwarmDHT,
        *,
        addrs: Callable[[], list[str]],
        reachable: Callable[[], bool],
    ) -> None:
        self.config = config
        self.key_pair = key_pair
        self.peer_id = peer_id
        self.dht = dht
        self._addrs = addrs
        self._reachable = reachable
        self.provider: RecordProvider | None = None
        self._last_seq = 0
        self._last_summary: tuple | None = None
        self._wake = trio.Event()
        self._loop_scope = trio.CancelScope()

    def set_provider(self, provider: RecordProvider | None) -> None:
        self.provider = provider
        self.wake()

    def wake(self) -> None:
        """Announce soon (e.g. after a state change)."""
        self._wake.set()

    def stop_periodic(self) -> None:
        """No further periodic announcement may start (before OFFLINE is sent)."""
        self._loop_scope.cancel()

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    async def announce(
        self, *, offline: bool = False, timeout: float | None = None, lookup: bool = True
    ) -> ServerRecord | None:
        """Sign and store the provider's record now; returns what was announced.

        `lookup=False` stores it on the peers found last time (one message each) instead of
        looking them up again.
        """
        if self.provider is None:
            return None
        try:
            base = self.provider()
        except Exception:
            log.exception("the record provider failed; not announcing this round")
            return None
        if base is None:
            return None
        record = replace(
            base,
            peer_id=self.peer_id,
            state=State.OFFLINE if offline else base.state,
            addrs=tuple(base.addrs) or tuple(self._addrs()),
            using_relay=not self._reachable(),
            seq=self._next_seq(),
            expires_at=time.time() + self.config.record_ttl,
        )
        # bounded by one period: a slow put must not delay the next announcement, or the
        # record (which lives two periods) could expire while we are alive
        if timeout is None:
            timeout = max(self.config.announce_period, 1.0)
        value = sign_record(record, self.key_pair)
        stored = await self.dht.put_record(value, timeout=timeout, lookup=lookup)
        self._log(record, stored)
        return record

    def _log(self, record: ServerRecord, stored: bool) -> None:
        summary = (record.model_id, record.start, record.end, record.state, record.addrs)
        if summary == self._last_summary:
            return
        log.info(
            "announced %s %s blocks [%d:%d) at %d address(es)%s",
            record.state.value,
            record.model_id,
            record.start,
            record.end,
            len(record.addrs),
            "" if stored else " (storing timed out)",
        )
        self._last_summary = summary

    async def run(self) -> None:
        """Announce every period (measured from the start of the previous announcement);
        re-provide when the model changes and every `provide_every` rounds, in the background."""
        providing = trio.Lock()

        async def provide(model_id: str) -> None:
            if not providing.locked():
                async with providing:
                    await self.dht.provide(model_id, self.peer_id)

        provided_model: str | None = None
        rounds = 0
        every = self.config.provide_every
        with self._loop_scope:
            async with trio.open_nursery() as nursery:
                while True:
                    started = trio.current_time()
                    self._wake = trio.Event()
                    record = await self.announce(lookup=rounds % every == 0)
                    if record is not None and (
                        record.model_id != provided_model or rounds % every == 0
                    ):
                        provided_model = record.model_id
                        nursery.start_soon(provide, record.model_id)
                    rounds += 1
                    with trio.move_on_at(started + self.config.announce_period):
                        await self._wake.wait()
