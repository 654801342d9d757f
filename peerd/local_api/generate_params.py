"""How the daemon reads a `Generate` request: the wire's fields as `GenerationParams`.

What a request gives wins; what it leaves out (None) follows the checkpoint's
generation_config.json, then transformers' defaults. One shortcut: a temperature given without
`do_sample` decides it — sampling when > 0, greedy decoding when 0 (OpenAI's convention).
"""

from __future__ import annotations

from pathlib import Path

from peerd.generation import GenerationParams
from wire import local as api


def params_for_request(request: api.Generate, checkpoint: str | Path) -> GenerationParams:
    """Raises ValueError for combinations the engine refuses."""
    do_sample = request.do_sample
    if do_sample is None and request.temperature is not None:
        do_sample = request.temperature > 0
    return GenerationParams.from_checkpoint(
        checkpoint,
        max_new_tokens=request.max_new_tokens,
        do_sample=do_sample,
        temperature=request.temperature if request.temperature else None,
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
