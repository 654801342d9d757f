"""Left-padded batches (pad_lengths) and beam-search cache reordering, architecture by architecture.

A batch of prompts of different lengths, left-padded as transformers' `generate` pads them, must
give at each row's real positions what (a) the prompt alone, unpadded, gives through our blocks
and (b) transformers gives with the matching attention_mask (and, for rotary models, the
position_ids that `generate` derives from it). Pads hold random hidden states, so any leak of a
pad into a real token shows. float32 tolerance as in test_blocks_reference.
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
    reference_layers,
)

from blocks import ClientParts, LoadedBlocks

TOL = 1e-4
NUM_LAYERS = 4
LENGTHS = (11, 6, 9)  # real lengths of the three prompts; T = 11 crosses Mistral's window of 8
PADS = tuple(max(LENGTHS) - n for n in LENGTHS)  # (0, 5, 2)
PAD_ID = 3


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def arch(request, tmp_path_factory):
    family, variant = request.param
    path = make_tiny_model(tmp_path_factory.mktemp("m"), family, variant, num_layers=NUM_LAYERS)
    ref = load_reference(path)
    ref.requires_grad_(False)
    return ref, LoadedBlocks.load(path, 0, NUM_LAYERS), ClientParts.load(path)


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} > {tol} x scale {scale:.3g}"


def assert_rows_close(ours: torch.Tensor, expected: list[torch.Tensor], pads) -> None:
    """Row b of `ours` from position pads[b] on equals expected[b] ([1, T - pad, ...])."""
    for b, pad in enumerate(pads):
        assert_close_scaled(ours[b : b + 1, pad:], expected[b])


def attention_mask(pads, length: int) -> torch.Tensor:
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    return mask


def reference_kwargs(span: LoadedBlocks, mask: torch.Tensor) -> dict:
    """transformers' inputs for a left-padded batch: the mask, and for rotary models the
    position_ids `generate` derives from it (without them it would rotate by absolute index)."""
    kwargs = {"attention_mask": mask}
    if span.config.family == "llama":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


def reference_padded(ref, span: LoadedBlocks, hidden: torch.Tensor, pads, start: int, end: int):
    """transformers' layers [start, end) on `hidden` with the batch's attention mask (hooks feed
    layer `start` and record layer `end - 1`, as tiny_models.reference_blocks)."""
    layers, captured = reference_layers(ref), []

    def feed(module, args, kwargs):
        return (hidden, *args[1:]), kwargs

    def record(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [
        layers[start].register_forward_pre_hook(feed, with_kwargs=True),
        layers[end - 1].register_forward_hook(record),
    ]
    try:
        ids = torch.full(hidden.shape[:2], 5, dtype=torch.long)
        ref(
            input_ids=ids,
            use_cache=False,
            **reference_kwargs(span, attention_mask(pads, ids.shape[1])),
        )
    finally:
        for handle in handles:
            handle.remove()
    return captured[0]


def hidden_states(span: LoadedBlocks, length: int = max(LENGTHS), batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, span.config.hidden_size, generator=gen)


def token_ids(parts: ClientParts, length: int, pads, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, parts.config.vocab_size, (len(pads), length), generator=gen)
    for b, pad in enumerate(pads):
        ids[b, :pad] = PAD_ID
    return ids


# -- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [(0, 4), (1, 3)])
def test_padded_forward_equals_each_prompt_alone(arch, interval):
    _, span, _ = arch
    x = hidden_states(span)
    ours = span.forward(x, start=interval[0], end=interval[1], pad_lengths=PADS)
    alone = [
        span.forward(x[b : b + 1, p:], start=interval[0], end=interval[1])
        for b, p in enumerate(PADS)
    ]
    assert_rows_close(ours, alone, PADS)
    assert torch.isfinite(ours).all()  # pad rows too


@pytest.mark.parametrize("interval", [(0, 4), (1, 3)])
def test_padded_forward_matches_transformers(arch, interval):
    ref, span, _ = arch
    x = hidden_states(span)
    with torch.no_grad():
        expected = reference_padded(ref, span, x, PADS, *interval)
    ours = span.forward(x, start=interval[0], end=interval[1], pad_lengths=PADS)
    assert_rows_close(ours, [expected[b : b + 1, p:] for b, p in enumerate(PADS)], PADS)


def test_padded_logits_match_transformers(arch):
    """The whole stack with token ids: OPT's learned positions come from embed's pad_lengths."""
    ref, span, parts = arch
    ids = token_ids(parts, max(LENGTHS), PADS)
    with torch.no_grad():
        expected = ref(
            input_ids=ids, **reference_kwargs(span, attention_mask(PADS, ids.shape[1]))
        ).logits
    ours = parts.logits(span.forward(parts.embed(ids, pad_lengths=PADS), pad_lengths=PADS))
    assert_rows_close(ours, [expected[b : b + 1, p:] for b, p in enumerate(PADS)], PADS)
    alone = [
        parts.logits(span.forward(parts.embed(ids[b : b + 1, p:]))) for b, p in enumerate(PADS)
    ]
    assert_rows_close(ours, alone, PADS)


def test_zero_padding_is_bit_identical_to_none(arch):
    _, span, parts = arch
    x = hidden_states(span)
    assert torch.equal(span.forward(x, pad_lengths=(0, 0, 0)), span.forward(x))
    ids = token_ids(parts, 5, (0, 0, 0))
    assert torch.equal(parts.embed(ids, 3, pad_lengths=[0, 0, 0]), parts.embed(ids, 3))
    outs = []
    for pads in (None, (0, 0, 0)):
        cache = span.new_cache(3, 12, pad_lengths=pads)
        outs.append(torch.cat([span.step(x[:, :7], cache), span.step(x[:, 7:8], cache)], dim=1))
    assert torch.equal(outs[0], outs[1])


def test_rotary_tables_follow_each_rows_real_positions(arch):
    """RoPE scores only see position differences, so outputs cannot tell; the tables must still
    be those of the real positions (as transformers' position_ids), and unpadded calls keep the
    fast paths (no mask, SDPA's is_causal)."""
    _, span, _ = arch
    t = max(LENGTHS)
    ctx = span._positions(0, t, torch.float32, PADS)
    assert ctx.mask is not None and ctx.mask.shape[0] == 3 and ctx.mask.shape[-2:] == (t, t)
    assert not ctx.is_causal
    for b, pad in enumerate(PADS):
        if ctx.cos is not None:
            alone = span._positions(0, t - pad, torch.float32)
            assert torch.equal(ctx.cos[b, 0, pad:], alone.cos)
            assert torch.equal(ctx.sin[b, 0, pad:], alone.sin)
    zeros, none = (
        span._positions(0, t, torch.float32, (0, 0, 0)),
        span._positions(0, t, torch.float32),
    )
    assert zeros.pads is None and zeros.is_causal == none.is_causal
    assert (zeros.mask is None) == (none.mask is None)
    if span.config.family == "opt":
        assert zeros.mask is None and zeros.is_causal  # a prefill is SDPA's own causal attention


# -- generation with a cache ------------------------------------------------------------------------


def test_padded_generation_matches_transformers_and_each_prompt_alone(arch):
    """Prefill of the padded prompts, then a 2-token step and 1-token steps, with client parts."""
    ref, span, parts = arch
    prompt_len, total = 8, 13  # prompts of 8, 3, 6 real tokens; 5 more tokens each
    pads = (0, 5, 2)
    ids = token_ids(parts, total, pads, seed=2)
    with torch.no_grad():
        expected = ref(input_ids=ids, **reference_kwargs(span, attention_mask(pads, total))).logits
    cache = span.new_cache(3, 16, pad_lengths=pads)
    logits = [parts.logits(span.step(parts.embed(ids[:, :prompt_len], pad_lengths=pads), cache))]
    for t, chunk in ((8, 2), (10, 1), (11, 1), (12, 1)):
        x = parts.embed(ids[:, t : t + chunk], past_length=t, pad_lengths=pads)
        logits.append(parts.logits(span.step(x, cache)))
    ours = torch.cat(logits, dim=1)
    assert cache.length == total
    assert_rows_close(ours, [expected[b : b + 1, p:] for b, p in enumerate(pads)], pads)
    alone = [
        parts.logits(span.forward(parts.embed(ids[b : b + 1, p:]))) for b, p in enumerate(pads)
    ]
    assert_rows_close(ours, alone, pads)


def test_padded_steps_equal_padded_forward(arch):
    _, span, _ = arch
    x = hidden_states(span)
    full = span.forward(x, pad_lengths=PADS)
    cache = span.new_cache(3, 12, pad_lengths=PADS)
    outs = [span.step(x[:, :7], cache)]  # row 1 (pad 5) has only 2 real tokens in the prefill
    outs += [span.step(x[:, t : t + 1], cache) for t in range(7, 11)]
    assert_close_scaled(torch.cat(outs, dim=1), full)


# -- deep prompts and backward ----------------------------------------------------------------------


def test_prompts_follow_each_rows_real_positions(arch):
    _, span, _ = arch
    x = hidden_states(span)
    prompts = torch.randn(
        2, 3, 4, span.config.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    ours = span.forward(x, prompts, start=1, end=3, pad_lengths=PADS)
    alone = [
        span.forward(x[b : b + 1, p:], prompts[:, b : b + 1], start=1, end=3)
        for b, p in enumerate(PADS)
    ]
    assert_rows_close(ours, alone, PADS)
    plain = span.forward(x, start=1, end=3, pad_lengths=PADS)
    assert (ours[1, PADS[1] :] - plain[1, PADS[1] :]).abs().max() > 0.1  # the prompt did land
    cache = span.new_cache(3, 11, 1, 3, pad_lengths=PADS)
    steps = [span.step(x[:, :6], cache, prompts)]  # row 1's prompt starts in the next step
    steps += [span.step(x[:, t : t + 1], cache, prompts) for t in range(6, 11)]
    assert_close_scaled(torch.cat(steps, dim=1), ours)


def test_padded_backward_equals_each_row_alone(arch):
    _, span, _ = arch
    x = hidden_states(span)
    grad_out = hidden_states(span, seed=4)
    for b, pad in enumerate(PADS):
        grad_out[b, :pad] = 0  # a loss ignores the pads
    prompts = torch.randn(
        3, 3, 2, span.config.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    grad_x, grad_p = span.backward(x, grad_out, prompts, start=1, end=4, pad_lengths=PADS)
    for b, pad in enumerate(PADS):
        gx, gp = span.backward(
            x[b : b + 1, pad:], grad_out[b : b + 1, pad:], prompts[:, b : b + 1], 1, 4
        )
        assert_close_scaled(grad_x[b : b + 1, pad:], gx)
        assert_close_scaled(grad_p[:, b : b + 1], gp)
        assert not grad_x[b, :pad].any()  # pads feed nothing real


# -- beam search: reorder ---------------------------------------------------------------------------


@pytest.mark.parametrize("pads", [None, PADS], ids=["unpadded", "padded"])
def test_reorder_then_step_equals_reordered_from_scratch(arch, pads):
    _, span, _ = arch
    x = hidden_states(span, length=13)
    prefill = 8
    cache = span.new_cache(3, 16, pad_lengths=pads)
    span.step(x[:, :prefill], cache)
    cache.reorder([2, 0, 0])
    first = span.step(x[:, prefill : prefill + 2], cache)
    cache.reorder(torch.tensor([1, 2, 0]))
    second = span.step(x[:, prefill + 2 : prefill + 3], cache)

    # From scratch: the beams' histories, re-run in their new order.
    def fresh(order):
        cache = span.new_cache(
            3, 16, pad_lengths=None if pads is None else [pads[i] for i in order]
        )
        span.step(x[order, :prefill], cache)
        return cache

    scratch = fresh([2, 0, 0])
    assert_close_scaled(span.step(x[:, prefill : prefill + 2], scratch), first)
    scratch = fresh([0, 0, 2])  # rows 1, 2, 0 of (2, 0, 0)
    span.step(x[[1, 2, 0], prefill : prefill + 2], scratch)
    assert_close_scaled(span.step(x[:, prefill + 2 : prefill + 3], scratch), second)
    assert cache.pad_lengths == (None if pads is None else (pads[0], pads[0], pads[2]))
    assert cache.length == prefill + 3


def test_reorder_of_an_empty_cache_only_moves_pads(arch):
    _, span, _ = arch
    cache = span.new_cache(3, 4, pad_lengths=(1, 2, 3))
    cache.reorder((2, 2, 1))
    assert cache.pad_lengths == (3, 3, 2) and cache.length == 0
