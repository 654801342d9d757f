"""SIGTERM drains: new sessions are refused, open ones finish within the grace (issue 9)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from server_harness import ServerUnderTest, ask, open_message, step_message
from service_harness import make_service, serve
from tiny_models import make_tiny_model

import wire
from peerd.records import State
from peerd.server.limits import ServerLimits
from peerd.server.service import ServeOptions
from wire import ErrorCode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("drain") / "llama", "llama", num_layers=4)


def test_a_draining_service_announces_refuses_new_sessions_and_lets_open_ones_finish(
    model_dir, tmp_path, monkeypatch
):
    limits = ServerLimits(drain_timeout=20.0)
    svc = make_service(monkeypatch, ServeOptions(model_dir, blocks=(0, 4), limits=limits), tmp_path)

    async def main():
        await serve(svc, (0, 4))
        async with trio.open_nursery() as nursery:
            h = ServerUnderTest(svc.server, nursery)
            span = svc.server.span
            old = h.connect(peer_id="a")
            assert isinstance(await ask(old, open_message(span)), wire.SessionOpened)
            drained = trio.Event()

            async def drain():
                await svc.drain()
                drained.set()

            nursery.start_soon(drain)
            await trio.sleep(1)
            assert svc.state is State.DRAINING
            assert svc.swarm.node.announced[-1].state is State.DRAINING
            new = h.connect(peer_id="b")
            refused = await ask(new, open_message(span))
            assert refused.code == ErrorCode.BUSY and "shutting down" in refused.message
            # the open session goes on for a while, then ends: the drain ends with it
            for step_id in range(3):
                await trio.sleep(1)
                reply = await ask(old, step_message(span, step_id=step_id))
                assert isinstance(reply, wire.StepResult), reply
            assert not drained.is_set()
            await old.write_message(wire.CloseSession().to_wire())
            with trio.fail_after(1):
                await drained.wait()
            assert trio.current_time() < 10
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.1))


def test_the_drain_ends_after_the_grace_period(model_dir, tmp_path, monkeypatch):
    limits = ServerLimits(drain_timeout=3.0)
    svc = make_service(monkeypatch, ServeOptions(model_dir, blocks=(0, 4), limits=limits), tmp_path)

    async def main():
        await serve(svc, (0, 4))
        async with trio.open_nursery() as nursery:
            h = ServerUnderTest(svc.server, nursery)
            stuck = h.connect()
            await ask(stuck, open_message(svc.server.span))
            began = trio.current_time()
            await svc.drain()
            assert 3.0 <= trio.current_time() - began < 4.0
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.1))


def test_a_draining_server_refuses_new_training_requests(model_dir, tmp_path, monkeypatch):
    svc = make_service(monkeypatch, ServeOptions(model_dir, blocks=(0, 4)), tmp_path)

    async def main():
        await serve(svc, (0, 4))
        async with trio.open_nursery() as nursery:
            h = ServerUnderTest(svc.server, nursery)
            span = svc.server.span
            svc.server.draining = True
            hidden = step_message(span, tokens=2).hidden
            forward = wire.Forward(model_id="tiny@cafe", start=0, end=4, hidden=hidden)
            reply = await ask(h.connect(protocol="rpc"), forward)
            assert reply.code == ErrorCode.BUSY
            nursery.cancel_scope.cancel()

    trio.run(main)
