"""What a client daemon holds of a model: embeddings, final norm, LM head and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blocks import ClientParts


@dataclass
class LocalModel:
    """What a client daemon holds of a model: embeddings, final norm, LM head, tokenizer."""

    path: Path
    parts: ClientParts
    tokenizer: object | None  # tokenizers.Tokenizer, when the checkpoint has tokenizer.json

    @classmethod
    def load(cls, path: str | Path) -> LocalModel:
        path = Path(path)
        parts = ClientParts.load(path)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        return cls(path=path, parts=parts, tokenizer=tokenizer)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.parts.config.raw.get("eos_token_id")
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}
