"""Fault-tolerant inference chains: a route of servers, one session per span, replay on failure.

The client keeps, for every block boundary where a span of the current chain starts, the
inputs it sent there (`history[boundary]`, all tokens so far). When a server fails or times
out, the chain bans it, tells the D* Lite planner, repairs the route from the failed span's
first block, replays the stored inputs to the replacement spans one after another (each
replay's output is the history of the next boundary, so a replacement may split the blocks
differently from the failed server), and retries the step. Spans before the failure, and
later spans whose (peer, interval) are unchanged, keep their server-side caches.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import trio

import wire
from peerd.framed import ConnectionLost, FramedChannel
from peerd.server.block_server import INFERENCE_PROTOCOL
from routing import (
    BanList,
    CostModel,
    NoRouteError,
    Route,
    RoutePlanner,
    ServerAdded,
    ServerRemoved,
    ServerSpan,
)

log = logging.getLogger("peerd.chain")

# Server answers that mean "this server cannot help now": route around it.
RETRYABLE_CODES = frozenset(
    {"busy", "cache_full", "timeout", "internal", "unknown_session", "unknown_model"}
)
REPLAY_CHUNK_TOKENS = 2048
OPEN_WAIT = 3.0  # seconds an opening chain waits for a missing block to appear


class ChainError(Exception):
    """A chain could not do what was asked; `code` follows wire's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class HopFailed(Exception):
    """One server of the chain failed (connection lost, timeout, or a retryable error reply)."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"{peer_id[:12]}…: {reason}")
        self.peer_id = peer_id
        self.reason = reason


class Connector(Protocol):
    async def __call__(self, peer_id: str, protocol: str) -> FramedChannel: ...


ServerSource = Callable[[], Awaitable[Sequence[ServerSpan]]]
RttProbe = Callable[[Sequence[str]], Awaitable[dict[str, float]]]


@dataclass
class ChainHop:
    """One span of the chain with its open session stream."""

    peer_id: str
    start: int
    end: int
    channel: FramedChannel | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.peer_id, self.start, self.end)


@dataclass
class RecoveryEvent:
    """What happened at one failure, for logs, the demo and tests."""

    failed_peer: str
    reason: str
    from_block: int
    new_route: list[tuple[str, int, int]]
    replayed_tokens: int
    seconds: float


@dataclass
class ChainOptions:
    """Everything a chain needs to know besides where its servers come from."""

    model_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    compression: str = "none"
    step_timeout: float = 30.0
    open_timeout: float = 10.0
    recovery_timeout: float = 30.0
    max_failures: int = 16
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    mode: str = "latency"


@dataclass
class Planning:
    """The shared routing state of a chain: candidate servers, bans, the D* Lite planner."""

    options: ChainOptions
    source: ServerSource
    probe_rtts: RttProbe | None
    bans: BanList
    clock: Callable[[], float] = time.monotonic
    planner: RoutePlanner | None = None
    known: dict[str, ServerSpan] = field(default_factory=dict)
    waiting: float | None = None  # overrides options.recovery_timeout while set
    rtts: dict[str, float] = field(default_factory=dict)

    def _eligible(self, servers: Iterable[ServerSpan]) -> list[ServerSpan]:
        now = self.clock()
        opts = self.options
        return [
            s
            for s in servers
            if (opts.allow is None or s.peer_id in opts.allow)
            and s.peer_id not in opts.deny
            and not self.bans.is_banned(s.peer_id, now)
            and s.end > opts.start
            and s.start < opts.end
        ]

    async def build(self) -> None:
        servers = self._eligible(await self.source())
        self.rtts = await self.probe_rtts([s.peer_id for s in servers]) if self.probe_rtts else {}
        self.known = {s.peer_id: s for s in servers}
        self.planner = RoutePlanner(
            servers,
            CostModel(client_rtts=self.rtts),
            start=self.options.start,
            end=self.options.end,
            mode=self.options.mode,
        )

    async def refresh(self) -> None:
        """Tell the planner which servers appeared (or came back from a ban) and which left."""
        assert self.planner is not None
        fresh = {s.peer_id: s for s in self._eligible(await self.source())}
        changes: list = [ServerRemoved(p) for p in self.known if p not in fresh]
        changes += [ServerAdded(s) for p, s in fresh.items() if p not in self.known]
        self.known = fresh
        if changes:
            self.planner.update(changes)

    def ban(self, peer_id: str) -> None:
        assert self.planner is not None
        backoff = self.bans.ban(peer_id, self.clock())
        log.info("banned %s for %.1f s", peer_id[:12], backoff)
        if self.known.pop(peer_id, None) is not None:
            self.planner.update([ServerRemoved(peer_id)])

    async def route_from(self, block: int, prev_peer: str | None) -> list[tuple[str, int, int]]:
        """Best route from `block` to the end (D* Lite repair); waits for coverage if needed."""
        assert self.planner is not None
        planner = self.planner
        return await self._wait_for_route(lambda: planner.route_from(block, prev_peer))

    async def route_range(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """A fresh route over exactly [start, end) (training requests and their retries)."""

        def plan() -> Route:
            servers = self._eligible(self.known.values())
            return RoutePlanner(
                servers,
                CostModel(client_rtts=self.rtts),
                start=start,
                end=end,
                mode=self.options.mode,
            ).plan()

        return await self._wait_for_route(plan)

    async def _wait_for_route(self, plan: Callable[[], Route]) -> list[tuple[str, int, int]]:
        wait = self.options.recovery_timeout if self.waiting is None else self.waiting
        deadline = self.clock() + wait
        while True:
            try:
                return [(h.peer_id, h.start, h.end) for h in plan().hops]
            except NoRouteError as exc:
                if self.clock() >= deadline:
                    raise ChainError("no_route", str(exc)) from exc
                log.info("%s; waiting for a server to cover them", exc)
                await trio.sleep(0.5)
                await self.refresh()


class InferenceChain:
    """One inference session across the swarm, surviving server failures."""

    def __init__(self, options: ChainOptions, planning: Planning, connect: Connector) -> None:
        self.options = options
        self.planning = planning
        self.connect = connect
        self.hops: list[ChainHop] = []
        self.history: dict[int, list[torch.Tensor]] = {}
        self.length = 0
        self.recoveries: list[RecoveryEvent] = []
        self.failures = 0
        self._step_ids = itertools.count()
        self.session_id = uuid.uuid4().hex

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [h.key for h in self.hops]

    # ----- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        await self.planning.build()
        self.hops = []
        self.planning.waiting = OPEN_WAIT  # a gap at the start is reported soon, not waited out
        try:
            await self._repair(0, None)
        finally:
            self.planning.waiting = None

    async def aclose(self) -> None:
        """Close every session; the route stays readable afterwards."""
        for hop in self.hops:
            await self._close_hop(hop)

    async def __aenter__(self) -> InferenceChain:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # ----- stepping ---------------------------------------------------------------
    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] in, hidden states after the last block out."""
        if hidden.dim() != 3 or hidden.shape[0] != self.options.batch_size:
            raise ChainError(
                "bad_request",
                f"expected hidden states [batch={self.options.batch_size}, tokens, hidden], "
                f"got {list(hidden.shape)}",
            )
        if self.length + hidden.shape[1] > self.options.max_length:
            raise ChainError(
                "cache_full",
                f"session max length {self.options.max_length} exceeded: {self.length} done + "
                f"{hidden.shape[1]} new",
            )
        x = hidden.detach().to("cpu")
        index = 0
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                y = await self._send_step(hop, x)
            except HopFailed as failure:
                await self._recover(index, failure)
                continue
            self.history.setdefault(hop.start, []).append(x)
            x = y
            index += 1
        self.length += hidden.shape[1]
        return x

    async def _send_step(
        self, hop: ChainHop, x: torch.Tensor, *, replay: bool = False
    ) -> torch.Tensor:
        assert hop.channel is not None
        step_id = next(self._step_ids)
        message = wire.Step(
            hidden=x,
            step_id=step_id,
            start=None,
            end=None,
            replay=replay,
            compression=self.options.compression,
        )
        reply = await self._request(hop, message.to_wire(), self.options.step_timeout)
        if not isinstance(reply, wire.StepResult) or reply.step_id != step_id:
            raise HopFailed(hop.peer_id, f"unexpected reply {type(reply).__name__}")
        expected = (x.shape[0], x.shape[1])
        if tuple(reply.hidden.shape[:2]) != expected:
            raise HopFailed(
                hop.peer_id, f"reply of shape {list(reply.hidden.shape)} for input {list(x.shape)}"
            )
        return reply.hidden

    async def _request(self, hop: ChainHop, message: dict, timeout: float) -> wire.Message:
        assert hop.channel is not None
        try:
            with trio.fail_after(timeout):
                await hop.channel.write_message(message)
                reply = wire.parse_message(await hop.channel.read_message())
        except trio.TooSlowError:
            raise HopFailed(hop.peer_id, f"no reply within {timeout:.1f} s") from None
        except (ConnectionLost, wire.WireError, OSError) as exc:
            raise HopFailed(hop.peer_id, f"stream failed: {exc}") from exc
        if isinstance(reply, wire.Error):
            if reply.code in RETRYABLE_CODES:
                raise HopFailed(hop.peer_id, f"{reply.code}: {reply.message}")
            raise ChainError(reply.code, f"server {hop.peer_id[:12]}…: {reply.message}")
        return reply

    # ----- recovery ---------------------------------------------------------------
    async def _recover(self, index: int, failure: HopFailed) -> None:
        started = time.monotonic()
        log.warning(
            "server %s failed (%s); repairing from block %d",
            failure.peer_id[:12],
            failure.reason,
            self.hops[index].start,
        )
        self._ban(failure)
        replayed = await self._repair(index, failure.peer_id)
        self.recoveries.append(
            RecoveryEvent(
                failed_peer=failure.peer_id,
                reason=failure.reason,
                from_block=self.hops[index].start,
                new_route=self.route,
                replayed_tokens=replayed,
                seconds=time.monotonic() - started,
            )
        )

    async def _repair(self, index: int, failed_peer: str | None) -> int:
        """Make hops[index:] a working tail: re-route from hops[index].start, open and replay.

        Loops until every hop of the tail has an open session whose cache holds all tokens so
        far; a failure during replay bans that server and repairs again from its first block.
        Returns the number of tokens replayed.
        """
        replayed = 0
        while True:
            block = self.hops[index].start if index < len(self.hops) else self.options.start
            prev = self.hops[index - 1].peer_id if index > 0 else None
            new_keys = await self.planning.route_from(block, prev)
            old_tail = {hop.key: hop for hop in self.hops[index:] if hop.peer_id != failed_peer}
            tail = [old_tail.pop(key, None) or ChainHop(*key) for key in new_keys]
            for hop in old_tail.values():
                await self._close_hop(hop)
            for hop in self.hops[index:]:
                if hop.peer_id == failed_peer:
                    await self._close_hop(hop, graceful=False)
            self.hops = self.hops[:index] + tail
            self._forget_unused_history()
            try:
                for position in range(index, len(self.hops)):
                    hop = self.hops[position]
                    if hop.channel is not None:
                        continue
                    replayed += await self._open_and_replay(hop)
                return replayed
            except HopFailed as failure:
                failed_peer = failure.peer_id
                log.warning("server %s failed during replay (%s)", failed_peer[:12], failure.reason)
                self._ban(failure)
                index = next(i for i, h in enumerate(self.hops) if h.peer_id == failed_peer)

    def _ban(self, failure: HopFailed) -> None:
        self.failures += 1
        if self.failures > self.options.max_failures:
            raise ChainError(
                "no_route", f"giving up after {self.failures} server failures; last: {failure}"
            )
        self.planning.ban(failure.peer_id)

    async def _open_and_replay(self, hop: ChainHop) -> int:
        """Open a session on `hop` and feed it every input its first block has seen so far."""
        try:
            with trio.fail_after(self.options.open_timeout):
                hop.channel = await self.connect(hop.peer_id, INFERENCE_PROTOCOL)
        except (trio.TooSlowError, ConnectionLost, OSError) as exc:
            raise HopFailed(hop.peer_id, f"could not open a stream: {exc!r}") from exc
        except Exception as exc:  # noqa: BLE001 - a dial error of any kind means this peer failed
            raise HopFailed(hop.peer_id, f"could not open a stream: {exc!r}") from exc
        opened = await self._request(
            hop,
            wire.OpenSession(
                model_id=self.options.model_id,
                start=hop.start,
                end=hop.end,
                max_length=self.options.max_length,
                batch_size=self.options.batch_size,
                compression=self.options.compression,
                session_id=self.session_id,
            ).to_wire(),
            self.options.open_timeout,
        )
        if not isinstance(opened, wire.SessionOpened):
            raise HopFailed(hop.peer_id, f"unexpected reply {type(opened).__name__} to OpenSession")
        if self.length == 0:
            return 0
        past = self.history.get(hop.start)
        if not past:
            raise ChainError(
                "internal", f"no stored inputs for block {hop.start}: cannot rebuild its cache"
            )
        inputs = torch.cat(past, dim=1)
        chunk = max(1, REPLAY_CHUNK_TOKENS // max(1, inputs.shape[0]))
        outputs = [
            await self._send_step(hop, inputs[:, i : i + chunk], replay=True)
            for i in range(0, inputs.shape[1], chunk)
        ]
        if hop.end < self.options.end:
            self.history[hop.end] = [torch.cat(outputs, dim=1)]
        return inputs.shape[1]

    def _forget_unused_history(self) -> None:
        """History is kept only where a hop starts; a boundary that left the chain goes stale."""
        starts = {hop.start for hop in self.hops}
        for boundary in list(self.history):
            if boundary not in starts:
                del self.history[boundary]

    async def _close_hop(self, hop: ChainHop, *, graceful: bool = True) -> None:
        """Say goodbye to a healthy server; just drop the stream of a failed one."""
        if hop.channel is None:
            return
        channel, hop.channel = hop.channel, None
        if graceful:
            with trio.move_on_after(1.0):
                try:
                    await channel.write_message(wire.CloseSession().to_wire())
                except Exception:  # noqa: BLE001 - the server may already be gone
                    pass
        with trio.move_on_after(1.0 if graceful else 0.2):
            try:
                await channel.aclose()
            except Exception:  # noqa: BLE001
                pass
