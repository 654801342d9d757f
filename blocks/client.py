"""Client-side parts of a model: what a client keeps while servers run the blocks.

Embeddings turn token ids into the first block's input (BLOOM adds its embedding LayerNorm,
OPT its learned positions, which is why `embed` takes the number of tokens already processed);
`logits` applies the final norm and the LM head. With left-padded rows (`pad_lengths`, see
masks.py) OPT's positions count from each row's first real token. Both stay differentiable w.r.t. their float
inputs so a client can fine-tune prompts end to end; the weights never require grad.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import Checkpoint, fresh_copy
from .config import ModelConfig, load_config
from .errors import CheckpointError, InputError
from .families import family_of
from .masks import check_pad_lengths, pad_tensor
from .span import check_dtype

HEAD_PREFIX = "lm_head."


class ClientParts:
    """Embeddings, final norm and LM head of one model."""

    def __init__(self, config: ModelConfig, module: nn.Module, dtype: torch.dtype, device):
        self.config, self.module = config, module
        self.dtype, self.device = dtype, torch.device(device)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ClientParts:
        """Read only the client-side tensors; the head falls back to the embeddings when tied."""
        config = load_config(path)
        family = family_of(config)
        dtype = check_dtype(dtype)
        ckpt = Checkpoint(path)
        base = ckpt.base_prefix(family.BASE_PREFIXES, family.LAYERS)
        with torch.device("meta"):
            module = family.Client(config, tied=config.tie_word_embeddings)
        expected = module.state_dict()
        names = {n: n if n.startswith(HEAD_PREFIX) else base + n for n in expected}
        tensors = ckpt.read(list(names.values()))
        state = {}
        for name, meta in expected.items():
            tensor = tensors[names[name]]
            if tensor.shape != meta.shape:
                raise CheckpointError(
                    f"tensor {names[name]!r} has shape {tuple(tensor.shape)}; the config implies "
                    f"{tuple(meta.shape)}"
                )
            state[name] = fresh_copy(tensor, dtype)
        module.load_state_dict(state, assign=True)
        module.requires_grad_(False)
        return cls(config, module.to(device).eval(), dtype, device)

    def embed(
        self,
        input_ids: Tensor,
        past_length: int = 0,
        *,
        pad_lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """Token ids [B, T] at absolute positions past_length.. -> first block's input [B, T, H].

        `pad_lengths`: left padding of each row (ints >= 0), the same as given to the span; OPT's
        learned positions are then absolute - pad (0 on the pads), others ignore it.
        """
        vocab = self.config.vocab_size
        if not isinstance(input_ids, Tensor):
            raise InputError(f"input_ids must be a tensor; got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise InputError(
                f"input_ids must have shape [batch, tokens]; got {tuple(input_ids.shape)}"
            )
        if (
            input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex
            or input_ids.dtype == torch.bool
        ):
            raise InputError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InputError(
                f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if not isinstance(past_length, int) or past_length < 0:
            raise InputError(f"past_length must be an int >= 0; got {past_length!r}")
        pad_lengths = check_pad_lengths(pad_lengths, input_ids.shape[0])
        limit = self.config.max_position_embeddings
        top = past_length + input_ids.shape[1] - (min(pad_lengths) if pad_lengths else 0)
        if self.config.family == "opt" and top > limit:
            raise InputError(f"positions up to {top} exceed OPT's {limit} learned positions")
        pads = pad_tensor(pad_lengths, self.device)
        return self.module.embed(input_ids.long().to(self.device), past_length, pads)

    def logits(self, hidden: Tensor) -> Tensor:
        """Last block's output [B, T, H] -> logits [B, T, vocab] (final norm + LM head)."""
        h = self.config.hidden_size
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != h:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise InputError(f"hidden must have shape [batch, tokens, {h}]; got {got}")
        if hidden.dtype != self.dtype:
            raise InputError(f"hidden must be {self.dtype}; got {hidden.dtype}")
        return self.module.logits(hidden.to(self.device))
