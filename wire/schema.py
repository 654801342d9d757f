"""Versioned messages: a base dataclass, a registry keyed by "type", one dispatcher.

Every message on the wire is a map {"v": PROTOCOL_VERSION, "type": <name>, <fields>...}.
A module adds message types by declaring dataclasses whose fields carry specs (`wired`) and
decorating them with `register`; `parse_message` then knows them without being edited:

    @register
    @dataclass(frozen=True, eq=False)
    class ListModels(Message):
        TYPE: ClassVar[str] = "list_models"
        prefix: str = wired(Text(256, min_len=0), default="")

Field policy: every field without a default must be present; unknown fields are refused
(a change of meaning needs a new PROTOCOL_VERSION, never a silently ignored field).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar, TypeVar

from .errors import ErrorCode, WireError, bad_request
from .fields import Spec, decoded_bytes_limit

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

_REGISTRY: dict[str, type[Message]] = {}
_ENVELOPE = ("v", "type")

M = TypeVar("M", bound="type[Message]")


@dataclasses.dataclass(frozen=True, eq=False)
class Message:
    """Base of all messages. Subclasses set TYPE and declare fields with `wired(spec)`.

    Fields are checked when a message is built, so an invalid message cannot be sent, and
    again (plus tensor decoding) when one is parsed. Tensors are encoded with the message's
    `compression` field when it has one, else sent raw.
    """

    TYPE: ClassVar[str] = ""
    _FIELDS: ClassVar[tuple[tuple[str, Spec, bool], ...]] = ()  # (name, spec, required)
    _wire_keys: ClassVar[frozenset[str]] = frozenset(_ENVELOPE)
    _omit_when: ClassVar[dict[str, Any]] = {}  # optional field -> the default it is left out at

    def __post_init__(self) -> None:
        for name, spec, _ in self._FIELDS:
            spec.check(f"{self.TYPE}.{name}", getattr(self, name))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (raise WireError); fields alone are already checked."""

    def to_wire(self) -> dict[str, Any]:
        compression = getattr(self, "compression", "none")
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for name, spec, _ in self._FIELDS:
            value = getattr(self, name)
            if name in self._omit_when and _same(value, self._omit_when[name]):
                continue  # a reader fills in the default: older peers never see newer fields
            out[name] = spec.to_wire(value, compression)
        return out

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Message:
        unknown = d.keys() - cls._wire_keys
        if unknown:
            names = sorted(repr(k)[:40] for k in unknown)[:5]
            raise bad_request(f"{cls.TYPE} has unknown fields {names}")
        values = {}
        for name, spec, required in cls._FIELDS:
            if name in d:
                values[name] = spec.from_wire(f"{cls.TYPE}.{name}", d[name])
            elif required:
                raise bad_request(f"{cls.TYPE} misses field {name!r}")
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        """Field-wise equality; tensors are equal when dtype, shape and values are."""
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f), getattr(other, f)) for f, _, _ in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside


def register(cls: M) -> M:
    """Class decorator: make `parse_message` dispatch maps whose "type" is `cls.TYPE`."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise ValueError(f"message type {cls.TYPE!r} is empty or registered twice")
    fields = []
    omit: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("wire")
        if not isinstance(spec, Spec):
            raise TypeError(f"{cls.__name__}.{f.name} has no wire spec; declare it with wired()")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, spec, required))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if not required and type(default) in _PLAIN:
            omit[f.name] = default
    cls._FIELDS = tuple(fields)
    cls._omit_when = omit
    cls._wire_keys = frozenset(_ENVELOPE) | {name for name, _, _ in fields}
    _REGISTRY[cls.TYPE] = cls
    return cls


_PLAIN = (type(None), bool, int, float, str, list, tuple, dict)


def _same(value: Any, default: Any) -> bool:
    """Equal and of the same plain type (1 is not True; a tensor is never a default)."""
    return type(value) is type(default) and value == default


def message_types() -> dict[str, type[Message]]:
    """The registered types, by wire name (a copy)."""
    return dict(_REGISTRY)


def parse_message(d: object, *, max_decoded: int | None = None) -> Message:
    """The message a decoded frame carries; WireError for anything else.

    `max_decoded` caps the bytes of all its tensors once decoded; receivers pass their frame
    cap (None: no cap, for callers whose limit is not known here): compressed data can
    expand ~7.5x, and is refused with "too_large" before it is allocated."""
    if not isinstance(d, dict):
        raise bad_request(f"a message must be a map, got {type(d).__name__}")
    if "v" not in d:
        raise bad_request("message has no protocol version 'v'")
    version = d["v"]
    if type(version) is not int:
        raise bad_request(f"protocol version must be an integer, got {version!r}"[:200])
    if version not in SUPPORTED_VERSIONS:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (this peer speaks {PROTOCOL_VERSION})",
            {"supported": sorted(SUPPORTED_VERSIONS)},
        )
    if "type" not in d:
        raise bad_request("message has no 'type'")
    kind = d["type"]
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise bad_request(f"unknown message type {kind!r}"[:200])
    with decoded_bytes_limit(max_decoded):
        return cls.from_wire(d)


def _same(a: Any, b: Any) -> bool:
    torch = sys.modules.get("torch")  # never imported: no tensors to compare
    if torch is not None and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    return type(a) is type(b) and a == b
