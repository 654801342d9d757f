"""Starting and stopping peerd daemons as child processes, for the demo.

A daemon says it is ready, and what it serves, in its ready file (`peerd.ready`); nothing
here reads its output. Every process a `DaemonGroup` started is stopped when the group
closes (SIGTERM, then SIGKILL), whatever happened — and only those processes, by their PID.
The test and benchmark harness (tests/launcher.py) builds on these classes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.ready import ReadyInfo, read_ready

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 8.0
POLL_SECONDS = 0.1


class DaemonFailed(RuntimeError):
    """A daemon exited or stayed silent before it was ready; the message has its log's tail."""


@dataclass
class DaemonProcess:
    name: str
    proc: subprocess.Popen
    home: Path
    log_path: Path
    info: ReadyInfo | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def peer_id(self) -> str:
        return self._info().peer_id

    @property
    def addrs(self) -> list[str]:
        return self._info().addrs

    @property
    def relay_addrs(self) -> list[str]:
        return self._info().relay_addrs

    @property
    def socket(self) -> Path:
        return Path(self._info().socket) if self.info else self.home / "peerd.sock"

    def _info(self) -> ReadyInfo:
        if self.info is None:
            raise DaemonFailed(f"{self.name} is not ready yet: call wait_ready() first")
        return self.info

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def printed(self) -> str:
        """What the daemon printed for its user (the banner); for people, not for parsing."""
        try:
            return self.log_path.with_suffix(".out").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:]) or "(empty log)"

    def wait_for(
        self, what: str, check: Callable[[ReadyInfo], bool], timeout: float = READY_TIMEOUT
    ) -> DaemonProcess:
        """Poll the ready file until `check(info)` holds; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            info = read_ready(self.home)
            if info is not None and info.pid == self.pid and check(info):
                self.info = info
                return self
            if self.proc.poll() is not None:
                raise DaemonFailed(
                    f"{self.name} exited with {self.proc.returncode} before {what}; "
                    f"log:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DaemonFailed(
                    f"{self.name}: not {what} after {timeout:.0f} s; log:\n{self.log_tail()}"
                )
            time.sleep(POLL_SECONDS)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> DaemonProcess:
        """Until the node joined the swarm and the local socket listens."""
        return self.wait_for("ready", lambda info: True, timeout)

    def wait_online(self, timeout: float = READY_TIMEOUT) -> DaemonProcess:
        """Until the daemon serves its blocks (`peerd serve` only)."""
        return self.wait_for(
            "online",
            lambda info: bool(info.serving) and info.serving.get("state") == "ONLINE",
            timeout,
        )

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
        """SIGKILL: a crash, as far as the swarm can tell."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class DaemonGroup:
    """Owns the daemons it starts; stops every one of them on exit."""

    def __init__(self, root: Path, *, announce_period: float = 2.0) -> None:
        self.root = Path(root)
        self.announce_period = announce_period
        self.daemons: list[DaemonProcess] = []

    def command(
        self,
        command: str,
        home: Path,
        host: str,
        args: Sequence[str],
        interpreter: Sequence[str] = (),
    ) -> list[str]:
        return [
            *(interpreter or [sys.executable]),
            "-m",
            "cli.main",
            command,
            "--home",
            str(home),
            "--host",
            host,
            "--announce-period",
            str(self.announce_period),
            *args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PEERD_INITIAL_PEERS", None)
        env.pop("PEERD_HOME", None)
        return env

    def spawn(
        self,
        name: str,
        *args: str,
        command: str = "join",
        host: str = "127.0.0.1",
        home: Path | None = None,
        prefix: Sequence[str] = (),
        interpreter: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> DaemonProcess:
        """Start `peerd <command> ...` with its own home under the group's root (`prefix`:
        a command that runs it, such as `ip netns exec NAME`)."""
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log_path = home / f"{name}-{len(self.daemons)}.log"
        cmd = [*prefix, *self.command(command, home, host, args, interpreter)]
        with open(log_path, "wb") as log, open(log_path.with_suffix(".out"), "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                cwd=cwd,
            )
        daemon = DaemonProcess(name=name, proc=proc, home=home, log_path=log_path)
        self.daemons.append(daemon)
        return daemon

    def start(self, name: str, *args: str, **kwargs: Any) -> DaemonProcess:
        return self.spawn(name, *args, **kwargs).wait_ready()

    def start_servers(
        self, model_dir: Path, intervals: dict[str, str], bootstrap: DaemonProcess, *extra: str
    ) -> dict[str, DaemonProcess]:
        """`peerd serve` one daemon per {name: "A:B"} (started together), until each is online."""
        servers = {
            name: self.spawn(
                name,
                str(model_dir),
                "--blocks",
                blocks,
                "--initial-peers",
                bootstrap.addrs[0],
                "--rebalance-period",
                "0",
                *extra,
                command="serve",
            )
            for name, blocks in intervals.items()
        }
        for daemon in servers.values():
            daemon.wait_online()
        return servers

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

    def __enter__(self) -> DaemonGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until_listed(client, servers: int, timeout: float = 60.0) -> None:
    """Wait until `client` (a peerd.client handle) lists `servers` ONLINE servers of one model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = client.models()
        if any(
            sum(s["state"] == "ONLINE" for s in m["servers"]) >= servers for m in models.values()
        ):
            return
        time.sleep(0.5)
    raise DaemonFailed(f"fewer than {servers} servers listed ONLINE after {timeout:.0f} s")
