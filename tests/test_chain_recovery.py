"""Fault-tolerant inference chains against real BlockServers in-process.

Servers are real `BlockServer`s over real spans of a tiny Llama, spoken to with the real wire
framing over in-memory streams (tests/chain_harness.py); a server "crashes" (its streams
break, new connections are refused) when a test's trigger fires. Deterministic failures make
the hard cases testable: failure at step 0, during the replay itself, and a replacement with
a different block split. The multi-process version with kill -9 is in test_e2e_swarm.py.
"""

from __future__ import annotations

import pytest
import torch
import trio

import wire
from blocks import LoadedBlocks
from peerd.chain import ChainError
from peerd.server.limits import ServerLimits
from peerd.server.runner import SpanRunner
from peerd.server.sessions import Sessions
from tests.chain_harness import MODEL_ID, Swarm, is_replay, nth_step, run_swarm
from tests.tiny_models import make_tiny_model

NUM_BLOCKS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("chain") / "llama", "llama", num_layers=NUM_BLOCKS
    )


@pytest.fixture(scope="module")
def reference_span(model_dir):
    return LoadedBlocks.load(model_dir, 0, NUM_BLOCKS)


def run_steps(
    model_dir, reference_span, intervals, chunks, *, throughputs=None, setup=None, batch=1
):
    """Step `chunks` (token counts) of random hidden states through a chain; compare with one forward."""
    torch.manual_seed(0)
    hidden_size = reference_span.config.hidden_size
    inputs = [torch.randn(batch, n, hidden_size) for n in chunks]

    async def main():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(model_dir, intervals, nursery, throughputs)
            if setup is not None:
                setup(swarm)
            chain = swarm.chain(sum(chunks), batch)
            async with chain:
                outputs = [await chain.step(x) for x in inputs]
            nursery.cancel_scope.cancel()
        return swarm, chain, outputs

    swarm, chain, outputs = trio.run(main)
    expected = reference_span.forward(torch.cat(inputs, dim=1))
    got = torch.cat(outputs, dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    return swarm, chain


def test_chain_without_failures_matches_one_forward(model_dir, reference_span):
    _, chain = run_steps(
        model_dir, reference_span, {"a": (0, 3), "b": (3, 6)}, [4, 1, 1, 3, 1], batch=2
    )
    assert chain.route == [("a", 0, 3), ("b", 3, 6)]
    assert chain.recoveries == []


def test_failure_mid_generation_replays_to_the_spare(model_dir, reference_span):
    def setup(swarm):
        swarm.peers["b1"].crash_when = nth_step(4)

    swarm, chain = run_steps(
        model_dir,
        reference_span,
        {"a": (0, 3), "b1": (3, 6), "b2": (3, 6)},
        [5, 1, 1, 1, 1, 1],
        throughputs={"b1": 1000.0},
        setup=setup,
    )
    assert swarm.peers["b1"].dead
    assert chain.route == [("a", 0, 3), ("b2", 3, 6)]
    assert len(chain.recoveries) == 1 and chain.recoveries[0].replayed_tokens == 7


def test_failure_at_step_zero(model_dir, reference_span):
    def setup(swarm):
        swarm.peers["b1"].crash_when = nth_step(1)

    swarm, chain = run_steps(
        model_dir,
        reference_span,
        {"a": (0, 3), "b1": (3, 6), "b2": (3, 6)},
        [4, 1, 1],
        throughputs={"b1": 1000.0},
        setup=setup,
    )
    assert chain.route[-1][0] == "b2"
    assert chain.recoveries[0].replayed_tokens == 0


def test_replacement_with_a_different_split(model_dir, reference_span):
    """The failed span 2..5 is replaced by two servers splitting it at block 4."""

    def setup(swarm):
        swarm.peers["mid"].crash_when = nth_step(3)

    swarm, chain = run_steps(
        model_dir,
        reference_span,
        {"a": (0, 2), "mid": (2, 6), "x": (2, 4), "y": (4, 6)},
        [3, 1, 1, 1, 2],
        throughputs={"mid": 1000.0},
        setup=setup,
    )
    assert chain.route == [("a", 0, 2), ("x", 2, 4), ("y", 4, 6)]


def test_failure_during_the_replay_itself(model_dir, reference_span):
    """b1 dies mid-generation; its replacement b2 dies while being replayed to; b3 takes over."""

    def setup(swarm):
        swarm.peers["b1"].crash_when = nth_step(3)
        swarm.peers["b2"].crash_when = is_replay

    swarm, chain = run_steps(
        model_dir,
        reference_span,
        {"a": (0, 3), "b1": (3, 6), "b2": (3, 6), "b3": (3, 6)},
        [4, 1, 1, 1, 1],
        throughputs={"b1": 1000.0, "b2": 500.0, "b3": 10.0},
        setup=setup,
    )
    assert swarm.peers["b1"].dead and swarm.peers["b2"].dead
    assert chain.route == [("a", 0, 3), ("b3", 3, 6)]


def test_first_span_failure_keeps_later_sessions(model_dir, reference_span):
    def setup(swarm):
        swarm.peers["a1"].crash_when = nth_step(3)

    swarm, chain = run_steps(
        model_dir,
        reference_span,
        {"a1": (0, 3), "a2": (0, 3), "b": (3, 6)},
        [2, 1, 1, 1],
        throughputs={"a1": 1000.0},
        setup=setup,
    )
    assert chain.route == [("a2", 0, 3), ("b", 3, 6)]
    assert swarm.connects.count("b") == 1  # b's cache was kept, never re-opened


def test_no_server_for_some_blocks_names_them(model_dir, reference_span):
    async def main():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(model_dir, {"a": (0, 2), "b": (4, 6)}, nursery)
            with pytest.raises(ChainError, match=r"blocks 2\.\.4 are not served by anyone") as info:
                await swarm.chain(8).open()
            assert info.value.code == "no_route"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_training_forward_backward_retries_and_matches_autograd(model_dir, reference_span):
    torch.manual_seed(1)
    x = torch.randn(2, 5, reference_span.config.hidden_size)
    grad = torch.randn_like(x)

    async def main():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(
                model_dir, {"a": (0, 3), "b1": (3, 6), "b2": (3, 6)}, nursery, {"b1": 1000.0}
            )
            training = await swarm.training()
            out, trace = await training.forward(x)
            swarm.peers[trace[-1].peer_id].dead = True  # dies between forward and backward
            grad_x, _ = await training.backward(trace, grad)
            nursery.cancel_scope.cancel()
        return out, grad_x

    out, grad_x = trio.run(main)
    expected_grad, _ = reference_span.backward(x, grad)  # equals autograd: see test_blocks_*
    torch.testing.assert_close(out, reference_span.forward(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_grad, atol=1e-5, rtol=1e-4)


def test_a_step_that_failed_part_way_is_repaired_before_the_next(model_dir, reference_span):
    """Hop a computed the step, b died and nobody covered its blocks: a's cache is ahead of
    the chain. Once a replacement appears the next step first brings a back (replays it, no
    ban) and the outputs are those of one forward without the lost step."""
    torch.manual_seed(0)
    hidden = reference_span.config.hidden_size
    x1, lost, x2 = (torch.randn(1, n, hidden) for n in (3, 1, 2))

    async def body(swarm):
        swarm.peers["b2"].dead = True  # not there yet
        chain = swarm.chain(16)
        await chain.open()
        y1 = await chain.step(x1)
        swarm.peers["b"].crash_when = nth_step(1)
        with pytest.raises(ChainError) as failed:
            await chain.step(lost)
        swarm.peers["b2"].dead = False
        y2 = await chain.step(x2)
        return failed.value.code, chain, torch.cat([y1, y2], dim=1)

    swarm, (failed, chain, got) = run_swarm(
        model_dir, {"a": (0, 3), "b": (3, NUM_BLOCKS), "b2": (3, NUM_BLOCKS)}, body
    )
    assert failed == "no_route"
    assert chain.route == [("a", 0, 3), ("b2", 3, NUM_BLOCKS)]
    assert swarm.banned() == ["b"]
    expected = reference_span.forward(torch.cat([x1, x2], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_server_out_of_step_refuses_and_is_replayed_not_banned(model_dir, reference_span):
    """A step whose position differs from the server's cache length is refused (out_of_step);
    the chain reopens that server's session, replays, and the output stays right."""
    torch.manual_seed(0)
    hidden = reference_span.config.hidden_size
    x1, x2 = torch.randn(1, 3, hidden), torch.randn(1, 1, hidden)

    async def body(swarm):
        chain = swarm.chain(16)
        await chain.open()
        y1 = await chain.step(x1)
        chain.hops[1].length -= 1  # as if we had lost track of one token
        chain._stale = lambda: []  # so the step goes out at the wrong position
        y2 = await chain.step(x2)
        return chain, torch.cat([y1, y2], dim=1)

    swarm, (chain, got) = run_swarm(model_dir, {"a": (0, 3), "b": (3, NUM_BLOCKS)}, body)
    assert swarm.banned() == []
    assert swarm.connects.count("b") == 2
    expected = reference_span.forward(torch.cat([x1, x2], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_server_refuses_a_step_at_the_wrong_position(model_dir):
    span = LoadedBlocks.load(model_dir, 0, 2)
    sessions = Sessions(SpanRunner(span, MODEL_ID, ServerLimits()))
    state = sessions.open_session(
        wire.OpenSession(
            model_id=MODEL_ID,
            start=0,
            end=2,
            max_length=8,
            batch_size=1,
            compression="none",
            session_id="s",
        )
    )
    x = torch.randn(1, 2, span.config.hidden_size)

    async def main():
        ok = await sessions.step(state, wire.Step(hidden=x, step_id=0, position=0))
        with pytest.raises(wire.WireError) as info:
            await sessions.step(state, wire.Step(hidden=x, step_id=1, position=0))
        return ok.cache_length, info.value

    length, refused = trio.run(main)
    assert length == 2 and refused.code == "out_of_step"
    assert refused.details == {"position": 0, "cache_length": 2}
    assert state.cache.length == 2  # the refused step left the cache alone


def test_a_failed_beam_step_is_undone_reorder_and_all(model_dir):
    """A step with a reorder reached hop a, then b died with nobody to replace it: the
    reorder is undone with the step, so sending the same step again (once b2 is there)
    gives what a chain without the failure gives."""
    torch.manual_seed(0)
    hidden = LoadedBlocks.load(model_dir, 0, 1).config.hidden_size
    x1, x2, x3 = (torch.randn(2, n, hidden) for n in (3, 1, 1))
    reorder = [1, 0]  # applied twice it would be no reorder at all

    async def with_failure(swarm):
        swarm.peers["b2"].dead = True
        async with swarm.chain(8, 2) as chain:
            await chain.step(x1)
            swarm.peers["b"].crash_when = lambda message: message.get("reorder") is not None
            with pytest.raises(ChainError):
                await chain.step(x2, reorder=reorder)
            swarm.peers["b2"].dead = False
            return [await chain.step(x2, reorder=reorder), await chain.step(x3)]

    async def without(swarm):
        async with swarm.chain(8, 2) as chain:
            await chain.step(x1)
            return [await chain.step(x2, reorder=reorder), await chain.step(x3)]

    spans = {"a": (0, 3), "b": (3, NUM_BLOCKS), "b2": (3, NUM_BLOCKS)}
    _, got = run_swarm(model_dir, spans, with_failure)
    _, expected = run_swarm(model_dir, {"a": (0, 3), "b": (3, NUM_BLOCKS)}, without)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_a_reply_with_the_wrong_cache_length_is_that_servers_failure(model_dir, reference_span):
    """b1 answers as if its cache held one token more than it should: routed around."""
    torch.manual_seed(0)
    x1, x2 = (torch.randn(1, n, reference_span.config.hidden_size) for n in (3, 1))

    async def body(swarm):
        sessions = swarm.peers["b1"].server.sessions
        honest = sessions.step

        async def lying(session, message):
            reply = await honest(session, message)
            return wire.StepResult(
                hidden=reply.hidden, step_id=reply.step_id, cache_length=reply.cache_length + 1
            )

        sessions.step = lying
        async with swarm.chain(8) as chain:
            got = torch.cat([await chain.step(x1), await chain.step(x2)], dim=1)
        return chain.route, got

    swarm, (route, got) = run_swarm(
        model_dir,
        {"a": (0, 3), "b1": (3, NUM_BLOCKS), "b2": (3, NUM_BLOCKS)},
        body,
        throughputs={"b1": 1000.0},
    )
    assert route[-1][0] == "b2" and swarm.banned() == ["b1"]
    expected = reference_span.forward(torch.cat([x1, x2], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
