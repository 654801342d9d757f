"""Framed messages over any byte stream: libp2p streams and the local Unix socket alike.

`wire/` parses bytes and does no I/O; this module does the reading and writing, so both
transports share one framing (4-byte length prefix + msgpack map, with a maximum frame size).
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from wire import HEADER_SIZE, WireError, decode_payload, encode_frame, parse_header


class ConnectionLost(Exception):
    """The other side closed or reset the stream (possibly in the middle of a frame)."""


class ByteStream(Protocol):
    """The least a transport must offer: receive some bytes (b"" at end), send all, close."""

    async def receive_some(self, max_bytes: int) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


class Libp2pByteStream:
    """Adapts a libp2p `INetStream` (which raises at EOF instead of returning b"")."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def receive_some(self, max_bytes: int) -> bytes:
        from libp2p.io.exceptions import IOException

        try:
            return await self.stream.read(max_bytes)
        except (IOException, EOFError):
            return b""

    async def send_all(self, data: bytes) -> None:
        from libp2p.io.exceptions import IOException

        try:
            await self.stream.write(data)
        except IOException as exc:
            raise ConnectionLost(f"stream closed while writing: {exc!r}") from exc

    async def aclose(self) -> None:
        try:
            await self.stream.close()
        except Exception:  # noqa: BLE001 - closing a dead stream must never raise
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:  # noqa: BLE001
            pass


class TrioByteStream:
    """Adapts a `trio.abc.Stream` (Unix socket, TCP, in-memory test streams)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send_all(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"stream closed while writing: {exc!r}") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()


class MemoryByteStream:
    """One end of an in-process byte pipe (`memory_pipe`): how a daemon reaches the blocks it
    serves itself, with the same framing and limits as over the network."""

    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send, self._receive = send, receive
        self._pending = b""

    async def receive_some(self, max_bytes: int) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def send_all(self, data: bytes) -> None:
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"pipe closed while writing: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_pipe(buffered_frames: int = 4) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-process byte streams."""
    a_send, b_receive = trio.open_memory_channel[bytes](buffered_frames)
    b_send, a_receive = trio.open_memory_channel[bytes](buffered_frames)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)


class ByteBudget:
    """Bytes of frames being read, shared by streams (of one peer): a reader waits for room,
    so a peer's streams together cannot make us buffer more than `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> int:
        """Wait until `n` bytes fit (a frame bigger than the whole budget waits for all of it);
        returns what was taken, to give to `release`."""
        n = min(n, self.capacity)
        while self.used + n > self.capacity:
            await self._changed.wait()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()


class FramedChannel:
    """Reads and writes whole messages; enforces the frame cap before reading a payload.

    `peer_id` names the other side (a libp2p peer id) for per-peer limits; None is this
    daemon itself (the in-process pipe) or a test. With `io_timeout` set, writing a frame and
    reading one once its header has come must each finish within that many seconds, or the
    stream is reset and ConnectionLost raised: a peer that reads or sends very slowly cannot
    pin whoever serves it (waiting for a frame to start is the caller's deadline)."""

    def __init__(
        self,
        stream: ByteStream,
        max_frame: int,
        peer_id: str | None = None,
        io_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.peer_id = peer_id
        self.io_timeout = io_timeout
        self.byte_budget: ByteBudget | None = None  # shared by the streams of one peer
        self._buffer = bytearray()

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = await self.stream.receive_some(max(n - len(self._buffer), 65536))
            if not chunk:
                if self._buffer:
                    raise ConnectionLost(
                        f"stream ended in the middle of a frame ({len(self._buffer)} of {n} bytes)"
                    )
                raise ConnectionLost("stream ended")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_message(self) -> dict:
        """One decoded msgpack map. Raises WireError (bad frame) or ConnectionLost."""
        length = parse_header(await self._read_exactly(HEADER_SIZE), self.max_frame)
        budget = self.byte_budget
        timeout = float("inf") if self.io_timeout is None else self.io_timeout
        held = 0
        try:
            with trio.move_on_after(timeout) as late:
                if budget is not None:
                    held = await budget.acquire(length)
                payload = await self._read_exactly(length)
            if late.cancelled_caught:
                await self._give_up(f"a {length:,}-byte frame took over {timeout:.0f} s")
            return decode_payload(payload)
        finally:
            if held:
                budget.release(held)

    async def write_message(self, message: dict) -> None:
        await self.write_frame(encode_frame(message))

    async def write_frame(self, frame: bytes) -> None:
        """Send a frame encoded beforehand (so that encoding errors stay the sender's own)."""
        if self.io_timeout is None:
            await self.stream.send_all(frame)
            return
        with trio.move_on_after(self.io_timeout) as late:
            await self.stream.send_all(frame)
        if late.cancelled_caught:
            await self._give_up(f"writing {len(frame):,} bytes took over {self.io_timeout:.0f} s")

    async def _give_up(self, why: str) -> None:
        """The stream is stuck mid-frame: reset it (or close it) and report it lost."""
        reset = getattr(self.stream, "reset", None)
        with trio.move_on_after(1):
            if reset is not None:
                await reset()
            else:
                await self.stream.aclose()
        raise ConnectionLost(f"peer too slow: {why}")

    async def aclose(self) -> None:
        await self.stream.aclose()


__all__ = [
    "ByteBudget",
    "ByteStream",
    "ConnectionLost",
    "FramedChannel",
    "Libp2pByteStream",
    "MemoryByteStream",
    "TrioByteStream",
    "WireError",
    "memory_pipe",
]
