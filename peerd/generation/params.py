"""The knobs of one generation, with transformers' names, meanings and defaults.

Where a value comes from, strongest first: what the caller passed, the checkpoint's
`generation_config.json` (EOS and pad ids fall back to `config.json`, as transformers does for
checkpoints without one), then transformers' documented defaults (the dataclass defaults here).
Llama 3 lists several EOS ids; generation stops at any of them.

One deliberate difference: `max_new_tokens` defaults to 20 new tokens, where transformers'
fallback is `max_length=20` tokens in all; a `max_length` in generation_config.json is ignored.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# generation_config.json keys we read, by our field name (transformers calls `stop` stop_strings).
_JSON_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "stop_strings": "stop",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "num_beams": "num_beams",
    "length_penalty": "length_penalty",
    "early_stopping": "early_stopping",
    "num_return_sequences": "num_return_sequences",
}


@dataclass(frozen=True)
class GenerationParams:
    """What to generate and how; invalid combinations raise ValueError at construction."""

    max_new_tokens: int = 20
    do_sample: bool = False  # False: greedy (or beam search when num_beams > 1)
    temperature: float = 1.0  # only when sampling
    top_k: int = 50  # only when sampling; 0 keeps every token
    top_p: float = 1.0  # only when sampling
    min_p: float | None = None  # only when sampling
    repetition_penalty: float = 1.0  # CTRL's penalty on every token already in the sequence
    stop: tuple[str, ...] = ()  # stop when the text contains one; the text ends before it
    eos_token_id: tuple[int, ...] = ()  # an int or a list is accepted; () never stops at EOS
    pad_token_id: int | None = None  # fed to finished rows; defaults to the first EOS id, else 0
    seed: int | None = None  # sampling draws from torch.Generator().manual_seed(seed)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "eos_token_id", _id_tuple(self.eos_token_id, "eos_token_id"))
        set_(self, "stop", _stop_tuple(self.stop))
        self._validate()

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> GenerationParams:
        """Parameters for the checkpoint in `path`; keyword arguments that are not None win."""
        return cls.merged(defaults_for(path), **overrides)

    @classmethod
    def merged(cls, defaults: dict[str, Any], **overrides: Any) -> GenerationParams:
        """`defaults` (e.g. from `defaults_for`) under `overrides`; a None override is "not given"."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown generation parameter(s): {', '.join(unknown)}")
        values = {k: v for k, v in defaults.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # ----- derived -------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        """The token fed to finished rows and used as left padding."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    # ----- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        _int(self.max_new_tokens, "max_new_tokens", 1)
        _int(self.top_k, "top_k", 0)
        _int(self.num_beams, "num_beams", 1)
        _int(self.num_return_sequences, "num_return_sequences", 1)
        if self.pad_token_id is not None:
            _int(self.pad_token_id, "pad_token_id", 0)
        if self.seed is not None:
            _int(self.seed, "seed", 0)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False; got {self.do_sample!r}")
        _float(self.temperature, "temperature")
        if self.temperature < 0 or (self.do_sample and self.temperature == 0):
            raise ValueError(
                f"temperature must be > 0 when sampling; got {self.temperature} "
                "(for greedy decoding pass do_sample=False)"
            )
        if not 0.0 <= _float(self.top_p, "top_p") <= 1.0:
            raise ValueError(f"top_p must be in [0, 1]; got {self.top_p}")
        if self.min_p is not None and not 0.0 <= _float(self.min_p, "min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1]; got {self.min_p}")
        if not _float(self.repetition_penalty, "repetition_penalty") > 0:
            raise ValueError(f"repetition_penalty must be > 0; got {self.repetition_penalty}")
        _float(self.length_penalty, "length_penalty")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never'; got {self.early_stopping!r}"
            )
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                    f"({self.num_beams})"
                )
            if self.stop:
                raise ValueError("stop strings are not supported with beam search (num_beams > 1)")
        elif not self.do_sample and self.num_return_sequences != 1:
            raise ValueError(
                "greedy decoding returns one sequence per prompt: num_return_sequences > 1 "
                "needs do_sample=True or num_beams > 1"
            )


def defaults_for(path: str | Path) -> dict[str, Any]:
    """The generation defaults a checkpoint states: generation_config.json, EOS/pad from config.json."""
    path = Path(path)
    gen = _read_json(path / "generation_config.json")
    out = {ours: gen[theirs] for theirs, ours in _JSON_KEYS.items() if gen.get(theirs) is not None}
    if "eos_token_id" not in out or "pad_token_id" not in out:
        config = _read_json(path / "config.json")
        for key in ("eos_token_id", "pad_token_id"):
            if key not in out and config.get(key) is not None:
                out[key] = config[key]
    pad = out.get("pad_token_id")
    if isinstance(pad, list):  # some configs list one pad id
        pad = out["pad_token_id"] = pad[0] if pad else None
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0):
        out.pop("pad_token_id", None)  # e.g. LLaMA-1's -1: no pad id, the EOS id serves
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {number}")
    return number


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return float(value)


def _id_tuple(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items: Iterable[Any] = value if isinstance(value, list | tuple | set | frozenset) else [value]
    ids = tuple(_int(v, name, 0) for v in items)
    return tuple(dict.fromkeys(ids))  # unique, order kept


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"stop strings must be non-empty strings; got {item!r}")
    return tuple(items)
