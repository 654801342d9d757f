"""Messages of the local Unix-socket API (scripts ↔ their daemon), protocol version 1.

Every request may carry a `request_id` (LocalMessage); replies echo it. Same framing, envelope and tensor codec as the peer RPCs (see rpc.py); any request may be
answered by `Error`. A script opens a chain and steps it, or asks the daemon to generate:

    ListModels -> ModelList
    OpenChain -> ChainOpened;  ChainStep -> ChainStepResult ...;  CloseChain -> ChainClosed
    Generate -> GeneratedToken ... -> GenerationDone     (streamed on the same connection)
    ChainForward -> ChainForwardResult;  ChainBackward -> ChainBackwardResult   (training)

`model` in a request is either a model id from ListModels ("name@fingerprint") or a
checkpoint directory on the daemon's machine: the daemon then loads the client-side parts
(embeddings, final norm, LM head, tokenizer) from it once and serves its fingerprinted id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

from .errors import bad_request
from .fields import (
    BATCH_INDEX,
    COMPRESSION,
    FRAME_BYTES,
    HIDDEN,
    PAD_LENGTHS,
    PROMPTS,
    Flag,
    Int,
    ListOf,
    Maybe,
    PlainMap,
    Spec,
    Text,
    check_batch_list,
    wired,
)
from .framing import DEFAULT_MAX_FRAME
from .schema import Message, register

MODEL_REF = Text(4096)
REQUEST_ID = Int(0, 2**63 - 1)
CHAIN_ID = Text(64)
TRACE_ID = Text(64)


@dataclass(frozen=True, eq=False)
class LocalMessage(Message):
    """Base of the local API's messages: `request_id`, set by a client on a request, comes
    back on every reply to it (Error included), so a client that timed out and sent again
    never takes the previous reply for the new one. Optional: older clients and daemons
    leave it out."""

    request_id: int | None = wired(Maybe(REQUEST_ID), default=None, kw_only=True)


class Float(Spec):
    """A finite float (ints accepted and converted) in [lo, hi]."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def check(self, where: str, value: Any) -> None:
        if (
            type(value) not in (int, float)
            or not math.isfinite(value)
            or not self.lo <= value <= self.hi
        ):
            raise bad_request(f"{where} must be a number in [{self.lo}, {self.hi}], got {value!r}")

    def from_wire(self, where: str, value: Any) -> float:
        self.check(where, value)
        return float(value)


class HopSpec(Spec):
    """One hop of a route: [peer_id, start, end]."""

    def check(self, where: str, value: Any) -> None:
        if (
            type(value) not in (list, tuple)
            or len(value) != 3
            or type(value[0]) is not str
            or type(value[1]) is not int
            or type(value[2]) is not int
        ):
            raise bad_request(f"{where} must be [peer_id, start, end], got {value!r:.80}")

    def from_wire(self, where: str, value: Any) -> Any:
        self.check(where, value)
        return (value[0], value[1], value[2])


PEER_LIST = Maybe(ListOf(Text(128)))
ROUTE = ListOf(HopSpec(), 1 << 16)


@register
@dataclass(frozen=True, eq=False)
class ListModels(LocalMessage):
    TYPE: ClassVar[str] = "list_models"


@register
@dataclass(frozen=True, eq=False)
class ModelList(LocalMessage):
    """{model_id: {"num_blocks", "coverage": [servers per block], "servers": [record maps]}}."""

    TYPE: ClassVar[str] = "model_list"
    models: dict[str, Any] = wired(PlainMap())


@register
@dataclass(frozen=True, eq=False)
class OpenChain(LocalMessage):
    TYPE: ClassVar[str] = "open_chain"
    model: str = wired(MODEL_REF)
    max_length: int = wired(Int(1, 2**20))
    batch_size: int = wired(Int(1, 2**16), default=1)
    compression: str = wired(COMPRESSION, default="none")
    allow: list[str] | None = wired(PEER_LIST, default=None)
    deny: list[str] | None = wired(PEER_LIST, default=None)
    pad_lengths: list[int] | None = wired(PAD_LENGTHS, default=None)

    def validate(self) -> None:
        check_batch_list(f"{self.TYPE}.pad_lengths", self.pad_lengths, self.batch_size)


