"""Whose fault a failure is, and what a chain does about it.

Ours (a request we cannot encode, a tensor too big even cut to one token or one sequence, a
request built wrong) is a `ChainError` to the caller and bans nobody. A server's is a
`HopFailed` of a kind: BAN (a strike in the shared ban list, routed around), AVOID (healthy
but unable to take this chain: moved blocks, its limits, a full cache; left out of this
chain only) or RESYNC (its session is gone or out of step: reopen it and replay).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import wire
from peerd.framed import FramedChannel
from wire import ErrorCode, WireError

# Server answers that mean "this server cannot help now": route around it.
RETRYABLE_CODES = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.CACHE_FULL,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.UNKNOWN_SESSION,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.OUT_OF_RANGE,
        ErrorCode.OUT_OF_STEP,
        ErrorCode.TOO_LARGE,
    }
)

# What a chain does about a failed server (HopFailed.kind).
BAN = "ban"  # it failed: ban it (a strike in the shared ban list) and route around it
AVOID = "avoid"  # it is healthy but cannot take this chain (moved blocks, its limits, full
# cache): leave it out of this chain only, no strike
RESYNC = "resync"  # its session is gone or out of step (idle timeout, position mismatch):
# reopen on the same server and replay, no ban

# Server error codes that are not the server's failure (the rest of RETRYABLE_CODES is).
_CODE_KINDS = {
    ErrorCode.OUT_OF_RANGE: AVOID,  # it moved its blocks since we read its record
    ErrorCode.TOO_LARGE: AVOID,  # we cut to the limits it announced: its limits shrank
    ErrorCode.CACHE_FULL: AVOID,
    ErrorCode.OUT_OF_STEP: RESYNC,
    ErrorCode.TIMEOUT: RESYNC,  # it closed our session for idleness
}


class ChainError(WireError):
    """A chain could not do what was asked (the caller's answer, never a server's ban)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(code, message)


class HopFailed(Exception):
    """One server of the chain failed (connection lost, timeout, or a retryable error reply);
    `kind` (BAN, AVOID, RESYNC) says what the chain does about it; `code` is the server's
    error code when it answered one, `details` its details."""

    def __init__(
        self,
        peer_id: str,
        reason: str,
        *,
        kind: str = BAN,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{peer_id[:12]}…: {reason}")
        self.peer_id = peer_id
        self.reason = reason
        self.kind = kind
        self.code = code
        self.details = details or {}


class Connector(Protocol):
    async def __call__(self, peer_id: str, protocol: str) -> FramedChannel: ...


@contextmanager
def our_fault(what: str) -> Iterator[None]:
    """A WireError raised inside (building or encoding a request) is ours: a ChainError."""
    try:
        yield
    except wire.WireError as exc:
        raise ChainError(exc.code, f"{what}: {exc.message}") from None


def failure_of(peer_id: str, reply: wire.Error) -> HopFailed:
    """A retryable error reply as a HopFailed of the right kind."""
    code = ErrorCode.parse(reply.code)
    return HopFailed(
        peer_id,
        f"{reply.code}: {reply.message}",
        kind=_CODE_KINDS.get(code, BAN),  # type: ignore[arg-type]
        code=str(code),
        details=reply.details,
    )
