"""What the engine and its driver hand each other: step requests, token events, results."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True, eq=False)
class StepRequest:
    """One step for the caller to run: embed `input_ids`, run every block, return the logits
    of each row's last position as [rows, vocab].

    `input_ids` [rows, T] are the new tokens (the first request holds the whole left-padded
    prompt batch, later ones one token per row) at absolute positions past_length..; row r's
    first `pad_lengths[r]` positions are padding to mask out (None when no row is padded; the
    same tuple for the whole generation). With `reorder` (beam search), new row i continues old
    row reorder[i]: apply it to every KV cache before running this step.
    """

    input_ids: Tensor
    past_length: int
    pad_lengths: tuple[int, ...] | None
    reorder: Tensor | None
    rows: int


@dataclass(frozen=True)
class TokenEvent:
    """A token of output sequence `sequence` of prompt `prompt_index`, and the text it adds.

    `text` may be "" (a character still incomplete, text held back for a possible stop
    string, a special token); the texts of a sequence's events add up to its whole text.
    `finish_reason` is set on a sequence's last event.
    """

    prompt_index: int
    token_id: int
    text: str
    sequence: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True, eq=False)
class Update:
    """What one `feed` produced: events to stream and the next step (None: generation over)."""

    events: list[TokenEvent]
    next: StepRequest | None


@dataclass(frozen=True)
class SequenceResult:
    """One output sequence: new token ids, its text, why it ended, its beam score if any."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "eos" | "stop"
    score: float | None = None  # beam search: log-probability / length ** length_penalty


@dataclass(frozen=True)
class PromptResult:
    """The output of one prompt: its sequences, best first (num_return_sequences of them)."""

    prompt_ids: list[int]
    sequences: list[SequenceResult] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The new ids of the best sequence."""
        return self.sequences[0].token_ids

    @property
    def full_ids(self) -> list[int]:
        """Prompt and new ids of the best sequence."""
        return self.prompt_ids + self.sequences[0].token_ids

    @property
    def text(self) -> str:
        return self.sequences[0].text

    @property
    def finish_reason(self) -> str:
        return self.sequences[0].finish_reason
