"""Limits that keep one peer or one request from taking a server down (issue 9)."""

from __future__ import annotations

import threading

import pytest
import torch
import trio
import trio.testing
from server_harness import MODEL_ID, ServerUnderTest, ask, open_message, step_message
from tiny_models import make_tiny_model

import wire
from blocks import LoadedBlocks
from peerd.server.block_server import BlockServer
from peerd.server.limits import ServerLimits
from wire import ErrorCode


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("limits") / "llama", "llama", num_layers=2)
    return LoadedBlocks.load(path, 0, 2)


def run_with_server(span, limits: ServerLimits, body, *, clock=None):
    """trio.run `body(harness)` against a BlockServer of `span` with `limits`."""

    async def main():
        async with trio.open_nursery() as nursery:
            harness = ServerUnderTest(BlockServer(span, MODEL_ID, limits), nursery)
            await body(harness)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_one_peer_cannot_hold_more_than_its_share_of_the_cache(span):
    limits = ServerLimits(cache_tokens=64, peer_share=0.5)

    async def body(h):
        a1, a2, b = h.connect(peer_id="a"), h.connect(peer_id="a"), h.connect(peer_id="b")
        assert isinstance(await ask(a1, open_message(span, max_length=32)), wire.SessionOpened)
        refused = await ask(a2, open_message(span, max_length=16))
        assert isinstance(refused, wire.Error) and refused.code == ErrorCode.CACHE_FULL
        assert "quota" in refused.message
        assert isinstance(await ask(b, open_message(span, max_length=32)), wire.SessionOpened)
        assert h.server.sessions.held_by("a") == (1, 32)

    run_with_server(span, limits, body)


def test_one_peer_cannot_hold_more_than_its_share_of_the_sessions(span):
    limits = ServerLimits(max_sessions=4, peer_share=0.5)

    async def body(h):
        chans = [h.connect(peer_id="a") for _ in range(3)]
        replies = [await ask(c, open_message(span, max_length=4)) for c in chans]
        assert [type(r).__name__ for r in replies[:2]] == ["SessionOpened"] * 2
        assert replies[2].code == ErrorCode.BUSY
        other = h.connect(peer_id="b")
        assert isinstance(await ask(other, open_message(span, max_length=4)), wire.SessionOpened)
        # closing a session gives the peer its quota back
        await chans[0].write_message(wire.CloseSession().to_wire())
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(await ask(chans[2], open_message(span, max_length=4)), wire.SessionOpened)

    run_with_server(span, limits, body)


def test_the_daemons_own_pipe_is_not_limited_per_peer(span):
    limits = ServerLimits(cache_tokens=64, peer_share=0.25)

    async def body(h):
        local = h.connect(peer_id=None)
        assert isinstance(await ask(local, open_message(span, max_length=64)), wire.SessionOpened)

    run_with_server(span, limits, body)


