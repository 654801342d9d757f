"""Server limits and the KV-cache budget: refuse what would not fit instead of running out of memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """Every limit a server enforces, with the defaults a consumer GPU owner would expect."""

    cache_tokens: int = 16384
    """KV-cache budget in tokens (summed over batch rows of all open sessions)."""
    cache_bytes: int | None = None
    """Optional budget in bytes; the smaller of the two budgets wins."""
    max_sessions: int = 64
    max_tokens_per_request: int = 8192
    """Batch × new tokens in one step, forward or backward request."""
    max_frame: int = 64 * 1024 * 1024
    """Largest frame read from a peer. Both limits are announced (SessionOpened, Info) so
    that clients cut bigger requests instead of having them refused."""
    step_timeout: float = 60.0
    """Longest a request may wait for its turn at the compute device before `busy`."""
    idle_timeout: float = 300.0
    """A session that sends nothing for this long is closed and its cache freed."""


class RequestRefused(Exception):
    """A request that breaks a limit or a rule; becomes a structured `Error` reply."""

    def __init__(self, code: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details)


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
                "cache_full",
                f"cache full: {self.free:,} tokens free, {tokens:,} asked",
                free=self.free,
                asked=tokens,
            )
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used = max(0, self.used - tokens)


def budget_tokens(limits: ServerLimits, bytes_per_token: int) -> int:
    """The token budget implied by both limits (bytes per token covers all blocks served)."""
    tokens = limits.cache_tokens
    if limits.cache_bytes is not None and bytes_per_token > 0:
        tokens = min(tokens, limits.cache_bytes // bytes_per_token)
    return max(0, tokens)
