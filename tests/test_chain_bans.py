"""Which failures ban a server, for how long, and which only route around it or replay."""

from __future__ import annotations

import pytest
import torch
import trio

from blocks import LoadedBlocks
from peerd.chain import ChainError
from peerd.planning import Planning
from peerd.server.limits import ServerLimits
from routing import BanList, ServerSpan
from tests.chain_harness import run_swarm
from tests.tiny_models import make_tiny_model

NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("bans") / "llama", "llama", num_layers=NUM_BLOCKS
    )


@pytest.fixture(scope="module")
def reference_span(model_dir):
    return LoadedBlocks.load(model_dir, 0, NUM_BLOCKS)


def test_a_failed_server_stays_banned_until_its_record_expires(model_dir):
    """A dead server's record goes on listing it: the ban lasts until that record expires."""
    span = ServerSpan("dead", 0, NUM_BLOCKS, throughput=1.0, expires_at=1_000.0 + 43.0)
    now = {"t": 0.0}

    async def source():
        return [span]

    async def main():
        planning = Planning(
            options=None,  # type: ignore[arg-type]  # ban() does not read it
            source=source,
            probe_rtts=None,
            bans=BanList(),
            clock=lambda: now["t"],
            wall_clock=lambda: 1_000.0,
        )
        planning.planner = type("P", (), {"update": lambda self, changes: None})()
        planning.known = {"dead": span}
        planning.ban("dead")
        return planning.bans

    bans = trio.run(main)
    assert bans.is_banned("dead", 42.0) and not bans.is_banned("dead", 43.5)


def test_an_idle_timeout_reopens_and_replays_without_a_ban(model_dir, reference_span):
    torch.manual_seed(0)
    hidden = reference_span.config.hidden_size
    x1, x2 = torch.randn(1, 3, hidden), torch.randn(1, 1, hidden)

    async def body(swarm):
        chain = swarm.chain(8)
        async with chain:
            y1 = await chain.step(x1)
            await trio.sleep(1.6)  # past b's idle timeout: it closed the session
            y2 = await chain.step(x2)
        return chain, torch.cat([y1, y2], dim=1)

    swarm, (chain, got) = run_swarm(
        model_dir,
        {"a": (0, 2), "b": (2, NUM_BLOCKS)},
        body,
        limits={"b": ServerLimits(idle_timeout=1.0)},
        num_blocks=NUM_BLOCKS,
    )
    assert swarm.banned() == []
    assert chain.route == [("a", 0, 2), ("b", 2, NUM_BLOCKS)]
    assert [r.kind for r in chain.recoveries] == ["resync"]
    expected = reference_span.forward(torch.cat([x1, x2], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_server_that_moved_its_blocks_is_routed_around_not_banned(model_dir, reference_span):
    """b1's record still says 2..4 but it now serves other blocks: out_of_range at open."""
    x = torch.randn(1, 2, reference_span.config.hidden_size)

    async def body(swarm):
        moved = swarm.peers["b1"]
        real = moved.span
        moved.server.runner.check_interval = lambda s, e: (_ for _ in ()).throw(
            __import__("peerd.server.limits", fromlist=["RequestRefused"]).RequestRefused(
                "out_of_range", f"blocks {s}..{e} are not served here"
            )
        )
        assert real.start == 2
        chain = swarm.chain(8)
        async with chain:
            y = await chain.step(x)
        return chain.route, y

    swarm, (route, y) = run_swarm(
        model_dir,
        {"a": (0, 2), "b1": (2, NUM_BLOCKS), "b2": (2, NUM_BLOCKS)},
        body,
        throughputs={"b1": 1000.0},
        num_blocks=NUM_BLOCKS,
    )
    assert route[-1][0] == "b2" and swarm.banned() == []
    torch.testing.assert_close(y, reference_span.forward(x), atol=1e-5, rtol=1e-4)


def test_a_session_no_server_can_hold_is_a_clear_error_and_bans_nobody(model_dir):
    async def body(swarm):
        with pytest.raises(ChainError) as info:
            await swarm.chain(64).open()
        return info.value

    swarm, error = run_swarm(
        model_dir,
        {"a": (0, 2), "b1": (2, NUM_BLOCKS), "b2": (2, NUM_BLOCKS)},
        body,
        limits=ServerLimits(cache_tokens=16),
        num_blocks=NUM_BLOCKS,
    )
    assert error.code == "cache_full" and "can hold a session of batch 1 × 64" in str(error)
    assert swarm.banned() == []


def _repair_after_b1_dies(model_dir, intervals, throughputs, dtypes, quants=None):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64)

    async def body(swarm):
        for name, quant in (quants or {}).items():
            swarm.peers[name].quant = quant
        chain = swarm.chain(8)
        async with chain:
            await chain.step(x[:, :1])
            swarm.peers["b1"].crash_when = lambda message: True
            await chain.step(x[:, 1:])
        return chain

    from tests.chain_harness import run_swarm as run

    _, chain = run(
        model_dir,
        intervals,
        body,
        throughputs=throughputs,
        dtypes=dtypes,
        num_blocks=NUM_BLOCKS,
    )
    return chain


def test_a_replacement_keeps_the_dtype_and_quantization_of_the_hop(model_dir):
    """b2 is faster but computes in bfloat16 (b4: int8 weights); b3 is like b1: b3 it is."""
    chain = _repair_after_b1_dies(
        model_dir,
        {"a": (0, 2), "b1": (2, 4), "b2": (2, 4), "b3": (2, 4), "b4": (2, 4)},
        {"b1": 1000.0, "b2": 500.0, "b4": 400.0, "b3": 10.0},
        {"b2": torch.bfloat16},
        quants={"b4": "int8"},
    )
    assert chain.route[-1][0] == "b3"
    assert chain.recoveries[-1].precision_changes == []


def test_a_replacement_of_another_dtype_is_said(model_dir, caplog):
    chain = _repair_after_b1_dies(
        model_dir,
        {"a": (0, 2), "b1": (2, 4), "b2": (2, 4)},
        {"b1": 1000.0},
        {"b2": torch.bfloat16},
    )
    assert chain.route[-1][0] == "b2"
    (change,) = chain.recoveries[-1].precision_changes
    assert "float32/none -> bfloat16/none" in change
    assert "precision changed" in caplog.text
