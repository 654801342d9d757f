"""The one exception type of the wire layer and the error codes peers exchange.

Every problem with bytes that arrived (or with a message we were asked to send) is a
`WireError`, so the daemon needs a single `except WireError` to answer the peer with a
structured `Error` and keep serving everyone else.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    """Every error code peers and scripts exchange; a member *is* its string on the wire.

    A peer may receive a code it does not know (a newer peer added it); it must treat it as a
    generic failure rather than a malformed message, so `Error.code` accepts any identifier
    and `WireError.code` keeps an unknown one as a plain string.
    """

    BAD_REQUEST = "bad_request"  # malformed frame, tensor or message (any field out of its range)
    UNSUPPORTED_VERSION = "unsupported_version"  # message "v" we do not speak
    TOO_LARGE = "too_large"  # frame (or one row of a request) above the receiver's limit
    CACHE_FULL = "cache_full"  # no room for the session's KV cache
    BUSY = "busy"  # server overloaded; retry elsewhere
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_MODEL = "unknown_model"
    OUT_OF_RANGE = "out_of_range"  # blocks not served here, position past the session's max_length
    OUT_OF_STEP = "out_of_step"  # a step's position is not the session's cache length: replay
    TIMEOUT = "timeout"
    NO_ROUTE = "no_route"  # no chain of servers covers the model
    CLOSED = "closed"  # the connection or session is closed
    CONNECTION_LOST = "connection_lost"  # (client side) the daemon went away mid-request
    BAD_REPLY = "bad_reply"  # (client side) a reply of the wrong type
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, code: str) -> ErrorCode | str:
        """The member for a known code; an unknown one stays the string it is."""
        try:
            return cls(code)
        except ValueError:
            return code


ALL_CODES = frozenset(code.value for code in ErrorCode)


class WireError(Exception):
    """A frame, tensor or message that cannot be accepted (or sent).

    `code` is one of `ErrorCode`; `details` is a small msgpack-able dict for the peer
    (for instance the frame limit that was exceeded).
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode.parse(str(code))
        self.message = message
        self.details = dict(details) if details else {}

    def __repr__(self) -> str:
        return f"WireError({str(self.code)!r}, {self.message!r})"


def bad_request(message: str, **details: Any) -> WireError:
    """Shorthand for the most common error."""
    return WireError(ErrorCode.BAD_REQUEST, message, details)