@register
@dataclass(frozen=True, eq=False)
class ChainOpened(LocalMessage):
    """`max_frame`: the largest frame the daemon reads; a script cuts bigger steps."""

    TYPE: ClassVar[str] = "chain_opened"
    chain_id: str = wired(CHAIN_ID)
    model_id: str = wired(Text(256))
    num_blocks: int = wired(Int(0, 2**16))
    route: list[Any] = wired(ROUTE)
    max_frame: int = wired(FRAME_BYTES, default=DEFAULT_MAX_FRAME)


@register
@dataclass(frozen=True, eq=False)
class ChainStep(LocalMessage):
    """`reorder` gathers every hop's cache rows (beam search) before this step runs."""

    TYPE: ClassVar[str] = "chain_step"
    chain_id: str = wired(CHAIN_ID)
    hidden: torch.Tensor = wired(HIDDEN)
    compression: str = wired(COMPRESSION, default="none")
    reorder: list[int] | None = wired(BATCH_INDEX, default=None)

    def validate(self) -> None:
        check_batch_list(f"{self.TYPE}.reorder", self.reorder, self.hidden.shape[0])


@register
@dataclass(frozen=True, eq=False)
class ChainStepResult(LocalMessage):
    TYPE: ClassVar[str] = "chain_step_result"
    hidden: torch.Tensor = wired(HIDDEN)
    route: list[Any] = wired(ROUTE)
    recoveries: int = wired(Int(0, 2**31), default=0)
    compression: str = wired(COMPRESSION, default="none")


@register
@dataclass(frozen=True, eq=False)
class CloseChain(LocalMessage):
    TYPE: ClassVar[str] = "close_chain"
    chain_id: str = wired(CHAIN_ID)


@register
@dataclass(frozen=True, eq=False)
class ChainClosed(LocalMessage):
    TYPE: ClassVar[str] = "chain_closed"
    chain_id: str = wired(CHAIN_ID)


@register
@dataclass(frozen=True, eq=False)
class Generate(LocalMessage):
    """Generate from text (`prompt`) or token ids (`input_ids`, one row); exactly one of them."""

    TYPE: ClassVar[str] = "generate"
    model: str = wired(MODEL_REF)
    prompt: str | None = wired(Maybe(Text(1 << 20, min_len=0)), default=None)
    input_ids: list[int] | None = wired(Maybe(ListOf(Int(0, 2**31), 1 << 16)), default=None)
    max_new_tokens: int | None = wired(Maybe(Int(1, 1 << 16)), default=None)  # None: see below
    # Sampling knobs with transformers' meanings; None: the checkpoint's generation_config.json,
    # then transformers' defaults. A temperature given without do_sample asks for sampling
    # when > 0 and for greedy decoding when 0 (OpenAI's convention).
    temperature: float | None = wired(Maybe(Float(0.0, 100.0)), default=None)
    top_k: int | None = wired(Maybe(Int(0, 1 << 20)), default=None)
    top_p: float | None = wired(Maybe(Float(0.0, 1.0)), default=None)
    repetition_penalty: float | None = wired(Maybe(Float(1e-3, 100.0)), default=None)
    stop: list[str] = wired(ListOf(Text(256), 64), default_factory=list)
    seed: int | None = wired(Maybe(Int(0, 2**63 - 1)), default=None)
    compression: str = wired(COMPRESSION, default="none")
    allow: list[str] | None = wired(PEER_LIST, default=None)
    deny: list[str] | None = wired(PEER_LIST, default=None)
    do_sample: bool | None = wired(Maybe(Flag()), default=None)
    min_p: float | None = wired(Maybe(Float(0.0, 1.0)), default=None)
    num_beams: int | None = wired(Maybe(Int(1, 64)), default=None)
    length_penalty: float | None = wired(Maybe(Float(-100.0, 100.0)), default=None)
    # None: the checkpoint's EOS ids (generation_config.json); []: never stop at an EOS id
    eos_token_id: list[int] | None = wired(Maybe(ListOf(Int(0, 2**31), 64)), default=None)

    def validate(self) -> None:
        if (self.prompt is None) == (self.input_ids is None):
            raise bad_request("generate needs exactly one of prompt and input_ids")
        if self.input_ids is not None and not self.input_ids:
            raise bad_request("generate.input_ids is empty")
        if self.top_p == 0.0:
            raise bad_request("generate.top_p must be > 0")
        if self.do_sample and self.temperature == 0.0:  # (None is fine: the default applies)
            raise bad_request("generate.temperature must be > 0 when do_sample is true")
        if (self.num_beams or 1) > 1 and self.stop:
            raise bad_request("generate.stop cannot be combined with num_beams > 1")


