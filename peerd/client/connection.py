"""A blocking connection to the daemon's local socket (standard library + msgpack + wire).

`wire` imports torch only when a tensor is encoded or decoded, so scripts that only
generate text never import it.
"""

from __future__ import annotations

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

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(code, message)

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
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise PeerdError(ErrorCode.CONNECTION_LOST, "the daemon closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> wire.Message:
        length = wire.parse_header(self._read_exactly(wire.HEADER_SIZE), self.max_frame)
        reply = wire.parse_message(wire.decode_payload(self._read_exactly(length)))
        if isinstance(reply, wire.Error):
            raise PeerdError(reply.code, reply.message)
        return reply

    def request(self, message: wire.Message, expected: type[wire.Message]) -> wire.Message:
        self.send(message)
        reply = self.receive()
        if not isinstance(reply, expected):
            raise PeerdError(ErrorCode.BAD_REPLY, f"expected {expected.TYPE}, got {reply.TYPE}")
        return reply

    def stream(
        self, message: wire.Message, item: type[wire.Message], last: type[wire.Message]
    ) -> Iterator[wire.Message]:
        """Send one request and yield `item` replies and finally the `last` one."""
        self.send(message)
        while True:
            reply = self.receive()
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
