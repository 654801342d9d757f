"""Field specs: the type and range of each message field, checked in both directions.

A spec validates the Python value (when a message is built locally, so a bad message fails
at the sender) and converts it to and from its wire form (only tensors differ).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from .errors import ErrorCode, WireError, bad_request
from .guard import MAX_DEPTH
from .names import COMPRESSIONS, FLOATING_DTYPES, MAX_NDIM

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
MAX_LIST = 4096


_decode_room: ContextVar[list[int] | None] = ContextVar("decode_room", default=None)


@contextmanager
def decoded_bytes_limit(limit: int | None) -> Iterator[None]:
    """Within this block, the tensors decoded (all together) may take at most `limit` bytes.

    `parse_message` sets it to the receiver's frame cap: a frame's tensors can expand many
    times over once decoded (int8 codes declared as float64), and that must not let a peer
    make us allocate more than the frame cap allows."""
    token = _decode_room.set(None if limit is None else [limit])
    try:
        yield
    finally:
        _decode_room.reset(token)


class Spec:
    """Base spec: subclasses implement `check`; tensors also override the conversions."""

    def check(self, where: str, value: Any) -> None:
        raise NotImplementedError

    def to_wire(self, value: Any, compression: str) -> Any:
        return value

    def from_wire(self, where: str, value: Any) -> Any:
        self.check(where, value)
        return value


class Int(Spec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, where: str, value: Any) -> None:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise bad_request(
                f"{where} must be an integer in [{self.lo}, {self.hi}], got {value!r}"
            )


class Flag(Spec):
    def check(self, where: str, value: Any) -> None:
        if type(value) is not bool:
            raise bad_request(f"{where} must be a boolean, got {value!r}")


class Text(Spec):
    """A str of bounded length, optionally from a fixed set or matching a pattern."""

    def __init__(
        self,
        max_len: int,
        min_len: int = 1,
        choices: tuple[str, ...] | None = None,
        pattern: str | None = None,
    ) -> None:
        self.min_len, self.max_len, self.choices = min_len, max_len, choices
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, where: str, value: Any) -> None:
        if type(value) is not str:
            raise bad_request(f"{where} must be a string, got {type(value).__name__}")
        if self.choices is not None:
            if value not in self.choices:
                raise bad_request(f"{where} must be one of {self.choices}, got {value[:80]!r}")
        elif not self.min_len <= len(value) <= self.max_len:
            raise bad_request(f"{where} must have {self.min_len}..{self.max_len} characters")
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            raise bad_request(f"{where} must match {self.pattern.pattern}, got {value[:80]!r}")


class PlainMap(Spec):
    """A dict with str keys whose values are plain msgpack data (no tensors, no objects)."""

    def check(self, where: str, value: Any) -> None:
        if type(value) is not dict:
            raise bad_request(f"{where} must be a map, got {type(value).__name__}")
        _check_plain(where, value, 1)


class TensorSpec(Spec):
    """A torch.Tensor; `floating` and `ndim` narrow what the field accepts."""

    def __init__(self, floating: bool = True, ndim: int | None = None) -> None:
        self.floating, self.ndim = floating, ndim

    def check(self, where: str, value: Any) -> None:
        torch = sys.modules.get("torch")  # never imported: value cannot be a tensor
        if torch is None or not isinstance(value, torch.Tensor):
            raise bad_request(f"{where} must be a tensor, got {type(value).__name__}")
        if self.floating and not value.dtype.is_floating_point:
            raise bad_request(f"{where} must have a floating dtype, got {value.dtype}")
        if value.dim() > MAX_NDIM or (self.ndim is not None and value.dim() != self.ndim):
            expected = self.ndim if self.ndim is not None else f"at most {MAX_NDIM}"
            raise bad_request(f"{where} must have {expected} dims, got shape {tuple(value.shape)}")

    def to_wire(self, value: Any, compression: str) -> dict[str, Any]:
        from .tensors import encode_tensor  # value is a tensor: torch is loaded already

        return encode_tensor(value, compression)

    def from_wire(self, where: str, value: Any) -> Any:
        try:
            from .tensors import decode_tensor  # torch loads with the first tensor received
        except ImportError as exc:
            raise WireError(ErrorCode.INTERNAL, f"{where}: decoding tensors needs torch") from exc
        room = _decode_room.get()
        try:
            tensor = decode_tensor(value, None if room is None else room[0])
        except WireError as exc:  # say which field held the bad tensor
            raise WireError(exc.code, f"{where}: {exc.message}", exc.details) from None
        if room is not None:
            room[0] -= tensor.nbytes
        self.check(where, tensor)
        return tensor


class ListOf(Spec):
    """A list of at most `max_len` values of the inner spec (msgpack arrays)."""

    def __init__(self, inner: Spec, max_len: int = MAX_LIST) -> None:
        self.inner, self.max_len = inner, max_len

    def check(self, where: str, value: Any) -> None:
        if type(value) not in (list, tuple):
            raise bad_request(f"{where} must be a list, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise bad_request(f"{where} has {len(value)} items, at most {self.max_len} allowed")
        for i, item in enumerate(value):
            self.inner.check(f"{where}[{i}]", item)

    def to_wire(self, value: Any, compression: str) -> Any:
        return [self.inner.to_wire(v, compression) for v in value]

    def from_wire(self, where: str, value: Any) -> Any:
        if type(value) not in (list, tuple):
            raise bad_request(f"{where} must be a list, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise bad_request(f"{where} has {len(value)} items, at most {self.max_len} allowed")
        return [self.inner.from_wire(f"{where}[{i}]", v) for i, v in enumerate(value)]


class Maybe(Spec):
    """The inner spec, or None."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def check(self, where: str, value: Any) -> None:
        if value is not None:
            self.inner.check(where, value)

    def to_wire(self, value: Any, compression: str) -> Any:
        return None if value is None else self.inner.to_wire(value, compression)

    def from_wire(self, where: str, value: Any) -> Any:
        return None if value is None else self.inner.from_wire(where, value)


