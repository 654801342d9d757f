"""Requests cut to fit frames, in each server's dtype; local errors never blamed on a server.

In-process servers (tests/chain_harness.py) whose streams enforce their frame limit for real:
a step or replay several times bigger than a frame must come out as one big step would, a
single token (or sequence) too big must be a `too_large` ChainError that bans nobody, and a
bfloat16 server must receive and answer bfloat16.
"""

from __future__ import annotations

import pytest
import torch

import wire
from blocks import LoadedBlocks
from peerd.chain import ChainError
from peerd.client.daemon_client import ChainSession
from peerd.server.limits import ServerLimits
from tests.chain_harness import nth_step, run_swarm
from tests.tiny_models import make_tiny_model
from wire import local as api

NUM_BLOCKS = 4
HIDDEN = 64
PROMPT = 2048  # × 64 float32 = 512 KiB: 8 frames of 64 KiB
SMALL_FRAME = 64 * 1024
TWO_SPANS = {"a": (0, 2), "b1": (2, 4), "b2": (2, 4)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(
        tmp_path_factory.mktemp("frames") / "llama",
        "llama",
        num_layers=NUM_BLOCKS,
        hidden_size=HIDDEN,
        max_position_embeddings=PROMPT + 64,
    )


@pytest.fixture(scope="module")
def reference_span(model_dir):
    return LoadedBlocks.load(model_dir, 0, NUM_BLOCKS)


def generate(model_dir, inputs, *, crash=None, **swarm_kw):
    """Step `inputs` through a chain of TWO_SPANS (b1 preferred); returns swarm, chain, outputs."""

    async def body(swarm):
        if crash is not None:
            swarm.peers["b1"].crash_when = crash
        chain = swarm.chain(sum(x.shape[1] for x in inputs), inputs[0].shape[0])
        async with chain:
            outputs = [await chain.step(x) for x in inputs]
        return chain, outputs

    swarm, (chain, outputs) = run_swarm(
        model_dir, TWO_SPANS, body, throughputs={"b1": 1000.0}, num_blocks=NUM_BLOCKS, **swarm_kw
    )
    return swarm, chain, outputs


def prompt_and_tokens(new_tokens: int = 3, batch: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, PROMPT, HIDDEN)] + [
        torch.randn(batch, 1, HIDDEN) for _ in range(new_tokens)
    ]


