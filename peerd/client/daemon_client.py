"""`DaemonClient`: the synchronous client of a peerd daemon, for any plain script.

from peerd.client import DaemonClient
daemon = DaemonClient()                           # ~/.peerd/peerd.sock or $PEERD_SOCKET
for piece in daemon.generate("path/to/checkpoint", "Hello", max_new_tokens=20, stream=True):
    print(piece, end="", flush=True)
with daemon.session(model, max_length=64) as s:  # research access to hidden states
    out = s.step(hidden)                          # torch tensor [batch, tokens, hidden]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import wire
from peerd.client.connection import Connection, PeerdError
from wire import ErrorCode
from wire import local as api

if TYPE_CHECKING:
    import torch


class DaemonClient:
    """A handle on the daemon; each call uses its own connection, so threads may share it."""

    def __init__(
        self, socket_path: str | os.PathLike | None = None, *, timeout: float = 300.0
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def connect(self) -> Connection:
        return Connection(self.socket_path, timeout=self.timeout)

    def models(self) -> dict[str, Any]:
        """Every model in the swarm: {model_id: {num_blocks, coverage, gaps, servers}}."""
        with self.connect() as conn:
            return conn.request(api.ListModels(), api.ModelList).models

    def generate(
        self,
        model: str,
        prompt: str | Sequence[int],
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        do_sample: bool | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        stop: Sequence[str] = (),
        eos_token_id: Sequence[int] | None = None,
        seed: int | None = None,
        stream: bool = False,
        compression: str = "none",
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
    ) -> Iterator[str] | str:
        """Text (or token ids) in; the continuation's text out, or an iterator of its pieces.

        `model` is a checkpoint directory on the daemon's machine (it holds the embeddings,
        head and tokenizer). Sampling knobs have transformers' meanings; what is left None
        follows the checkpoint's generation_config.json, then transformers' defaults (greedy).
        A temperature given without `do_sample` decides it: > 0 samples, 0 is greedy.
        `eos_token_id` None takes the checkpoint's EOS ids, [] never stops at one; the text
        ends before the first `stop` string found.
        """
        request = api.Generate(
            model=str(model),
            prompt=prompt if isinstance(prompt, str) else None,
            input_ids=None if isinstance(prompt, str) else [int(t) for t in prompt],
            max_new_tokens=max_new_tokens,
            temperature=None if temperature is None else float(temperature),
            top_k=top_k,
            top_p=None if top_p is None else float(top_p),
            repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
            min_p=None if min_p is None else float(min_p),
            do_sample=do_sample,
            num_beams=num_beams,
            length_penalty=None if length_penalty is None else float(length_penalty),
            stop=list(stop),
            eos_token_id=None if eos_token_id is None else [int(t) for t in eos_token_id],
            seed=seed,
            compression=compression,
            allow=list(allow) if allow is not None else None,
            deny=list(deny) if deny is not None else None,
        )
        pieces = self.generate_events(request)
        if stream:
            return (e.text for e in pieces if isinstance(e, api.GeneratedToken) and e.text)
        done = None
        for event in pieces:
            done = event
        assert isinstance(done, api.GenerationDone)
        return done.text

    def generate_events(self, request: api.Generate) -> Iterator[wire.Message]:
        """Every GeneratedToken, then the GenerationDone (with route and recoveries)."""
        with self.connect() as conn:
            yield from conn.stream(request, api.GeneratedToken, api.GenerationDone)

    def session(
        self,
        model: str,
        max_length: int,
        *,
        batch_size: int = 1,
        compression: str = "none",
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
        pad_lengths: Sequence[int] | None = None,
    ) -> ChainSession:
        return ChainSession(
            self,
            str(model),
            max_length,
            batch_size=batch_size,
            compression=compression,
            allow=allow,
            deny=deny,
            pad_lengths=pad_lengths,
        )

    def forward(
        self,
        model: str,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        compression: str = "none",
        keep_trace: bool = False,
    ) -> tuple[torch.Tensor, str | None]:
        """Hidden states through every block of the chain (batched, full sequences)."""
        with self.connect() as conn:
            reply = conn.request(
                api.ChainForward(
                    model=str(model),
                    hidden=hidden,
                    prompts=prompts,
                    compression=compression,
                    keep_trace=keep_trace,
                ),
                api.ChainForwardResult,
            )
        return reply.hidden, reply.trace_id

    def backward(
        self,
        model: str,
        hidden: torch.Tensor,
        grad_out: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        trace_id: str | None = None,
        compression: str = "none",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the chain's input hidden states (and deep prompts)."""
        with self.connect() as conn:
            reply = conn.request(
                api.ChainBackward(
                    model=str(model),
                    hidden=hidden,
                    grad_out=grad_out,
                    prompts=prompts,
                    trace_id=trace_id,
                    compression=compression,
                ),
                api.ChainBackwardResult,
            )
        return reply.grad_hidden, reply.grad_prompts


