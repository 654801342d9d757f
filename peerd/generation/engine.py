"""`Generation`: the one embed → step → pick loop of peerd, as a sans-IO state machine.

It never runs a model: it says what to run (`StepRequest`) and takes the logits back, so the
torch client, the demo, the benchmarks (synchronous) and the daemon (trio) drive it alike:

    gen = Generation(prompts, params, tokenizer=tok, vocab_size=parts.config.vocab_size)
    req = gen.first_request()
    while req is not None:
        update = gen.feed(step(req))       # step: embed, blocks, LM head -> [rows, vocab]
        for event in update.events: ...    # stream TokenEvents
        req = update.next
    results = gen.result()                 # one PromptResult per prompt

Caches for a generation hold `gen.rows` sequences of up to `gen.max_length` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .beam import BeamSearch
from .layout import RowLayout
from .params import GenerationParams
from .sampler import Sampler
from .types import PromptResult, StepRequest, Update


class Generation:
    """Generation for a batch of prompts; greedy, sampling or beam search as `params` say."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        *,
        tokenizer=None,
        vocab_size: int,
    ) -> None:
        if not isinstance(params, GenerationParams):
            raise ValueError(f"params must be GenerationParams; got {type(params).__name__}")
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the text is what they are found in)")
        beams = params.num_beams > 1
        copies = params.num_beams if beams else params.num_return_sequences
        self.params = params
        self.vocab_size = vocab_size
        self.layout = RowLayout(prompts, copies, params.pad_id, vocab_size)
        strategy = BeamSearch if beams else Sampler
        self._strategy = strategy(self.layout, params, tokenizer)
        self._expected: StepRequest | None = None
        self._started = False

    # ----- what the caller allocates ---------------------------------------------------------
    @property
    def rows(self) -> int:
        """Sequences every step runs (prompts × beams, or × num_return_sequences when sampling)."""
        return self.layout.rows

    @property
    def prompt_length(self) -> int:
        """Length of the left-padded prompt batch (the first request's width)."""
        return self.layout.length

    @property
    def max_length(self) -> int:
        """Positions a KV cache needs: padded prompt plus max_new_tokens."""
        return self.layout.length + self.params.max_new_tokens

    @property
    def pad_lengths(self) -> tuple[int, ...] | None:
        return self.layout.pad_lengths

    @property
    def done(self) -> bool:
        return self._strategy.done

    # ----- the loop --------------------------------------------------------------------------
    def first_request(self) -> StepRequest:
        if self._started:
            raise RuntimeError("first_request() was already called for this generation")
        self._started = True
        self._expected = self._strategy.first_request()
        return self._expected

    def feed(self, logits: Tensor) -> Update:
        """The logits [rows, vocab] of the last position of the step just run."""
        if self._expected is None:
            raise RuntimeError(
                "feed() needs a pending step: call first_request() first"
                if not self._started
                else "this generation is over: no step is pending"
            )
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a [rows, vocab] tensor; got {got}")
        if tuple(logits.shape) != (self.rows, self.vocab_size):
            raise ValueError(
                f"logits must have shape [{self.rows}, {self.vocab_size}] (rows, vocab); "
                f"got {tuple(logits.shape)}"
            )
        update = self._strategy.feed(logits)
        self._expected = update.next
        return update

    def result(self) -> list[PromptResult]:
        """Per prompt: its sequences (best first), each with new ids, text and finish_reason."""
        if not self.done:
            raise RuntimeError("the generation is not over yet: feed it until next is None")
        return self._strategy.result()
