"""Start and stop peerd daemon processes in tests: parse their printed addresses, always clean up.

    with DaemonGroup(tmp_path) as group:
        boot = group.start("boot", "--new-swarm")
        peer = group.start("a", "--initial-peers", boot.addrs[0], "--test-record", "m@x:0:4")
        ...  # every daemon is stopped (SIGTERM, then SIGKILL) when the block ends

Each daemon costs ~3-4 s of imports on a 2-core machine: share one swarm per test module, and
start daemons together (`spawn` them all, then `wait_ready`) so their imports overlap.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 8.0


class DaemonFailed(RuntimeError):
    pass


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    home: Path
    log_path: Path
    lines: queue.Queue = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    relay_addrs: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Daemon:
        """Read stdout until the "Ready" line; collect the peer id and addresses printed."""
        deadline = time.monotonic() + timeout
        section = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonFailed(
                    f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}"
                )
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise DaemonFailed(
                        f"{self.name} exited with {self.proc.returncode} before it was ready; log:\n{self.log_tail()}"
                    ) from None
                continue
            if line is None:  # stdout closed
                continue
            self.stdout.append(line)
            text = line.strip()
            if text.startswith("Peer id:"):
                self.peer_id = text.split(":", 1)[1].strip()
            elif text.startswith("Listening on"):
                section = self.addrs
            elif text.startswith("Reachable through relays"):
                section = self.relay_addrs
            elif text.startswith("/") and section is not None:
                section.append(text)
            elif text.startswith("Ready"):
                return self
            else:
                section = None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (negative: killed by a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class DaemonGroup:
    """Owns the daemons a test starts; stops every one of them on exit, whatever happened."""

    def __init__(self, root: Path, *, announce_period: float = 2.0) -> None:
        self.root = Path(root)
        self.announce_period = announce_period
        self.daemons: list[Daemon] = []

    def spawn(
        self,
        name: str,
        *args: str,
        netns: str | None = None,
        host: str = "127.0.0.1",
        home: Path | None = None,
    ) -> Daemon:
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / f"{name}-{len(self.daemons)}.log"
        cmd = [
            sys.executable,
            "-m",
            "cli.main",
            "join",
            "--home",
            str(home),
            "--host",
            host,
            "--announce-period",
            str(self.announce_period),
            *args,
        ]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PEERD_INITIAL_PEERS", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
            )
        daemon = Daemon(name=name, proc=proc, home=home, log_path=log_path)
        threading.Thread(target=_pump, args=(proc, daemon.lines), daemon=True).start()
        self.daemons.append(daemon)
        return daemon

    def start(self, name: str, *args: str, **kwargs) -> Daemon:
        return self.spawn(name, *args, **kwargs).wait_ready()

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for d in self.daemons:
            try:
                d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.kill()
            if d.proc.stdout:
                d.proc.stdout.close()

    def __enter__(self) -> DaemonGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.put(line)
    except ValueError:  # closed while reading
        pass
    lines.put(None)


def run_with_node(config, body, *, timeout: float = 60.0):
    """Run an in-process Node (the test's own peer), call `await body(node)`, shut it down."""
    from peerd.node import Node

    async def main():
        node = Node(config, out=None)
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                try:
                    return await body(node)
                finally:
                    await node.shutdown()
                    nursery.cancel_scope.cancel()

    return trio.run(main)


async def wait_for(predicate, *, timeout: float, interval: float = 0.3):
    """Await `predicate()` until it returns something truthy; that value, or None on timeout."""
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(interval)
    return None
