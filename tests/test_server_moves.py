"""Rebalancing never runs the daemon out of memory, and a failed move never kills it (issue 9)."""

from __future__ import annotations

import pytest
import trio
from service_harness import make_service, serve
from tiny_models import make_tiny_model

from peerd.records import State
from peerd.server import memory
from peerd.server.service import ServeOptions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moves") / "llama", "llama", num_layers=4)


def _service(monkeypatch, model_dir, tmp_path):
    return make_service(monkeypatch, ServeOptions(model_dir, num_blocks=2), tmp_path)


def _failing_second_load(monkeypatch, svc, seen: list):
    real = svc._load_span
    calls = []

    def load(start, end):
        seen.append((svc.server, svc.state, svc.interval))
        calls.append((start, end))
        if len(calls) > 1:
            raise MemoryError("cannot allocate the new blocks")
        return real(start, end)

    monkeypatch.setattr(svc, "_load_span", load)


def test_a_failed_move_keeps_serving_the_old_span(model_dir, tmp_path, monkeypatch):
    svc = _service(monkeypatch, model_dir, tmp_path)
    seen: list = []
    _failing_second_load(monkeypatch, svc, seen)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**40)

    async def main():
        await serve(svc, (0, 2))
        old = svc.server
        await svc._move((2, 4))
        assert seen[-1][0] is old  # loaded beside the old span: it fitted
        assert svc.server is old and svc.interval == (0, 2) and svc.state is State.ONLINE
        record = svc.swarm.node.announced[-1]
        assert (record.start, record.end, record.state) == (0, 2, State.ONLINE)
        assert not svc.swarm.node.shut_down

    trio.run(main)


def test_a_span_that_does_not_fit_beside_the_old_one_is_loaded_after_releasing_it(
    model_dir, tmp_path, monkeypatch
):
    svc = _service(monkeypatch, model_dir, tmp_path)
    seen: list = []
    real = svc._load_span
    monkeypatch.setattr(svc, "_load_span", lambda a, b: seen.append(svc.server) or real(a, b))
    need = memory.span_bytes(svc.config, svc.options, 2)

    async def main():
        await serve(svc, (0, 2))
        old = svc.server
        # room for one span only: what auto-sizing left after loading the first
        monkeypatch.setattr(memory, "free_bytes", lambda device: int(need * 0.9))
        await svc._move((2, 4))
        assert seen[-1] is None and old.draining  # released before the new span loaded
        states = [(r.start, r.end, r.state) for r in svc.swarm.node.announced]
        assert (2, 4, State.JOINING) in states
        assert svc.interval == (2, 4) and svc.state is State.ONLINE
        assert svc.server is not old and svc.server.span.start == 2

    trio.run(main)


def test_a_failed_move_after_releasing_announces_offline_and_stops(
    model_dir, tmp_path, monkeypatch
):
    svc = _service(monkeypatch, model_dir, tmp_path)
    seen: list = []
    _failing_second_load(monkeypatch, svc, seen)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)

    async def main():
        await serve(svc, (0, 2))
        await svc._move((2, 4))  # returns: the error is handled
        assert svc.swarm.node.shut_down
        assert svc.swarm.node.announced[-1].state is State.OFFLINE

    trio.run(main)


def test_no_move_runs_once_the_daemon_drains(model_dir, tmp_path, monkeypatch):
    svc = _service(monkeypatch, model_dir, tmp_path)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**40)

    async def main():
        await serve(svc, (0, 2))
        old = svc.server
        await svc.drain()
        await svc._load_and_serve((2, 4))  # a move that was under way when SIGTERM came
        assert svc.server is old and svc.state is State.DRAINING

    trio.run(main)
