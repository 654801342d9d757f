"""Incremental detokenization: each new token's text in O(1) decoding work, not O(length).

`tokenizers.decoders.DecodeStream` decodes a sliding window of recent tokens and holds back
bytes of a character still being spelled (byte-level BPE and byte fallback split characters
across tokens). The stream starts from the prompt's last tokens, so the continuation's first
piece reads as it does after the prompt (" the", not SentencePiece's stripped "the").
`SequenceText` puts it together with the stop strings of `stopping`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .stopping import StopStrings

CONTEXT_TOKENS = 8  # prompt tokens the stream starts from


class Detokenizer:
    """Text of one output sequence, piece by piece; the pieces add up to its whole decode."""

    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.context = list(context[-CONTEXT_TOKENS:])
        self._stream = DecodeStream(ids=self.context or None, skip_special_tokens=True)
        self.ids: list[int] = []
        self._pieces: list[str] = []  # what push has returned so far
        self._pending = 0  # tokens pushed since the stream last produced text

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        piece = self._stream.step(self.tokenizer, token_id)
        if piece is None:
            self._pending += 1
            return ""
        self._pending = 0
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """At the end: what the stream still holds (an incomplete character decodes to U+FFFD)."""
        if not self._pending:
            return ""
        self._pending = 0
        whole = self._decode(self.context + self.ids)
        before = self._decode(self.context)
        so_far = "".join(self._pieces)
        if not whole.startswith(before) or not whole[len(before) :].startswith(so_far):
            return ""
        rest = whole[len(before) + len(so_far) :]
        self._pieces = [so_far, rest]
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class SequenceText:
    """The text of one output sequence: detokenized, then cut at the first stop string."""

    def __init__(self, tokenizer, context: Sequence[int], stops: Sequence[str]) -> None:
        self._detok = Detokenizer(tokenizer, context) if tokenizer is not None else None
        self._stops = StopStrings(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def text(self) -> str:
        return self._stops.text

    def push(self, token_id: int) -> str:
        """The text to show after this token (possibly "")."""
        if self._detok is None or self.stopped:
            return ""
        return self._stops.push(self._detok.push(token_id))

    def finish(self) -> str:
        """The text still held back, shown with the sequence's last token."""
        if self._detok is None or self.stopped:
            return ""
        piece = self._stops.push(self._detok.flush())
        return piece + ("" if self.stopped else self._stops.flush())
