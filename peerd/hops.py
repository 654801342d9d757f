"""Talking to one server of a chain: requests cut to fit its frames, replies checked.

Failures are sorted by whose fault they are. Ours (a request we cannot encode, a tensor too
big even cut down to one token or one sequence, a request built wrong) raise `ChainError`
to the caller and ban nobody. The server's (its stream broke, it timed out, it answered a
retryable error or a reply that does not match the request) raise `HopFailed`, which the
chains answer by banning it and routing around it.

Every request fits the smaller of our frame limit and the server's (SessionOpened.max_frame,
or InfoResult.limits for stateless calls) and its tokens-per-request limit; activations
travel in the server's compute dtype, and it answers in it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import trio

import wire
from peerd.framed import ConnectionLost, FramedChannel
from peerd.server.protocols import INFERENCE_PROTOCOL
from wire import ErrorCode, WireError
from wire.names import FLOATING_DTYPES
from wire.sizing import SEQUENCE, int_list_bytes

# Server answers that mean "this server cannot help now": route around it.
RETRYABLE_CODES = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.CACHE_FULL,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.UNKNOWN_SESSION,
        ErrorCode.UNKNOWN_MODEL,
    }
)


REPLAY_PIECE_TOKENS = 2048  # batch × tokens of one replayed Step at most


class ChainError(WireError):
    """A chain could not do what was asked (the caller's answer, never a server's ban)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(code, message)


class HopFailed(Exception):
    """One server of the chain failed (connection lost, timeout, or a retryable error reply)."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"{peer_id[:12]}…: {reason}")
        self.peer_id = peer_id
        self.reason = reason


class Connector(Protocol):
    async def __call__(self, peer_id: str, protocol: str) -> FramedChannel: ...


@contextmanager
def our_fault(what: str) -> Iterator[None]:
    """A WireError raised inside (building or encoding a request) is ours: a ChainError."""
    try:
        yield
    except wire.WireError as exc:
        raise ChainError(exc.code, f"{what}: {exc.message}") from None


@dataclass(frozen=True)
class HopLimits:
    """What one server accepts, already combined with our own frame limit."""

    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_tokens: int | None = None
    dtype: str = "float32"

    @classmethod
    def from_opened(cls, opened: wire.SessionOpened, ours: int) -> HopLimits:
        return cls(min(ours, opened.max_frame), opened.max_tokens, opened.dtype)

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


async def exchange(
    channel: FramedChannel, peer_id: str, message: wire.Message, *, timeout: float, max_frame: int
) -> wire.Message:
    """Send one request and read its reply; sort failures into ChainError and HopFailed."""
    with our_fault(f"request {message.TYPE} for {peer_id[:12]}… not sent"):
        frame = wire.encode_frame(message.to_wire(), max_frame)
    try:
        with trio.fail_after(timeout):
            await channel.write_frame(frame)
            reply = wire.parse_message(await channel.read_message())
    except trio.TooSlowError:
        raise HopFailed(peer_id, f"no reply within {timeout:.1f} s") from None
    except (ConnectionLost, wire.WireError, OSError) as exc:
        raise HopFailed(peer_id, f"stream failed: {exc}") from exc
    if isinstance(reply, wire.Error):
        if reply.code in RETRYABLE_CODES:
            raise HopFailed(peer_id, f"{reply.code}: {reply.message}")
        raise ChainError(reply.code, f"server {peer_id[:12]}…: {reply.message}")
    return reply


async def open_channel(connect: Connector, peer_id: str, protocol: str) -> FramedChannel:
    """A stream to `peer_id`; any failure to dial is that peer's."""
    try:
        return await connect(peer_id, protocol)
    except Exception as exc:  # noqa: BLE001 - a dial error of any kind means this peer failed
        raise HopFailed(peer_id, f"could not open a stream: {exc!r}") from exc


@dataclass(eq=False)
class ChainHop:
    """One span of an inference chain: its session stream and what its server accepts."""

    peer_id: str
    start: int
    end: int
    channel: FramedChannel | None = None
    limits: HopLimits | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.peer_id, self.start, self.end)

    async def open(self, connect: Connector, request: wire.OpenSession, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                self.channel = await open_channel(connect, self.peer_id, INFERENCE_PROTOCOL)
        except trio.TooSlowError:
            raise HopFailed(self.peer_id, f"no stream within {timeout:.1f} s") from None
        ours = self.channel.max_frame
        opened = await exchange(
            self.channel, self.peer_id, request, timeout=timeout, max_frame=ours
        )
        if not isinstance(opened, wire.SessionOpened):
            raise HopFailed(
                self.peer_id, f"unexpected reply {type(opened).__name__} to OpenSession"
            )
        self.limits = HopLimits.from_opened(opened, ours)

    def tokens_per_step(self, shape: torch.Size, compression: str, reorder_rows: int = 0) -> int:
        """How many tokens of a [batch, tokens, hidden] step one Step to this server carries
        (with a reorder list of `reorder_rows` indices in the first one)."""
        assert self.limits is not None
        extra = int_list_bytes(reorder_rows) if reorder_rows else 0
        return self.limits.rows(shape, compression, dim=SEQUENCE, fixed_bytes=extra)

    async def step(
        self,
        x: torch.Tensor,
        step_ids: itertools.count,
        *,
        compression: str,
        timeout: float,
        replay: bool = False,
        reorder: list[int] | None = None,
    ) -> torch.Tensor:
        """Run `x` [batch, tokens, hidden] through this hop's blocks, in as many Steps as the
        frames need (the server's cache advances with each); `reorder` goes with the first."""
        assert self.channel is not None and self.limits is not None
        x = x.to(self.limits.torch_dtype)
        per_step = self.tokens_per_step(x.shape, compression, len(reorder or ()))
        if replay:  # each piece gets one step timeout: keep a replay's pieces short to compute
            per_step = min(per_step, max(1, REPLAY_PIECE_TOKENS // x.shape[0]))
        outputs = []
        for piece in wire.cuts(x.shape[1], per_step):
            chunk = x[:, piece]
            step_id = next(step_ids)
            with our_fault("step not sent"):
                message = wire.Step(
                    hidden=chunk,
                    step_id=step_id,
                    replay=replay,
                    compression=compression,
                    reorder=reorder if piece.start == 0 else None,
                )
            reply = await exchange(
                self.channel,
                self.peer_id,
                message,
                timeout=timeout,
                max_frame=self.limits.max_frame,
            )
            if not isinstance(reply, wire.StepResult) or reply.step_id != step_id:
                raise HopFailed(self.peer_id, f"unexpected reply {type(reply).__name__}")
            if reply.hidden.shape != chunk.shape:
                raise HopFailed(
                    self.peer_id,
                    f"reply of shape {list(reply.hidden.shape)} for input {list(chunk.shape)}",
                )
            outputs.append(reply.hidden)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def close(self, *, graceful: bool = True) -> None:
        """Say goodbye to a healthy server; just drop the stream of a failed one."""
        if self.channel is None:
            return
        channel, self.channel = self.channel, None
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
