"""The harness tests and benchmarks start real daemons with (one copy, shared by both).

It is the demo's process launcher (`peerd.demo.processes`) plus what only a harness needs:
daemons run from this checkout (even from a git worktree), with one compute thread each so
that many fit a small machine, optionally inside a network namespace.

    with HarnessGroup(tmp_path) as group:
        boot = group.start("boot", "--new-swarm")
        servers = group.start_servers(model_dir, {"a": "0:4", "b": "4:8"}, boot)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from peerd.demo.processes import (
    READY_TIMEOUT,
    DaemonFailed,
    DaemonGroup,
    DaemonProcess,
    wait_until_listed,
)

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO",
    "DaemonFailed",
    "DaemonProcess",
    "HarnessGroup",
    "wait_for_log",
    "wait_until_listed",
]


class HarnessGroup(DaemonGroup):
    """A DaemonGroup for tests and benchmarks: checkout code, thread limits, network namespaces."""

    def __init__(
        self, root: Path, *, announce_period: float = 2.0, threads: int | None = 1
    ) -> None:
        super().__init__(root, announce_period=announce_period)
        self.threads = threads

    def spawn(
        self, name: str, *args: str, netns: str | None = None, **kwargs: Any
    ) -> DaemonProcess:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        return super().spawn(name, *args, prefix=prefix, cwd=REPO, **kwargs)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        if self.threads is not None:  # many daemons on one small machine: don't oversubscribe
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return env


def wait_for_log(daemon: DaemonProcess, needle: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the daemon's log contains `needle` (for tests of what a daemon logs)."""
    deadline = time.monotonic() + timeout
    while needle not in daemon.log_text():
        if daemon.proc.poll() is not None:
            raise DaemonFailed(
                f"{daemon.name} exited with {daemon.proc.returncode}; log:\n{daemon.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DaemonFailed(
                f"{daemon.name}: no {needle!r} after {timeout:.0f} s; log:\n{daemon.log_tail()}"
            )
        time.sleep(0.2)
