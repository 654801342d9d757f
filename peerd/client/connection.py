"""A blocking connection to the daemon's local socket (standard library + msgpack + wire).

`wire` imports torch only when a tensor is encoded or decoded, so scripts that only
generate text never import it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import wire
import wire.local  # noqa: F401 - registers the local API messages
from wire import ErrorCode, WireError

DEFAULT_SOCKET = Path("~/.peerd/peerd.sock")
DEFAULT_TIMEOUT = 300.0


class PeerdError(WireError):
    """An error reply from the daemon (or no daemon at all); `code` is wire's error code."""

    def __init__(
        self, code: ErrorCode | str, message: str, *, request_id: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.request_id = request_id  # of the request that failed (send it again to retry)

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


def default_socket_path() -> Path:
    env = os.environ.get("PEERD_SOCKET")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("PEERD_HOME")
    return (Path(home) / "peerd.sock").expanduser() if home else DEFAULT_SOCKET.expanduser()


class Connection:
    """One socket, one request at a time; replies are parsed and error replies raised."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = Path(path).expanduser() if path is not None else default_socket_path()
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending = bytearray()  # bytes received but not yet read
        self._header: bytes | None = None  # a frame's header whose payload is still coming
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise PeerdError(
                "no_daemon",
                f"no peerd daemon at {self.path} ({exc.strerror}); start one with `peerd join` "
                "or `peerd serve`, or point PEERD_SOCKET at its socket",
            ) from None

    def send(self, message: wire.Message) -> None:
        self.sock.sendall(wire.encode_frame(message.to_wire()))

    def _read_exactly(self, n: int) -> bytes:
        """n bytes; what arrived before a timeout stays buffered for the next read, so a
        timeout never leaves the stream in the middle of a frame."""
        while len(self._pending) < n:
            chunk = self.sock.recv(min(n - len(self._pending), 1 << 20))
            if not chunk:
                raise PeerdError(ErrorCode.CONNECTION_LOST, "the daemon closed the connection")
            self._pending += chunk
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    def _receive_frame(self) -> bytes:
        if self._header is None:
            self._header = self._read_exactly(wire.HEADER_SIZE)
        length = wire.parse_header(self._header, self.max_frame)
        payload = self._read_exactly(length)
        self._header = None
        return payload

    def receive(self, request_id: int | None = None) -> wire.Message:
        """The next reply to `request_id` (replies to earlier requests, say one that timed
        out, are skipped; a reply without an id, from an older daemon, is taken)."""
        while True:
            try:
                payload = self._receive_frame()
            except TimeoutError:
                raise PeerdError(
                    ErrorCode.TIMEOUT, "no reply from the daemon in time", request_id=request_id
                ) from None
            reply = wire.parse_message(wire.decode_payload(payload))
            rid = getattr(reply, "request_id", None)
            if request_id is not None and rid is not None and rid != request_id:
                continue  # the late answer to a request we gave up on
            if isinstance(reply, wire.Error):
                raise PeerdError(reply.code, reply.message, request_id=request_id)
            return reply

    def _with_id(self, message: wire.Message, request_id: int | None) -> tuple[wire.Message, int]:
        rid = next(self._ids) if request_id is None else request_id
        if any(f.name == "request_id" for f in dataclasses.fields(message)):
            message = dataclasses.replace(message, request_id=rid)
        return message, rid

    def request(
        self,
        message: wire.Message,
        expected: type[wire.Message],
        *,
        request_id: int | None = None,
    ) -> wire.Message:
        """Send `message` with a fresh id (or `request_id`, to retry one) and read its reply."""
        message, rid = self._with_id(message, request_id)
        self.send(message)
        reply = self.receive(rid)
        if not isinstance(reply, expected):
            raise PeerdError(ErrorCode.BAD_REPLY, f"expected {expected.TYPE}, got {reply.TYPE}")
        return reply

    def stream(
        self, message: wire.Message, item: type[wire.Message], last: type[wire.Message]
    ) -> Iterator[wire.Message]:
        """Send one request and yield `item` replies and finally the `last` one."""
        message, rid = self._with_id(message, None)
        self.send(message)
        while True:
            reply = self.receive(rid)
            if isinstance(reply, item):
                yield reply
            elif isinstance(reply, last):
                yield reply
                return
            else:
                raise PeerdError(
                    ErrorCode.BAD_REPLY, f"unexpected {reply.TYPE} in a {message.TYPE} stream"
                )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