def test_a_session_that_never_steps_is_closed_after_the_first_step_timeout(span):
    limits = ServerLimits(cache_tokens=64, first_step_timeout=5.0, idle_timeout=300.0)

    async def body(h):
        channel = h.connect()
        await ask(channel, open_message(span, max_length=32))
        assert h.server.budget.used == 32
        await trio.sleep(4)
        assert h.server.budget.used == 32
        await trio.sleep(2)
        reply = wire.parse_message(await channel.read_message())
        assert reply.code == ErrorCode.TIMEOUT and "first step" in reply.message
        await trio.testing.wait_all_tasks_blocked()
        assert h.server.budget.used == 0 and len(h.server.sessions) == 0

    run_with_server(span, limits, body, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_pings_do_not_keep_a_session_alive(span):
    limits = ServerLimits(cache_tokens=64, first_step_timeout=5.0, idle_timeout=20.0)

    async def body(h):
        channel = h.connect()
        await ask(channel, open_message(span, max_length=32))
        reply = await ask(channel, step_message(span))
        assert isinstance(reply, wire.StepResult)
        for nonce in range(30):  # 30 s of pings, one a second
            await trio.sleep(1)
            reply = await ask(channel, wire.Ping(nonce=nonce))
            if isinstance(reply, wire.Error):
                break
        assert isinstance(reply, wire.Error) and reply.code == ErrorCode.TIMEOUT
        assert trio.current_time() < 22
        await trio.testing.wait_all_tasks_blocked()
        assert h.server.budget.used == 0

    run_with_server(span, limits, body, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_steps_keep_a_session_alive_past_the_first_step_timeout(span):
    limits = ServerLimits(first_step_timeout=2.0, idle_timeout=20.0)

    async def body(h):
        channel = h.connect()
        await ask(channel, open_message(span, max_length=32))
        for step_id in range(5):
            await trio.sleep(1.5)
            reply = await ask(channel, step_message(span, step_id=step_id))
            assert isinstance(reply, wire.StepResult), reply
        await trio.sleep(10)  # between the two timeouts: still open
        assert isinstance(await ask(channel, step_message(span, step_id=5)), wire.StepResult)

    run_with_server(span, limits, body, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_a_peer_that_reads_very_slowly_loses_its_session_not_the_handler(span):
    limits = ServerLimits(cache_tokens=64, io_timeout=5.0)

    async def body(h):
        channel = h.connect(lockstep=True)
        await ask(channel, open_message(span, max_length=32))
        await channel.write_message(step_message(span, tokens=4).to_wire())
        got = b""
        for _ in range(60):  # 8 bytes a second: the reply would take minutes
            chunk = await channel.stream.receive_some(8)
            if not chunk:
                break
            got += chunk
            await trio.sleep(1)
        assert trio.current_time() < 10
        await trio.testing.wait_all_tasks_blocked()
        assert h.server.budget.used == 0 and len(h.server.sessions) == 0

    run_with_server(span, limits, body, clock=trio.testing.MockClock(autojump_threshold=0.01))


def test_a_frame_sent_very_slowly_is_given_up_on(span):
    limits = ServerLimits(io_timeout=5.0)

    async def body(h):
        channel = h.connect(protocol="rpc", lockstep=True)
        frame = wire.encode_frame(wire.Ping(nonce=1).to_wire())
        await channel.stream.send_all(frame[:6])  # header and a little, then nothing
        await trio.sleep(6)
        assert await channel.stream.receive_some(100) == b""  # the server hung up

    run_with_server(span, limits, body, clock=trio.testing.MockClock(autojump_threshold=0.01))


def _forward(span, tokens: int) -> wire.Forward:
    hidden = step_message(span, tokens=tokens).hidden
    return wire.Forward(model_id=MODEL_ID, start=span.start, end=span.end, hidden=hidden)


def _backward(span, tokens: int) -> wire.Backward:
    hidden = step_message(span, tokens=tokens).hidden
    return wire.Backward(
        model_id=MODEL_ID, start=span.start, end=span.end, hidden=hidden, grad_out=hidden
    )


def test_training_requests_draw_on_a_budget_and_are_refused_busy_beyond_it(span, monkeypatch):
    limits = ServerLimits(training_tokens=12)
    release = threading.Event()
    real_forward = span.forward

    def slow_forward(*args, **kwargs):
        release.wait(10)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(span, "forward", slow_forward)

    async def body(h):
        first, second, third = (h.connect(protocol="rpc") for _ in range(3))
        await first.write_message(_forward(span, 8).to_wire())
        await trio.testing.wait_all_tasks_blocked()
        assert h.server.runner.training.used == 8
        refused = await ask(second, _forward(span, 5))
        assert refused.code == ErrorCode.BUSY and "training budget" in refused.message
        refused = await ask(third, _backward(span, 3))  # a backward counts twice
        assert refused.code == ErrorCode.BUSY
        release.set()
        assert isinstance(wire.parse_message(await first.read_message()), wire.ForwardResult)
        assert h.server.runner.training.used == 0
        assert isinstance(await ask(second, _backward(span, 6)), wire.BackwardResult)

    run_with_server(span, limits, body)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        torch.OutOfMemoryError("CUDA out of memory"),
    ],
    ids=["MemoryError", "RuntimeError", "OutOfMemoryError"],
)
def test_out_of_memory_fails_that_request_only(span, monkeypatch, error):
    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(span, "backward", exhausted)

    async def body(h):
        session = h.connect(peer_id="b")
        assert isinstance(await ask(session, open_message(span)), wire.SessionOpened)
        rpc = h.connect(protocol="rpc")
        reply = await ask(rpc, _backward(span, 4))
        assert isinstance(reply, wire.Error) and reply.code == ErrorCode.BUSY
        assert "out of memory" in reply.message
        # the same stream and the other session keep working
        assert isinstance(await ask(rpc, _forward(span, 4)), wire.ForwardResult)
        assert isinstance(await ask(session, step_message(span)), wire.StepResult)

    run_with_server(span, ServerLimits(), body)


def test_out_of_memory_in_a_step_fails_that_step_only(span, monkeypatch):
    real_step = span.step
    calls = []

    def sometimes_exhausted(inputs, cache):
        calls.append(inputs.shape[0])
        if inputs.shape[0] == 2:  # the big session's steps
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_step(inputs, cache)

    monkeypatch.setattr(span, "step", sometimes_exhausted)

    async def body(h):
        big, small = h.connect(peer_id="a"), h.connect(peer_id="b")
        await ask(big, open_message(span, batch_size=2))
        await ask(small, open_message(span))
        reply = await ask(big, step_message(span, batch=2))
        assert reply.code == ErrorCode.BUSY and "out of memory" in reply.message
        for step_id in range(2):
            assert isinstance(
                await ask(small, step_message(span, step_id=step_id)), wire.StepResult
            )
        assert len(h.server.sessions) == 2  # the failed one is still open: the client decides

    run_with_server(span, ServerLimits(), body)
