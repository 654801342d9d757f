"""A span: the contiguous blocks [start, end) of one model that a server holds.

`LoadedBlocks.load` reads only those blocks' tensors from an HF checkpoint. Three ways to run them:
`forward` (whole sequences from position 0, no grad), `step` (new tokens appended to a KVCache,
for generation) and `backward` (gradients w.r.t. the inputs and the deep prompts, for clients
that fine-tune; the weights themselves never get gradients and are never modified).

Every method also takes an absolute sub-interval [start, end) of the span, so one loaded span
can serve a client that needs only part of it.

Batches of sequences of different lengths are left-padded (`pad_lengths`, see masks.py), as
transformers' `generate` does: each row then computes, at its real tokens, what it would alone.
`forward` and `backward` take `pad_lengths`; `step` reads them from the cache. Right-padded
batches need no argument (causal attention never looks ahead); callers ignore the pads' outputs.
Deep prompts follow each row's real positions: prompt position p goes to the row's p-th real
token (absolute index p + pad), so a padded row gets the prompt exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .cache import KVCache, cache_bytes_per_token
from .checkpoint import Checkpoint, fresh_copy
from .config import ModelConfig, load_config
from .errors import BlockRangeError, CheckpointError, InputError
from .families import family_of
from .layers import AttnContext
from .masks import as_index, check_pad_lengths
from .prompts import add_prompt, check_prompts
from .quant import check_quant, quantize_linears

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16", "torch.float16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(map(str, DTYPES))}; got {dtype}")
    return dtype


def check_block_range(config: ModelConfig, start: int, end: int) -> tuple[int, int]:
    """(start, end) as ints if they are a non-empty interval of the model's blocks."""
    s, e = as_index(start), as_index(end)
    if s is None or e is None or not 0 <= s < e <= config.num_blocks:
        raise BlockRangeError(
            f"block range [{start}, {end}) is outside the model's blocks [0, {config.num_blocks})"
            " or empty"
        )
    return s, e