class ChainSession:
    """An inference chain held open by the daemon: step hidden states through every block.

    `pad_lengths`: left padding of each sequence of the batch (positions never attended to).
    A step too big for one frame of the socket is sent as several along the sequence.
    """

    def __init__(
        self,
        peer: DaemonClient,
        model: str,
        max_length: int,
        *,
        batch_size: int = 1,
        compression: str = "none",
        allow=None,
        deny=None,
        pad_lengths: Sequence[int] | None = None,
    ) -> None:
        try:
            self._request = api.OpenChain(
                model=model,
                max_length=max_length,
                batch_size=batch_size,
                compression=compression,
                allow=list(allow) if allow is not None else None,
                deny=list(deny) if deny is not None else None,
                pad_lengths=[int(p) for p in pad_lengths] if pad_lengths is not None else None,
            )
        except wire.WireError as exc:
            raise PeerdError(exc.code, exc.message) from None
        self._peer = peer
        self.conn: Connection | None = None
        self.chain_id = ""
        self.model_id = ""
        self.num_blocks = 0
        self.route: list[tuple[str, int, int]] = []
        self.recoveries = 0
        self.max_frame = wire.DEFAULT_MAX_FRAME  # the daemon's, from ChainOpened

    def open(self) -> ChainSession:
        self.conn = self._peer.connect()
        try:
            opened = self.conn.request(self._request, api.ChainOpened)
        except BaseException:
            self.conn.close()
            self.conn = None
            raise
        self.chain_id, self.model_id = opened.chain_id, opened.model_id
        self.num_blocks, self.route = opened.num_blocks, list(opened.route)
        self.max_frame = opened.max_frame
        return self

    def step(
        self, hidden: torch.Tensor, reorder: Sequence[int] | None = None, *, retries: int = 0
    ) -> torch.Tensor:
        """[batch, new tokens, hidden] in → hidden states after the last block.

        `reorder` (beam search): row i of every cache becomes row reorder[i] before the step.
        `retries`: times a step that timed out is sent again, with the same request id (the
        daemon applies it once and answers a repeat with the same reply).
        """
        if self.conn is None:
            raise PeerdError(ErrorCode.CLOSED, "the session is not open")
        compression = self._request.compression
        index = [int(i) for i in reorder] if reorder is not None else None
        try:
            per_step = wire.rows_per_frame(
                list(hidden.shape),
                hidden.dtype,
                compression,
                min(self.max_frame, self.conn.max_frame),
            )
            requests = [
                api.ChainStep(
                    chain_id=self.chain_id,
                    hidden=hidden[:, piece],
                    compression=compression,
                    reorder=index if piece.start == 0 else None,
                )
                for piece in wire.cuts(hidden.shape[1], per_step)
            ]
        except wire.WireError as exc:
            raise PeerdError(exc.code, exc.message) from None
        outputs = []
        for request in requests:
            reply = self._request_step(request, retries)
            self.route, self.recoveries = list(reply.route), reply.recoveries
            outputs.append(reply.hidden)
        if len(outputs) == 1:
            return outputs[0]
        import torch  # only a step's tensors need it, and they brought it already

        return torch.cat(outputs, dim=1)

    def _request_step(self, request: api.ChainStep, retries: int) -> api.ChainStepResult:
        assert self.conn is not None
        request_id = None
        while True:
            try:
                return self.conn.request(request, api.ChainStepResult, request_id=request_id)
            except PeerdError as exc:
                if exc.code != ErrorCode.TIMEOUT or retries <= 0 or exc.request_id is None:
                    raise
                retries -= 1
                request_id = exc.request_id

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            self.conn.request(api.CloseChain(chain_id=self.chain_id), api.ChainClosed)
        except (PeerdError, OSError):
            pass
        finally:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> ChainSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
