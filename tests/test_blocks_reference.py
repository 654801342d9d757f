"""Our blocks against transformers, architecture by architecture, with identical weights.

The reference is transformers' own decoder layers, run through hooks that feed our input to
layer `start` and record the output of layer `end - 1` (see tiny_models.reference_blocks).
float32 tolerance: max abs difference <= 1e-4 of the output's max abs value.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    ARCH_IDS,
    ARCHS,
    load_reference,
    make_tiny_model,
    one_thread,  # noqa: F401 - autouse: one torch thread here
    reference_blocks,
)

from blocks import ClientParts, LoadedBlocks

TOL = 1e-4
NUM_LAYERS = 4


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} x scale {scale:.3g}"


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def arch(request, tmp_path_factory):
    family, variant = request.param
    path = make_tiny_model(tmp_path_factory.mktemp("m"), family, variant, num_layers=NUM_LAYERS)
    ref = load_reference(path)
    ref.requires_grad_(False)
    span = LoadedBlocks.load(path, 0, NUM_LAYERS)
    return path, ref, span


def _hidden(span: LoadedBlocks, batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, span.config.hidden_size, generator=gen)


@pytest.mark.parametrize("interval", [(0, 4), (1, 3), (3, 4)])
def test_forward_matches_transformers(arch, interval):
    _, ref, span = arch
    start, end = interval
    x = _hidden(span)
    with torch.no_grad():
        expected = reference_blocks(ref, x, start, end)
    assert_close_scaled(span.forward(x, start=start, end=end), expected)


def test_forward_with_prompts_matches_transformers(arch):
    _, ref, span = arch
    x = _hidden(span)
    prompts = torch.randn(2, 1, 3, span.config.hidden_size)  # batch dim 1 broadcasts
    with torch.no_grad():
        expected = reference_blocks(ref, x, 1, 3, prompts)
        plain = reference_blocks(ref, x, 1, 3)
    ours = span.forward(x, prompts, start=1, end=3)
    assert_close_scaled(ours, expected)
    assert (ours - plain).abs().max() > 0.1  # the prompts did change something


def test_full_stack_logits_match_transformers(arch):
    path, ref, span = arch
    parts = ClientParts.load(path)
    ids = torch.randint(
        4, parts.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    ours = parts.logits(span.forward(parts.embed(ids)))
    assert ours.shape == (2, 11, parts.config.vocab_size)
    assert_close_scaled(ours, expected)


def test_incremental_generation_matches_transformers(arch):
    """Client parts + span.step, one token at a time with OPT's positions from past_length."""
    path, ref, span = arch
    parts = ClientParts.load(path)
    ids = torch.randint(
        4, parts.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    cache = span.new_cache(2, 10)
    logits = [parts.logits(span.step(parts.embed(ids[:, :4]), cache))]
    for t in range(4, 10):
        logits.append(parts.logits(span.step(parts.embed(ids[:, t : t + 1], past_length=t), cache)))
    assert_close_scaled(torch.cat(logits, dim=1), expected)


@pytest.mark.parametrize("interval", [(0, 4), (1, 3)])
def test_step_in_chunks_equals_forward(arch, interval):
    _, _, span = arch
    start, end = interval
    x = _hidden(span, length=13)
    full = span.forward(x, start=start, end=end)
    cache = span.new_cache(2, 16, start, end)
    outs, pos = [], 0
    for chunk in (5, 1, 3, 1, 1, 1, 1):  # chunks of several tokens and single tokens
        outs.append(span.step(x[:, pos : pos + chunk], cache))
        pos += chunk
        assert cache.length == pos
    assert_close_scaled(torch.cat(outs, dim=1), full)


def test_step_with_prompts_equals_forward(arch):
    _, _, span = arch
    x = _hidden(span, length=9)
    prompts = torch.randn(4, 2, 3, span.config.hidden_size)
    full = span.forward(x, prompts)
    cache = span.new_cache(2, 9)
    outs = [span.step(x[:, :2], cache, prompts)]  # the prompt straddles the first two steps
    outs += [span.step(x[:, t : t + 1], cache, prompts) for t in range(2, 9)]
    assert_close_scaled(torch.cat(outs, dim=1), full)


@pytest.mark.parametrize("with_prompts", [False, True])
def test_backward_matches_transformers_autograd(arch, with_prompts):
    _, ref, span = arch
    start, end = 1, 4
    x = _hidden(span)
    grad_out = torch.randn_like(x)
    prompts = torch.randn(3, 2, 4, span.config.hidden_size) if with_prompts else None
    x_ref = x.clone().requires_grad_(True)
    inputs = [x_ref]
    p_ref = None
    if with_prompts:
        p_ref = prompts.clone().requires_grad_(True)
        inputs.append(p_ref)
    with torch.enable_grad():
        out = reference_blocks(ref, x_ref, start, end, p_ref)
        expected = torch.autograd.grad(out, inputs, grad_out)
    before = {k: v.clone() for k, v in span.blocks.state_dict().items()}
    grad_x, grad_p = span.backward(x, grad_out, prompts, start=start, end=end)
    assert_close_scaled(grad_x, expected[0])
    if with_prompts:
        assert grad_p.shape == prompts.shape
        assert_close_scaled(grad_p, expected[1])
    else:
        assert grad_p is None
    # weights got no gradient and were not modified
    assert all(p.grad is None and not p.requires_grad for p in span.blocks.parameters())
    after = span.blocks.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_and_float16_stay_close_to_float32(arch):
    path, _, span = arch
    x = _hidden(span)
    full = span.forward(x)
    for dtype in (torch.bfloat16, torch.float16):
        low = LoadedBlocks.load(path, 0, NUM_LAYERS, dtype=dtype)
        out = low.forward(x.to(dtype))
        assert out.dtype == dtype
        rel = ((out.float() - full).norm() / full.norm()).item()
        assert rel < 0.05, f"{dtype}: relative error {rel:.3f}"


def test_sliding_window_is_applied(tmp_path):
    """Mistral's window (8 here) hides old keys: outputs past it differ from a windowless model."""
    path = make_tiny_model(tmp_path / "w", "mistral", num_layers=2)
    no_window = make_tiny_model(tmp_path / "nw", "mistral", num_layers=2, sliding_window=None)
    span, plain = LoadedBlocks.load(path, 0, 2), LoadedBlocks.load(no_window, 0, 2)
    x = torch.randn(1, 12, span.config.hidden_size)
    a, b = span.forward(x), plain.forward(x)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-2


def test_linear_rope_scaling_matches_transformers(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    path = make_tiny_model(tmp_path / "lin", "llama", num_layers=2, rope_parameters=rope)
    span = LoadedBlocks.load(path, 0, 2)
    assert span.config.rope.type == "linear"
    x = _hidden(span)
    with torch.no_grad():
        expected = reference_blocks(load_reference(path), x, 0, 2)
    assert_close_scaled(span.forward(x), expected)
