"""The generation engine of peerd: one loop for the daemon, the torch client, demo and benchmarks.

A sans-IO state machine (`Generation`) over batches of prompts: greedy decoding, sampling
(temperature, top-k, top-p, min-p, repetition penalty; reproducible with a seed) and beam
search, with transformers' meanings and results; EOS ids, max_new_tokens and stop strings;
incremental detokenization. It imports torch and tokenizers only: no trio, no networking.
"""

from .drive import generate_sync, run_async, run_sync
from .engine import Generation
from .local import LocalStep, embed_request, last_logits
from .params import GenerationParams, defaults_for
from .types import PromptResult, SequenceResult, StepRequest, TokenEvent, Update

__all__ = [
    "Generation",
    "GenerationParams",
    "LocalStep",
    "PromptResult",
    "SequenceResult",
    "StepRequest",
    "TokenEvent",
    "Update",
    "defaults_for",
    "embed_request",
    "generate_sync",
    "last_logits",
    "run_async",
    "run_sync",
]
