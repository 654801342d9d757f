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
from dataclasses import dataclass

import torch
import trio

import wire
from peerd.framed import ConnectionLost, FramedChannel
from peerd.hop_errors import (  # noqa: F401 - re-exported for the chain modules
    AVOID,
    BAN,
    RESYNC,
    RETRYABLE_CODES,
    ChainError,
    Connector,
    HopFailed,
    failure_of,
    our_fault,
)
from peerd.hop_limits import MIN_PEER_FRAME, HopLimits  # noqa: F401
from peerd.server.protocols import INFERENCE_PROTOCOL
from wire.sizing import SEQUENCE, int_list_bytes

IDLE_RESYNC_AFTER = 10.0
"""A stream that breaks after this many idle seconds is first reopened on the same server
(its idle timeout may have closed it) before the server is blamed."""


REPLAY_PIECE_TOKENS = 2048  # batch × tokens of one replayed Step at most


async def exchange(
    channel: FramedChannel, peer_id: str, message: wire.Message, *, timeout: float, max_frame: int
) -> wire.Message:
    """Send one request and read its reply; sort failures into ChainError and HopFailed."""
    with our_fault(f"request {message.TYPE} for {peer_id[:12]}… not sent"):
        frame = wire.encode_frame(message.to_wire(), max_frame)
    try:
        with trio.fail_after(timeout):
            try:
                await channel.write_frame(frame)
            except (ConnectionLost, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                # it may have said why before closing (an idle timeout): read that first
                reply = await _last_word(channel)
                if reply is None:
                    raise
            else:  # a server's reply may not decode to more than our frame cap either
                reply = wire.parse_message(await channel.read_message(), max_decoded=max_frame)
    except trio.TooSlowError:
        raise HopFailed(peer_id, f"no reply within {timeout:.1f} s") from None
    except (ConnectionLost, wire.WireError, OSError) as exc:
        raise HopFailed(peer_id, f"stream failed: {exc}") from exc
    if isinstance(reply, wire.Error):
        if reply.code in RETRYABLE_CODES:
            raise failure_of(peer_id, reply)
        raise ChainError(reply.code, f"server {peer_id[:12]}…: {reply.message}")
    return reply


async def _last_word(channel: FramedChannel) -> wire.Message | None:
    """An Error the server sent before closing a stream we could not write to, if any."""
    with trio.move_on_after(0.5):
        try:
            message = wire.parse_message(await channel.read_message())
        except Exception:  # noqa: BLE001 - nothing readable: the write's failure stands
            return None
        return message if isinstance(message, wire.Error) else None
    return None


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
    length: int | None = 0  # tokens its cache holds as far as we know; None: unknown
    last_active: float = 0.0  # trio time of its last reply

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
        limits = HopLimits.from_opened(opened, ours)
        absurd = limits.absurd()
        if absurd is not None:
            raise HopFailed(self.peer_id, f"announced absurd limits ({absurd})")
        self.limits = limits
        self.length = 0
        self.last_active = trio.current_time()

    def tokens_per_step(self, shape: torch.Size, compression: str, reorder_rows: int = 0) -> int:
        """How many tokens of a [batch, tokens, hidden] step one Step to this server carries
        (with a reorder list of `reorder_rows` indices in the first one). A step our own frame
        limit cannot carry is a ChainError; one only this server's smaller limits refuse makes
        it AVOID-failed (another server may take it)."""
        assert self.limits is not None
        extra = int_list_bytes(reorder_rows) if reorder_rows else 0
        try:
            return self.limits.rows(shape, compression, dim=SEQUENCE, fixed_bytes=extra)
        except ChainError as exc:
            if self.limits.ours is None:
                raise
            ours = HopLimits(self.limits.ours, None, self.limits.dtype)
            ours.rows(shape, compression, dim=SEQUENCE, fixed_bytes=extra)  # ours: raises
            raise HopFailed(
                self.peer_id, f"its limits cannot take this step ({exc.message})", kind=AVOID
            ) from None

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
            position = self.length
            if position is None:
                raise HopFailed(self.peer_id, "its cache length is unknown", kind=RESYNC)
            with our_fault("step not sent"):
                message = wire.Step(
                    hidden=chunk,
                    step_id=step_id,
                    replay=replay,
                    compression=compression,
                    reorder=reorder if piece.start == 0 else None,
                    position=position,
                )
            self.length = None  # until a matching reply says where its cache is
            reply = await self._exchange(message, timeout)
            if not isinstance(reply, wire.StepResult) or reply.step_id != step_id:
                raise HopFailed(self.peer_id, f"unexpected reply {type(reply).__name__}")
            if reply.hidden.shape != chunk.shape:
                raise HopFailed(
                    self.peer_id,
                    f"reply of shape {list(reply.hidden.shape)} for input {list(chunk.shape)}",
                )
            if reply.cache_length != position + chunk.shape[1]:
                raise HopFailed(
                    self.peer_id,
                    f"its cache holds {reply.cache_length} tokens after a step of "
                    f"{chunk.shape[1]} at position {position}",
                )
            self.length = reply.cache_length
            outputs.append(reply.hidden)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _exchange(self, message: wire.Message, timeout: float) -> wire.Message:
        """exchange(); a stream that broke after a long idle pause is first taken for the
        server's idle timeout (RESYNC: reopen there), not for a dead server."""
        assert self.channel is not None and self.limits is not None
        idle = trio.current_time() - self.last_active
        try:
            reply = await exchange(
                self.channel,
                self.peer_id,
                message,
                timeout=timeout,
                max_frame=self.limits.max_frame,
            )
        except HopFailed as failure:
            if (
                failure.kind == BAN
                and failure.reason.startswith("stream failed")
                and (idle >= IDLE_RESYNC_AFTER)
            ):
                failure.kind = RESYNC
            raise
        self.last_active = trio.current_time()
        return reply

    async def close(self, *, graceful: bool = True) -> None:
        """Say goodbye to a healthy server; just drop the stream of a failed one."""
        self.length = 0
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
