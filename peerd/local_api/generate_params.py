"""How the daemon reads a `Generate` request: the wire's fields as `GenerationParams`.

The wire keeps its first meanings, so old scripts get what they got: temperature 0 (the
default) is greedy decoding and top_k 0 keeps every token. What the request leaves open (EOS
and pad ids, unless it lists `eos_token_id`) comes from the checkpoint's generation config.
"""

from __future__ import annotations

from pathlib import Path

from peerd.generation import GenerationParams
from wire import local as api


def params_for_request(request: api.Generate, checkpoint: str | Path) -> GenerationParams:
    """Raises ValueError for combinations the engine refuses."""
    do_sample = request.do_sample if request.do_sample is not None else request.temperature > 0
    return GenerationParams.from_checkpoint(
        checkpoint,
        max_new_tokens=request.max_new_tokens,
        do_sample=do_sample,
        temperature=request.temperature if request.temperature > 0 else None,
        top_k=request.top_k,
        top_p=request.top_p,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        stop=tuple(request.stop) or None,
        seed=request.seed,
        num_beams=request.num_beams,
        length_penalty=request.length_penalty,
        eos_token_id=request.eos_token_id,  # None: the checkpoint's; []: none
    )
