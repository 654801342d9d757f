"""What one server accepts — its frame and tokens-per-request limits and its compute dtype —
combined with our own frame limit; requests are cut to fit it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import wire
from peerd.hop_errors import ChainError
from wire.names import FLOATING_DTYPES

MIN_PEER_FRAME = 64 * 1024
"""A server announcing a smaller frame limit (or max_tokens < 1) is refused as broken."""


@dataclass(frozen=True)
class HopLimits:
    """What one server accepts, already combined with our own frame limit."""

    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_tokens: int | None = None
    dtype: str = "float32"
    ours: int | None = None  # our own frame limit (None: max_frame is ours)

    @classmethod
    def from_opened(cls, opened: wire.SessionOpened, ours: int) -> HopLimits:
        return cls(min(ours, opened.max_frame), opened.max_tokens, opened.dtype, ours)

    def absurd(self) -> str | None:
        """Why limits a server announced cannot be meant (None when they are sane)."""
        if self.max_tokens is not None and self.max_tokens < 1:
            return f"max_tokens {self.max_tokens}"
        if self.max_frame < min(MIN_PEER_FRAME, self.ours or MIN_PEER_FRAME):
            return f"max_frame {self.max_frame} bytes"
        return None

    @classmethod
    def from_info(cls, limits: dict[str, Any], ours: int) -> HopLimits:
        """From InfoResult.limits; what is missing or malformed (an older server) stays default."""
        frame, tokens, dtype = (limits.get(k) for k in ("max_frame", "max_tokens", "dtype"))
        return cls(
            min(ours, frame) if _positive_int(frame) else min(ours, wire.DEFAULT_MAX_FRAME),
            tokens if _positive_int(tokens) else None,
            dtype if dtype in FLOATING_DTYPES else "float32",
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return wire.DTYPES[self.dtype]

    def rows(self, shape: torch.Size | list[int], compression: str, **kw: Any) -> int:
        """wire.rows_per_frame for this server; a request that cannot be cut small enough is
        a too_large ChainError to the caller, not the server's fault."""
        try:
            return wire.rows_per_frame(
                list(shape),
                self.dtype,
                compression,
                self.max_frame,
                max_tokens=self.max_tokens,
                **kw,
            )
        except wire.WireError as exc:
            raise ChainError(exc.code, f"request cannot be sent: {exc.message}") from None


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0
