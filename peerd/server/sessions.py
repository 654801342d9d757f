"""Inference sessions on a server: each holds a KV cache reserved from the server's budget.

A session is opened with its batch size, max length and left padding; every Step appends
tokens to its cache (a step cut into several by the client just advances it several times),
after gathering the cache's rows first when the step carries a `reorder` (beam search).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import wire
from blocks import InputError, KVCache
from peerd.server.limits import CacheBudget, RequestRefused, budget_tokens, peer_quota
from peerd.server.priority import INFERENCE
from peerd.server.runner import SpanRunner
from wire import ErrorCode

log = logging.getLogger("peerd.server")


@dataclass
class OpenSessionState:
    """One client's inference session on this server."""

    session_id: str
    cache: KVCache
    reserved_tokens: int
    compression: str
    peer: str | None = None  # who opened it (None: this daemon, through its in-process pipe)
    opened_at: float = field(default_factory=time.monotonic)


class Sessions:
    """The open sessions of one server and the cache budget they draw on."""

    def __init__(self, runner: SpanRunner) -> None:
        self.runner = runner
        span = runner.span
        self.budget = CacheBudget(budget_tokens(runner.limits, span.cache_bytes_per_token()))
        self.open: dict[int, OpenSessionState] = {}  # keyed by object: client ids may collide
        self._by_peer: dict[str, list[int]] = {}  # peer -> [sessions, reserved tokens]

    def __len__(self) -> int:
        return len(self.open)

    def opened_reply(self, state: OpenSessionState) -> wire.SessionOpened:
        accepts = self.runner.accepts()
        return wire.SessionOpened(
            session_id=state.session_id,
            start=state.cache.start,
            end=state.cache.end,
            free_cache_tokens=self.budget.free,
            max_frame=accepts["max_frame"],
            max_tokens=accepts["max_tokens"],
            dtype=accepts["dtype"],
        )

    def held_by(self, peer: str) -> tuple[int, int]:
        """(sessions, reserved cache tokens) that `peer` holds now."""
        sessions, tokens = self._by_peer.get(peer, (0, 0))
        return sessions, tokens

    def _check_peer_quota(self, peer: str | None, cost: int) -> None:
        if peer is None:
            return
        limits = self.runner.limits
        sessions, tokens = self.held_by(peer)
        max_sessions = peer_quota(limits.max_sessions, limits.peer_share)
        if sessions >= max_sessions:
            raise RequestRefused(
                ErrorCode.BUSY,
                f"server busy for this peer: it holds {sessions} sessions, the most one peer "
                f"may hold is {max_sessions}",
                held=sessions,
                limit=max_sessions,
            )
        max_tokens = peer_quota(self.budget.capacity, limits.peer_share)
        if tokens + cost > max_tokens:
            raise RequestRefused(
                ErrorCode.CACHE_FULL,
                f"cache quota of this peer exceeded: it holds {tokens:,} tokens and asks "
                f"{cost:,}; one peer may hold at most {max_tokens:,}",
                held=tokens,
                asked=cost,
                limit=max_tokens,
            )

    def open_session(self, message: wire.OpenSession, peer: str | None = None) -> OpenSessionState:
        """Reserve the session's cache; `peer` is charged for it (None: not limited)."""
        runner, limits = self.runner, self.runner.limits
        runner.check_model(message.model_id)
        start, end = runner.check_interval(message.start, message.end)
        if len(self.open) >= limits.max_sessions:
            raise RequestRefused(
                ErrorCode.BUSY,
                f"server busy: {len(self.open)} sessions open, the limit is {limits.max_sessions}",
            )
        if message.batch_size < 1 or message.max_length < 1:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST, "batch_size and max_length must be positive"
            )
        tokens = message.batch_size * message.max_length
        cost = self._budget_cost(tokens, runner.span.cache_bytes_per_token(1, start, end))
        self.budget.reserve(cost)  # the server's shortage is said first, then the peer's
        try:
            self._check_peer_quota(peer, cost)
        except RequestRefused:
            self.budget.release(cost)
            raise
        try:
            cache = runner.span.new_cache(
                message.batch_size,
                message.max_length,
                start,
                end,
                pad_lengths=message.pad_lengths,
            )
        except InputError as exc:  # pad lengths out of range
            self.budget.release(cost)
            raise RequestRefused(ErrorCode.BAD_REQUEST, str(exc)) from None
        except BaseException:
            self.budget.release(cost)
            raise
        state = OpenSessionState(
            session_id=message.session_id or uuid.uuid4().hex,
            cache=cache,
            reserved_tokens=cost,
            compression=message.compression,
            peer=peer,
        )
        self.open[id(state)] = state
        if peer is not None:
            held = self._by_peer.setdefault(peer, [0, 0])
            held[0] += 1
            held[1] += cost
        log.info(
            "session %s opened: blocks %d:%d, batch %d, max length %d",
            state.session_id[:8],
            start,
            end,
            message.batch_size,
            message.max_length,
        )
        return state

    def _budget_cost(self, tokens: int, bytes_per_token_of_interval: int) -> int:
        """A session over a sub-interval costs its share of the full span's per-token bytes."""
        full = self.runner.span.cache_bytes_per_token(1)
        if full <= 0:
            return tokens
        return -(-tokens * bytes_per_token_of_interval // full)

    def close_session(self, state: OpenSessionState) -> None:
        if self.open.pop(id(state), None) is None:
            return  # closed already
        self.budget.release(state.reserved_tokens)
        held = self._by_peer.get(state.peer) if state.peer is not None else None
        if held is not None:
            held[0] -= 1
            held[1] -= state.reserved_tokens
            if held[0] <= 0:
                del self._by_peer[state.peer]
        log.info("session %s closed after %d tokens", state.session_id[:8], state.cache.length)

    async def step(self, session: OpenSessionState, message: wire.Step) -> wire.StepResult:
        runner, cache = self.runner, session.cache
        if message.position is not None and message.position != cache.length:
            raise RequestRefused(
                ErrorCode.OUT_OF_STEP,
                f"step at position {message.position}, but this session's cache holds "
                f"{cache.length} tokens",
                position=message.position,
                cache_length=cache.length,
            )
        if (message.start is not None and message.start != cache.start) or (
            message.end is not None and message.end != cache.end
        ):
            raise RequestRefused(
                ErrorCode.OUT_OF_RANGE,
                f"this session covers blocks {cache.start}:{cache.end}; "
                f"open a new session for blocks {message.start}:{message.end}",
            )
        hidden = message.hidden
        runner.check_tokens(hidden)
        if hidden.shape[0] != cache.batch_size:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"session batch size is {cache.batch_size}, step has {hidden.shape[0]}",
            )
        if cache.length + hidden.shape[1] > cache.max_length:
            raise RequestRefused(
                ErrorCode.CACHE_FULL,
                f"session max length {cache.max_length} exceeded: {cache.length} cached + "
                f"{hidden.shape[1]} new",
            )
        reorder = message.reorder
        if reorder is not None and (
            len(reorder) != cache.batch_size or any(not 0 <= i < cache.batch_size for i in reorder)
        ):
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"reorder must list {cache.batch_size} row indices in [0, {cache.batch_size})",
            )
        inputs = runner.to_compute(hidden)
        width = runner.span.config.hidden_size
        if inputs.shape[-1] != width:  # refused before the cache is touched (reorder included)
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"hidden states must have {width} features, got {inputs.shape[-1]}",
            )

        def run():
            if reorder is not None:
                cache.reorder(reorder)
            return runner.span.step(inputs, cache)

        output = await runner.run(INFERENCE, run)
        return wire.StepResult(
            hidden=output.cpu(),
            step_id=message.step_id,
            cache_length=cache.length,
            compression=session.compression,
        )
