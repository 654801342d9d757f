"""How many blocks of a model fit in this machine's free memory, next to their KV cache."""

from __future__ import annotations

import logging
from typing import Protocol

import psutil
import torch

from blocks import ModelConfig
from blocks.families import family_of

log = logging.getLogger("peerd.serve")

BYTES_PER_PARAM = {"none": None, "int8": 1.0, "nf4": 0.56}  # measured, TORCH-CPU-NOTES.md
MEMORY_HEADROOM = 0.8  # use at most this share of free memory for weights and cache


class _Sizing(Protocol):
    device: str
    dtype: str
    quant: str

    @property
    def limits(self): ...


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def block_bytes(config: ModelConfig, dtype: str, quant: str) -> float:
    """Weight bytes of one block in `dtype` under `quant`."""
    with torch.device("meta"):
        block = family_of(config).Block(config)
    params = sum(p.numel() for p in block.parameters())
    per_param = BYTES_PER_PARAM.get(quant) or getattr(torch, dtype).itemsize
    return params * per_param


def cache_bytes_per_token_per_block(config: ModelConfig, dtype: str) -> int:
    return 2 * config.num_kv_heads * config.head_dim * getattr(torch, dtype).itemsize


def blocks_that_fit(config: ModelConfig, options: _Sizing) -> int:
    """How many blocks fit in free memory after reserving the KV-cache budget (at least 1)."""
    free = free_bytes(torch.device(options.device))
    per_block = block_bytes(config, options.dtype, options.quant)
    cache = options.limits.cache_tokens * cache_bytes_per_token_per_block(config, options.dtype)
    fit = int(free * MEMORY_HEADROOM // (per_block + cache))
    log.info(
        "%.1f GiB free: room for %d blocks of %.0f MiB (+ %.0f MiB cache each)",
        free / 2**30,
        fit,
        per_block / 2**20,
        cache / 2**20,
    )
    return max(1, fit)


def span_bytes(config: ModelConfig, options: _Sizing, num_blocks: int) -> float:
    """Memory a span of `num_blocks` takes once loaded: weights plus its KV-cache budget."""
    per_block = block_bytes(config, options.dtype, options.quant)
    cache = options.limits.cache_tokens * cache_bytes_per_token_per_block(config, options.dtype)
    return num_blocks * (per_block + cache)


def span_fits(config: ModelConfig, options: _Sizing, num_blocks: int) -> bool:
    """Whether a span of `num_blocks` fits in the memory free now (within the headroom):
    a server that moves loads its new span beside the old one only when it does."""
    need = span_bytes(config, options, num_blocks)
    free = free_bytes(torch.device(options.device))
    log.info(
        "a span of %d blocks needs %.0f MiB; %.0f MiB free", num_blocks, need / 2**20, free / 2**20
    )
    return need <= free * MEMORY_HEADROOM