def wired(spec: Spec, **kwargs: Any) -> Any:
    """A dataclass field carrying its wire spec; kwargs go to dataclasses.field (defaults)."""
    return dataclasses.field(metadata={"wire": spec}, **kwargs)


# specs shared by many messages
COMPRESSION = Text(16, choices=COMPRESSIONS)
MODEL_ID = Text(256)
SESSION_ID = Text(128)
BLOCK = Int(0, 2**16)
COUNTER = Int(0, 2**63 - 1)
HIDDEN = TensorSpec(floating=True, ndim=3)
PROMPTS = Maybe(TensorSpec(floating=True))
PAD_LENGTHS = Maybe(ListOf(Int(0, 2**20), 2**16))
"""Per sequence of a batch, how many positions at its start are padding (left padding)."""
BATCH_INDEX = Maybe(ListOf(Int(0, 2**16 - 1), 2**16))
"""Row i of the result is row index[i] of the source (beam search reordering hypotheses)."""
FRAME_BYTES = Int(1, 2**40)
COMPUTE_DTYPE = Text(16, choices=FLOATING_DTYPES)


def check_batch_list(where: str, values: list[int] | None, batch: int) -> None:
    """A per-row list (pad lengths, reorder index) must have one entry per row of the batch."""
    if values is not None and len(values) != batch:
        raise bad_request(f"{where} has {len(values)} entries for a batch of {batch}")


def _check_plain(where: str, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise bad_request(f"{where} nests deeper than {MAX_DEPTH}")
    if value is None or type(value) in (bool, float, str, bytes):
        return
    if type(value) is int:
        if not INT64_MIN <= value <= UINT64_MAX:
            raise bad_request(f"{where} holds an integer msgpack cannot carry")
    elif type(value) in (list, tuple):
        for item in value:
            _check_plain(where, item, depth + 1)
    elif type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise bad_request(f"{where} keys must be strings, got {key!r}")
            _check_plain(f"{where}.{key[:40]}", item, depth + 1)
    else:
        raise bad_request(f"{where} holds a {type(value).__name__}, not plain data")