@register
@dataclass(frozen=True, eq=False)
class GeneratedToken(LocalMessage):
    """One new token; `text` is the decoded text it adds (may be "" mid-character)."""

    TYPE: ClassVar[str] = "generated_token"
    token_id: int = wired(Int(0, 2**31))
    text: str = wired(Text(1 << 16, min_len=0))


@register
@dataclass(frozen=True, eq=False)
class GenerationDone(LocalMessage):
    TYPE: ClassVar[str] = "generation_done"
    token_ids: list[int] = wired(ListOf(Int(0, 2**31), 1 << 16))
    text: str = wired(Text(1 << 22, min_len=0))
    stop_reason: str = wired(Text(16, choices=("length", "eos", "stop")))
    route: list[Any] = wired(ROUTE)
    recoveries: list[Any] = wired(ListOf(PlainMap(), 1024), default_factory=list)


@register
@dataclass(frozen=True, eq=False)
class ChainForward(LocalMessage):
    TYPE: ClassVar[str] = "chain_forward"
    model: str = wired(MODEL_REF)
    hidden: torch.Tensor = wired(HIDDEN)
    prompts: torch.Tensor | None = wired(PROMPTS, default=None)
    compression: str = wired(COMPRESSION, default="none")
    keep_trace: bool = wired(Flag(), default=False)  # only when a backward will follow


@register
@dataclass(frozen=True, eq=False)
class ChainForwardResult(LocalMessage):
    TYPE: ClassVar[str] = "chain_forward_result"
    hidden: torch.Tensor = wired(HIDDEN)
    trace_id: str | None = wired(Maybe(TRACE_ID), default=None)
    compression: str = wired(COMPRESSION, default="none")


@register
@dataclass(frozen=True, eq=False)
class ChainBackward(LocalMessage):
    """Gradients through the chain; with the forward's `trace_id` nothing is recomputed."""

    TYPE: ClassVar[str] = "chain_backward"
    model: str = wired(MODEL_REF)
    hidden: torch.Tensor = wired(HIDDEN)
    grad_out: torch.Tensor = wired(HIDDEN)
    prompts: torch.Tensor | None = wired(PROMPTS, default=None)
    trace_id: str | None = wired(Maybe(TRACE_ID), default=None)
    compression: str = wired(COMPRESSION, default="none")

    def validate(self) -> None:
        if self.grad_out.shape != self.hidden.shape:
            raise bad_request(
                f"chain_backward.grad_out shape {tuple(self.grad_out.shape)} differs from "
                f"hidden shape {tuple(self.hidden.shape)}"
            )


@register
@dataclass(frozen=True, eq=False)
class ChainBackwardResult(LocalMessage):
    TYPE: ClassVar[str] = "chain_backward_result"
    grad_hidden: torch.Tensor = wired(HIDDEN)
    grad_prompts: torch.Tensor | None = wired(PROMPTS, default=None)
    compression: str = wired(COMPRESSION, default="none")
