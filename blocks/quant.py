"""Weight quantization of a block's linear layers with bitsandbytes: LLM.int8 or NF4.

Recipe (measured, see TORCH-CPU-NOTES.md): build the bnb layer around the *float* weights, then
`.to(device)` quantizes them (on CPU too); `.eval()` selects the real LLM.int8 path. Loading
float weights into an already-quantized layer silently truncates them, so the order matters.
Only the big linear layers of blocks are quantized: norms and embeddings stay in float.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import InputError

QUANTS = ("none", "int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8: input columns with an outlier above this stay in float


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise InputError(f"quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    return quant


def quantize_linears(module: nn.Module, quant: str, device: torch.device | str) -> nn.Module:
    """Replace every nn.Linear inside `module` (holding float weights) by its bnb twin, then move
    the module to `device`, which quantizes. Returns the module in eval mode."""
    if check_quant(quant) == "none":
        return module.to(device).eval()
    import bitsandbytes as bnb

    # bnb logs "inputs will be cast from float32 to float16" on every int8 forward.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _bnb_linear(bnb, child, quant))
    return module.to(device).eval()


def _bnb_linear(bnb, linear: nn.Linear, quant: str) -> nn.Module:
    weight = linear.weight.data
    has_bias = linear.bias is not None
    args = (linear.in_features, linear.out_features, has_bias)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(
            *args, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            *args,
            compute_dtype=weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        # On CPUs with AVX512-BF16, bnb >= 0.49 repacks the weight at the first no-grad forward
        # and from then on computes in bfloat16 (~1e-2 error on top of NF4's) with a kernel that
        # has no autograd (gradients through it are silently wrong) and that refuses shapes not
        # divisible by its tile. Keep the dequantize-then-matmul path, exact and differentiable.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer
