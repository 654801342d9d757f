"""int8 (LLM.int8) and NF4 spans on CPU: close to float, exact w.r.t. their own dequantized
weights (NF4), smaller in memory, and every code path (forward, step, backward) works.

Tolerances, measured on these tiny random models (4 blocks, relative L2 error of the output vs
the float32 span): int8 0.017-0.026, NF4 0.19-0.29 (NF4 errs ~0.09 per linear with random
weights, and 4 blocks of 7 linears compound). Asserted: int8 < 0.05, NF4 < 0.45; an unrelated
model would be ~1.4 away.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    make_tiny_model,
    one_thread,  # noqa: F401 - autouse: one torch thread here
)

from blocks import LoadedBlocks

TOLERANCE = {"int8": 0.05, "nf4": 0.45}
FAMILIES = [("llama", "llama3"), ("bloom", None), ("opt", None)]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def model(request, tmp_path_factory):
    family, variant = request.param
    path = make_tiny_model(tmp_path_factory.mktemp("q"), family, variant, num_layers=4)
    return path, LoadedBlocks.load(path, 0, 4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_stays_close_to_float(model, quant):
    path, span = model
    q = LoadedBlocks.load(path, 0, 4, quant=quant)
    assert q.quant == quant
    x = torch.randn(2, 9, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    full, out = span.forward(x), q.forward(x)
    assert 0 < rel(out, full) < TOLERANCE[quant]
    # step with a cache on the quantized span equals its own forward (up to LLM.int8's choice of
    # outlier columns, which depends on every token of a call: measured 0.008)
    cache = q.new_cache(2, 9)
    steps = [q.step(x[:, :4], cache)] + [q.step(x[:, t : t + 1], cache) for t in range(4, 9)]
    assert rel(torch.cat(steps, dim=1), out) < (0.03 if quant == "int8" else 1e-5)
    # backward to the inputs works and approximates the float gradient
    grad_out = torch.randn_like(x)
    grad_q, _ = q.backward(x, grad_out)
    grad_f, _ = span.backward(x, grad_out)
    assert torch.isfinite(grad_q).all()
    assert rel(grad_q, grad_f) < 2 * TOLERANCE[quant]


@pytest.mark.parametrize("quant, max_ratio", [("int8", 0.35), ("nf4", 0.25)])
def test_quantized_span_is_smaller(model, quant, max_ratio):
    path, span = model
    q = LoadedBlocks.load(path, 0, 4, quant=quant)
    assert q.nbytes < max_ratio * span.nbytes


def test_only_linear_layers_are_quantized(model):
    import bitsandbytes as bnb

    path, _ = model
    q = LoadedBlocks.load(path, 0, 1, quant="nf4")
    kinds = {type(m) for m in q.blocks.modules()}
    assert bnb.nn.Linear4bit in kinds
    assert torch.nn.Linear not in kinds
    norms = [m for m in q.blocks.modules() if "Norm" in type(m).__name__]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())


def test_nf4_equals_float_with_dequantized_weights(model):
    """The NF4 span computes exactly what a float span with its dequantized weights computes, so
    every quantized weight sits in the right place (no transposed or swapped matrices)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    path, _ = model
    q = LoadedBlocks.load(path, 0, 4, quant="nf4")
    f = LoadedBlocks.load(path, 0, 4)
    qmods = dict(q.blocks.named_modules())
    with torch.no_grad():
        for name, module in f.blocks.named_modules():
            if isinstance(module, torch.nn.Linear):
                ql = qmods[name]
                assert isinstance(ql, bnb.nn.Linear4bit)
                module.weight.copy_(bf.dequantize_4bit(ql.weight.data, ql.weight.quant_state))
    x = torch.randn(1, 7, f.config.hidden_size)
    expected = f.forward(x)
    assert (q.forward(x) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_quantized_bfloat16(model):
    path, span = model
    x = torch.randn(1, 5, span.config.hidden_size)
    for quant in ("int8", "nf4"):
        q = LoadedBlocks.load(path, 0, 4, quant=quant, dtype=torch.bfloat16)
        out = q.forward(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert rel(out, span.forward(x)) < TOLERANCE[quant] + 0.05
