"""Serving a span of blocks to peers: the stream handlers of inference sessions and RPCs.

Transport-agnostic: handlers take a `FramedChannel`, so the same code serves libp2p streams
(and in-memory streams in tests). Every bad request gets a structured `Error` reply and only
its own stream is affected; all compute goes through one `ComputeQueue` (peerd.server.runner),
sessions and their cache budget live in peerd.server.sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

import wire
from blocks import LoadedBlocks
from peerd.framed import ConnectionLost, FramedChannel
from peerd.server.limits import CacheBudget, RequestRefused, ServerLimits
from peerd.server.protocols import INFERENCE_PROTOCOL, RPC_PROTOCOL
from peerd.server.runner import SpanRunner
from peerd.server.sessions import OpenSessionState, Sessions
from wire import ErrorCode

log = logging.getLogger("peerd.server")

CLOSE_TIMEOUT = 2.0  # seconds to close a stream politely before giving up on it

__all__ = ["INFERENCE_PROTOCOL", "RPC_PROTOCOL", "BlockServer", "OpenSessionState"]


class BlockServer:
    """Answers requests for the blocks of one span. Assembles only; handlers do the work."""

    def __init__(
        self,
        span: LoadedBlocks,
        model_id: str,
        limits: ServerLimits,
        *,
        record: Callable[[], dict] = dict,
    ) -> None:
        self.span = span
        self.model_id = model_id
        self.limits = limits
        self.record = record
        self.runner = SpanRunner(span, model_id, limits)
        self.compute = self.runner.compute
        self.sessions = Sessions(self.runner)
        self.draining = False  # stopping: open sessions finish, new ones are refused
        self._requests_in_flight = 0  # forward/backward/info being answered
        self._work_ended = trio.Event()  # set (and renewed) when a session or request ends

    @property
    def budget(self) -> CacheBudget:
        return self.sessions.budget

    @property
    def requests_served(self) -> int:
        return self.runner.requests_served

    @staticmethod
    async def _reply_error(channel: FramedChannel, code: str, message: str, details: dict) -> None:
        await channel.write_message(
            wire.Error(code=code, message=message, details=details).to_wire()
        )

    # ----- inference sessions ---------------------------------------------------------
    async def handle_inference(self, channel: FramedChannel) -> None:
        """One long-lived stream per client session: open, steps, close.

        The session is closed (its cache freed) when no Step comes within the idle timeout,
        or no first step within the shorter first-step timeout; pings keep the stream
        answering but not the session alive."""
        session: OpenSessionState | None = None
        limits = self.limits
        self._set_deadlines(channel)
        deadline, why = trio.current_time() + limits.idle_timeout, "idle"
        try:
            while True:
                with trio.move_on_at(deadline) as idle:
                    raw = await channel.read_message()
                if idle.cancelled_caught:
                    timeout = limits.idle_timeout
                    if why != "idle":
                        timeout = min(limits.first_step_timeout, timeout)
                    message = (
                        f"session idle for {timeout:.0f} s, closed"
                        if why == "idle"
                        else f"no first step within {timeout:.0f} s of opening, session closed"
                    )
                    await self._reply_error(channel, ErrorCode.TIMEOUT, message, {})
                    return
                try:
                    message = wire.parse_message(raw, max_decoded=limits.max_frame)
                    if isinstance(message, wire.OpenSession):
                        if session is not None:
                            raise RequestRefused(
                                ErrorCode.BAD_REQUEST, "session already open on this stream"
                            )
                        self._check_accepting()
                        session = self.sessions.open_session(message, channel.peer_id)
                        first = min(limits.first_step_timeout, limits.idle_timeout)
                        deadline, why = trio.current_time() + first, "first step"
                        reply = self.sessions.opened_reply(session)
                        await channel.write_message(reply.to_wire())
                    elif isinstance(message, wire.Step):
                        if session is None:
                            raise RequestRefused(
                                ErrorCode.UNKNOWN_SESSION, "step before the session was opened"
                            )
                        deadline, why = trio.current_time() + limits.idle_timeout, "idle"
                        result = await self.sessions.step(session, message)
                        deadline = trio.current_time() + limits.idle_timeout
                        await channel.write_message(result.to_wire())
                    elif isinstance(message, wire.CloseSession):
                        return
                    elif isinstance(message, wire.Ping):
                        await channel.write_message(wire.Pong(nonce=message.nonce).to_wire())
                    else:
                        raise RequestRefused(
                            ErrorCode.BAD_REQUEST,
                            f"{type(message).__name__} is not valid in an inference session",
                        )
                except wire.WireError as exc:  # RequestRefused included
                    await self._reply_error(channel, exc.code, exc.message, exc.details)
        except wire.WireError as exc:  # unreadable frame: framing is lost, tell and hang up
            log.info("inference stream: bad frame (%s), closing", exc)
            try:
                await self._reply_error(channel, exc.code, exc.message, exc.details)
            except ConnectionLost:
                pass
        except ConnectionLost as exc:
            log.debug("inference stream closed by peer: %s", exc)
        finally:
            if session is not None:
                self.sessions.close_session(session)
                self._ended()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await channel.aclose()

    def _set_deadlines(self, channel: FramedChannel) -> None:
        """Every frame to or from a peer gets the server's I/O deadline (unless set already)."""
        if channel.io_timeout is None:
            channel.io_timeout = self.limits.io_timeout

    def _check_accepting(self) -> None:
        """A draining server takes no new sessions or training requests ("busy": go elsewhere)."""
        if self.draining:
            raise RequestRefused(
                ErrorCode.BUSY, "server shutting down: it finishes open sessions, takes no new ones"
            )

    async def drain(self, grace: float) -> bool:
        """Refuse new work and wait (at most `grace` s) for open sessions and requests to
        end; True when all ended in time."""
        self.draining = True
        with trio.move_on_after(grace):
            while len(self.sessions) or self._requests_in_flight:
                await self._work_ended.wait()
            return True
        return False

    def _ended(self) -> None:
        self._work_ended.set()
        self._work_ended = trio.Event()

    # ----- forward / backward / info / ping -----------------------------------------
    async def handle_rpc(self, channel: FramedChannel) -> None:
        """Request/reply on one stream (a client may send several requests in turn)."""
        self._set_deadlines(channel)
        try:
            while True:
                with trio.move_on_after(self.limits.idle_timeout) as idle:
                    raw = await channel.read_message()
                if idle.cancelled_caught:
                    return
                self._requests_in_flight += 1
                try:
                    try:
                        message = wire.parse_message(raw, max_decoded=self.limits.max_frame)
                        reply = await self._answer(message)
                    except wire.WireError as exc:  # RequestRefused included
                        reply = wire.Error.from_exception(exc)
                    await channel.write_message(reply.to_wire())
                finally:
                    self._requests_in_flight -= 1
                    self._ended()
        except wire.WireError as exc:
            try:
                await self._reply_error(channel, exc.code, exc.message, exc.details)
            except ConnectionLost:
                pass
        except ConnectionLost:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await channel.aclose()

    async def _answer(self, message: wire.Message) -> wire.Message:
        if isinstance(message, wire.Ping):
            return wire.Pong(nonce=message.nonce)
        if isinstance(message, wire.Info):
            return wire.InfoResult(
                record=self.record(), load=self.load(), limits=self.runner.accepts()
            )
        if isinstance(message, wire.Forward):
            self._check_accepting()
            return await self.runner.forward(message)
        if isinstance(message, wire.Backward):
            self._check_accepting()
            return await self.runner.backward(message)
        raise RequestRefused(
            ErrorCode.BAD_REQUEST, f"{type(message).__name__} is not a request this protocol serves"
        )

    def load(self) -> dict:
        """Live load figures for `Info` replies and the record's free-cache field."""
        return {
            "sessions": len(self.sessions),
            "queued": self.compute.queued,
            "cache_tokens_free": self.budget.free,
            "cache_tokens_total": self.budget.capacity,
            "requests_served": self.requests_served,
        }
