"""Messages servers and clients say to each other (server RPCs), protocol version 1.

Inference runs on one long-lived stream per session:
    OpenSession -> SessionOpened, then Step -> StepResult ..., then CloseSession.
After a server failure the client replays the inputs it cached for that span to the
replacement as ordinary Steps with replay=True, which rebuild its KV cache.
Stateless calls: Forward -> ForwardResult, Backward -> BackwardResult, Info -> InfoResult,
Ping -> Pong. Any request may be answered by Error.

Blocks are half-open intervals [start, end). `compression` names how the tensors of a
message travel ("none", "float16", "int8"); a reply uses the request's (or session's).
Hidden states are (batch, sequence, hidden) floating tensors; a server answers in its compute
dtype (SessionOpened.dtype, InfoResult.limits["dtype"]), and a client sends in it.

A request must fit the smaller of the sender's and the receiver's frame limit
(SessionOpened.max_frame, InfoResult.limits): senders cut big steps along the sequence and
big forward/backward requests along the batch (wire.sizing).

Left padding: `pad_lengths[i]` positions at the start of sequence i are padding, never
attended to. `Step.reorder` (beam search) gathers the session's cache rows by that index
before the step is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ErrorCode, WireError, bad_request
from .fields import (
    BATCH_INDEX,
    BLOCK,
    COMPRESSION,
    COMPUTE_DTYPE,
    COUNTER,
    FRAME_BYTES,
    HIDDEN,
    MODEL_ID,
    PAD_LENGTHS,
    PROMPTS,
    SESSION_ID,
    UINT64_MAX,
    Flag,
    Int,
    Maybe,
    PlainMap,
    TensorSpec,
    Text,
    check_batch_list,
    wired,
)
from .framing import DEFAULT_MAX_FRAME
from .schema import Message, register

if TYPE_CHECKING:
    import torch

MAX_LENGTH = 2**20
"""Largest max_length (tokens) an OpenSession may ask for."""
MAX_BATCH = 2**16
MAX_ERROR_MESSAGE = 4096
"""Longer Error.message strings are cut to this many characters (sending or receiving)."""


def _check_interval(msg: Any) -> None:
    if msg.end <= msg.start:
        raise bad_request(f"{msg.TYPE}: block interval [{msg.start}, {msg.end}) is empty")


@register
@dataclass(frozen=True, eq=False)
class OpenSession(Message):
    """Reserve a KV cache for blocks [start, end) of `model_id`; the stream is the session."""

    TYPE: ClassVar[str] = "open_session"
    model_id: str = wired(MODEL_ID)
    start: int = wired(BLOCK)
    end: int = wired(BLOCK)
    max_length: int = wired(Int(1, MAX_LENGTH))
    batch_size: int = wired(Int(1, MAX_BATCH))
    compression: str = wired(COMPRESSION)
    session_id: str = wired(SESSION_ID)
    pad_lengths: list[int] | None = wired(PAD_LENGTHS, default=None)

    def validate(self) -> None:
        _check_interval(self)
        check_batch_list(f"{self.TYPE}.pad_lengths", self.pad_lengths, self.batch_size)


@register
@dataclass(frozen=True, eq=False)
class SessionOpened(Message):
    """The session is ready; the server's limits and compute dtype come with it (peers that
    predate these fields are taken to have the default frame limit and float32)."""

    TYPE: ClassVar[str] = "session_opened"
    session_id: str = wired(SESSION_ID)
    start: int = wired(BLOCK)
    end: int = wired(BLOCK)
    free_cache_tokens: int = wired(COUNTER)
    max_frame: int = wired(FRAME_BYTES, default=DEFAULT_MAX_FRAME)
    max_tokens: int | None = wired(Maybe(COUNTER), default=None)
    dtype: str = wired(COMPUTE_DTYPE, default="float32")

    def validate(self) -> None:
        _check_interval(self)


@register
@dataclass(frozen=True, eq=False)
class Step(Message):
    """One incremental step; start/end, when set, narrow the session's blocks for this step.

    `position`, when set, is the number of tokens the sender believes the session's cache
    holds before this step; a server whose cache length differs refuses with `out_of_step`
    (older clients leave it out and are not checked)."""

    TYPE: ClassVar[str] = "step"
    hidden: torch.Tensor = wired(HIDDEN)
    step_id: int = wired(COUNTER)
    start: int | None = wired(Maybe(BLOCK), default=None)
    end: int | None = wired(Maybe(BLOCK), default=None)
    replay: bool = wired(Flag(), default=False)
    compression: str = wired(COMPRESSION, default="none")
    reorder: list[int] | None = wired(BATCH_INDEX, default=None)
    position: int | None = wired(Maybe(COUNTER), default=None)

    def validate(self) -> None:
        if self.start is not None and self.end is not None:
            _check_interval(self)
        batch = self.hidden.shape[0]
        check_batch_list(f"{self.TYPE}.reorder", self.reorder, batch)
        if self.reorder is not None and any(i >= batch for i in self.reorder):
            raise bad_request(f"{self.TYPE}.reorder has an index outside the batch of {batch}")


@register
@dataclass(frozen=True, eq=False)
class StepResult(Message):
    TYPE: ClassVar[str] = "step_result"
    hidden: torch.Tensor = wired(HIDDEN)
    step_id: int = wired(COUNTER)
    cache_length: int = wired(COUNTER)
    compression: str = wired(COMPRESSION, default="none")


@register
@dataclass(frozen=True, eq=False)
class CloseSession(Message):
    TYPE: ClassVar[str] = "close_session"


@register
@dataclass(frozen=True, eq=False)
class Forward(Message):
    """Stateless forward through blocks [start, end) (training, or inference without cache)."""

    TYPE: ClassVar[str] = "forward"
    model_id: str = wired(MODEL_ID)
    start: int = wired(BLOCK)
    end: int = wired(BLOCK)
    hidden: torch.Tensor = wired(HIDDEN)
    prompts: torch.Tensor | None = wired(PROMPTS, default=None)
    compression: str = wired(COMPRESSION, default="none")
    pad_lengths: list[int] | None = wired(PAD_LENGTHS, default=None)

    def validate(self) -> None:
        _check_interval(self)
        check_batch_list(f"{self.TYPE}.pad_lengths", self.pad_lengths, self.hidden.shape[0])


@register
@dataclass(frozen=True, eq=False)
class ForwardResult(Message):
    TYPE: ClassVar[str] = "forward_result"
    hidden: torch.Tensor = wired(HIDDEN)
    compression: str = wired(COMPRESSION, default="none")


@register
@dataclass(frozen=True, eq=False)
class Backward(Message):
    """Gradients w.r.t. the span's inputs (and prompts) given the gradient of its output."""

    TYPE: ClassVar[str] = "backward"
    model_id: str = wired(MODEL_ID)
    start: int = wired(BLOCK)
    end: int = wired(BLOCK)
    hidden: torch.Tensor = wired(HIDDEN)
    grad_out: torch.Tensor = wired(HIDDEN)
    prompts: torch.Tensor | None = wired(PROMPTS, default=None)
    compression: str = wired(COMPRESSION, default="none")
    pad_lengths: list[int] | None = wired(PAD_LENGTHS, default=None)

    def validate(self) -> None:
        _check_interval(self)
        if self.grad_out.shape != self.hidden.shape:
            raise bad_request(
                f"backward.grad_out shape {tuple(self.grad_out.shape)} differs from "
                f"hidden shape {tuple(self.hidden.shape)}"
            )
        check_batch_list(f"{self.TYPE}.pad_lengths", self.pad_lengths, self.hidden.shape[0])


