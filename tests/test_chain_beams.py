"""Left padding and beam reordering through the wire and the chain, also across a replay.

The expected output is always a fresh computation: the test keeps each row's own history
(gathered by every reorder, as beam search's surviving hypotheses carry their past), and
row b's outputs must equal one forward of its real tokens alone (from its pad length on).
Pads hold random hidden states, so a pad leaking into a real token shows.
"""

from __future__ import annotations

import pytest
import torch

from blocks import LoadedBlocks
from peerd.chain import ChainError
from tests.chain_harness import has_reorder, nth_step, run_swarm
from tests.tiny_models import make_tiny_model

NUM_BLOCKS = 6
HIDDEN = 64
BATCH = 3
INTERVALS = {"a1": (0, 3), "a2": (0, 3), "b1": (3, 6), "b2": (3, 6)}
PREFERRED = {"a1": 1000.0, "b1": 1000.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("beams") / "llama", "llama", num_layers=6)


@pytest.fixture(scope="module")
def reference_span(model_dir):
    return LoadedBlocks.load(model_dir, 0, NUM_BLOCKS)


# (new tokens, reorder before the step or None)
PLAN = [(5, None), (1, None), (1, [2, 0, 0]), (2, None), (1, [1, 2, 1]), (1, None)]


def run_plan(model_dir, plan, *, pads=None, crash=None):
    """Step random inputs by `plan` through a chain; returns (swarm, chain, inputs, outputs)."""
    torch.manual_seed(0)
    inputs = [torch.randn(BATCH, n, HIDDEN) for n, _ in plan]

    async def body(swarm):
        for name, trigger in (crash or {}).items():
            swarm.peers[name].crash_when = trigger
        chain = swarm.chain(sum(n for n, _ in plan), BATCH, pad_lengths=pads)
        async with chain:
            outputs = [
                await chain.step(x, reorder=r) for x, (_, r) in zip(inputs, plan, strict=True)
            ]
        return chain, outputs

    swarm, (chain, outputs) = run_swarm(
        model_dir, INTERVALS, body, throughputs=PREFERRED, num_blocks=NUM_BLOCKS
    )
    return swarm, chain, inputs, outputs


def check_against_fresh_runs(reference_span, plan, inputs, outputs, pads=None):
    """Each step's output row b equals a forward of row b's history alone (real tokens)."""
    pads = list(pads or [0] * BATCH)
    history = torch.zeros(BATCH, 0, HIDDEN)
    for x, (n, reorder), out in zip(inputs, plan, outputs, strict=True):
        if reorder is not None:
            history, pads = history[reorder], [pads[i] for i in reorder]
        history = torch.cat([history, x], dim=1)
        for b in range(BATCH):
            real = history[b : b + 1, pads[b] :]
            new = min(n, real.shape[1])  # this step's real tokens (pads come first)
            expected = reference_span.forward(real)[:, real.shape[1] - new :]
            torch.testing.assert_close(out[b : b + 1, n - new :], expected, atol=1e-5, rtol=1e-4)


def test_reorder_equals_running_the_reordered_prompts_fresh(model_dir, reference_span):
    swarm, chain, inputs, outputs = run_plan(model_dir, PLAN)
    assert chain.recoveries == []
    check_against_fresh_runs(reference_span, PLAN, inputs, outputs)


@pytest.mark.parametrize(
    "crash",
    [
        {"b1": has_reorder},  # the last hop dies on the step that reorders
        {"a1": has_reorder},  # the first hop does: b1 must still get the reorder, once
        {"b1": nth_step(4)},  # the last hop dies right after a reorder
    ],
    ids=["last-on-reorder", "first-on-reorder", "after-reorder"],
)
def test_reorder_survives_a_failure_and_replay(model_dir, reference_span, crash):
    swarm, chain, inputs, outputs = run_plan(model_dir, PLAN, crash=crash)
    assert len(chain.recoveries) == 1
    assert [swarm.peers[name].dead for name in crash] == [True]
    check_against_fresh_runs(reference_span, PLAN, inputs, outputs)


PADS = [0, 2, 4]  # prompts of 5, 3 and 1 real tokens, left-padded to 5


def test_padding_equals_each_prompt_alone(model_dir, reference_span):
    plan = [(5, None), (1, None), (1, None)]
    _, _, inputs, outputs = run_plan(model_dir, plan, pads=PADS)
    check_against_fresh_runs(reference_span, plan, inputs, outputs, PADS)


def test_padding_and_reorder_across_a_replay(model_dir, reference_span):
    """Rows of different pad lengths swap places; the replacement gets the permuted pads."""
    plan = [(5, None), (1, [2, 0, 1]), (1, None), (1, None)]
    swarm, chain, inputs, outputs = run_plan(model_dir, plan, pads=PADS, crash={"b1": nth_step(3)})
    assert swarm.peers["b1"].dead and len(chain.recoveries) == 1
    assert chain.pad_lengths == [4, 0, 2]
    check_against_fresh_runs(reference_span, plan, inputs, outputs, PADS)


def test_bad_pad_lengths_and_reorder_are_bad_requests(model_dir):
    async def body(swarm):
        errors = []
        for kwargs in ({"pad_lengths": [0, 1]}, {"pad_lengths": [0, 0, 9]}):
            try:
                await swarm.chain(8, BATCH, **kwargs).open()
            except ChainError as exc:
                errors.append(exc.code)
        chain = swarm.chain(8, BATCH)
        async with chain:
            for reorder in ([0, 1], [0, 1, 3]):
                with pytest.raises(ChainError) as info:
                    await chain.step(torch.randn(BATCH, 1, HIDDEN), reorder=reorder)
                errors.append(info.value.code)
        return errors

    swarm, errors = run_swarm(
        model_dir, INTERVALS, body, throughputs=PREFERRED, num_blocks=NUM_BLOCKS
    )
    assert errors == ["bad_request"] * 4
    assert swarm.banned() == []
