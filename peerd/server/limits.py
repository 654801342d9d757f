"""Server limits and the KV-cache budget: refuse what would not fit instead of running out of memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from wire import DEFAULT_MAX_FRAME, ErrorCode, WireError

MIB = 2**20


@dataclass(frozen=True)
class ServerLimits:
    """Every limit a server enforces, with the defaults a consumer GPU owner would expect.

    Fields with `help` metadata are options of `peerd serve` (see cli/options.py).
    """

    # Summed over the batch rows of all open sessions.
    cache_tokens: int = field(
        default=16384,
        metadata={"help": "KV-cache budget in tokens over all sessions.", "min": 0},
    )
    cache_bytes: int | None = field(
        default=None,
        metadata={
            "help": "KV-cache budget in MiB (the smaller budget wins).",
            "flag": "--cache-mib",
            "scale": MIB,
            "min": 0,
        },
    )
    max_sessions: int = field(
        default=64, metadata={"help": "Most inference sessions open at once.", "min": 1}
    )
    max_tokens_per_request: int = field(
        default=8192,
        metadata={
            "help": "Most batch rows × new tokens in one forward, backward or inference step.",
            "min": 1,
        },
    )
    # Forward and backward requests hold activations (backward also its recompute and the
    # gradients) while they wait and compute: they draw on this budget, as sessions do on
    # the cache budget, and are refused with "busy" beyond it.
    training_tokens: int = field(
        default=16384,
        metadata={
            "help": "Most batch rows × tokens of forward/backward requests in flight at once "
            "(a backward counts twice).",
            "min": 1,
        },
    )
    # The daemon applies the same limit to its local socket. Both limits are announced
    # (SessionOpened, Info) so that clients cut bigger requests instead of having them refused.
    max_frame: int = field(
        default=DEFAULT_MAX_FRAME,
        metadata={
            "help": "Largest message accepted from a peer or on the local socket, in MiB.",
            "flag": "--max-frame-mib",
            "scale": MIB,
            "min": 1,
        },
    )
    step_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a request may wait for the compute device before 'busy'.",
            "min": 0.1,
        },
    )
    idle_timeout: float = field(
        default=300.0,
        metadata={
            "help": "Seconds without a step before an inference session is closed and its "
            "cache freed (pings do not count).",
            "min": 1,
        },
    )
    io_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds one message may take to reach a peer, or to arrive once begun.",
            "min": 0.1,
        },
    )
    drain_timeout: float = field(
        default=30.0,
        metadata={
            "help": "Seconds a stopping server (SIGTERM) lets open sessions finish, taking "
            "no new ones, before it exits.",
            "min": 0,
        },
    )
    # Enforced on our stream handlers: py-libp2p 0.8.1's resource manager counts only
    # outbound streams (inbound ones bypass it), though it does limit connections per peer.
    max_streams_per_peer: int = field(
        default=64,
        metadata={
            "help": "Most inference and RPC streams one peer may have open at once.",
            "min": 1,
        },
    )
    peer_bytes_in_flight: int = field(
        default=256 * MIB,
        metadata={
            "help": "Most MiB of frames one peer may have us reading at once (more waits).",
            "flag": "--peer-bytes-in-flight-mib",
            "scale": MIB,
            "min": 1,
        },
    )
    # A session reserves its whole cache when it opens: one that never steps would hold it
    # for the full idle timeout.
    first_step_timeout: float = field(
        default=30.0,
        metadata={
            "help": "Seconds an opened inference session may wait for its first step.",
            "min": 0.1,
        },
    )
    # So that one peer cannot reserve a server's whole budget (the daemon's own client,
    # through the in-process pipe, is not limited).
    peer_share: float = field(
        default=0.5,
        metadata={
            "help": "Largest share of the sessions and of the KV-cache budget one peer may hold.",
            "min": 0.01,
            "max": 1.0,
        },
    )


class RequestRefused(WireError):
    """A request that breaks a limit or a rule; becomes a structured `Error` reply."""

    def __init__(self, code: ErrorCode, message: str, **details: object) -> None:
        super().__init__(code, message, details)


class CacheBudget:
    """Tokens of KV cache handed out to sessions, with the exact shortfall in refusals."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def reserve(self, tokens: int) -> None:
        if tokens > self.free:
            raise RequestRefused(
                ErrorCode.CACHE_FULL,
                f"cache full: {self.free:,} tokens free, {tokens:,} asked",
                free=self.free,
                asked=tokens,
            )
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used = max(0, self.used - tokens)


class TokenBudget:
    """Tokens of work in flight (forward/backward); refuses with "busy" beyond capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @contextmanager
    def hold(self, tokens: int, what: str) -> Iterator[None]:
        if self.used + tokens > self.capacity:
            raise RequestRefused(
                ErrorCode.BUSY,
                f"server busy: {what} needs {tokens:,} tokens of the training budget, "
                f"{self.capacity - self.used:,} of {self.capacity:,} are free",
                free=self.capacity - self.used,
                asked=tokens,
            )
        self.used += tokens
        try:
            yield
        finally:
            self.used -= tokens


def peer_quota(total: int, share: float) -> int:
    """What one peer may hold of `total` (sessions, cache tokens): at least 1."""
    return max(1, int(total * share))


def budget_tokens(limits: ServerLimits, bytes_per_token: int) -> int:
    """The token budget implied by both limits (bytes per token covers all blocks served)."""
    tokens = limits.cache_tokens
    if limits.cache_bytes is not None and bytes_per_token > 0:
        tokens = min(tokens, limits.cache_bytes // bytes_per_token)
    return max(0, tokens)
