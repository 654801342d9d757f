"""Serving a span of blocks to peers: inference sessions, forward, backward, info, ping.

Transport-agnostic: handlers take a `FramedChannel`, so the same code serves libp2p streams
(and in-memory streams in tests). Every bad request gets a structured `Error` reply and only
its own stream is affected; all compute goes through one `ComputeQueue`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio

import wire
from blocks import BlockRangeError, BlocksError, InputError, KVCache, Span
from peerd.framed import ConnectionLost, FramedChannel
from peerd.server.limits import CacheBudget, RequestRefused, ServerLimits, budget_tokens
from peerd.server.priority import INFERENCE, TRAINING, ComputeQueue

log = logging.getLogger("peerd.server")

INFERENCE_PROTOCOL = "/peerd/inference/1.0.0"
RPC_PROTOCOL = "/peerd/rpc/1.0.0"


@dataclass
class OpenSessionState:
    """One client's inference session on this server."""

    session_id: str
    cache: KVCache
    reserved_tokens: int
    compression: str
    opened_at: float = field(default_factory=time.monotonic)


class BlockServer:
    """Answers requests for the blocks of one span. Assembles only; handlers do the work."""

    def __init__(
        self,
        span: Span,
        model_id: str,
        limits: ServerLimits,
        *,
        record: Callable[[], dict] = dict,
    ) -> None:
        self.span = span
        self.model_id = model_id
        self.limits = limits
        self.record = record
        self.compute = ComputeQueue()
        self.budget = CacheBudget(budget_tokens(limits, span.cache_bytes_per_token()))
        self.sessions: dict[str, OpenSessionState] = {}
        self.requests_served = 0

    # ----- shared helpers -------------------------------------------------------------
    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise RequestRefused(
                "unknown_model",
                f"this server serves {self.model_id!r}, not {model_id!r}",
                served=self.model_id,
            )

    def _check_interval(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.span.start if start is None else start
        end = self.span.end if end is None else end
        if not (self.span.start <= start < end <= self.span.end):
            raise RequestRefused(
                "out_of_range",
                f"blocks {start}:{end} are not within this server's blocks "
                f"{self.span.start}:{self.span.end}",
                served=[self.span.start, self.span.end],
            )
        return start, end

    def _check_tokens(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3:
            raise RequestRefused(
                "bad_request",
                f"hidden states must have shape [batch, tokens, hidden], got {list(hidden.shape)}",
            )
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.limits.max_tokens_per_request:
            raise RequestRefused(
                "too_large",
                f"request has {tokens:,} tokens (batch × length), the limit is "
                f"{self.limits.max_tokens_per_request:,}",
            )

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise RequestRefused(
                "bad_request", f"expected floating-point tensor, got {tensor.dtype}"
            )
        return tensor.to(device=self.span.device, dtype=self.span.dtype)

    async def _compute(self, priority: int, fn: Callable[[], torch.Tensor]):
        try:
            return await self.compute.run(priority, fn, wait_timeout=self.limits.step_timeout)
        except trio.TooSlowError:
            raise RequestRefused(
                "busy", f"server busy: no compute slot within {self.limits.step_timeout:.0f} s"
            ) from None
        except BlockRangeError as exc:
            raise RequestRefused("out_of_range", str(exc)) from exc
        except (InputError, BlocksError) as exc:
            raise RequestRefused("bad_request", str(exc)) from exc

    @staticmethod
    async def _reply_error(channel: FramedChannel, code: str, message: str, details: dict) -> None:
        await channel.write_message(
            wire.Error(code=code, message=message, details=details).to_wire()
        )

    # ----- inference sessions ---------------------------------------------------------
    async def handle_inference(self, channel: FramedChannel) -> None:
        """One long-lived stream per client session: open, steps, close."""
        session: OpenSessionState | None = None
        try:
            while True:
                timeout = self.limits.idle_timeout
                with trio.move_on_after(timeout) as idle:
                    raw = await channel.read_message()
                if idle.cancelled_caught:
                    await self._reply_error(
                        channel, "timeout", f"session idle for {timeout:.0f} s, closed", {}
                    )
                    return
                try:
                    message = wire.parse_message(raw)
                    if isinstance(message, wire.OpenSession):
                        if session is not None:
                            raise RequestRefused(
                                "bad_request", "session already open on this stream"
                            )
                        session = self._open_session(message)
                        await channel.write_message(
                            wire.SessionOpened(
                                session_id=session.session_id,
                                start=session.cache.start,
                                end=session.cache.end,
                                free_cache_tokens=self.budget.free,
                            ).to_wire()
                        )
                    elif isinstance(message, wire.Step):
                        if session is None:
                            raise RequestRefused(
                                "unknown_session", "step before the session was opened"
                            )
                        result = await self._step(session, message)
                        await channel.write_message(result.to_wire())
                    elif isinstance(message, wire.CloseSession):
                        return
                    elif isinstance(message, wire.Ping):
                        await channel.write_message(wire.Pong(nonce=message.nonce).to_wire())
                    else:
                        raise RequestRefused(
                            "bad_request",
                            f"{type(message).__name__} is not valid in an inference session",
                        )
                except RequestRefused as exc:
                    await self._reply_error(channel, exc.code, exc.message, exc.details)
                except wire.WireError as exc:
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
                self._close_session(session)
            await channel.aclose()

    def _open_session(self, message: wire.OpenSession) -> OpenSessionState:
        self._check_model(message.model_id)
        start, end = self._check_interval(message.start, message.end)
        if len(self.sessions) >= self.limits.max_sessions:
            raise RequestRefused(
                "busy",
                f"server busy: {len(self.sessions)} sessions open, the limit is {self.limits.max_sessions}",
            )
        if message.batch_size < 1 or message.max_length < 1:
            raise RequestRefused("bad_request", "batch_size and max_length must be positive")
        tokens = message.batch_size * message.max_length
        bytes_per_token = self.span.cache_bytes_per_token(1, start, end)
        self.budget.reserve(self._budget_cost(tokens, bytes_per_token))
        try:
            cache = self.span.new_cache(message.batch_size, message.max_length, start, end)
        except BaseException:
            self.budget.release(self._budget_cost(tokens, bytes_per_token))
            raise
        session_id = message.session_id or uuid.uuid4().hex
        state = OpenSessionState(
            session_id=session_id,
            cache=cache,
            reserved_tokens=self._budget_cost(tokens, bytes_per_token),
            compression=message.compression,
        )
        self.sessions[id(state)] = state  # keyed by object: client-chosen ids may collide
        log.info(
            "session %s opened: blocks %d:%d, batch %d, max length %d",
            session_id[:8],
            start,
            end,
            message.batch_size,
            message.max_length,
        )
        return state

    def _budget_cost(self, tokens: int, bytes_per_token_of_interval: int) -> int:
        """A session over a sub-interval costs its share of the full span's per-token bytes."""
        full = self.span.cache_bytes_per_token(1)
        if full <= 0:
            return tokens
        return -(-tokens * bytes_per_token_of_interval // full)

    def _close_session(self, state: OpenSessionState) -> None:
        self.sessions.pop(id(state), None)
        self.budget.release(state.reserved_tokens)
        log.info("session %s closed after %d tokens", state.session_id[:8], state.cache.length)

    async def _step(self, session: OpenSessionState, message: wire.Step) -> wire.StepResult:
        cache = session.cache
        if (message.start is not None and message.start != cache.start) or (
            message.end is not None and message.end != cache.end
        ):
            raise RequestRefused(
                "out_of_range",
                f"this session covers blocks {cache.start}:{cache.end}; "
                f"open a new session for blocks {message.start}:{message.end}",
            )
        hidden = message.hidden
        self._check_tokens(hidden)
        if hidden.shape[0] != cache.batch_size:
            raise RequestRefused(
                "bad_request",
                f"session batch size is {cache.batch_size}, step has {hidden.shape[0]}",
            )
        if cache.length + hidden.shape[1] > cache.max_length:
            raise RequestRefused(
                "cache_full",
                f"session max length {cache.max_length} exceeded: {cache.length} cached + "
                f"{hidden.shape[1]} new",
            )
        out_dtype = hidden.dtype
        inputs = self._to_compute(hidden)
        output = await self._compute(INFERENCE, lambda: self.span.step(inputs, cache))
        self.requests_served += 1
        return wire.StepResult(
            hidden=output.to(device="cpu", dtype=out_dtype),
            step_id=message.step_id,
            cache_length=cache.length,
            compression=session.compression,
        )

    # ----- forward / backward / info / ping -----------------------------------------
    async def handle_rpc(self, channel: FramedChannel) -> None:
        """Request/reply on one stream (a client may send several requests in turn)."""
        try:
            while True:
                with trio.move_on_after(self.limits.idle_timeout) as idle:
                    raw = await channel.read_message()
                if idle.cancelled_caught:
                    return
                try:
                    reply = await self._answer(wire.parse_message(raw))
                except RequestRefused as exc:
                    reply = wire.Error(code=exc.code, message=exc.message, details=exc.details)
                except wire.WireError as exc:
                    reply = wire.Error(code=exc.code, message=exc.message, details=exc.details)
                await channel.write_message(reply.to_wire())
        except wire.WireError as exc:
            try:
                await self._reply_error(channel, exc.code, exc.message, exc.details)
            except ConnectionLost:
                pass
        except ConnectionLost:
            pass
        finally:
            await channel.aclose()

    async def _answer(self, message: wire.Message) -> wire.Message:
        if isinstance(message, wire.Ping):
            return wire.Pong(nonce=message.nonce)
        if isinstance(message, wire.Info):
            return wire.InfoResult(record=self.record(), load=self.load())
        if isinstance(message, wire.Forward):
            return await self._forward(message)
        if isinstance(message, wire.Backward):
            return await self._backward(message)
        raise RequestRefused(
            "bad_request", f"{type(message).__name__} is not a request this protocol serves"
        )

    async def _forward(self, message: wire.Forward) -> wire.ForwardResult:
        self._check_model(message.model_id)
        start, end = self._check_interval(message.start, message.end)
        self._check_tokens(message.hidden)
        out_dtype = message.hidden.dtype
        hidden = self._to_compute(message.hidden)
        prompts = None if message.prompts is None else self._to_compute(message.prompts)
        output = await self._compute(
            TRAINING, lambda: self.span.forward(hidden, prompts=prompts, start=start, end=end)
        )
        self.requests_served += 1
        return wire.ForwardResult(
            hidden=output.to(device="cpu", dtype=out_dtype), compression=message.compression
        )

    async def _backward(self, message: wire.Backward) -> wire.BackwardResult:
        self._check_model(message.model_id)
        start, end = self._check_interval(message.start, message.end)
        self._check_tokens(message.hidden)
        if message.grad_out.shape != message.hidden.shape:
            raise RequestRefused(
                "bad_request",
                f"grad_out shape {list(message.grad_out.shape)} differs from hidden shape "
                f"{list(message.hidden.shape)}",
            )
        out_dtype = message.hidden.dtype
        hidden = self._to_compute(message.hidden)
        grad_out = self._to_compute(message.grad_out)
        prompts = None if message.prompts is None else self._to_compute(message.prompts)
        grad_hidden, grad_prompts = await self._compute(
            TRAINING,
            lambda: self.span.backward(hidden, grad_out, prompts=prompts, start=start, end=end),
        )
        self.requests_served += 1
        return wire.BackwardResult(
            grad_hidden=grad_hidden.to(device="cpu", dtype=out_dtype),
            grad_prompts=None
            if grad_prompts is None
            else grad_prompts.to(device="cpu", dtype=out_dtype),
            compression=message.compression,
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
