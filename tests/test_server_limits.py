"""Limits that keep one peer or one request from taking a server down (issue 9)."""

from __future__ import annotations

import pytest
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
