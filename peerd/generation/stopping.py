"""When a sequence ends, in one place: EOS ids, max_new_tokens, stop strings.

A sequence that produces an EOS id ends with reason "eos" (the EOS token is kept in its ids,
as transformers keeps it); one whose text comes to contain a stop string ends with "stop" and
its text is cut just before the stop string (as OpenAI's `stop` does; the ids keep the token
that completed it); one that reaches max_new_tokens ends with "length". The first that applies,
in that order, names the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .params import GenerationParams

EOS, STOP, LENGTH = "eos", "stop", "length"


class StopRules:
    """The token-level rules (EOS, length); the text-level one is `StopStrings`."""

    def __init__(self, params: GenerationParams) -> None:
        self.eos = frozenset(params.eos_token_id)
        self._eos_tensor = torch.tensor(params.eos_token_id, dtype=torch.long)
        self.max_new_tokens = params.max_new_tokens
        self.stops = params.stop

    def reason(self, token_id: int, generated: int, text_stopped: bool = False) -> str | None:
        """Why a sequence ends after its `generated`-th token `token_id`, or None."""
        if token_id in self.eos:
            return EOS
        if text_stopped:
            return STOP
        if generated >= self.max_new_tokens:
            return LENGTH
        return None

    def hits(self, tokens: Tensor, generated: int) -> Tensor:
        """Bool per token of a tensor of candidate `generated`-th tokens: does it end the sequence."""
        done = torch.isin(tokens, self._eos_tensor.to(tokens.device))
        if generated >= self.max_new_tokens:
            done = torch.ones_like(done)
        return done


class StopStrings:
    """Finds the first stop string in streamed text; releases only text that cannot begin one.

    Work per piece is O(piece + longest stop string): only the text held back and the last
    characters released are searched.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._overlap = max((len(s) for s in self.stops), default=1) - 1
        self._released: list[str] = []
        self._window = ""  # the last `_overlap` characters released
        self._held = ""  # text that could be the start of a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        """What was released so far (all of the text, cut at the stop, once finished)."""
        return "".join(self._released)

    def push(self, piece: str) -> str:
        """Text safe to show now; once a stop string is found, `stopped` is True."""
        if self.stopped:
            return ""
        if not self.stops:
            return self._release(piece)
        buffer = self._held + piece
        haystack = self._window + buffer
        found = [i for i in (haystack.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return self._release(buffer[: max(0, min(found) - len(self._window))])
        keep = self._held_back(buffer)
        self._held = buffer[len(buffer) - keep :]
        return self._release(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """At the end without a stop string: what was held back."""
        held, self._held = self._held, ""
        return self._release(held)

    def _held_back(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that a stop string starts with."""
        for n in range(min(self._overlap, len(buffer)), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, piece: str) -> str:
        if piece:
            self._released.append(piece)
            if self._overlap:
                self._window = (self._window + piece)[-self._overlap :]
        return piece
