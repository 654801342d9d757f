"""Running requests on a server's span: every check a request must pass, then the compute.

Shared by inference sessions and stateless forward/backward: the model and block checks,
the tokens-per-request limit, the cast to the compute dtype and device, and the compute
queue with its wait timeout. Outputs go back in the compute dtype (clients send in it too,
SessionOpened.dtype), so a bfloat16 server moves half the bytes of float32 both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import trio

import wire
from blocks import BlockRangeError, BlocksError, InputError, LoadedBlocks
from peerd.server.limits import RequestRefused, ServerLimits, TokenBudget
from peerd.server.priority import TRAINING, ComputeQueue
from wire import ErrorCode


class SpanRunner:
    """Checks requests against one span and its limits; runs them on the compute queue."""

    def __init__(self, span: LoadedBlocks, model_id: str, limits: ServerLimits) -> None:
        self.span = span
        self.model_id = model_id
        self.limits = limits
        self.compute = ComputeQueue()
        self.training = TokenBudget(limits.training_tokens)
        self.requests_served = 0

    @property
    def dtype_name(self) -> str:
        return str(self.span.dtype).removeprefix("torch.")

    def accepts(self) -> dict[str, Any]:
        """What requests this server accepts (InfoResult.limits; SessionOpened has the same)."""
        return {
            "max_frame": self.limits.max_frame,
            "max_tokens": self.limits.max_tokens_per_request,
            "dtype": self.dtype_name,
        }

    # ----- checks -------------------------------------------------------------------
    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise RequestRefused(
                ErrorCode.UNKNOWN_MODEL,
                f"this server serves {self.model_id!r}, not {model_id!r}",
                served=self.model_id,
            )

    def check_interval(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.span.start if start is None else start
        end = self.span.end if end is None else end
        if not (self.span.start <= start < end <= self.span.end):
            raise RequestRefused(
                ErrorCode.OUT_OF_RANGE,
                f"blocks {start}:{end} are not within this server's blocks "
                f"{self.span.start}:{self.span.end}",
                served=[self.span.start, self.span.end],
            )
        return start, end

    def check_tokens(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"hidden states must have shape [batch, tokens, hidden], got {list(hidden.shape)}",
            )
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.limits.max_tokens_per_request:
            raise RequestRefused(
                ErrorCode.TOO_LARGE,
                f"request has {tokens:,} tokens (batch × length), the limit is "
                f"{self.limits.max_tokens_per_request:,}",
            )

    def to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        """In the span's dtype, still in host memory: the copy to the device happens in the
        compute worker (the span's own input check moves it), never on the trio thread."""
        if not tensor.is_floating_point():
            raise RequestRefused(
                ErrorCode.BAD_REQUEST, f"expected floating-point tensor, got {tensor.dtype}"
            )
        try:
            return tensor.to(dtype=self.span.dtype)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            self._free_device_memory()
            raise RequestRefused(
                ErrorCode.BUSY, "server out of memory receiving this request; retry elsewhere"
            ) from None

    async def run(self, priority: int, fn: Callable[[], Any]) -> Any:
        """`fn()` in the compute worker; what it returns comes back in host memory, and on a
        GPU only once its kernels are done, so the compute slot is held for the real work."""

        def work() -> Any:
            return _to_host(fn(), self.span.device)

        try:
            result = await self.compute.run(priority, work, wait_timeout=self.limits.step_timeout)
        except trio.TooSlowError:
            raise RequestRefused(
                ErrorCode.BUSY,
                f"server busy: no compute slot within {self.limits.step_timeout:.0f} s",
            ) from None
        except BlockRangeError as exc:
            raise RequestRefused(ErrorCode.OUT_OF_RANGE, str(exc)) from exc
        except (InputError, BlocksError) as exc:
            raise RequestRefused(ErrorCode.BAD_REQUEST, str(exc)) from exc
        except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            self._free_device_memory()
            raise RequestRefused(
                ErrorCode.BUSY,
                f"server out of memory running this request ({type(exc).__name__}); "
                "retry smaller or elsewhere",
            ) from None
        self.requests_served += 1
        return result

    def _free_device_memory(self) -> None:
        """After an OOM: hand the allocator's cached blocks back, so the next request fits."""
        if self.span.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- stateless forward / backward -----------------------------------------------
    async def forward(self, message: wire.Forward) -> wire.ForwardResult:
        self.check_model(message.model_id)
        start, end = self.check_interval(message.start, message.end)
        self.check_tokens(message.hidden)
        hidden = self.to_compute(message.hidden)
        prompts = None if message.prompts is None else self.to_compute(message.prompts)
        pads = message.pad_lengths
        tokens = message.hidden.shape[0] * message.hidden.shape[1]
        with self.training.hold(tokens, "this forward"):
            output = await self.run(
                TRAINING,
                lambda: self.span.forward(hidden, prompts, start, end, pad_lengths=pads),
            )
        return wire.ForwardResult(hidden=output.cpu(), compression=message.compression)

    async def backward(self, message: wire.Backward) -> wire.BackwardResult:
        self.check_model(message.model_id)
        start, end = self.check_interval(message.start, message.end)
        self.check_tokens(message.hidden)
        if message.grad_out.shape != message.hidden.shape:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"grad_out shape {list(message.grad_out.shape)} differs from hidden shape "
                f"{list(message.hidden.shape)}",
            )
        hidden = self.to_compute(message.hidden)
        grad_out = self.to_compute(message.grad_out)
        prompts = None if message.prompts is None else self.to_compute(message.prompts)
        pads = message.pad_lengths
        tokens = 2 * message.hidden.shape[0] * message.hidden.shape[1]  # recompute + gradients
        with self.training.hold(tokens, "this backward"):
            grad_hidden, grad_prompts = await self.run(
                TRAINING,
                lambda: self.span.backward(hidden, grad_out, prompts, start, end, pad_lengths=pads),
            )
        return wire.BackwardResult(
            grad_hidden=grad_hidden.cpu(),
            grad_prompts=None if grad_prompts is None else grad_prompts.cpu(),
            compression=message.compression,
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors torch and Python raise when an allocation fails (CPU or CUDA)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _to_host(result: Any, device: torch.device) -> Any:
    """Tensors (alone or in a tuple) copied to host memory; waits for a GPU's queued kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if isinstance(result, torch.Tensor):
        return result.cpu()
    if isinstance(result, tuple):
        return tuple(r.cpu() if isinstance(r, torch.Tensor) else r for r in result)
    return result