@register
@dataclass(frozen=True, eq=False)
class BackwardResult(Message):
    TYPE: ClassVar[str] = "backward_result"
    grad_hidden: torch.Tensor = wired(HIDDEN)
    grad_prompts: torch.Tensor | None = wired(Maybe(TensorSpec(floating=True)), default=None)
    compression: str = wired(COMPRESSION, default="none")


@register
@dataclass(frozen=True, eq=False)
class Info(Message):
    TYPE: ClassVar[str] = "info"


@register
@dataclass(frozen=True, eq=False)
class InfoResult(Message):
    """The server's announced record, its current load and what requests it accepts, as plain
    maps; `limits` has "max_frame", "max_tokens" and "dtype" (its compute dtype)."""

    TYPE: ClassVar[str] = "info_result"
    record: dict[str, Any] = wired(PlainMap())
    load: dict[str, Any] = wired(PlainMap())
    limits: dict[str, Any] = wired(PlainMap(), default_factory=dict)


@register
@dataclass(frozen=True, eq=False)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    nonce: int = wired(Int(0, UINT64_MAX))


@register
@dataclass(frozen=True, eq=False)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    nonce: int = wired(Int(0, UINT64_MAX))


@register
@dataclass(frozen=True, eq=False)
class Error(Message):
    """A structured failure. `code` is usually an ErrorCode; a peer must accept codes it does
    not know (newer peers may add some) and treat them as generic failures."""

    TYPE: ClassVar[str] = "error"
    code: str = wired(Text(64, pattern=r"[a-z][a-z0-9_]*"))
    message: str = wired(Text(MAX_ERROR_MESSAGE, min_len=0))
    details: dict[str, Any] = wired(PlainMap(), default_factory=dict)
    request_id: int | None = wired(Maybe(COUNTER), default=None)
    """On the local socket: the id of the request this answers (wire.local.LocalMessage)."""

    def __post_init__(self) -> None:
        if isinstance(self.code, ErrorCode):  # members travel as the plain strings they are
            object.__setattr__(self, "code", self.code.value)
        # an error report must not fail for being long: cut it instead of refusing it
        if isinstance(self.message, str) and len(self.message) > MAX_ERROR_MESSAGE:
            object.__setattr__(self, "message", self.message[: MAX_ERROR_MESSAGE - 3] + "...")
        super().__post_init__()

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error:
        """The Error to send for `exc`: its own code for a WireError, else "internal"."""
        if isinstance(exc, WireError):
            return cls(exc.code, exc.message, exc.details)
        return cls(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def to_exception(self) -> WireError:
        """This error as a raisable WireError (what a client raises on receiving it)."""
        return WireError(self.code, self.message, self.details)