def test_big_step_and_its_replay_are_cut_into_frames(model_dir, reference_span):
    inputs = prompt_and_tokens()
    small = {"limits": ServerLimits(max_frame=SMALL_FRAME)}
    _, _, big_frames = generate(model_dir, inputs)
    swarm, chain, cut = generate(model_dir, inputs, **small)
    for peer in swarm.peers.values():
        assert peer.largest_frame <= SMALL_FRAME
    assert swarm.peers["a"].steps >= PROMPT * HIDDEN * 4 // SMALL_FRAME  # really cut
    for got, expected in zip(cut, big_frames, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    expected = reference_span.forward(torch.cat(inputs, dim=1))
    torch.testing.assert_close(torch.cat(cut, dim=1), expected, atol=1e-4, rtol=1e-4)

    # b1 dies at the second new token: the replay of 2049 tokens to b2 is cut as well
    steps_before = swarm.peers["b1"].steps
    swarm, chain, replayed = generate(model_dir, inputs, crash=nth_step(steps_before - 1), **small)
    assert swarm.peers["b1"].dead and chain.route[-1][0] == "b2"
    assert chain.recoveries[0].replayed_tokens == PROMPT + 1
    assert swarm.peers["b2"].largest_frame <= SMALL_FRAME
    assert swarm.peers["b2"].steps > PROMPT * HIDDEN * 4 // SMALL_FRAME
    for got, expected in zip(replayed, cut, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_our_own_frame_limit_cuts_too(model_dir, reference_span):
    inputs = prompt_and_tokens(1)
    swarm, _, outputs = generate(model_dir, inputs, client_max_frame=SMALL_FRAME)
    assert swarm.peers["a"].largest_frame <= SMALL_FRAME
    expected = reference_span.forward(torch.cat(inputs, dim=1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_servers_token_limit_cuts_steps(model_dir, reference_span):
    torch.manual_seed(1)
    inputs = [torch.randn(2, 50, HIDDEN), torch.randn(2, 1, HIDDEN)]
    swarm, _, outputs = generate(model_dir, inputs, limits=ServerLimits(max_tokens_per_request=16))
    assert swarm.peers["a"].steps == 50 // 8 + 1 + 1  # 8 tokens × batch 2 per step
    expected = reference_span.forward(torch.cat(inputs, dim=1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("limits", "banned"),
    [
        # a frame limit no real step fits is absurd: that server's fault, banned
        (ServerLimits(max_frame=wire.ENVELOPE_BYTES + 100), ["b1"]),
        # one token of a batch of 3 is 3 tokens: b1 cannot take this chain, b2 can
        (ServerLimits(max_tokens_per_request=2), []),
    ],
    ids=["frame", "tokens"],
)
def test_a_server_whose_limits_cannot_take_a_token_is_routed_around(model_dir, limits, banned):
    x = torch.randn(3, 4, HIDDEN)

    async def body(swarm):
        chain = swarm.chain(8, batch_size=3)
        async with chain:
            y = await chain.step(x)
        return chain.route, y

    swarm, (route, y) = run_swarm(
        model_dir,
        TWO_SPANS,
        body,
        limits={"b1": limits},
        throughputs={"b1": 1000.0},
        num_blocks=NUM_BLOCKS,
    )
    assert route[-1][0] == "b2"
    assert swarm.banned() == banned
    assert swarm.peers["b1"].steps == 0
    expected = LoadedBlocks.load(model_dir, 0, NUM_BLOCKS).forward(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


def test_a_token_our_own_frame_cannot_carry_is_too_large_and_bans_nobody(model_dir):
    async def body(swarm):
        chain = swarm.chain(8, batch_size=3)
        async with chain:
            with pytest.raises(ChainError) as info:
                await chain.step(torch.randn(3, 4, 8192))
        return info.value

    swarm, error = run_swarm(
        model_dir, TWO_SPANS, body, num_blocks=NUM_BLOCKS, client_max_frame=SMALL_FRAME
    )
    assert error.code == "too_large" and "one token" in str(error)
    assert swarm.banned() == []
    assert all(peer.steps == 0 for peer in swarm.peers.values())  # refused before sending


def test_a_request_built_wrong_is_a_local_error(model_dir):
    async def body(swarm):
        chain = swarm.chain(8, batch_size=2)
        async with chain:
            with pytest.raises(ChainError) as bad_reorder:
                await chain.step(torch.randn(2, 1, HIDDEN), reorder=[0])
            with pytest.raises(ChainError) as bad_shape:
                await chain.step(torch.randn(3, 1, HIDDEN))
        return bad_reorder.value, bad_shape.value

    swarm, errors = run_swarm(model_dir, TWO_SPANS, body, num_blocks=NUM_BLOCKS)
    assert [e.code for e in errors] == ["bad_request", "bad_request"]
    assert swarm.banned() == []


def test_bfloat16_server_receives_and_answers_bfloat16(model_dir, reference_span):
    torch.manual_seed(2)
    inputs = [torch.randn(1, 6, HIDDEN), torch.randn(1, 1, HIDDEN)]
    swarm, _, outputs = generate(model_dir, inputs, dtypes={"b1": torch.bfloat16})
    assert swarm.peers["a"].hidden_dtypes == {"float32"}
    assert swarm.peers["b1"].hidden_dtypes == {"bfloat16"}
    assert all(out.dtype == torch.float32 for out in outputs)  # cast back for the caller
    expected = reference_span.forward(torch.cat(inputs, dim=1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("prompts_per_row", [False, True], ids=["shared-prompts", "row-prompts"])
def test_training_cut_along_the_batch_matches_one_request(
    model_dir, reference_span, prompts_per_row
):
    torch.manual_seed(3)
    batch, length = 8, 5
    x = torch.randn(batch, length, HIDDEN)
    grad = torch.randn_like(x)
    prompts = 0.1 * torch.randn(NUM_BLOCKS, batch if prompts_per_row else 1, 2, HIDDEN)
    one_sequence = length * HIDDEN * 4
    span_prompt = 2 * 1 * 2 * HIDDEN * 4  # each server holds 2 blocks: one row of its prompts
    if prompts_per_row:
        frame = wire.ENVELOPE_BYTES + 3 * (one_sequence + span_prompt)
    else:
        frame = wire.ENVELOPE_BYTES + 3 * one_sequence + span_prompt

    async def body(swarm):
        training = await swarm.training(batch)
        out, trace = await training.forward(x, prompts)
        grads = await training.backward(trace, grad, prompts)
        return out, grads

    swarm, (out, (grad_x, grad_p)) = run_swarm(
        model_dir,
        {"a": (0, 2), "b": (2, 4)},
        body,
        limits=ServerLimits(max_frame=frame),
        num_blocks=NUM_BLOCKS,
    )
    # forward: 3 sequences a request; backward (hidden + gradient): 1
    assert swarm.peers["a"].received == 1 + 3 + 8  # Info, forwards, backwards
    assert all(peer.largest_frame <= frame for peer in swarm.peers.values())
    expected_grad, expected_grad_p = reference_span.backward(x, grad, prompts)
    torch.testing.assert_close(out, reference_span.forward(x, prompts), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_p, expected_grad_p, atol=1e-5, rtol=1e-4)


def test_training_sequence_that_cannot_fit_is_too_large(model_dir):
    async def body(swarm):
        training = await swarm.training(2)
        with pytest.raises(ChainError) as info:
            await training.forward(torch.randn(2, 100, HIDDEN))
        return info.value

    swarm, error = run_swarm(
        model_dir,
        {"a": (0, 4)},
        body,
        limits=ServerLimits(max_frame=wire.ENVELOPE_BYTES + 1000),
        num_blocks=NUM_BLOCKS,
    )
    assert error.code == "too_large" and "one sequence" in str(error)
    assert swarm.banned() == []


class FakeConnection:
    """Stands in for the daemon's socket: the chain doubles hidden states; requests are kept."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.sent: list[api.ChainStep] = []

    def request(self, message, expected, *, request_id=None):
        assert len(wire.encode_frame(message.to_wire(), self.max_frame)) <= self.max_frame
        self.sent.append(message)
        return api.ChainStepResult(hidden=message.hidden * 2, route=[("p", 0, 4)], recoveries=0)


@pytest.mark.parametrize("daemon_frame", [SMALL_FRAME, wire.DEFAULT_MAX_FRAME])
def test_client_session_cuts_steps_to_the_smaller_frame_limit(daemon_frame):
    session = ChainSession(None, "model", 4096, batch_size=2)
    session.conn = FakeConnection(min(daemon_frame, 2 * SMALL_FRAME))
    session.chain_id, session.max_frame = "c1", daemon_frame
    hidden = torch.randn(2, 1000, HIDDEN)  # 512 KB
    out = session.step(hidden, reorder=[1, 0])
    torch.testing.assert_close(out, hidden * 2)
    sent = session.conn.sent
    per_frame = (min(daemon_frame, 2 * SMALL_FRAME) - wire.ENVELOPE_BYTES) // (2 * HIDDEN * 4)
    assert len(sent) == -(-1000 // per_frame)
    assert sent[0].reorder == [1, 0] and all(m.reorder is None for m in sent[1:])
    with pytest.raises(Exception, match="too_large"):
        session.max_frame = wire.ENVELOPE_BYTES + 10
        session.step(hidden)