class LoadedBlocks:
    """Blocks [start, end) of one model, loaded on one device in one dtype and quantization."""

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        blocks: nn.ModuleList,
        *,
        dtype: torch.dtype,
        device: torch.device,
        quant: str,
    ):
        self.config, self.start, self.end = config, start, end
        self.blocks = blocks
        self.dtype, self.device, self.quant = dtype, torch.device(device), quant
        self._positions = family_of(config).Positions(config, self.device)
        self.nbytes = sum(t.numel() * t.element_size() for t in blocks.state_dict().values())

    @classmethod
    def load(
        cls,
        path: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        quant: str = "none",
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
    ) -> LoadedBlocks:
        """Load blocks [start, end) of the checkpoint at `path`, reading only their tensors
        (the checkpoint's fingerprint, `checkpoint_fingerprint`, still reads every shard once).

        `progress(index)` is called after each block is loaded (e.g. to advance a progress bar).
        """
        config = load_config(path)
        family = family_of(config)
        start, end = check_block_range(config, start, end)
        dtype, quant, device = check_dtype(dtype), check_quant(quant), torch.device(device)
        ckpt = Checkpoint(path)
        layers = ckpt.base_prefix(family.BASE_PREFIXES, family.LAYERS) + family.LAYERS
        blocks = nn.ModuleList()
        for index in range(start, end):
            with torch.device("meta"):
                block = family.Block(config)
            prefix = f"{layers}.{index}."
            _load_state(block, ckpt, prefix, dtype)
            blocks.append(quantize_linears(block, quant, device))
            if progress is not None:
                progress(index)
        return cls(config, start, end, blocks, dtype=dtype, device=device, quant=quant)

    def __repr__(self) -> str:
        return (
            f"LoadedBlocks({self.config.model_type}, blocks [{self.start}, {self.end}), {self.dtype}, "
            f"quant={self.quant}, {self.device})"
        )

    # -- memory -------------------------------------------------------------------------------

    def cache_bytes_per_token(
        self, batch_size: int = 1, start: int | None = None, end: int | None = None
    ) -> int:
        """KV-cache bytes one more token position costs over the blocks of [start, end)."""
        start, end = self._interval(start, end)
        return cache_bytes_per_token(self.config, self.dtype, end - start, batch_size)

    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        start: int | None = None,
        end: int | None = None,
        *,
        pad_lengths: Sequence[int] | None = None,
    ) -> KVCache:
        """Allocate a session's cache for blocks [start, end) now, all `max_length` positions of it
        (its `nbytes` is exactly what `cache_bytes_per_token(batch_size, start, end) * max_length` said).

        `pad_lengths`: left padding of each row (ints in [0, max_length)), honoured by `step`.
        """
        start, end = self._interval(start, end)
        return KVCache(
            self.config,
            start,
            end,
            batch_size,
            max_length,
            self.dtype,
            self.device,
            pad_lengths=pad_lengths,
        )

    # -- compute ------------------------------------------------------------------------------

    def forward(
        self,
        hidden: Tensor,
        prompts: Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
        *,
        pad_lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """Run blocks [start, end) over whole sequences [B, T, H] starting at position 0.

        `pad_lengths`: left padding of each row (ints in [0, T)); pads' outputs are meaningless.
        """
        start, end = self._interval(start, end)
        x = self._check_hidden(hidden, "hidden")
        pads = check_pad_lengths(pad_lengths, x.shape[0], x.shape[1])
        prompts = self._prompts(prompts, end - start, x)
        with torch.no_grad():
            ctx = self._positions(0, x.shape[1], self.dtype, pads)
            return self._run(x, start, end, ctx, prompts)

    def step(self, hidden: Tensor, cache: KVCache, prompts: Tensor | None = None) -> Tensor:
        """Run the cache's blocks over T >= 1 new tokens at positions cache.length.., appending
        their keys and values. The cache advances only if the whole step succeeds.
        Rows are left-padded by cache.pad_lengths (set at `new_cache`, permuted by `reorder`)."""
        if not isinstance(cache, KVCache):
            raise InputError(f"cache must be a KVCache; got {type(cache).__name__}")
        self._interval(cache.start, cache.end)
        if cache.dtype != self.dtype or cache.device != self.device:
            raise InputError(
                f"cache holds {cache.dtype} on {cache.device}; this span runs {self.dtype} on {self.device}"
            )
        x = self._check_hidden(hidden, "hidden")
        batch, length = x.shape[:2]
        if batch != cache.batch_size:
            raise InputError(
                f"hidden has batch size {batch}; the cache was made for {cache.batch_size}"
            )
        if cache.length + length > cache.max_length:
            raise InputError(
                f"{length} new tokens after {cache.length} cached exceed the cache's max_length "
                f"{cache.max_length}"
            )
        prompts = self._prompts(prompts, cache.end - cache.start, x, in_step=True)
        with torch.no_grad():
            ctx = self._positions(cache.length, length, self.dtype, cache.pad_lengths)
            out = self._run(x, cache.start, cache.end, ctx, prompts, cache)
        cache.length += length
        return out

    def backward(
        self,
        hidden: Tensor,
        grad_out: Tensor,
        prompts: Tensor | None = None,
        start: int | None = None,
        end: int | None = None,
        *,
        pad_lengths: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients of <forward(hidden, prompts, pad_lengths=...), grad_out> w.r.t. hidden and
        prompts. Recomputes the forward pass (the server keeps no activations between calls).

        With `pad_lengths` a row's real outputs do not depend on its pads, so zeroing grad_out on
        the pads gives each row exactly the gradients it would get alone.
        """
        start, end = self._interval(start, end)
        x = self._check_hidden(hidden, "hidden")
        pads = check_pad_lengths(pad_lengths, x.shape[0], x.shape[1])
        grad_out = self._check_hidden(grad_out, "grad_out")
        if grad_out.shape != x.shape:
            raise InputError(
                f"grad_out must have the shape of hidden {tuple(x.shape)}; got {tuple(grad_out.shape)}"
            )
        prompts = self._prompts(prompts, end - start, x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            inputs = [x]
            if prompts is not None:
                prompts = prompts.detach().requires_grad_(True)
                inputs.append(prompts)
            ctx = self._positions(0, x.shape[1], self.dtype, pads)
            out = self._run(x, start, end, ctx, prompts)
            grads = torch.autograd.grad(out, inputs, grad_out)
        return grads[0], (grads[1] if prompts is not None else None)

    def _run(
        self,
        x: Tensor,
        start: int,
        end: int,
        ctx: AttnContext,
        prompts: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        for index in range(start, end):
            if prompts is not None:
                x = add_prompt(x, prompts[index - start], ctx.pos, ctx.pads)
            kv = None
            if cache is not None:
                kv = (cache.keys[index - cache.start], cache.values[index - cache.start])
            x = self.blocks[index - self.start](x, ctx, kv)
        return x

    # -- validation -----------------------------------------------------------------------------

    def _interval(self, start: int | None, end: int | None) -> tuple[int, int]:
        s = self.start if start is None else as_index(start)
        e = self.end if end is None else as_index(end)
        if s is None or e is None or not self.start <= s < e <= self.end:
            raise BlockRangeError(
                f"blocks [{start}, {end}) are not a non-empty part of this span's "
                f"[{self.start}, {self.end})"
            )
        start, end = s, e
        return start, end

    def _check_hidden(self, hidden: Tensor, name: str) -> Tensor:
        h = self.config.hidden_size
        if not isinstance(hidden, Tensor):
            raise InputError(f"{name} must be a tensor; got {type(hidden).__name__}")
        if hidden.dim() != 3 or hidden.shape[-1] != h or hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise InputError(
                f"{name} must have shape [batch, tokens, {h}]; got {tuple(hidden.shape)}"
            )
        if hidden.dtype != self.dtype:
            raise InputError(f"{name} must be {self.dtype}; got {hidden.dtype}")
        return hidden.to(self.device)

    def _prompts(
        self, prompts: Tensor | None, num_blocks: int, x: Tensor, in_step: bool = False
    ) -> Tensor | None:
        return check_prompts(
            prompts, num_blocks, x, self.config.hidden_size, self.dtype, self.device, in_step
        )


def _load_state(block: nn.Module, ckpt: Checkpoint, prefix: str, dtype: torch.dtype) -> None:
    """Read the block's tensors (names = checkpoint names minus `prefix`) into the meta-built block."""
    expected = block.state_dict()
    tensors = ckpt.read([prefix + name for name in expected])
    state = {}
    for name, meta in expected.items():
        tensor = tensors[prefix + name]
        if tensor.shape != meta.shape:
            raise CheckpointError(
                f"tensor {prefix + name!r} has shape {tuple(tensor.shape)}; the config implies "
                f"{tuple(meta.shape)}"
            )
        state[name] = fresh_copy(tensor, dtype)
    block.load_state_dict(state, assign=True)
    block.requires_grad_(False)
