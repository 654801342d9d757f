"""One compute device, many requests: a priority lock so inference steps jump the queue.

Compute runs in a worker thread (the trio loop never blocks); only one request computes at a
time because torch already uses every core, and a waiting decoding step (latency-bound) goes
before waiting forward/backward batches (throughput-bound).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

INFERENCE = 0
TRAINING = 1


class ComputeQueue:
    """Runs blocking functions in a thread, one at a time, lowest priority number first."""

    def __init__(self) -> None:
        self._busy = False
        self._waiters: list[tuple[int, int, trio.Event]] = []
        self._counter = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def _acquire(self, priority: int) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        event = trio.Event()
        entry = (priority, next(self._counter), event)
        heapq.heappush(self._waiters, entry)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():  # handed the device just as we were cancelled: pass it on
                self._release()
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def _release(self) -> None:
        if self._waiters:
            _, _, event = heapq.heappop(self._waiters)
            event.set()  # ownership passes directly to the next waiter
        else:
            self._busy = False

    async def run(self, priority: int, fn: Callable[[], T], *, wait_timeout: float) -> T:
        """Run `fn` when the device is ours; raise trio.TooSlowError if we waited too long."""
        with trio.fail_after(wait_timeout):
            await self._acquire(priority)
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            self._release()
